"""End to end on the twin: driver and agent in separate processes, through ZeroMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml
import zmq

from agent.config import load_config
from agent.plans.feedback_trap import run_experiment
from agent.records.recorder import read_events
from drivers.protocol import EVENT_TOPIC, HEARTBEAT_TOPIC, unpack_map

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "twin-feedback-trap.yaml"


def test_feedback_holds_the_particle_and_writes_a_run_record(tmp_path: Path) -> None:
    config = load_config(DEFAULT, [f"runs_dir={tmp_path}", "duration_s=6", "seed=3", "name=e2e"])
    run_dir, summary = run_experiment(config)

    # Held: the trapped particle stays near the target, the free one wanders off.
    assert summary["rms_feedback_um"] < 1.0
    assert summary["rms_ratio"] < 0.5
    assert summary["steps"] > 100  # ~30 fps for 6 s, not a handful of frames
    assert summary["commands_failed"] == 0
    assert np.isfinite(summary["latency_p99_ms"])
    assert summary["detection_rmse_um"] < 0.1

    for name in (
        "config.yaml",
        "summary.json",
        "trap.png",
        "events-feedback.jsonl",
        "events-free.jsonl",
        "truth-feedback.jsonl",
    ):
        assert (run_dir / name).stat().st_size > 0, name
    assert json.loads((run_dir / "summary.json").read_text())["rms_ratio"] == summary["rms_ratio"]
    snapshot = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert snapshot["seed"] == 3 and snapshot["driver"]["seed"] == 3
    steps = [e for e in read_events(run_dir / "events-feedback.jsonl") if e["kind"] == "step"]
    assert len(steps) == summary["steps"]
    assert all({"seq", "latency_ms", "laser", "detections_um"} <= set(s) for s in steps)
    assert any(s["laser"] for s in steps), "the feedback never switched the laser on"
    free = [e for e in read_events(run_dir / "events-free.jsonl") if e["kind"] == "step"]
    assert free and not any(s["laser"] for s in free)


AGENT_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from agent.detection.detect import ParticleDetector
    from agent.engine.frame_loop import LoopEndpoints
    from agent.plans.feedback_trap import feedback_loop
    from agent.records.recorder import EventLog
    from policies.feedback import ProportionalTrap, ProportionalTrapConfig
    from pathlib import Path
    stream, command, log = sys.argv[1:4]
    with EventLog(Path(log)) as events:
        loop = feedback_loop(LoopEndpoints(stream, command), ParticleDetector(),
                             ProportionalTrap(ProportionalTrapConfig()), events)
        loop.run(120.0)
    """
)


def _laser_on(message: dict) -> bool:
    return bool(message.get("state", {}).get("laser"))


def test_killing_the_agent_switches_the_laser_off_within_the_watchdog(
    tmp_path: Path, ipc_dir: Path
) -> None:
    watchdog_ms = 300
    stream, command = f"ipc://{ipc_dir}/s", f"ipc://{ipc_dir}/c"
    config = yaml.safe_load(DEFAULT.read_text())
    config["driver"].update(
        stream_endpoint=stream, command_endpoint=command, watchdog_ms=watchdog_ms, heartbeat_ms=10
    )
    config_path = tmp_path / "driver.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "driver", "serve", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, stream, command, str(tmp_path / "agent.jsonl")],
        env=env,
    )
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, HEARTBEAT_TOPIC)
    sub.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC)
    sub.connect(stream)
    try:
        deadline = time.monotonic() + 60
        laser_on_since = None
        while time.monotonic() < deadline:
            if not sub.poll(100):
                continue
            topic, body = sub.recv_multipart()
            if topic == HEARTBEAT_TOPIC and _laser_on(unpack_map(body, "hb")):
                laser_on_since = laser_on_since or time.monotonic()
                if time.monotonic() - laser_on_since > 1.0:
                    break
        assert laser_on_since is not None, "the agent never switched the laser on"

        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        t_kill = time.monotonic()
        off_after_ms = None
        watchdog_event = False
        while time.monotonic() - t_kill < 5.0:
            if not sub.poll(50):
                continue
            topic, body = sub.recv_multipart()
            message = unpack_map(body, "message")
            if topic == EVENT_TOPIC and message.get("event") == "watchdog":
                watchdog_event = True
            if topic == HEARTBEAT_TOPIC and not _laser_on(message):
                off_after_ms = (time.monotonic() - t_kill) * 1000
                break
        assert off_after_ms is not None, "laser still on 5 s after the agent died"
        # Watchdog time plus one heartbeat and scheduling slack on a loaded 2-core machine.
        assert off_after_ms <= watchdog_ms + 150, f"laser off after {off_after_ms:.0f} ms"
        assert watchdog_event
        assert driver.poll() is None, "the driver must keep running without its agent"
    finally:
        sub.close()
        ctx.term()
        for proc in (agent, driver):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    assert driver.returncode == 0  # SIGTERM: clean shutdown, laser off


def test_deep_detector_trains_on_the_live_stream_then_holds_the_particle(tmp_path: Path) -> None:
    config = load_config(
        DEFAULT,
        [
            f"runs_dir={tmp_path}",
            "duration_s=4",
            "seed=5",
            "name=deep",
            "agent.detector.kind=lodestar",
            "compare_free_diffusion=false",
        ],
    )
    run_dir, summary = run_experiment(config)
    assert (run_dir / "lodestar.pt").stat().st_size > 0
    events = read_events(run_dir / "events-training.jsonl")
    trained = [e for e in events if e["kind"] == "detector"]
    assert trained and "converged: True" in trained[0]["message"]
    # Which seeds the crops came from is logged; the sparse stream (one particle a frame)
    # is read past train_frames until min_crops crops are gathered.
    assert "classical hits" in trained[0]["message"] and "DoG blobs" in trained[0]["message"]
    stats = next(e for e in events if e["kind"] == "detector_stats")
    assert stats["crops_classical"] + stats["crops_blob"] >= 64
    assert stats["crop_frames"] > 24
    curve = run_dir / "report-learning-curve.png"  # the report shows how training went
    assert curve.stat().st_size > 2048 and curve.name in (run_dir / "report.html").read_text()
    assert summary["rms_feedback_um"] < 1.0
    assert summary["detection_rmse_um"] < 0.1
