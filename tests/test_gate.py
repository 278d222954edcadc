"""The actuation gate and the control lease, against the attacks of issue 16 (twin node)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq

from drivers.config import DriverConfig, Limits
from drivers.mmcore_node import LIGHT_TRUTH_TOPIC, DriverNode
from drivers.protocol import EVENT_TOPIC, now_ns, unpack_map
from drivers.transport import CommandClient, CommandError, StreamSubscriber

MakeNode = Callable[[DriverConfig], DriverNode]
SPOT = {"x_um": 8.0, "y_um": 8.0, "power_mw": 1.0}


def _client(node: DriverNode, ctx: zmq.Context) -> CommandClient:
    client = CommandClient(ctx, node.endpoints[1], timeout_ms=3000)
    client.call("get_state", timeout_ms=5000)
    return client


def _refused(client: CommandClient, cmd: str, args: dict[str, Any], code: str) -> str:
    with pytest.raises(CommandError) as info:
        client.call(cmd, args)
    message = str(info.value)
    assert info.value.code == code, message
    assert "\n" not in message and message.startswith(f"{cmd}:")
    return message


def _wait(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _slm_lit(node: DriverNode) -> int:
    return int(np.count_nonzero(node.core.getSLMImage("SLM")))


def _galvo_mw(node: DriverNode) -> float:
    return float(node.core.getProperty("Laser", "Power_mW"))


@pytest.fixture
def galvo_node(make_node: MakeNode) -> DriverNode:
    limits = Limits(properties={"Camera.Exposure": (1.0, 1000.0)})
    return make_node(
        DriverConfig(watchdog_ms=200, heartbeat_ms=20, exposure_ms=10.0, limits=limits)
    )


def test_slm_image_on_a_galvo_config_is_judged_as_light_on_the_sample(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    """The attack: 20 SLM spots x 5 mW on a galvo config (limits 3 mW, 1 spot)."""
    client = _client(galvo_node, zmq_ctx)
    sub = StreamSubscriber(zmq_ctx, galvo_node.endpoints[0])
    try:
        image = np.zeros((128, 128), dtype=np.uint8)
        image[10, 10:30] = 255
        message = _refused(client, "set_slm_image", {"image": image.tolist()}, "out_of_limits")
        assert "20 spots" in message and "[0, 1]" in message
        assert _slm_lit(galvo_node) == 0
        one = np.zeros((128, 128), dtype=np.uint8)
        one[40, 50] = 255  # 5 mW: above the 3 mW spot limit
        assert "power_mw" in _refused(
            client, "set_slm_image", {"image": one.tolist()}, "out_of_limits"
        )
        one[40, 50] = 100  # 1.96 mW at (10, 8) um
        client.call("set_slm_image", {"image": one.tolist()})
        laser = client.call("get_state").result["laser"]
        assert len(laser) == 1 and laser[0]["power_mw"] == pytest.approx(100 / 255 * 5)
        deadline = time.monotonic() + 5
        header_laser: list[Any] = []
        while not header_laser and time.monotonic() < deadline:
            frame = sub.recv_newest(100)
            header_laser = frame.header.state["laser"] if frame is not None else []
        assert header_laser == laser  # frame headers report the SLM's light too
        # The galvo would make a second spot on the sample: refused, nothing changes.
        _refused(client, "set_laser", {"spots": [SPOT]}, "out_of_limits")
        assert _galvo_mw(galvo_node) == 0.0
        client.call("laser_off")
        assert _slm_lit(galvo_node) == 0 and client.call("get_state").result["laser"] == []
    finally:
        sub.close()
        client.close()


def test_the_watchdog_blanks_an_slm_lit_on_a_galvo_config(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(galvo_node, zmq_ctx)
    try:
        image = np.zeros((128, 128), dtype=np.uint8)
        image[20, 20] = 50
        client.call("set_slm_image", {"image": image.tolist()})
        assert _slm_lit(galvo_node) == 1
        assert _wait(lambda: _slm_lit(galvo_node) == 0)
        assert galvo_node.watchdog_tripped and galvo_node.laser == []
    finally:
        client.close()


def test_camera_exposure_property_is_bounded_and_nan_is_refused(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(galvo_node, zmq_ctx)
    sub = StreamSubscriber(zmq_ctx, galvo_node.endpoints[0])
    try:
        prop = {"device": "Camera", "property": "Exposure"}
        assert "[1, 1000]" in _refused(
            client, "set_property", {**prop, "value": 1e9}, "out_of_limits"
        )
        _refused(client, "set_property", {**prop, "value": math.nan}, "bad_args")
        _refused(client, "set_property", {**prop, "value": math.inf}, "bad_args")
        _refused(client, "set_property", {**prop, "value": True}, "bad_args")
        assert "not writable" in _refused(
            client,
            "set_property",
            {"device": "Camera", "property": "Binning", "value": 2},
            "out_of_limits",
        )
        client.call("set_property", {**prop, "value": 20.0})
        assert galvo_node.core.getExposure() == pytest.approx(20.0)
        seqs = set()
        deadline = time.monotonic() + 5
        while len(seqs) < 3 and time.monotonic() < deadline:  # still streaming
            frame = sub.recv_newest(100)
            if frame is not None:
                seqs.add(frame.header.seq)
        assert len(seqs) >= 3
    finally:
        sub.close()
        client.close()


@pytest.mark.parametrize(
    ("cmd", "args"),
    [
        ("set_laser", {"spots": [{**SPOT, "x_um": math.nan}]}),
        ("set_laser", {"spots": [{**SPOT, "power_mw": math.inf}]}),
        ("set_laser", {"spots": [{**SPOT, "power_mw": True}]}),
        ("set_laser", {"spots": [{**SPOT, "y_um": "8"}]}),
        ("move_stage", {"x_um": math.nan, "y_um": 0.0}),
        ("move_stage", {"x_um": 0.0, "y_um": 0.0, "wait": "yes"}),
        ("move_z", {"z_um": -math.inf}),
        ("set_exposure", {"exposure_ms": False}),
        ("set_shutter", {"open": 1}),
        ("submit_events", {"events": [{"exposure": math.nan}]}),
        ("submit_events", {"events": [{"x_pos": math.inf}]}),
    ],
)
def test_nan_inf_bool_and_wrong_types_are_refused_everywhere(
    galvo_node: DriverNode, zmq_ctx: zmq.Context, cmd: str, args: dict[str, Any]
) -> None:
    client = _client(galvo_node, zmq_ctx)
    try:
        with pytest.raises(CommandError) as info:
            client.call(cmd, args)
        assert info.value.code in {"bad_args", "out_of_limits"}, str(info.value)
        assert "\n" not in str(info.value)
        assert galvo_node.laser == [] and _galvo_mw(galvo_node) == 0.0
    finally:
        client.close()


def test_a_refused_command_never_grants_control_and_polls_never_feed_the_watchdog(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    """The attack: a second peer's refused command made it the controller, and its
    get_state polls kept a dead agent's laser on."""
    agent = _client(galvo_node, zmq_ctx)
    other = _client(galvo_node, zmq_ctx)
    try:
        agent.call("set_laser", {"spots": [SPOT]})
        holder = agent.call("get_state").result["controller"]
        assert "control is held" in _refused(
            other, "set_laser", {"spots": [SPOT]}, "not_controller"
        )
        # The agent dies; the other peer polls and sends an out-of-limits command.
        tripped = False
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not tripped:
            state = other.call("get_state").result
            tripped = state["watchdog_tripped"]
            if state["controller_live"] is False:
                _refused(
                    other, "set_laser", {"spots": [{**SPOT, "power_mw": 99.0}]}, "out_of_limits"
                )
        state = other.call("get_state").result
        assert tripped and state["laser"] == [] and _galvo_mw(galvo_node) == 0.0
        assert state["controller"] == holder  # the refused command granted nothing
    finally:
        agent.close()
        other.close()


