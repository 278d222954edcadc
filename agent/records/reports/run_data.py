"""One run directory read back: what every plan's report (and replay) reads.

Reads only what the run wrote (`summary.json`, `config.yaml`, `events-<phase>.jsonl`,
`truth-<phase>.jsonl`, the frame recording); never the instrument or its twin. A run
whose records stop early (killed: a log never closed, no summary; or ended by a fault
the summary names) says so (`RunData.end_note`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from agent.records.frame_recording import FRAMES_NAME, read_recording, recording_exists
from agent.records.recorder import read_events, read_log

PHASE_ORDER = ("feedback", "free")
# A run without a readable config snapshot: its plan from the event log it left.
KIND_BY_LOG = {"smart": "smart-acquisition", "spm": "spm-active"}
DEFAULT_KIND = "feedback-trap"


class RunData:
    """Everything a report or replay reads from one run directory."""

    def __init__(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        event_files = sorted(run_dir.glob("events-*.jsonl")) if run_dir.is_dir() else []
        phase_files = [p for p in event_files if p.stem != "events-training"]
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file() and not phase_files:
            raise ValueError(
                f"{run_dir} is not a run directory (no summary.json, no events-*.jsonl)"
            )
        self.summary: dict[str, Any] | None = None
        if summary_path.is_file():
            try:
                self.summary = json.loads(summary_path.read_text())
            except json.JSONDecodeError:
                self.summary = None
        config_path = run_dir / "config.yaml"
        self.config_text = config_path.read_text() if config_path.is_file() else None
        names = [p.stem.removeprefix("events-") for p in phase_files]
        names.sort(key=lambda n: (PHASE_ORDER.index(n) if n in PHASE_ORDER else 99, n))
        logs = {n: read_log(run_dir / f"events-{n}.jsonl") for n in names}
        self.events: dict[str, list[dict[str, Any]]] = {n: log.events for n, log in logs.items()}
        self.closed: dict[str, bool] = {n: log.closed for n, log in logs.items()}
        self.truth: dict[str, list[dict[str, Any]]] = {}
        for n in names:
            path = run_dir / f"truth-{n}.jsonl"
            records = read_events(path) if path.is_file() else []
            if records:
                self.truth[n] = records

    @property
    def config(self) -> dict[str, Any]:
        """The config snapshot as a mapping ({} when missing or unreadable)."""
        try:
            data = yaml.safe_load(self.config_text or "")
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    @property
    def kind(self) -> str:
        """The plan that wrote this run: the snapshot's `kind`, else told by its logs."""
        kind = self.config.get("kind") or (self.summary or {}).get("kind")
        if isinstance(kind, str):
            return kind
        return next((KIND_BY_LOG[n] for n in self.events if n in KIND_BY_LOG), DEFAULT_KIND)

    def end_note(self) -> str | None:
        """One line on why this run's records stop early; None for a run that finished."""
        reasons = [] if self.summary is not None else ["no summary.json"]
        for name, closed in self.closed.items():
            if not closed:
                reasons.append(f"events-{name}.jsonl never closed{_last_record(self.events[name])}")
        frames = self.run_dir / FRAMES_NAME
        if recording_exists(frames):
            recording = read_recording(frames)
            if not recording.complete:
                reasons.append(recording.describe())
        if reasons:
            return "cut short: " + "; ".join(reasons)
        reason = (self.summary or {}).get("end_reason")
        if reason and reason != "finished":
            return f"ended early: {reason}"
        return None

    @property
    def phases(self) -> list[str]:
        return list(self.events)

    def steps(self, phase: str) -> list[dict[str, Any]]:
        return self.records(phase, "step")

    def records(self, phase: str, kind: str) -> list[dict[str, Any]]:
        """The phase's event records of one kind, in order."""
        return [e for e in self.events.get(phase, []) if e.get("kind") == kind]

    def start(self, phase: str) -> dict[str, Any] | None:
        return next((e for e in self.events.get(phase, []) if e.get("kind") == "start"), None)

    def target_um(self) -> tuple[float, float] | None:
        for phase in self.phases:
            start = self.start(phase)
            if start and start.get("target_um"):
                return (float(start["target_um"][0]), float(start["target_um"][1]))
        if self.summary and self.summary.get("target_um"):
            return (float(self.summary["target_um"][0]), float(self.summary["target_um"][1]))
        return None


def _last_record(events: list[dict[str, Any]]) -> str:
    times = [float(e["wall_time"]) for e in events if isinstance(e.get("wall_time"), int | float)]
    if not times:
        return " (no record)"
    stamp = time.strftime("%H:%M:%S", time.localtime(times[-1])) + f".{times[-1] % 1:.3f}"[2:]
    return f" (last record at {stamp}, {times[-1] - times[0]:.2f} s after its first)"


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; ValueError naming the path if it is not one."""
    return RunData(run_dir)
