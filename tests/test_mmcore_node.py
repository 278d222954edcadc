"""The same driver node on Micro-Manager's C++ demo adapters (mm-test-adapters, offline)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq

from drivers.config import DriverConfig, Limits
from drivers.mmcore_node import DriverNode
from drivers.serve import load_mmcore
from drivers.transport import CommandClient, CommandError, StreamSubscriber


@pytest.fixture
def demo_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    limits = Limits(
        properties={"Camera.Mode": ["Noise", "Artificial Waves"]},
        config_groups=["Camera", "Channel"],
    )
    return make_node(DriverConfig(kind="mmcore", mm_config="demo", exposure_ms=5.0, limits=limits))


def _client(node: DriverNode, ctx: zmq.Context) -> CommandClient:
    client = CommandClient(ctx, node.endpoints[1], timeout_ms=3000)
    client.call("get_state", timeout_ms=5000)
    return client


def test_demo_camera_streams_through_the_protocol(
    demo_node: DriverNode, zmq_ctx: zmq.Context
) -> None:
    _client(demo_node, zmq_ctx).close()
    sub = StreamSubscriber(zmq_ctx, demo_node.endpoints[0])
    try:
        frames = []
        for _ in range(200):
            frame = sub.recv_newest(timeout_ms=100)
            if frame is not None:
                frames.append(frame)
            if len(frames) >= 3:
                break
    finally:
        sub.close()
    assert len(frames) >= 3
    assert frames[0].data.shape == (512, 512) and frames[0].data.dtype == np.uint16
    assert frames[-1].header.seq > frames[0].header.seq
    assert frames[0].header.state["exposure_ms"] == pytest.approx(5.0)


def test_demo_commands_and_their_limits(demo_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    client = _client(demo_node, zmq_ctx)
    try:
        assert client.call("move_stage", {"x_um": 12.0, "y_um": -3.0, "wait": True}).result[
            "stage_um"
        ] == [
            12.0,
            -3.0,
        ]
        assert demo_node.core.getXYPosition() == pytest.approx((12.0, -3.0))
        client.call("move_z", {"z_um": 4.5, "wait": True})
        assert demo_node.core.getPosition() == pytest.approx(4.5)
        with pytest.raises(CommandError) as z_far:
            client.call("move_z", {"z_um": 5000.0})
        assert z_far.value.code == "out_of_limits" and "z_um" in str(z_far.value)

        client.call("set_property", {"device": "Camera", "property": "Mode", "value": "Noise"})
        assert demo_node.core.getProperty("Camera", "Mode") == "Noise"
        with pytest.raises(CommandError) as not_allowed:
            client.call(
                "set_property", {"device": "Camera", "property": "Mode", "value": "Rainbow"}
            )
        assert not_allowed.value.code == "out_of_limits" and "Rainbow" in str(not_allowed.value)
        with pytest.raises(CommandError) as no_device:
            client.call("set_property", {"device": "Toaster", "property": "Heat", "value": 1})
        assert no_device.value.code == "bad_args" and "Toaster" in str(no_device.value)

        groups = demo_node.core.getAvailableConfigGroups()
        group = groups[0]
        preset = demo_node.core.getAvailableConfigs(group)[-1]
        client.call("set_config", {"group": group, "preset": preset})
        assert demo_node.core.getCurrentConfig(group) == preset
        with pytest.raises(CommandError) as bad_preset:
            client.call("set_config", {"group": group, "preset": "nope"})
        assert "preset" in str(bad_preset.value)

        client.call("set_shutter", {"open": True})
        assert demo_node.core.getShutterOpen()
        with pytest.raises(CommandError) as no_laser:
            client.call("set_laser", {"spots": [{"x_um": 1.0, "y_um": 1.0, "power_mw": 0.1}]})
        assert no_laser.value.code == "device_error" and "Laser" in str(no_laser.value)
        assert client.call("get_state").result["frames_published"] > 0
    finally:
        client.close()


def test_missing_or_broken_micro_manager_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"driver\.mm_config: file .* does not exist"):
        load_mmcore(DriverConfig(kind="mmcore", mm_config=str(tmp_path / "none.cfg")))
    broken = tmp_path / "broken.cfg"
    broken.write_text("Device,Camera,NoSuchLibrary,NoSuchCamera\n")
    with pytest.raises(ValueError, match=r"driver\.mm_config: .*broken\.cfg could not be loaded"):
        load_mmcore(DriverConfig(kind="mmcore", mm_config=str(broken)))


def test_a_shutter_in_the_camera_module_caps_exposures_to_the_watchdog(
    demo_node: DriverNode, make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    """MMCore runs DemoCamera's shutter and camera one call at a time: a snap longer than
    the watchdog would keep the shutter open past it, so such exposures are refused."""
    cap = demo_node.gate.exposure_ms[1]
    assert cap == pytest.approx((500 - 50) / 2)  # watchdog_ms 500, ReadoutTime 0
    client = _client(demo_node, zmq_ctx)
    try:
        client.call("acquire_control")
        assert client.call("set_exposure", {"exposure_ms": cap}).result["exposure_ms"] == cap
        for cmd, args in (
            ("set_exposure", {"exposure_ms": cap + 1}),
            ("submit_events", {"events": [{"exposure": cap + 1}]}),
        ):
            with pytest.raises(CommandError) as info:
                client.call(cmd, args)
            message = str(info.value)
            assert info.value.code == "out_of_limits" and "\n" not in message
            assert "White Light Shutter" in message and "DemoCamera" in message
        slow = DriverConfig(kind="mmcore", mm_config="demo", exposure_ms=400.0)
        with pytest.raises(ValueError, match=r"driver.exposure_ms: .*watchdog_ms"):
            make_node(slow)
    finally:
        client.close()