def test_taking_control_from_a_live_peer_is_explicit_and_on_the_stream(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    agent = _client(galvo_node, zmq_ctx)
    other = _client(galvo_node, zmq_ctx)
    sub = StreamSubscriber(zmq_ctx, galvo_node.endpoints[0], topics=(EVENT_TOPIC,))
    try:
        time.sleep(0.05)  # the subscription reaches the node
        mine = agent.call("acquire_control").result["controller"]
        agent.call("heartbeat")
        _refused(other, "acquire_control", {}, "not_controller")
        _refused(other, "acquire_control", {"take": "yes"}, "bad_args")
        theirs = other.call("acquire_control", {"take": True}).result["controller"]
        assert theirs != mine
        _refused(agent, "set_laser", {"spots": [SPOT]}, "not_controller")
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not any(e["action"] == "taken" for e in events):
            sub.recv_newest(50)
            events += [m for t, m in sub.take_messages() if m.get("event") == "control"]
        taken = [e for e in events if e["action"] == "taken"]
        assert taken and taken[0]["peer"] == theirs and taken[0]["previous"] == mine
        agent.call("laser_off")  # making safe stays open to every peer
    finally:
        sub.close()
        agent.close()
        other.close()


def test_the_watchdog_trips_while_the_node_is_blocked_in_a_long_snap(
    make_node: MakeNode, zmq_ctx: zmq.Context
) -> None:
    """The attack: a 1 s exposure + snap held the watchdog (500 ms) to 2 s. Now the light
    goes off while the snap still runs (seen on the twin's light-truth topic)."""
    node = make_node(DriverConfig(watchdog_ms=100, heartbeat_ms=20, exposure_ms=10.0))
    truth = zmq_ctx.socket(zmq.SUB)
    truth.setsockopt(zmq.LINGER, 0)
    truth.setsockopt(zmq.SUBSCRIBE, LIGHT_TRUTH_TOPIC)
    truth.connect(node.endpoints[0])
    agent = _client(node, zmq_ctx)
    try:
        agent.call("set_exposure", {"exposure_ms": 1500.0})
        agent.call("set_laser", {"spots": [SPOT]})
        t_snap = now_ns()
        agent.send("snap", reply=False)  # the node blocks for 1.5 s; the agent dies
        assert _wait(lambda: node.watchdog_tripped, 10)
        assert _galvo_mw(node) == 0.0
        offs: list[int] = []
        deadline = time.monotonic() + 10
        while not offs and time.monotonic() < deadline:
            if truth.poll(100):
                record = unpack_map(truth.recv_multipart()[1], "light")
                changes = record["changes"]
                offs += [c["t_ns"] for c in changes if not c["spots"] and c["t_ns"] > t_snap]
        assert offs and offs[0] < t_snap + 1_500_000_000  # off while the snap still ran
    finally:
        agent.close()
        truth.close()


def test_safe_state_is_read_back_from_the_devices(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    client = _client(galvo_node, zmq_ctx)
    try:
        client.call("set_laser", {"spots": [SPOT]})
        client.call("laser_off")
        state = client.call("get_state").result
        assert state["safe_verified"] is True and _galvo_mw(galvo_node) == 0.0
        assert galvo_node._light_read_back() == []
        galvo_node.core.setProperty("Laser", "Power_mW", 2.0)  # lit behind the node's back
        assert galvo_node._light_read_back() == ["Laser.Power_mW reads 2"]
    finally:
        client.close()


def test_an_event_slm_image_is_checked_again_when_it_is_shown(
    galvo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    """Allowed when submitted (galvo off), then the galvo lit: showing the event's SLM
    spot would put two spots on a one-spot galvo config, so it is not shown."""
    client = _client(galvo_node, zmq_ctx)
    try:
        image = np.zeros((128, 128), dtype=np.uint8)
        image[30, 30] = 100
        event = {"slm_image": {"data": image.tolist()}, "t_start_ns": now_ns() + 400_000_000}
        client.call("submit_events", {"events": [event]})
        client.call("set_laser", {"spots": [SPOT]})
        # get_state from the holder feeds the watchdog while the event waits its turn
        assert _wait(lambda: client.call("get_state").result["event_frames_published"] == 1)
        assert _slm_lit(galvo_node) == 0 and _galvo_mw(galvo_node) == SPOT["power_mw"]
        assert client.call("get_state").result["event_light_refused"] >= 1
    finally:
        client.close()
