"""The page every plan's report shares: headline first, then the plan's sections.

A plan's report module returns a `PlanReport` (headline, sections, what it left out
and why); this lays it out as one self-contained `report.html` (PNGs next to it, by
relative path), with the run's end note, driver faults, summary and config snapshot.
A section with nothing recorded is left out, named once in a footnote.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

from agent.records.reports.run_data import RunData

CSS = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f4f4f4;font-weight:normal}td{font-family:monospace}
img{max-width:100%;border:1px solid #ddd}.warning{color:#a33;font-style:italic}
.headline{font-size:1.25em;background:#eef5ee;border-left:6px solid #4a4;padding:.6em 1em}
.left-out{color:#777;font-size:.9em}pre{background:#f7f7f7;padding:1em;overflow:auto}
"""
DRIVER_FAULT_KINDS = ("driver_down", "driver_resumed", "driver_lost")


@dataclass(frozen=True)
class Section:
    title: str
    body: str  # HTML


@dataclass
class PlanReport:
    """What a plan's report module hands the page."""

    headline: str  # plain text: the run's result, first thing on the page
    sections: list[Section] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # "title (what was not recorded)"

    def figure(self, title: str, image: str | None, caption: str, missing: str) -> None:
        """A plot section, or a footnote saying what it lacked when `image` is None."""
        if image is None:
            self.left_out.append(f"{title} ({missing})")
            return
        body = f'<p>{html.escape(caption)}</p><img src="{html.escape(image)}" alt="{title}">'
        self.sections.append(Section(title, body))


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) < 200 else text[:197] + "..."
    return str(value)


def table(head: list[str], rows: list[list[Any]]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def _summary_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>"
        for k, v in summary.items()
    )
    return f"<table>{rows}</table>"


def driver_faults(run: RunData) -> Section | None:
    """The driver going down, coming back or lost, per phase (agent/engine/driver_faults.py)."""
    rows = []
    for phase in run.phases:
        events = run.events[phase]
        t0 = next((float(e["wall_time"]) for e in events if "wall_time" in e), 0.0)
        for e in events:
            if e.get("kind") in DRIVER_FAULT_KINDS:
                down = f"{e['down_ms']:.0f} ms" if "down_ms" in e else ""
                at = f"{float(e['wall_time']) - t0:.2f} s"
                rows.append([phase, at, e["kind"], e.get("reason", ""), down])
    if not rows:
        return None
    return Section("Driver faults", table(["phase", "at", "event", "reason", "down for"], rows))


def render_page(run: RunData, report: PlanReport) -> str:
    """The whole HTML page for one run."""
    name = (run.summary or {}).get("name") or run.config.get("name") or run.run_dir.name
    note = run.end_note()
    end_html = f'<p class="warning">{html.escape(note[0].upper() + note[1:])}</p>' if note else ""
    sections = list(report.sections)
    faults = driver_faults(run)
    if faults is not None:
        sections.append(faults)
    if run.summary is not None:
        sections.append(Section("Summary", _summary_table(run.summary)))
    if run.config_text is not None:
        sections.append(
            Section(
                "Configuration",
                "<details><summary>config.yaml</summary>"
                f"<pre>{html.escape(run.config_text)}</pre></details>",
            )
        )
    body = "".join(f"<h2>{html.escape(s.title)}</h2>{s.body}" for s in sections)
    left_out = (
        f'<p class="left-out">Left out, nothing recorded for them: '
        f"{html.escape('; '.join(report.left_out))}.</p>"
        if report.left_out
        else ""
    )
    phases = ", ".join(f"{p} ({len(run.events[p])} records)" for p in run.phases) or "none"
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>scopeloop run {html.escape(str(name))}</title><style>{CSS}</style></head>"
        f"<body><h1>Run {html.escape(str(name))}</h1>"
        f'<p class="headline">{html.escape(report.headline)}</p>{end_html}'
        f"<p>Plan: {html.escape(run.kind)}<br>Directory: <code>{html.escape(str(run.run_dir))}"
        f"</code><br>Event logs: {html.escape(phases)}</p>"
        f"{body}{left_out}</body></html>\n"
    )
