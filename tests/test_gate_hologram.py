"""A phase SLM's hologram goes through the gate as the light it makes: the gate computes
each trap and its power from the hologram (Fourier optics) before it is shown, and counts
all the laser's power, however the hologram spreads it."""

from __future__ import annotations

import math
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zmq

from drivers.config import DeviceNames, DriverConfig, Limits
from drivers.light import SlmCalibration as LightCalibration
from drivers.light import slm_image_spots
from drivers.mmcore_node import DriverNode
from drivers.protocol import Reply, Request
from drivers.slm_optics import PhaseSlmSettings, phase_to_levels
from drivers.transport import CommandClient, CommandError
from simulators.optics.hologram import SlmCalibration, phase_for_traps

# The undiffracted light lands mid-field of the twin camera (25.6 um across).
CAL = SlmCalibration(
    slm_px=128, pixel_pitch_um=8.0, focal_length_um=500.0, zero_order_um=(12.8, 12.8)
)
PHASE = PhaseSlmSettings(calibration=CAL, laser_power_mw=8.0)
DEVICES = DeviceNames(laser_kind="slm", slm_phase=PHASE)


def _grating(period_px: float) -> np.ndarray:
    """A blazed grating: all the light into one trap off axis."""
    cols = np.mgrid[0 : CAL.slm_px, 0 : CAL.slm_px][1]
    return phase_to_levels(np.mod(2.0 * math.pi * cols / period_px, 2.0 * math.pi))


def test_every_milliwatt_of_a_hologram_is_on_some_spot() -> None:
    calibration = LightCalibration.from_devices(DEVICES)
    one = slm_image_spots(_grating(8.0), calibration)
    assert one[0].power_mw == pytest.approx(8.0, rel=0.02)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    diffuse = slm_image_spots(noise, calibration)  # light everywhere, no trap to speak of
    assert sum(s.power_mw for s in diffuse) == pytest.approx(8.0)


def test_the_gate_refuses_a_hologram_whose_trap_is_too_bright(
    make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    limits = Limits(max_laser_power_mw=3.0, max_laser_spots=10, max_total_power_mw=9.0)
    node = make_node(
        DriverConfig(
            watchdog_ms=60_000,
            exposure_ms=10.0,
            devices=DEVICES,
            limits=limits,
            twin={"slm_px": 128},
        )
    )
    client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=5000)
    try:
        client.call("acquire_control")
        with pytest.raises(CommandError) as info:  # 8 mW in one trap, 3 mW allowed
            client.call("set_slm_image", {"image": _grating(8.0).tolist()})
        assert info.value.code == "out_of_limits" and "power_mw" in str(info.value)
        assert not np.any(node.core.getSLMImage("SLM"))  # nothing was written
        traps = [[6.8 + 4.0 * i, 15.8] for i in range(4)]  # four traps of ~2 mW
        image = phase_to_levels(phase_for_traps(traps, CAL, iterations=20)[0])
        client.call("set_slm_image", {"image": image.tolist()})
        laser = client.call("get_state").result["laser"]
        assert len(laser) >= 4 and max(s["power_mw"] for s in laser) <= 3.0
        assert sum(s["power_mw"] for s in laser) == pytest.approx(8.0)
    finally:
        client.close()


# --- large holograms travel as a raw buffer after the command header ---------------------

BIG = SlmCalibration(
    slm_px=512, pixel_pitch_um=8.0, focal_length_um=2000.0, zero_order_um=(12.8, 12.8)
)
BIG_DEVICES = DeviceNames(
    laser_kind="slm", slm_phase=PhaseSlmSettings(calibration=BIG, laser_power_mw=8.0)
)


def _big_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    limits = Limits(max_laser_power_mw=3.0, max_laser_spots=10, max_total_power_mw=9.0)
    return make_node(
        DriverConfig(
            watchdog_ms=60_000,
            exposure_ms=10.0,
            devices=BIG_DEVICES,
            limits=limits,
            twin={"slm_px": 512},
        )
    )


