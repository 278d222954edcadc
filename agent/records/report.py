"""Run report: `report.html` plus PNG plots for any run directory, laid out per plan.

The plan that wrote the run (its config snapshot's `kind`) picks the report module in
`agent.records.reports`; each puts its headline result first and leaves out the
sections its run recorded nothing for. Reads only what the run wrote, so a crashed run
or a run without ground truth still gets a report, and one cut short says so.
"""

from __future__ import annotations

from pathlib import Path

from agent.records.reports import builder_for
from agent.records.reports.page import render_page
from agent.records.reports.run_data import RunData, load_run

__all__ = ["REPORT_NAME", "RunData", "load_run", "write_report"]

REPORT_NAME = "report.html"


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` and its PNG plots; return the HTML path.

    Raises ValueError (one line, naming the path) if `run_dir` is not a run directory.
    """
    run = load_run(Path(run_dir))
    report = builder_for(run.kind)(run)
    path = run.run_dir / REPORT_NAME
    path.write_text(render_page(run, report), encoding="utf-8")
    return path
