"""Event-driven acquisition, snap and SLM images on the driver node (demo adapters, twin)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq

from drivers.config import DeviceNames, DriverConfig, Limits, TwinSettings
from drivers.mda import TARGET_KEY, parse_events
from drivers.mmcore_node import DriverNode
from drivers.protocol import FRAME_PREFIX, Frame, ProtocolError, decode_frame, now_ns
from drivers.transport import CommandClient, CommandError


@pytest.fixture
def demo_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    return make_node(
        DriverConfig(kind="mmcore", mm_config="demo", exposure_ms=2.0, stream_hwm=1000)
    )


class Peer:
    """A client plus a SUB socket that keeps every frame (no newest-only dropping)."""

    def __init__(self, node: DriverNode, ctx: zmq.Context) -> None:
        self.client = CommandClient(ctx, node.endpoints[1], timeout_ms=5000)
        self.client.call("get_state", timeout_ms=5000)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 10_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, FRAME_PREFIX)
        self.sub.connect(node.endpoints[0])
        assert self.sub.poll(5000), "no frame from the node"

    def event_frames(self, n: int, timeout_s: float = 20.0) -> list[Frame]:
        frames: list[Frame] = []
        deadline = time.monotonic() + timeout_s
        while len(frames) < n and time.monotonic() < deadline:
            if self.sub.poll(100):
                frame = decode_frame(self.sub.recv_multipart(copy=False))
                if "event" in frame.header.state:
                    frames.append(frame)
        return frames

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.client.call(cmd, args or {}).result

    def close(self) -> None:
        self.client.close()
        self.sub.close()


def test_submitted_events_move_expose_and_report_their_index(
    demo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    peer = Peer(demo_node, zmq_ctx)
    try:
        events = [
            {
                "x_pos": 10.0 * i,
                "y_pos": -5.0,
                "exposure": 1.0 + i,
                "index": {"p": i},
                "metadata": {"reason": "test", "k": i},
            }
            for i in range(3)
        ]
        ids = peer.call("submit_events", {"events": events})["ids"]
        assert ids == [0, 1, 2]
        frames = peer.event_frames(3)
        assert [f.header.state["event"]["id"] for f in frames] == ids
        for i, frame in enumerate(frames):
            event = frame.header.state["event"]
            assert event["index"] == {"p": i} and event["metadata"] == {"reason": "test", "k": i}
            assert event["x_pos"] == 10.0 * i and event["exposure_ms"] == 1.0 + i
            assert frame.data.shape == (512, 512)
        assert demo_node.core.getXYPosition() == pytest.approx((20.0, -5.0), abs=0.01)
        # while events run, camera changes go through events, not around them
        with pytest.raises(CommandError) as busy:
            peer.client.call("set_exposure", {"exposure_ms": 5.0})
        assert busy.value.code == "busy"
        peer.call("stop_events")
        deadline = time.monotonic() + 5
        while peer.call("get_state")["events_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not peer.call("get_state")["events_running"]
        assert demo_node.core.isSequenceRunning()  # back to the continuous stream
    finally:
        peer.close()


def test_events_start_on_their_absolute_times(demo_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    peer = Peer(demo_node, zmq_ctx)
    try:
        start = now_ns() + 400_000_000  # the session starts on first submit
        n = 30
        events = [
            {"t_start_ns": start + i * 25_000_000, "exposure": 1.0, "index": {"t": i}}
            for i in range(n)
        ]
        peer.call("submit_events", {"events": events})
        frames = peer.event_frames(n)
        assert len(frames) == n
        errors = np.array([f.header.state["event"]["start_error_ms"] for f in frames])
        assert np.all(errors >= 0.0)  # never early
        assert np.percentile(errors, 90) < 5.0  # and on time, whatever came before
        starts = np.array([f.header.t_exposure_start_ns for f in frames])
        assert np.median(np.diff(starts)) / 1e6 == pytest.approx(25.0, abs=1.0)
    finally:
        peer.close()


def test_bad_events_are_refused_and_the_node_stays_up(
    demo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    peer = Peer(demo_node, zmq_ctx)
    try:
        cases: list[tuple[Any, str, str]] = [
            ([], "bad_args", "events"),
            ([{"exposure": -1.0}], "bad_args", "events[0]"),
            ([{"warp_drive": 1}], "bad_args", "events[0].warp_drive"),
            ([{"x_pos": 0.0}, {"x_pos": 1e6}], "out_of_limits", "events[1].x_pos"),
            ([{"exposure": 1e9}], "out_of_limits", "events[0].exposure"),
            ([{"properties": [["Toaster", "Heat", 1]]}], "bad_args", "Toaster"),
            ([{"t_start_ns": "soon"}], "bad_args", "t_start_ns"),
        ]
        for events, code, text in cases:
            with pytest.raises(CommandError) as info:
                peer.client.call("submit_events", {"events": events})
            assert info.value.code == code, events
            assert text in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(CommandError) as unknown_prop:
            peer.client.call("set_property", {"device": "Camera", "property": "Warp", "value": 1})
        assert "Warp" in str(unknown_prop.value)
        with pytest.raises(CommandError) as out_of_range:
            peer.client.call(
                "set_property", {"device": "Camera", "property": "Gain", "value": 1000}
            )
        assert out_of_range.value.code == "out_of_limits" and "Camera.Gain" in str(
            out_of_range.value
        )
        assert not peer.call("get_state")["events_running"]
        snap = peer.call("snap")
        assert snap["shape"] == [512, 512]
    finally:
        peer.close()


def test_snap_publishes_one_marked_frame(demo_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    peer = Peer(demo_node, zmq_ctx)
    try:
        seq = peer.call("snap")["seq"]
        deadline = time.monotonic() + 5
        snapped = None
        while snapped is None and time.monotonic() < deadline:
            if peer.sub.poll(100):
                frame = decode_frame(peer.sub.recv_multipart(copy=False))
                if frame.header.seq == seq:
                    snapped = frame
        assert snapped is not None and snapped.header.state.get("snap") is True
        assert demo_node.core.isSequenceRunning()
    finally:
        peer.close()


def test_min_start_time_is_relative_to_the_session_start() -> None:
    t0 = 1_000_000_000
    events = parse_events([{"min_start_time": 0.25}, {"t_start_ns": 5}, {}], t0)
    assert events[0].metadata[TARGET_KEY] == t0 + 250_000_000
    assert events[0].min_start_time is None  # the runner must not wait a second time
    assert events[1].metadata[TARGET_KEY] == 5
    assert TARGET_KEY not in events[2].metadata
    with pytest.raises(ProtocolError, match=r"events\[0\]\.metadata"):
        parse_events([{"metadata": {"x": "y" * 5000}}], t0)


@pytest.fixture
def slm_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    return make_node(
        DriverConfig(
            watchdog_ms=5000,
            exposure_ms=5.0,
            limits=Limits(max_laser_spots=2, max_laser_power_mw=3.0),
            devices=DeviceNames(laser_kind="slm", slm_pixel_um=0.2, slm_max_power_mw=5.0),
            twin=TwinSettings(slm_px=32),
        )
    )


def test_slm_images_obey_the_laser_limits(slm_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    peer = Peer(slm_node, zmq_ctx)
    try:
        image = np.zeros((32, 32), dtype=int)
        image[3, 4] = 100  # 100/255 x 5 mW = 1.96 mW
        result = peer.call("set_slm_image", {"image": image.tolist()})
        assert result["lit_pixels"] == 1
        laser = peer.call("get_state")["laser"]
        assert laser == [pytest.approx({"x_um": 0.8, "y_um": 0.6, "power_mw": 100 / 255 * 5})]
        too_bright = np.zeros((32, 32), dtype=int)
        too_bright[1, 1] = 255  # 5 mW > 3 mW limit
        with pytest.raises(CommandError) as info:
            peer.client.call("set_slm_image", {"image": too_bright.tolist()})
        assert info.value.code == "out_of_limits" and "power_mw" in str(info.value)
        too_many = np.zeros((32, 32), dtype=int)
        too_many[0, :3] = 10
        with pytest.raises(CommandError) as many:
            peer.client.call("set_slm_image", {"image": too_many.tolist()})
        assert "max_laser_spots" in str(many.value)
        with pytest.raises(CommandError) as shape:
            peer.client.call("set_slm_image", {"image": [[1, 2], [3, 4]]})
        assert "32x32" in str(shape.value)
        # the same limits hold for SLM images inside events
        with pytest.raises(CommandError) as in_event:
            peer.client.call(
                "submit_events", {"events": [{"slm_image": {"data": too_bright.tolist()}}]}
            )
        assert in_event.value.code == "out_of_limits"
        assert np.count_nonzero(slm_node.core.getSLMImage("SLM")) == 1  # refusals change nothing
        peer.call("laser_off")
        assert np.count_nonzero(slm_node.core.getSLMImage("SLM")) == 0
    finally:
        peer.close()


def test_commands_are_served_while_events_wait_and_cancel_drops_them(
    demo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    """The MDA runs on the node thread, but between events the node keeps serving."""
    peer = Peer(demo_node, zmq_ctx)
    try:
        later = now_ns() + 3_000_000_000
        peer.call("submit_events", {"events": [{"t_start_ns": later, "exposure": 1.0}]})
        t0 = time.monotonic()
        state = peer.call("get_state")
        moved = peer.call("move_stage", {"x_um": 12.0, "y_um": 3.0})
        replied_s = time.monotonic() - t0
        assert state["events_running"] and moved["stage_um"] == [12.0, 3.0]
        assert replied_s < 1.0  # not held until the event at +3 s
        # a second submit joins the same session, ids continue
        assert peer.call("submit_events", {"events": [{"t_start_ns": later}]})["ids"] == [1]
        peer.call("stop_events", {"cancel": True})
        deadline = time.monotonic() + 2
        while peer.call("get_state")["events_running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert now_ns() < later  # ended by the cancel, not by running the events
        assert not peer.call("get_state")["events_running"]
        assert peer.event_frames(1, timeout_s=0.3) == []  # the cancelled events never ran
        assert demo_node.event_frames_published == 0
        assert demo_node.core.isSequenceRunning()
    finally:
        peer.close()


def test_engine_waits_for_hardware_only_when_an_event_changes_it(
    demo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    core = demo_node.core
    waits: list[int] = []
    original = core.waitForSystem

    def counting_wait() -> None:
        waits.append(now_ns())
        original()

    core.waitForSystem = counting_wait  # type: ignore[method-assign]
    peer = Peer(demo_node, zmq_ctx)
    try:
        exposure = core.getExposure()
        events = [
            {"exposure": exposure, "index": {"t": 0}},  # nothing changes
            {"x_pos": 5.0, "y_pos": 6.0, "index": {"t": 1}},  # moves
            {"x_pos": 5.0, "y_pos": 6.0, "index": {"t": 2}},  # already there
            {"exposure": exposure + 1.0, "index": {"t": 3}},  # camera setting changes
        ]
        peer.call("submit_events", {"events": events})
        frames = peer.event_frames(4)
        assert [f.header.state["event"]["index"]["t"] for f in frames] == [0, 1, 2, 3]
        assert len(waits) == 2
        assert core.getXYPosition() == pytest.approx((5.0, 6.0), abs=0.01)
        assert core.getExposure() == pytest.approx(exposure + 1.0)
        starts = [f.header.t_exposure_start_ns for f in frames]
        assert starts == sorted(starts)
        # pymmcore-plus's per-event INFO log is quietened only while a session runs
        peer.call("stop_events")
        deadline = time.monotonic() + 5
        while peer.call("get_state")["events_running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert logging.getLogger("pymmcore-plus").level == logging.NOTSET
    finally:
        core.waitForSystem = original  # type: ignore[method-assign]
        peer.close()


@pytest.fixture
def short_watchdog_slm_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    return make_node(
        DriverConfig(
            watchdog_ms=200,
            exposure_ms=5.0,
            limits=Limits(max_laser_spots=2, max_laser_power_mw=3.0),
            devices=DeviceNames(laser_kind="slm", slm_pixel_um=0.2, slm_max_power_mw=5.0),
            twin=TwinSettings(slm_px=32),
        )
    )


def test_watchdog_ends_a_lit_event_session_when_the_agent_goes_silent(
    short_watchdog_slm_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    node = short_watchdog_slm_node
    agent = Peer(node, zmq_ctx)
    monitor = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    try:
        image = np.zeros((32, 32), dtype=int)
        image[2, 2] = 100
        later = now_ns() + 5_000_000_000
        agent.call(
            "submit_events",
            {"events": [{"t_start_ns": later, "slm_image": {"data": image.tolist()}}]},
        )
        agent.call("set_laser", {"spots": [{"x_um": 1.0, "y_um": 1.0, "power_mw": 1.0}]})
        assert np.count_nonzero(node.core.getSLMImage("SLM")) == 1
        time.sleep(0.6)  # the agent goes silent; a monitor's polls do not feed the watchdog
        state = monitor.call("get_state").result
        assert state["watchdog_tripped"] and state["laser"] == []
        assert not state["events_running"]  # the queued lit event was dropped
        assert np.count_nonzero(node.core.getSLMImage("SLM")) == 0
        assert node.event_frames_published == 0
    finally:
        monitor.close()
        agent.close()
