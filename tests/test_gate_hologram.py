"""A phase SLM's hologram goes through the gate as the light it makes: the gate computes
each trap and its power from the hologram (Fourier optics) before it is shown, and counts
all the laser's power, however the hologram spreads it."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from drivers.config import DeviceNames, DriverConfig, Limits
from drivers.light import SlmCalibration as LightCalibration
from drivers.light import slm_image_spots
from drivers.mmcore_node import DriverNode
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
