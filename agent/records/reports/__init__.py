"""Reports per plan: one module per plan kind builds its sections, `page` lays them out.

A module here exposes `build(run: RunData) -> PlanReport`; adding a plan's report is one
module and one line in `PLAN_REPORTS` (keyed by the config snapshot's `kind`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from agent.records.reports.page import PlanReport
from agent.records.reports.run_data import RunData

PLAN_REPORTS: dict[str, str] = {
    "feedback-trap": "agent.records.reports.feedback",
    "smart-acquisition": "agent.records.reports.smart_acquisition",
    "spm-active": "agent.records.reports.spm",
}


def generic(run: RunData) -> PlanReport:
    """A plan without a report of its own: its summary and config, said so up front."""
    return PlanReport(f"Plan {run.kind!r} has no report of its own: its summary and config.")


def builder_for(kind: str) -> Callable[[RunData], PlanReport]:
    if kind not in PLAN_REPORTS:
        return generic
    return importlib.import_module(PLAN_REPORTS[kind]).build
