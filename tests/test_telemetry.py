"""Run telemetry: publish/subscribe, dropping for slow readers, and pause/resume/stop
obeyed by the engine's frame loop running the feedback-trap plan on the twin."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from agent.detection.detect import ParticleDetector
from agent.engine.frame_loop import LoopEndpoints, LoopResult
from agent.engine.telemetry import (
    RunTelemetry,
    TelemetryMessage,
    TelemetrySubscriber,
    find_live_run,
    read_telemetry_info,
    send_control,
)
from agent.plans.feedback_trap import feedback_loop
from agent.records.recorder import EventLog, read_events
from drivers.mmcore_node import DriverNode
from drivers.transport import CommandClient
from policies.contract import Action, LaserSpot, Observation


def _collect(sub: TelemetrySubscriber, kind: str, timeout_s: float = 5.0) -> TelemetryMessage:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for msg in sub.poll(50):
            if msg.kind == kind:
                return msg
    raise AssertionError(f"no {kind} message within {timeout_s} s")


def _connected(tm: RunTelemetry, sub: TelemetrySubscriber) -> None:
    """PUB/SUB slow joiner: publish events until the subscriber sees one."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        tm.event("hello")
        if any(m.kind == "event" for m in sub.poll(50)):
            return
    raise AssertionError("subscriber never connected")


def test_messages_round_trip_with_frames_decimated_and_rate_limited(zmq_ctx: zmq.Context) -> None:
    tm = RunTelemetry("unit", zmq_ctx, max_frame_hz=20.0, max_px=256)
    sub = TelemetrySubscriber(tm.endpoints.publish, zmq_ctx)
    try:
        _connected(tm, sub)
        image = np.arange(1000 * 600, dtype=np.uint16).reshape(600, 1000)
        detections = np.array([[1.5, 2.5], [30.0, 40.0]])
        laser = [{"x_um": 3.0, "y_um": 4.0, "power_mw": 0.7}]
        assert tm.frame(image, 7, 0.1, detections, (50.0, 30.0), laser, {"error_um": 0.2})
        # A 100 fps caller gets at most max_frame_hz frames through.
        sent = sum(tm.frame(image, 8 + i, 0.1) for i in range(50))
        assert sent == 0
        frame = _collect(sub, "frame")
        assert frame.header["seq"] == 7
        assert max(frame.arrays[0].shape) <= 256
        stride = frame.header["stride"]
        np.testing.assert_array_equal(frame.arrays[0], image[::stride, ::stride])
        assert frame.header["field_um"] == pytest.approx([100.0, 60.0])
        assert frame.header["detections_um"] == detections.tolist()
        assert frame.header["laser"] == laser
        assert frame.header["info"] == {"error_um": 0.2}

        mean = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
        tm.map("gp", {"mean": mean, "std": 2 * mean}, (0, 4, 0, 3), points=[[1, 1], [2, 2]])
        gp = _collect(sub, "map")
        assert [layer["name"] for layer in gp.header["layers"]] == ["mean", "std"]
        np.testing.assert_allclose(gp.arrays[1], 2 * mean)
        assert gp.header["points"] == [[1.0, 1.0], [2.0, 2.0]]

        tm.metrics({"latency_ms": 1.5, "reward": float("nan"), "skipped": None})
        metric = _collect(sub, "metric")
        assert metric.header["values"] == {"latency_ms": 1.5}  # NaN/None left out
        tm.set_phase("feedback")
        state = _collect(sub, "state")
        assert (state.header["state"], state.header["phase"]) == ("starting", "feedback")
        with pytest.raises(ValueError, match="every layer must be 2-D"):
            tm.map("bad", {"x": np.zeros(3)}, (0, 1, 0, 1))
    finally:
        sub.close()
        tm.close()


def test_a_slow_subscriber_never_blocks_the_publisher(zmq_ctx: zmq.Context) -> None:
    tm = RunTelemetry("unit", zmq_ctx, max_frame_hz=0.0, sndhwm=16)
    sub = TelemetrySubscriber(tm.endpoints.publish, zmq_ctx, rcvhwm=16)
    try:
        _connected(tm, sub)
        image = np.zeros((512, 512), dtype=np.uint16)
        n = 3000
        t0 = time.perf_counter()
        published = sum(tm.frame(image, seq, 0.1) for seq in range(n))  # nobody reads now
        elapsed = time.perf_counter() - t0
        assert published == n  # every call returned at once; PUB drops per subscriber
        # Loose bound (2-core CI): blocking on a reader would take forever, not 20 s.
        assert elapsed < 20.0
        seen: list[int] = []
        while batch := sub.poll(300):  # drain what was queued until nothing more comes
            seen += [m.header["seq"] for m in batch if m.kind == "frame"]
        assert 0 < len(seen) < n  # the backlog was bounded: most frames were dropped
        tm.frame(image, n, 0.1)  # after the reader caught up, the newest frame gets through
        assert _collect(sub, "frame").header["seq"] == n
    finally:
        sub.close()
        tm.close()


