"""Locators: which run's telemetry the dashboard should be attached to right now."""

from __future__ import annotations

import time
from pathlib import Path

from agent.dashboard.hub import Locator
from agent.engine.telemetry import TelemetryInfo, find_live_run, read_telemetry_info


def fixed_run(run_dir: Path) -> Locator:
    """Always this run (its state shows `stopped` once it has ended)."""

    def locate() -> TelemetryInfo | None:
        return read_telemetry_info(run_dir)

    return locate


def newest_live_run(runs_dir: Path, since_wall: float = 0.0) -> Locator:
    """The newest live run under runs_dir started after since_wall; the last one found
    stays attached after it ends, until a newer one starts."""
    last: list[TelemetryInfo] = []

    def locate() -> TelemetryInfo | None:
        info = find_live_run(runs_dir, since_wall)
        if info is not None:
            last[:] = [info]
            return info
        return read_telemetry_info(last[0].run_dir) if last else None

    return locate


def runs_started_from_now(runs_dir: Path) -> Locator:
    """For `run --dashboard`: only runs this command starts (1 s of clock slack)."""
    return newest_live_run(runs_dir, time.time() - 1.0)
