"""Which code runs a config: `scopeloop run` and `scopeloop train` look up the YAML's
top-level `kind` here, so every experiment and trainer has one entry point.

Entries are "module:function" strings, imported only when used (CLI start stays fast).
A new plan is its module in `agent/plans/` and one line in `PLANS`.
A run entry is `fn(config_path: Path, overrides: list[str], console) -> dict` (the
summary); a train entry has the same signature and returns the training summary.
Both raise `agent.config.ConfigError` for a config they cannot run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config import ConfigError, read_config_mapping

DEFAULT_RUN_KIND = "feedback-trap"

# One line per plan: its run entry and its config loader `(path, overrides) -> model`
# (ConfigError on bad input), so a caller can check a config before running it
# (`scopeloop sweep` checks every point).
PLANS: dict[str, tuple[str, str]] = {
    "feedback-trap": ("agent.plans.feedback_trap:run_feedback_trap", "agent.config:load_config"),
    "smart-acquisition": (
        "agent.plans.smart_acquisition:run_smart_acquisition",
        "agent.plans.smart_acquisition:load_smart_config",
    ),
    "spm-active": (
        "agent.plans.spm_active:run_spm_active",
        "agent.plans.spm_active:load_spm_config",
    ),
}
RUN_KINDS: dict[str, str] = {kind: entry for kind, (entry, _) in PLANS.items()}
RUN_CONFIG_LOADERS: dict[str, str] = {kind: loader for kind, (_, loader) in PLANS.items()}

TRAIN_KINDS: dict[str, str] = {
    "spm-segmenter": "agent.training.spm_segmenter:train_spm_segmenter",
    "rl": "agent.training.rl:train_entry",
    "calibration-estimator": "agent.training.calibration:train_calibration",
    "optical-force": "agent.training.optics:train_optical_force",
}

EntryFn = Callable[..., dict[str, Any]]


def peek_kind(path: Path, default: str | None) -> str:
    """The config's top-level `kind` (before full validation, which is the entry's job)."""
    raw = read_config_mapping(path)
    kind = raw.get("kind", default)
    if kind is None:
        raise ConfigError(f"config error: kind: missing (one of {sorted(TRAIN_KINDS)})")
    return str(kind)


def resolve(kind: str, table: dict[str, str]) -> EntryFn:
    if kind not in table:
        raise ConfigError(f"config error: kind: must be one of {sorted(table)} (got {kind!r})")
    module_name, _, attr = table[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)


def validate_run_config(path: Path, overrides: list[str]) -> Any:
    """The run config as its kind's loader validates it (ConfigError, one line per problem)."""
    loader = resolve(peek_kind(path, DEFAULT_RUN_KIND), RUN_CONFIG_LOADERS)
    return loader(path, overrides)