def test_a_512_hologram_goes_through_the_gate_as_a_buffer(
    make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    node = _big_node(make_node)
    client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    try:
        caps = client.call("get_capabilities").result
        assert caps["max_command_buffer_bytes"] == 512 * 512
        client.call("acquire_control")
        cols = np.mgrid[0:512, 0:512][1]
        grating = phase_to_levels(np.mod(2.0 * math.pi * cols / 64.0, 2.0 * math.pi))
        with pytest.raises(CommandError) as info:  # 8 mW in one trap, 3 mW allowed
            client.call("set_slm_image", {"image": grating})
        assert info.value.code == "out_of_limits" and "power_mw" in str(info.value)
        assert not np.any(node.core.getSLMImage("SLM"))  # nothing was written
        traps = [[6.8 + 4.0 * i, 15.8] for i in range(4)]
        image = phase_to_levels(phase_for_traps(traps, BIG, iterations=10)[0])
        assert len(Request(1, "x", {"image": image}, 0).to_parts()[0]) < 200  # header only
        client.call("set_slm_image", {"image": image})
        assert np.array_equal(node.core.getSLMImage("SLM"), image)
        laser = client.call("get_state").result["laser"]
        expected = slm_image_spots(image, LightCalibration.from_devices(BIG_DEVICES))
        assert len(laser) == len(expected) >= 4  # the same hologram -> spots model
        assert max(s["power_mw"] for s in laser) <= 3.0
        assert sum(s["power_mw"] for s in laser) == pytest.approx(8.0)
    finally:
        client.close()


def test_an_image_beyond_the_node_limit_is_refused_in_one_line_before_it_is_sent(
    make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    node = _big_node(make_node)
    client = CommandClient(zmq_ctx, node.endpoints[1], timeout_ms=10_000)
    try:
        client.call("acquire_control")
        rejected = client.call("get_state").result["commands_rejected"]
        with pytest.raises(CommandError) as info:
            client.call("set_slm_image", {"image": np.zeros((1024, 1024), np.uint8)})
        message = str(info.value)
        assert info.value.code == "too_large" and "\n" not in message
        assert str(512 * 512) in message and "max_command_buffer_bytes" in message
        with pytest.raises(CommandError, match="dtype int64"):  # no silent conversion
            client.call("set_slm_image", {"image": np.zeros((512, 512), np.int64)})
        state = client.call("get_state").result
        assert state["commands_rejected"] == rejected  # none of it reached the node
    finally:
        client.close()


def _raw_reply(zmq_ctx: zmq.Context, endpoint: str, parts: list[bytes]) -> Reply:
    sock = zmq_ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(parts)
        assert sock.poll(10_000), "no reply to a malformed buffer"
        return Reply.from_wire(sock.recv())
    finally:
        sock.close()


def test_a_malformed_or_too_large_buffer_gets_a_one_line_error_reply(
    make_node: Callable[[DriverConfig], DriverNode], zmq_ctx: zmq.Context
) -> None:
    node = make_node(DriverConfig(watchdog_ms=60_000, exposure_ms=10.0, devices=DEVICES))
    endpoint = node.endpoints[1]  # a 128 x 128 SLM: 16 KB buffers, the socket takes 64 KB

    def header(shape: list[int], req_id: int) -> bytes:
        spec = {"field": "image", "shape": shape, "dtype": "uint8"}
        return msgpack.packb(
            {"v": 1, "id": req_id, "cmd": "set_slm_image", "args": {}, "buf": spec}
        )

    short = _raw_reply(zmq_ctx, endpoint, [header([128, 128], 7), bytes(100)])
    assert (short.id, short.ok, short.error_code) == (7, False, "malformed")
    assert "16384" in short.error_message and "\n" not in short.error_message
    big = _raw_reply(zmq_ctx, endpoint, [header([181, 181], 8), bytes(181 * 181)])
    assert (big.id, big.error_code) == (8, "too_large")
    assert str(128 * 128) in big.error_message
    assert not np.any(node.core.getSLMImage("SLM"))
