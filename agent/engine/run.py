"""What every plan's run shares, written once: the run directory and config snapshot,
the event log, live telemetry with the dashboard's pause / resume / stop, the frame
recording (`frames.ome.zarr`, one per run, every phase's frames tagged with their
phase), and the summary and report at the end. A plan holds only its experiment's
logic and calls `checkpoint()` wherever it may pause or stop (between batches, steps,
phases); a plan that acts frame by frame runs on `agent.engine.frame_loop`.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any

import zmq
from pydantic import BaseModel

from agent.config import dump_config
from agent.engine.telemetry import RunTelemetry
from agent.records.frame_recording import FRAMES_NAME
from agent.records.frame_writer import BackgroundFrameWriter
from agent.records.recorder import EventLog, new_run_dir, write_json

PAUSE_POLL_S = 0.05


class RunEngine:
    """One run of a plan: `with RunEngine(config, "events-x.jsonl") as run: ...`."""

    def __init__(
        self,
        config: BaseModel,
        events_name: str,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.config = config
        runs_dir = str(getattr(config, "runs_dir", "runs"))
        self.run_dir = new_run_dir(runs_dir, str(getattr(config, "name", "run")))
        dump_config(config, self.run_dir / "config.yaml")
        self.events = EventLog(self.run_dir / events_name)
        self.telemetry = RunTelemetry(self.run_dir.name, ctx)
        self.telemetry.write_info(self.run_dir)
        self.frames: BackgroundFrameWriter | None = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> RunEngine:
        self.telemetry.set_state("running")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.telemetry.reason = (
            "stop command" if self.stopped else ("finished" if exc is None else f"error: {exc}")
        )
        if self.frames is not None:
            self.frames.close()
            self.events.write("frames", **self.frames.stats())
        self.events.close()
        self.telemetry.close(self.telemetry.reason)

    @property
    def stopped(self) -> bool:
        return self.telemetry.stop_requested

    def checkpoint(self) -> bool:
        """Serve the control channel; wait here while paused. False once a stop came, so
        the plan ends (its driver's close makes the instrument safe)."""
        self.telemetry.poll_control()
        if self.telemetry.paused:
            self.events.write("paused")
            while self.telemetry.paused and not self.telemetry.stop_requested:
                time.sleep(PAUSE_POLL_S)
                self.telemetry.poll_control()
            self.events.write("resumed" if not self.stopped else "stopped")
        return not self.stopped

    def frame_writer(self, max_queued_mb: float, lossless: bool = False) -> BackgroundFrameWriter:
        """The run's frame recording, opened on the first ask and shared by every phase.

        The plan says what a writer that falls `max_queued_mb` behind does: drop and
        count (a loop that must never wait) or, `lossless`, make the plan wait (every
        frame precious, few of them); see `BackgroundFrameWriter`."""
        if self.frames is None:
            self.frames = BackgroundFrameWriter(
                self.run_dir / FRAMES_NAME, int(max_queued_mb * 1024 * 1024), lossless=lossless
            )
        elif self.frames.lossless != lossless:
            raise ValueError(
                f"frame recording: this run records with lossless={self.frames.lossless}; "
                f"a phase asked for lossless={lossless} (one recording per run)"
            )
        return self.frames

    def phase(self, name: str) -> None:
        self.telemetry.set_phase(name)
        self.telemetry.event(f"phase {name} started")
        self.events.write("phase", name=name)

    def finish(self, summary: dict[str, Any], report: bool = True) -> dict[str, Any]:
        """Write summary.json (with the run dir, stop flag and wall time) and the report."""
        summary = {
            **summary,
            "run_dir": str(self.run_dir),
            "stopped": self.stopped,
            "wall_s": time.perf_counter() - self._t0,
            **(self.frames.stats() if self.frames is not None else {}),
        }
        write_json(self.run_dir / "summary.json", summary)
        if report:
            from agent.records.report import write_report

            write_report(self.run_dir)
        return summary
