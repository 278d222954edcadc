"""Event hooks: agent logic answering each event frame on the driver node's own thread."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from pydantic import ValidationError

from drivers.config import DeviceNames, DriverConfig, Limits, TwinSettings
from drivers.event_hooks import EventHook, load_event_hook
from drivers.mda import EventFrame
from drivers.mmcore_node import DriverNode
from drivers.protocol import EVENT_TOPIC, FRAME_PREFIX, Frame, decode_frame, unpack_map
from drivers.serve import build_node
from drivers.transport import CommandClient

NodeFactory = Callable[..., DriverNode]


@pytest.fixture
def hooked_node(
    ipc_dir: Path, zmq_ctx: zmq.Context, run_node: Callable[[DriverNode], DriverNode]
) -> NodeFactory:
    """Start a driver node (demo adapters unless a config says otherwise) with a hook."""
    numbers = itertools.count()

    def start(hook: EventHook | None, config: DriverConfig | None = None) -> DriverNode:
        n = next(numbers)
        config = (config or DriverConfig(kind="mmcore", exposure_ms=2.0)).model_copy(
            update={
                "stream_endpoint": f"ipc://{ipc_dir}/hs{n}",
                "command_endpoint": f"ipc://{ipc_dir}/hc{n}",
                "stream_hwm": 1000,
            }
        )
        return run_node(build_node(config, ctx=zmq_ctx, event_hook=hook))

    return start


class Listener:
    """A client plus a SUB socket keeping every event frame and every event message."""

    def __init__(self, node: DriverNode, ctx: zmq.Context) -> None:
        self.client = CommandClient(ctx, node.endpoints[1], timeout_ms=5000)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 10_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, FRAME_PREFIX)
        self.sub.setsockopt(zmq.SUBSCRIBE, EVENT_TOPIC)
        self.sub.connect(node.endpoints[0])
        self.client.call("get_state")
        assert self.sub.poll(5000), "no frame from the node"
        self.frames: list[Frame] = []
        self.messages: list[dict[str, Any]] = []

    def wait(self, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, "timed out"
            if not self.sub.poll(100):
                continue
            parts = self.sub.recv_multipart(copy=False)
            if bytes(parts[0].buffer) == EVENT_TOPIC:
                self.messages.append(unpack_map(parts[1].buffer, "event"))
                continue
            frame = decode_frame(parts)
            if "event" in frame.header.state:
                self.frames.append(frame)

    def close(self) -> None:
        self.client.close()
        self.sub.close()


@pytest.fixture
def listen(zmq_ctx: zmq.Context) -> Iterator[Callable[[DriverNode], Listener]]:
    made: list[Listener] = []

    def make(node: DriverNode) -> Listener:
        made.append(Listener(node, zmq_ctx))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


def test_a_hook_chains_events_and_every_frame_is_still_published(
    hooked_node: NodeFactory, listen: Callable[[DriverNode], Listener]
) -> None:
    seen: list[EventFrame] = []

    def hook(frame: EventFrame) -> list[dict[str, Any]] | None:
        seen.append(frame)
        step = int(frame.event.index.get("t", 0))
        if step >= 4:
            return None
        return [{"exposure": 1.0 + step, "index": {"t": step + 1}, "metadata": {"by": "hook"}}]

    node = hooked_node(hook)
    peer = listen(node)
    peer.client.call("submit_events", {"events": [{"exposure": 1.0, "index": {"t": 0}}]})
    peer.wait(lambda: len(peer.frames) == 5)
    assert [f.event_id for f in seen] == [0, 1, 2, 3, 4]
    assert [f.header.state["event"]["index"] for f in peer.frames] == [{"t": t} for t in range(5)]
    assert [f.header.state["event"]["exposure_ms"] for f in peer.frames] == [1, 1, 2, 3, 4]
    assert peer.frames[-1].header.state["event"]["metadata"] == {"by": "hook"}
    assert np.array_equal(seen[2].image, peer.frames[2].data)  # the hook saw that very image
    state = peer.client.call("get_state").result
    assert state["event_hook"] and state["hook_calls"] == 5 and state["hook_refusals"] == 0


def test_events_from_a_hook_obey_the_same_limits_as_the_command(
    hooked_node: NodeFactory, listen: Callable[[DriverNode], Listener]
) -> None:
    def hook(frame: EventFrame) -> list[dict[str, Any]] | None:
        if frame.event_id == 0:
            return [{"exposure": 1e6}]  # far above limits.exposure_ms
        return None

    node = hooked_node(hook)
    peer = listen(node)
    peer.client.call("submit_events", {"events": [{"exposure": 1.0}]})
    peer.wait(lambda: any(m["event"] == "hook_refused" for m in peer.messages))
    refused = next(m for m in peer.messages if m["event"] == "hook_refused")["message"]
    assert "event_hook: field 'events[0].exposure'" in refused and "allowed range" in refused
    peer.client.call("submit_events", {"events": [{"exposure": 1.0}]})  # the node goes on
    peer.wait(lambda: len(peer.frames) == 2)
    state = peer.client.call("get_state").result
    assert state["hook_refusals"] == 1 and state["hook_calls"] == 2


def test_a_raising_hook_cancels_its_session_and_the_node_stays_up(
    hooked_node: NodeFactory, listen: Callable[[DriverNode], Listener]
) -> None:
    def hook(frame: EventFrame) -> list[dict[str, Any]] | None:
        raise RuntimeError("detector crashed")

    node = hooked_node(hook)
    peer = listen(node)
    later = [{"exposure": 1.0, "min_start_time": 30.0}]  # queued, never due in this test
    peer.client.call("submit_events", {"events": [{"exposure": 1.0}, *later]})
    peer.wait(lambda: any(m["event"] == "hook_failed" for m in peer.messages))
    failed = next(m for m in peer.messages if m["event"] == "hook_failed")["message"]
    assert failed == "event_hook: raised RuntimeError: detector crashed"
    deadline = time.monotonic() + 5
    while peer.client.call("get_state").result["events_running"]:
        assert time.monotonic() < deadline, "the session did not end"
        time.sleep(0.02)
    assert node.event_frames_published == 1  # the queued event was dropped


def test_an_overrunning_hook_makes_a_lit_rig_safe_while_it_still_runs(
    hooked_node: NodeFactory, listen: Callable[[DriverNode], Listener]
) -> None:
    config = DriverConfig(
        watchdog_ms=60_000,
        exposure_ms=5.0,
        hook_timeout_ms=50,
        limits=Limits(max_laser_spots=2, max_laser_power_mw=3.0),
        devices=DeviceNames(laser_kind="slm", slm_pixel_um=0.2, slm_max_power_mw=5.0),
        twin=TwinSettings(slm_px=32),
    )
    in_hook: list[float] = []
    slm_lit_after_timeout: list[int] = []
    node_box: list[DriverNode] = []

    def hook(frame: EventFrame) -> list[dict[str, Any]] | None:
        in_hook.append(time.monotonic())
        time.sleep(0.3)  # a stuck detector: 6x the budget
        slm_lit_after_timeout.append(int(np.count_nonzero(node_box[0].core.getSLMImage("SLM"))))
        return [{"exposure": 1.0}]

    node = hooked_node(hook, config)
    node_box.append(node)
    peer = listen(node)
    peer.client.call("set_laser", {"spots": [{"x_um": 1.0, "y_um": 1.0, "power_mw": 1.0}]})
    assert np.count_nonzero(node.core.getSLMImage("SLM")) == 1
    peer.client.call("submit_events", {"events": [{"exposure": 1.0}]})
    peer.wait(lambda: any(m["event"] == "hook_failed" for m in peer.messages))
    assert slm_lit_after_timeout == [0]  # dark before the hook returned
    failed = next(m for m in peer.messages if m["event"] == "hook_failed")["message"]
    assert "hook_timeout_ms" in failed and "[0, 50] ms" in failed
    state = peer.client.call("get_state").result
    assert state["laser"] == [] and state["hook_calls"] == 1
    assert node.event_frames_published == 1  # the overrunning hook's event never ran


def test_config_errors_name_the_hook_field() -> None:
    with pytest.raises(ValueError, match=r"driver.event_hook: 'nope' must look like"):
        load_event_hook("nope", {})
    with pytest.raises(ValueError, match=r"driver.event_hook: cannot load 'agent.nope:x'"):
        load_event_hook("agent.nope:x", {})
    with pytest.raises(ValueError, match=r"driver.event_hook: cannot load"):
        load_event_hook("agent.plans.event_hooks:missing", {})
    with pytest.raises(ValueError, match=r"driver.event_hook_args: .* \(exposure_ms: Field"):
        load_event_hook("agent.plans.event_hooks:revisit_detections", {})
    with pytest.raises(ValueError, match=r"driver.event_hook_args: .* \(frames: Input should"):
        load_event_hook(
            "agent.plans.event_hooks:revisit_detections", {"exposure_ms": 5, "frames": 0}
        )
    with pytest.raises(ValidationError, match="kind 'pycromanager' has its own"):
        DriverConfig(kind="pycromanager", event_hook="agent.plans.event_hooks:revisit_detections")
    with pytest.raises(ValidationError, match="hook_timeout_ms"):
        DriverConfig(hook_timeout_ms=0)


def test_the_shipped_revisit_hook_revisits_screens_that_hold_objects(
    hooked_node: NodeFactory, listen: Callable[[DriverNode], Listener]
) -> None:
    config = DriverConfig(
        exposure_ms=10.0,
        event_hook="agent.plans.event_hooks:revisit_detections",
        event_hook_args={"exposure_ms": 30.0, "frames": 2},
    )
    node = hooked_node(None, config)
    peer = listen(node)
    screens = [
        {"exposure": 10.0, "index": {"p": 0}, "metadata": {"role": "screen"}},
        {"exposure": 10.0, "index": {"p": 1}, "metadata": {"role": "other"}},
    ]
    peer.client.call("submit_events", {"events": screens})
    peer.wait(lambda: len(peer.frames) == 4)
    events = [f.header.state["event"] for f in peer.frames]
    assert [e["metadata"].get("role") for e in events] == ["screen", "other", "revisit", "revisit"]
    revisits = events[2:]
    assert [e["index"] for e in revisits] == [{"p": 0, "revisit": 0}, {"p": 0, "revisit": 1}]
    assert all(e["exposure_ms"] == 30.0 and e["metadata"]["screen_id"] == 0 for e in revisits)
    assert revisits[0]["metadata"]["objects"] >= 1
