"""A trained RL policy in the live ZeroMQ loop against the Micro-Manager twin driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from agent.records.recorder import read_events

ROOT = Path(__file__).resolve().parents[1]
GOAL_CELL = (18.0, 24.0, 6.0, 12.0)  # x0, x1, y0, y1 of grid cell (row 1, col 3)


def _run(tmp_path: Path, config: str, *sets: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "agent.cli", "run", str(ROOT / config)]
    for item in (f"runs_dir={tmp_path}", *sets):
        args += ["--set", item]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _read(path: Path) -> list[dict]:
    return read_events(path)  # the records, without the log's own closing record


def test_live_run_of_the_q_table_reaches_the_goal_cell(tmp_path: Path) -> None:
    done = _run(tmp_path, "configs/twin-rl-microswimmer.yaml", "duration_s=4", "seed=5")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > 40 and summary["commands_failed"] == 0
    steps = [e for e in _read(run_dir / "events-feedback.jsonl") if e["kind"] == "step"]
    powers = {round(s["laser"][0]["power_mw"], 6) for s in steps if s["laser"]}
    assert len(powers) == 1  # fixed power: the Peclet number of the checkpoint
    truth = _read(run_dir / "truth-feedback.jsonl")
    track = np.array([np.asarray(r["positions_um"], float).reshape(-1, 2)[0] for r in truth])
    x0, x1, y0, y1 = GOAL_CELL
    inside = (track[:, 0] >= x0) & (track[:, 0] < x1) & (track[:, 1] >= y0) & (track[:, 1] < y1)
    assert not inside[0] and inside.any()  # started elsewhere, steered into the goal cell


def test_live_run_rejects_a_missing_checkpoint(tmp_path: Path) -> None:
    done = _run(tmp_path, "configs/twin-rl-steering.yaml", "policy.checkpoint=missing.zip")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "policy.rl.checkpoint" in lines[0]
