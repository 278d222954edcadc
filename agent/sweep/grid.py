"""Sweep points: the cartesian product of `--grid key=v1,v2` axes times seeds.

A point is identified by its setting and seed alone, so re-running the same sweep finds
the points already finished (resume) whatever order they ran in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.config import ConfigError

PointResult = dict[str, Any]  # one finished (or failed) run: a row of the sweep's table


@dataclass(frozen=True)
class GridAxis:
    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class SweepPoint:
    setting: tuple[tuple[str, Any], ...]  # (dotted key, value) per axis, in axis order
    seed: int

    @property
    def label(self) -> str:
        """The setting without the seed: points that differ only in seed share it."""
        return ",".join(f"{k}={v}" for k, v in self.setting) or "(base)"

    @property
    def point_id(self) -> str:
        text = json.dumps([list(self.setting), self.seed], sort_keys=True, default=str)
        return "p-" + hashlib.sha1(text.encode()).hexdigest()[:12]

    def overrides(self) -> list[str]:
        """`--set` pairs for this point (values as JSON, which YAML reads back, so a
        string that looks like a number stays a string)."""
        return [*(f"{k}={json.dumps(v)}" for k, v in self.setting), f"seed={self.seed}"]


def parse_grid(items: list[str]) -> list[GridAxis]:
    """`dotted.key=v1,v2,...` items into axes; values parsed as YAML scalars."""
    axes: list[GridAxis] = []
    seen: set[str] = set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"sweep: --grid {item!r}: expected dotted.key=v1,v2,...")
        if key == "seed":
            raise ConfigError("sweep: --grid seed: use --seeds N for seeds")
        if key in seen:
            raise ConfigError(f"sweep: --grid {key}: given twice")
        seen.add(key)
        values = tuple(_parse_value(key, part) for part in text.split(","))
        axes.append(GridAxis(key, values))
    return axes


def _parse_value(key: str, text: str) -> Any:
    text = text.strip()
    if not text:
        raise ConfigError(f"sweep: --grid {key}: empty value in the list")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"sweep: --grid {key}: {text!r} is not a value") from None


Setting = tuple[tuple[str, Any], ...]


def read_settings_file(path: Path) -> list[Setting]:
    """A YAML list of settings, each a mapping of dotted keys to values: for values that
    go together (a microscope's endpoint and its server key), not a product."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"sweep: --settings {path}: cannot read ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"sweep: --settings {path}: expected a non-empty list of mappings")
    settings = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not item or not all(isinstance(k, str) for k in item):
            raise ConfigError(f"sweep: --settings {path}: entry {i} must map dotted keys to values")
        if "seed" in item:
            raise ConfigError(f"sweep: --settings {path}: entry {i}: use --seeds N for seeds")
        settings.append(tuple(item.items()))
    return settings


def sweep_points(
    axes: list[GridAxis], seeds: list[int], settings: list[Setting] | None = None
) -> list[SweepPoint]:
    """(each listed setting) x (the grid's product) x seeds."""
    grid = [tuple(g) for g in itertools.product(*[[(a.key, v) for v in a.values] for a in axes])]
    combined = [base + g for base in (settings or [()]) for g in grid]
    return [SweepPoint(s, seed) for s in combined for seed in seeds]
