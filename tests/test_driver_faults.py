"""Driver faults: a driver restarted, killed or failing to start under a running agent."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.detection.detect import ParticleDetector
from agent.engine.driver_faults import DriverFaults, DriverLost, DriverSilent, cause_line
from agent.engine.frame_loop import LoopEndpoints, LoopResult
from agent.plans import feedback_trap as runner
from agent.plans.feedback_trap import feedback_loop
from agent.records.recorder import EventLog, read_events
from agent.records.report import load_run, write_report
from benchmarks.faults_records import RestartableDriver, wait_for
from policies.feedback import ProportionalTrap, ProportionalTrapConfig

ROOT = Path(__file__).resolve().parents[1]
TRAP = ROOT / "configs" / "twin-feedback-trap.yaml"


def _kinds(path: Path) -> list[dict]:
    return read_events(path) if path.is_file() else []


@pytest.fixture
def drivers(ipc_dir: Path) -> Iterator[RestartableDriver]:
    procs = RestartableDriver(ipc_dir)
    yield procs
    procs.stop()


def test_driver_restarted_under_a_running_agent_resumes(
    drivers: RestartableDriver, tmp_path: Path
) -> None:
    drivers.start()
    log_path = tmp_path / "events.jsonl"
    stop = threading.Event()
    results: list[LoopResult] = []
    with EventLog(log_path) as events:
        loop = feedback_loop(
            LoopEndpoints(drivers.stream, drivers.command),
            ParticleDetector(),
            ProportionalTrap(ProportionalTrapConfig()),
            events,
            faults=DriverFaults(reconnect_s=120.0, silence_ms=60_000, probe=drivers.probe),
        )
        thread = threading.Thread(target=lambda: results.append(loop.run(600.0, stop, 90.0)))
        thread.start()
        try:
            steps = lambda: [e for e in _kinds(log_path) if e["kind"] == "step"]  # noqa: E731
            wait_for(lambda: len(steps()) >= 20, "20 steps before the restart")
            drivers.kill()
            kinds = lambda: [e["kind"] for e in _kinds(log_path)]  # noqa: E731
            wait_for(lambda: "driver_down" in kinds(), "the agent to see the driver gone")
            drivers.start()
            wait_for(
                lambda: (
                    sum(s["session"] == 1 and s["latency_ms"] is not None for s in steps()) >= 20
                ),
                "20 applied commands after the restart",
            )
        finally:
            stop.set()
            thread.join(30)
    assert results, "the agent loop crashed"
    records = read_events(log_path)
    kinds = [e["kind"] for e in records]
    down, resumed = kinds.index("driver_down"), kinds.index("driver_resumed")
    assert down < resumed
    assert "step" not in kinds[down:resumed], "no actuation while the driver was down"
    assert "exited with code -9" in records[down]["reason"]
    assert records[resumed]["session"] == 1
    end = records[kinds.index("end")]
    assert end["driver_sessions"] == 2 and end["end_reason"] is None
    assert results[0].end_reason is None and results[0].driver_sessions == 2


def test_driver_killed_mid_run_ends_the_run_with_a_summary_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[runner.DriverProcess] = []

    class Tracked(runner.DriverProcess):
        def __init__(self, config_path: Path, log_path: Path) -> None:
            super().__init__(config_path, log_path)
            started.append(self)

    monkeypatch.setattr(runner, "DriverProcess", Tracked)
    config = load_config(
        TRAP,
        [f"runs_dir={tmp_path}", "duration_s=600", "agent.driver_reconnect_s=0.5", "name=lost"],
    )

    def kill_after_some_steps() -> None:
        wait_for(lambda: bool(started), "the driver process")
        events = lambda: list(tmp_path.glob("*/events-feedback.jsonl"))  # noqa: E731
        wait_for(lambda: bool(events()) and len(_kinds(events()[0])) > 10, "steps")
        started[0].proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_some_steps, daemon=True)
    killer.start()
    run_dir, summary = runner.run_experiment(config)
    killer.join(10)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["end_reason"] == summary["end_reason"]
    assert summary["end_reason"].startswith("driver lost: driver process exited with code -9")
    assert "driver_reconnect_s" in summary["end_reason"]
    assert summary["steps"] > 0 and "rms_free_um" not in summary  # free phase skipped
    note = load_run(run_dir).end_note()
    assert note is not None and note.startswith("ended early: driver lost")
    page = write_report(run_dir).read_text()
    assert "<h2>Driver faults</h2>" in page and "driver_lost" in page


def test_driver_failing_to_start_is_reported_with_its_cause(tmp_path: Path) -> None:
    config = load_config(
        TRAP,
        [
            f"runs_dir={tmp_path}",
            "driver.kind=mmcore",
            f"driver.mm_config={tmp_path / 'missing.cfg'}",
            "agent.startup_timeout_s=300",  # only the driver's exit can end this wait early
        ],
    )
    with pytest.raises(DriverSilent) as info:
        runner.run_experiment(config)
    message = str(info.value)
    assert message.startswith("driver failed to start")
    assert f"driver.mm_config: file {tmp_path / 'missing.cfg'} does not exist" in message
    assert "did not answer" not in message


def test_fault_states_follow_the_stream() -> None:
    faults = DriverFaults(reconnect_s=1.0, silence_ms=500)
    assert faults.check(0, 0, 5) is None and faults.check(10, 10, 6) is None
    restart = faults.check(20, 20, 0)
    assert restart is not None and restart.kind == "restarted" and faults.down
    assert faults.resumed() >= 0 and faults.session == 1 and not faults.down
    assert faults.check(30, 30, 0) is None  # frame numbers of the new session
    silent = faults.check(int(0.6e9), 30, None)
    assert silent is not None and silent.kind == "down" and "500 ms" in silent.reason
    assert faults.check(int(1.5e9), 30, None) is None  # still waiting
    with pytest.raises(DriverLost, match="within 1 s"):
        faults.check(int(1.7e9), 30, None)


def test_cause_line_is_the_error_not_the_traceback_frame(tmp_path: Path) -> None:
    log = tmp_path / "driver.log"
    log.write_text(
        "driver starting\nTraceback (most recent call last):\n  File 'x.py', line 3\n"
        "    raise ValueError('bad')\nValueError: driver.mm_config: file x does not exist\n\n"
    )
    assert cause_line(log) == "ValueError: driver.mm_config: file x does not exist"
    log.write_text("config error: driver.exposure_ms: must be > 0 (got -1)\n")
    assert cause_line(log).startswith("config error: driver.exposure_ms")
    log.write_text("Traceback\nValueError: bad\ndriver failed: ValueError: bad\nexit\n")
    assert cause_line(log) == "driver failed: ValueError: bad"
    assert "empty" in cause_line(tmp_path / "none.log") or "unreadable" in cause_line(
        tmp_path / "none.log"
    )


def test_driver_reconnect_s_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"agent.driver_reconnect_s.*(greater|less)"):
        load_config(TRAP, ["agent.driver_reconnect_s=-1"])
    with pytest.raises(ConfigError, match=r"agent\.driver_reconnect_s"):
        load_config(TRAP, ["agent.driver_reconnect_s=1e9"])
