"""Driver node on the twin: streaming, limits, bad input, watchdog, stage and exposure."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from drivers.config import DeviceNames, DriverConfig, Limits, TwinSettings
from drivers.mmcore_node import DriverNode
from drivers.protocol import EVENT_TOPIC, TRUTH_PREFIX, Frame, unpack_map
from drivers.transport import CommandClient, CommandError, StreamSubscriber


def _client(node: DriverNode, ctx: zmq.Context) -> CommandClient:
    client = CommandClient(ctx, node.endpoints[1], timeout_ms=2000)
    client.call("get_state", timeout_ms=5000)  # waits until the node answers
    return client


def _next_frame(sub: StreamSubscriber, timeout_s: float = 5.0) -> Frame:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = sub.recv_newest(timeout_ms=100)
        if frame is not None:
            return frame
    raise AssertionError("no frame from the driver")


def _truth_positions(ctx: zmq.Context, endpoint: str, n: int = 3) -> np.ndarray:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, TRUTH_PREFIX)
    sock.connect(endpoint)
    try:
        positions = []
        while len(positions) < n:
            assert sock.poll(5000), "no ground truth from the twin driver"
            record = unpack_map(sock.recv_multipart()[1], "truth")
            positions.append(np.asarray(record["positions_um"])[0])
        return np.asarray(positions)
    finally:
        sock.close()


def test_streams_frames_with_header_and_state(twin_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    _client(twin_node, zmq_ctx).close()
    sub = StreamSubscriber(zmq_ctx, twin_node.endpoints[0])
    try:
        first = _next_frame(sub)
        second = _next_frame(sub)
    finally:
        sub.close()
    assert second.header.seq > first.header.seq
    assert first.data.shape == (256, 256) and first.data.dtype == np.uint16
    h = first.header
    assert h.t_exposure_start_ns < h.t_exposure_end_ns <= h.t_published_ns
    assert abs((h.t_exposure_end_ns - h.t_exposure_start_ns) / 1e6 - 10.0) < 0.5
    assert h.state["exposure_ms"] == pytest.approx(10.0)
    assert h.state["pixel_size_um"] == pytest.approx(0.1)
    assert h.state["laser"] == []
    # A bright particle sits on a dim background: the twin renders real photons.
    assert first.data.max() > np.median(first.data) + 20


def test_truth_is_on_its_own_topic(twin_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    _client(twin_node, zmq_ctx).close()
    sub = StreamSubscriber(zmq_ctx, twin_node.endpoints[0])
    try:
        for _ in range(5):
            _next_frame(sub)
        topics = {topic for topic, _ in sub.take_messages()}
    finally:
        sub.close()
    assert not any(t.startswith(TRUTH_PREFIX) for t in topics)
    positions = _truth_positions(zmq_ctx, twin_node.endpoints[0])
    assert positions.shape == (3, 2)


def test_set_laser_within_limits_is_applied(twin_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    client = _client(twin_node, zmq_ctx)
    sub = StreamSubscriber(zmq_ctx, twin_node.endpoints[0])
    try:
        seq = _next_frame(sub).header.seq
        spot = {"x_um": 10.0, "y_um": 12.0, "power_mw": 1.5}
        reply = client.call("set_laser", {"spots": [spot], "frame_seq": seq})
        assert reply.result["laser"] == [spot]
        assert 0 < reply.result["latency_ns"] < 1e9
        rig_power = float(twin_node.core.getProperty("Laser", "Power_mW"))
        assert rig_power == pytest.approx(1.5)
        later = _next_frame(sub)
        assert later.header.state["laser"] == [spot]
    finally:
        sub.close()
        client.close()


@pytest.mark.parametrize(
    ("spot", "field", "allowed"),
    [
        ({"x_um": 10.0, "y_um": 10.0, "power_mw": 5.0}, "spots[0].power_mw", "[0, 3]"),
        ({"x_um": -4.0, "y_um": 10.0, "power_mw": 1.0}, "spots[0].x_um", "[0, 25.6]"),
        ({"x_um": 10.0, "y_um": 99.0, "power_mw": 1.0}, "spots[0].y_um", "[0, 25.6]"),
    ],
)
def test_out_of_limits_laser_is_refused(
    twin_node: DriverNode, zmq_ctx: zmq.Context, spot: dict, field: str, allowed: str
) -> None:
    client = _client(twin_node, zmq_ctx)
    try:
        with pytest.raises(CommandError) as info:
            client.call("set_laser", {"spots": [spot]})
        assert info.value.code == "out_of_limits"
        assert field in str(info.value) and allowed in str(info.value)
        assert float(twin_node.core.getProperty("Laser", "Power_mW")) == 0.0
        assert client.call("get_state").result["commands_rejected"] >= 1
    finally:
        client.close()


def test_bad_messages_get_error_replies_and_node_keeps_running(
    twin_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(twin_node, zmq_ctx)
    try:
        with pytest.raises(CommandError) as unknown:
            client.call("fire_the_lasers", {})
        assert unknown.value.code == "unknown_command"
        with pytest.raises(CommandError) as bad:
            client.call("set_laser", {"spots": [{"x_um": "left", "y_um": 1, "power_mw": 1}]})
        assert bad.value.code == "bad_args" and "x_um" in str(bad.value)
        with pytest.raises(CommandError) as too_many:
            spot = {"x_um": 1.0, "y_um": 1.0, "power_mw": 0.1}
            client.call("set_laser", {"spots": [spot, spot]})
        assert too_many.value.code == "out_of_limits"
        raw = zmq_ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(twin_node.endpoints[1])
        raw.send(b"\xc1 definitely not msgpack")
        assert raw.poll(2000)
        reply = unpack_map(raw.recv(), "reply")
        raw.close()
        assert reply["ok"] is False and reply["error"]["code"] == "malformed"
        state = client.call("get_state").result  # still serving after all of that
        assert state["commands_rejected"] >= 4
    finally:
        client.close()


def test_watchdog_switches_laser_off_when_agent_goes_silent(
    twin_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    controller = _client(twin_node, zmq_ctx)
    observer = _client(twin_node, zmq_ctx)
    events = StreamSubscriber(zmq_ctx, twin_node.endpoints[0], topics=(EVENT_TOPIC,))
    try:
        controller.call("set_laser", {"spots": [{"x_um": 5.0, "y_um": 5.0, "power_mw": 1.0}]})
        t_silent = time.monotonic()
        power = 1.0
        while time.monotonic() - t_silent < 2.0:
            # Another client polling state must not keep the controller's laser alive.
            observer.call("get_state")
            power = float(twin_node.core.getProperty("Laser", "Power_mW"))
            if power == 0.0:
                break
            time.sleep(0.005)
        elapsed_ms = (time.monotonic() - t_silent) * 1000
        assert power == 0.0, "laser still on after the agent went silent"
        assert 150 <= elapsed_ms <= 200 + 100, f"laser went off after {elapsed_ms:.0f} ms"
        events.recv_newest(timeout_ms=500)
        kinds = [m.get("event") for _, m in events.take_messages()]
        assert "watchdog" in kinds
    finally:
        events.close()
        observer.close()
        controller.close()


def test_heartbeats_keep_the_laser_on(twin_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    client = _client(twin_node, zmq_ctx)
    try:
        client.call("set_laser", {"spots": [{"x_um": 5.0, "y_um": 5.0, "power_mw": 1.0}]})
        for _ in range(40):  # 0.8 s, four watchdog periods
            client.send("heartbeat", reply=False)
            time.sleep(0.02)
        assert float(twin_node.core.getProperty("Laser", "Power_mW")) == pytest.approx(1.0)
    finally:
        client.close()


def test_stage_moves_the_view_and_respects_travel(
    twin_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(twin_node, zmq_ctx)
    try:
        before = _truth_positions(zmq_ctx, twin_node.endpoints[0]).mean(axis=0)
        client.call("move_stage", {"x_um": 4.0, "y_um": -3.0})
        time.sleep(0.05)
        after = _truth_positions(zmq_ctx, twin_node.endpoints[0]).mean(axis=0)
        # The sample moved by -stage in the camera frame (Brownian motion adds ~0.1 um).
        assert np.allclose(after - before, [-4.0, 3.0], atol=0.5)
        with pytest.raises(CommandError) as info:
            client.call("move_stage", {"x_um": 20_000.0, "y_um": 0.0})
        assert info.value.code == "out_of_limits" and "x_um" in str(info.value)
    finally:
        client.close()


def test_exposure_change_is_applied_and_limited(
    twin_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(twin_node, zmq_ctx)
    sub = StreamSubscriber(zmq_ctx, twin_node.endpoints[0])
    try:
        client.call("set_exposure", {"exposure_ms": 25.0})
        _next_frame(sub)
        frame = _next_frame(sub)
        h = frame.header
        assert (h.t_exposure_end_ns - h.t_exposure_start_ns) / 1e6 == pytest.approx(25.0, abs=0.5)
        with pytest.raises(CommandError) as info:
            client.call("set_exposure", {"exposure_ms": 0.0})
        assert info.value.code == "out_of_limits" and "exposure_ms" in str(info.value)
    finally:
        sub.close()
        client.close()


@pytest.fixture
def slm_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    config = DriverConfig(
        watchdog_ms=200,
        heartbeat_ms=20,
        exposure_ms=10.0,
        limits=Limits(max_laser_spots=4, max_laser_power_mw=3.0),
        devices=DeviceNames(laser_kind="slm", slm_pixel_um=0.2),
        twin=TwinSettings(slm_px=128, actuation_delay_ms=40.0),
    )
    return make_node(config)


def _slm_lit(node: DriverNode) -> int:
    return int(np.count_nonzero(node.core.getSLMImage("SLM")))


def test_slm_draws_several_spots_quantised_to_its_pixels(
    slm_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(slm_node, zmq_ctx)
    try:
        spots = [
            {"x_um": 5.03, "y_um": 5.0, "power_mw": 1.0},
            {"x_um": 12.0, "y_um": 7.91, "power_mw": 2.0},
            {"x_um": 20.0, "y_um": 20.0, "power_mw": 0.5},
        ]
        applied = client.call("set_laser", {"spots": spots}).result["laser"]
        assert len(applied) == 3 and _slm_lit(slm_node) == 3
        for want, got in zip(spots, applied, strict=True):
            assert abs(got["x_um"] - want["x_um"]) <= 0.1 + 1e-9  # half an SLM pixel
            assert abs(got["y_um"] - want["y_um"]) <= 0.1 + 1e-9
            assert got["power_mw"] == pytest.approx(want["power_mw"], abs=5.0 / 255)
        with pytest.raises(CommandError) as too_many:
            client.call("set_laser", {"spots": spots + spots[:2]})
        assert too_many.value.code == "out_of_limits" and "[0, 4]" in str(too_many.value)
        with pytest.raises(CommandError) as same_pixel:
            client.call("set_laser", {"spots": [spots[0], dict(spots[0], power_mw=0.3)]})
        assert same_pixel.value.code == "bad_args" and "spots[1]" in str(same_pixel.value)
        assert _slm_lit(slm_node) == 3  # refused commands leave the pattern alone
        client.call("laser_off")
        assert _slm_lit(slm_node) == 0
    finally:
        client.close()


def test_watchdog_blanks_the_slm(slm_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    client = _client(slm_node, zmq_ctx)
    try:
        spot = {"x_um": 8.0, "y_um": 8.0, "power_mw": 1.0}
        client.call("set_laser", {"spots": [spot, dict(spot, x_um=16.0)]})
        assert _slm_lit(slm_node) == 2
        deadline = time.monotonic() + 2.0
        while _slm_lit(slm_node) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _slm_lit(slm_node) == 0
    finally:
        client.close()


def test_light_reaches_the_sample_after_the_actuation_delay(
    slm_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(slm_node, zmq_ctx)
    sock = zmq_ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, TRUTH_PREFIX)
    sock.connect(slm_node.endpoints[0])
    try:
        time.sleep(0.1)
        t_command = time.monotonic_ns()
        client.call("set_laser", {"spots": [{"x_um": 8.0, "y_um": 8.0, "power_mw": 1.0}]})
        first_lit_ns = None
        while first_lit_ns is None and time.monotonic_ns() - t_command < 2e9:
            assert sock.poll(2000)
            record = unpack_map(sock.recv_multipart()[1], "truth")
            if any(record["laser_substeps"]):
                # Truth arrives when the exposure that first saw light ends: without the
                # delay that is within one 10 ms exposure of the command.
                first_lit_ns = time.monotonic_ns()
        assert first_lit_ns is not None
        assert (first_lit_ns - t_command) / 1e6 >= 40.0
    finally:
        sock.close()
        client.close()


def test_truth_carries_orientations_and_temperatures(
    twin_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(twin_node, zmq_ctx)
    sock = zmq_ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, TRUTH_PREFIX)
    sock.connect(twin_node.endpoints[0])
    try:
        assert sock.poll(5000)
        cold = unpack_map(sock.recv_multipart()[1], "truth")
        x, y = cold["positions_um"][0]
        client.call("set_laser", {"spots": [{"x_um": x + 1.0, "y_um": y, "power_mw": 1.0}]})
        hot = None
        for _ in range(20):
            assert sock.poll(5000)
            record = unpack_map(sock.recv_multipart()[1], "truth")
            if all(record["laser_substeps"]):
                hot = record
                break
        assert hot is not None
        assert len(cold["orientations_rad"]) == len(cold["temperatures_k"]) == 1
        ambient = cold["temperatures_k"][0]
        # A 1 mW spot ~1 um away heats the particle by most of the 20 K/mW peak.
        assert 10.0 < hot["temperatures_k"][0] - ambient < 20.5
    finally:
        sock.close()
        client.close()
