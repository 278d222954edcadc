"""The run engine every plan shares: run dir + config snapshot, event log, and one
pause / resume / stop from the dashboard's control channel."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from pydantic import BaseModel

from agent.engine.run import RunEngine
from agent.engine.telemetry import send_control
from agent.records.recorder import read_events


class PlanConfig(BaseModel):
    name: str = "plan"
    runs_dir: str


def test_pause_resume_and_stop_reach_the_plan(tmp_path: Path) -> None:
    steps: list[int] = []
    with RunEngine(PlanConfig(runs_dir=str(tmp_path)), "events-plan.jsonl") as run:
        control = run.telemetry.endpoints.control

        def plan() -> None:
            for step in range(10_000):
                if not run.checkpoint():
                    return
                steps.append(step)
                time.sleep(0.002)

        worker = threading.Thread(target=plan)
        worker.start()
        send_control(control, "pause", timeout_ms=5000)
        time.sleep(0.05)  # let the plan reach its next checkpoint and wait there
        held = len(steps)
        time.sleep(0.3)
        assert len(steps) <= held + 1  # nothing ran while paused
        send_control(control, "resume", timeout_ms=5000)
        while len(steps) < held + 5:
            time.sleep(0.01)
        send_control(control, "stop", timeout_ms=5000)
        worker.join(10)
        assert not worker.is_alive() and run.stopped
    summary = run.finish({"steps": len(steps)}, report=False)
    run_dir = Path(summary["run_dir"])
    assert summary["stopped"] is True and summary["steps"] < 10_000
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == len(steps)
    assert (run_dir / "config.yaml").is_file()
    kinds = [e["kind"] for e in read_events(run_dir / "events-plan.jsonl")]
    assert kinds[:2] == ["paused", "resumed"]