def test_control_channel_and_telemetry_json(zmq_ctx: zmq.Context, tmp_path: Path) -> None:
    run_dir = tmp_path / "20260101-000000-unit"
    run_dir.mkdir()
    tm = RunTelemetry(run_dir.name, zmq_ctx)
    tm.write_info(run_dir)
    info = read_telemetry_info(run_dir)
    stop = threading.Event()
    accepted: list[str] = []

    def owner() -> None:  # the telemetry is used from one thread, as in a runner
        while not stop.is_set():
            accepted.extend(tm.poll_control())
            time.sleep(0.005)

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        assert info is not None and info.is_live()
        assert info.control == tm.endpoints.control
        assert find_live_run(tmp_path) == info
        tm.set_state("running")
        assert send_control(tm.endpoints.control, "pause", ctx=zmq_ctx)["state"] == "paused"
        assert tm.paused
        assert send_control(tm.endpoints.control, "resume", ctx=zmq_ctx)["state"] == "running"
        bad = send_control(tm.endpoints.control, "explode", ctx=zmq_ctx)
        assert not bad["ok"] and "must be one of" in bad["error"]
        assert send_control(tm.endpoints.control, "stop", ctx=zmq_ctx)["state"] == "stopping"
        assert tm.stop_requested
        late = send_control(tm.endpoints.control, "resume", ctx=zmq_ctx)
        assert not late["ok"] and "stopping" in late["error"]
    finally:
        stop.set()
        thread.join()
        tm.close("stop command")
    assert accepted == ["pause", "resume", "stop"]
    closed = read_telemetry_info(run_dir)
    assert closed is not None and not closed.is_live()
    assert find_live_run(tmp_path) is None


class AlwaysOn:
    """Asks for the laser at every step, so any actuation while paused would show."""

    def __init__(self) -> None:
        self.calls = 0

    def reset(self) -> None:
        pass

    def act(self, obs: Observation) -> Action:
        self.calls += 1
        x, y = obs.target_um
        return Action(laser=(LaserSpot(x, y, 0.5),), info={"reward": 1.0})


def _laser(client: CommandClient) -> list:
    return client.call("get_state", timeout_ms=2000).result["laser"]


def _wait(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_agent_loop_pauses_resumes_and_stops_on_command(
    twin_node: DriverNode, zmq_ctx: zmq.Context, tmp_path: Path
) -> None:
    stream, command = twin_node.endpoints
    tm = RunTelemetry("loop", zmq_ctx)
    sub = TelemetrySubscriber(tm.endpoints.publish, zmq_ctx)
    policy = AlwaysOn()
    client = CommandClient(zmq_ctx, command, timeout_ms=2000)
    result: list[LoopResult] = []
    with EventLog(tmp_path / "events.jsonl") as events:
        loop = feedback_loop(
            LoopEndpoints(stream, command),
            ParticleDetector(),
            policy,
            events,
            ctx=zmq_ctx,
            telemetry=tm,
        )
        thread = threading.Thread(target=lambda: result.append(loop.run(60.0)))
        t_start = time.monotonic()
        thread.start()
        try:
            _wait(lambda: policy.calls > 5 and bool(_laser(client)))
            assert send_control(tm.endpoints.control, "pause", ctx=zmq_ctx)["state"] == "paused"
            _wait(lambda: not _laser(client))
            calls = policy.calls
            seen_frames: list[int] = []
            t_pause = time.monotonic()
            while time.monotonic() - t_pause < 0.8:  # paused: laser stays off, frames go on
                assert _laser(client) == []
                seen_frames += [m.header["seq"] for m in sub.poll(20) if m.kind == "frame"]
            assert policy.calls == calls, "the policy acted while paused"
            assert len(seen_frames) > 3, "frames must still be shown while paused"

            assert send_control(tm.endpoints.control, "resume", ctx=zmq_ctx)["ok"]
            _wait(lambda: policy.calls > calls + 3 and bool(_laser(client)))

            assert send_control(tm.endpoints.control, "stop", ctx=zmq_ctx)["ok"]
            thread.join(timeout=10)
            assert not thread.is_alive(), "stop did not end the loop"
            assert time.monotonic() - t_start < 30.0  # well before the 60 s duration
            assert _laser(client) == []  # safe state
        finally:
            if thread.is_alive():
                tm.set_state("stopping")
                thread.join(timeout=10)
            client.close()
            sub.close()
            tm.close()
    kinds = [e["kind"] for e in read_events(tmp_path / "events.jsonl")]
    assert kinds.index("pause") < kinds.index("resume") < kinds.index("stop") < kinds.index("end")
    pause, resume = kinds.index("pause"), kinds.index("resume")
    assert "step" not in kinds[pause:resume], "no decisions are logged while paused"
    assert result and result[0].steps == policy.calls
