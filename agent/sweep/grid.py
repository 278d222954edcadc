"""Sweep points: the cartesian product of `--grid key=v1,v2` axes times seeds.

A point is identified by its setting and seed alone, so re-running the same sweep finds
the points already finished (resume) whatever order they ran in.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

import yaml

from agent.config import ConfigError


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


def sweep_points(axes: list[GridAxis], seeds: list[int]) -> list[SweepPoint]:
    settings = itertools.product(*[[(a.key, v) for v in a.values] for a in axes])
    return [SweepPoint(tuple(s), seed) for s in settings for seed in seeds]
