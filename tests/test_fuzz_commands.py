"""Property-based fuzzing of every driver command's arguments against a live twin node.

Whatever the arguments, a command is applied within the limits or refused with a
one-line error naming a field, the light the twin's devices put on the sample stays
within the limits, and the node keeps streaming.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.config import DeviceNames, DriverConfig, Limits
from drivers.light import LaserState, LightLimits, SlmCalibration, slm_image_spots
from drivers.mmcore_node import DriverNode
from drivers.transport import CommandClient, CommandError, StreamSubscriber

LIMITS = Limits(
    max_laser_power_mw=3.0,
    max_laser_spots=4,
    exposure_ms=(1.0, 30.0),
    properties={"Camera.Exposure": (1.0, 30.0)},
)
CODES = {"bad_args", "out_of_limits", "busy", "device_error", "not_controller", "unknown_command"}

nasty_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-50, max_value=300),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)
spot = st.fixed_dictionaries(
    {"x_um": nasty_numbers, "y_um": nasty_numbers, "power_mw": nasty_numbers}
) | st.dictionaries(st.text(max_size=6), nasty_numbers, max_size=3)
small_image = st.lists(
    st.lists(st.integers(min_value=-2, max_value=300), min_size=1, max_size=4), max_size=4
)


@st.composite
def slm_images(draw: st.DrawFn) -> Any:
    """Mostly full-size twin SLM images with a few lit pixels, sometimes junk."""
    if draw(st.booleans()):
        return draw(small_image | nasty_numbers)
    image = np.zeros((128, 128), dtype=np.int64)
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        r, c = draw(st.integers(0, 127)), draw(st.integers(0, 127))
        image[r, c] = draw(st.integers(min_value=0, max_value=255))
    return image.tolist()


event = st.dictionaries(
    st.sampled_from(["x_pos", "y_pos", "z_pos", "exposure", "min_start_time", "bogus"]),
    nasty_numbers,
    max_size=3,
)
commands = st.one_of(
    st.tuples(st.just("set_laser"), st.fixed_dictionaries({"spots": st.lists(spot, max_size=6)})),
    st.tuples(st.just("set_slm_image"), st.fixed_dictionaries({"image": slm_images()})),
    st.tuples(
        st.just("move_stage"),
        st.fixed_dictionaries({"x_um": nasty_numbers, "y_um": nasty_numbers}),
    ),
    st.tuples(st.just("move_z"), st.fixed_dictionaries({"z_um": nasty_numbers})),
    st.tuples(st.just("set_exposure"), st.fixed_dictionaries({"exposure_ms": nasty_numbers})),
    st.tuples(
        st.just("set_property"),
        st.fixed_dictionaries(
            {
                "device": st.sampled_from(["Camera", "Laser", "SLM", "XY", "Nope", 3]),
                "property": st.sampled_from(["Exposure", "Power_mW", "Binning", None]),
                "value": nasty_numbers,
            }
        ),
    ),
    st.tuples(
        st.just("set_config"),
        st.fixed_dictionaries({"group": nasty_numbers, "preset": nasty_numbers}),
    ),
    st.tuples(st.just("set_shutter"), st.fixed_dictionaries({"open": nasty_numbers})),
    st.tuples(
        st.just("submit_events"), st.fixed_dictionaries({"events": st.lists(event, max_size=3)})
    ),
    st.tuples(
        st.sampled_from(["laser_off", "stop_events", "heartbeat", "get_state", "no_such"]),
        st.dictionaries(st.text(max_size=5), nasty_numbers, max_size=2),
    ),
)


def _light_on_sample(node: DriverNode) -> list[LaserState]:
    """What the twin's devices themselves say is lit (not what the node believes)."""
    names = node.config.devices
    spots = slm_image_spots(node.core.getSLMImage("SLM"), SlmCalibration.from_devices(names))
    power = float(node.core.getProperty("Laser", "Power_mW"))
    if power > 0:
        x = float(node.core.getProperty("Laser", "X_um"))
        y = float(node.core.getProperty("Laser", "Y_um"))
        spots.append(LaserState(x, y, power))
    return spots


@pytest.fixture
def fuzz_node(make_node: Callable[[DriverConfig], DriverNode]) -> DriverNode:
    return make_node(
        DriverConfig(
            watchdog_ms=5000,
            heartbeat_ms=50,
            exposure_ms=5.0,
            limits=LIMITS,
            devices=DeviceNames(laser_kind="slm"),
        )
    )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(commands, min_size=1, max_size=4))
def test_every_command_with_any_arguments_stays_within_the_limits(
    fuzz_node: DriverNode, zmq_ctx: zmq.Context, batch: list[tuple[str, dict[str, Any]]]
) -> None:
    client = CommandClient(zmq_ctx, fuzz_node.endpoints[1], timeout_ms=5000)
    light = LightLimits.from_config(
        fuzz_node.config.limits, fuzz_node.config.devices, fuzz_node.field_um
    )
    try:
        for cmd, args in batch:
            try:
                client.call(cmd, args)
            except CommandError as exc:
                assert exc.code in CODES and "\n" not in str(exc), str(exc)
            light.check("fuzz", "sample", _light_on_sample(fuzz_node))  # raises if beyond
            exposure = fuzz_node.core.getExposure()
            assert math.isfinite(exposure) and 1.0 <= exposure <= 30.0
        client.call("stop_events", {"cancel": True})
    finally:
        client.close()


def test_the_node_still_streams_after_fuzzing(fuzz_node: DriverNode, zmq_ctx: zmq.Context) -> None:
    """A fixed ugly sequence, then frames must keep coming."""
    client = CommandClient(zmq_ctx, fuzz_node.endpoints[1], timeout_ms=5000)
    sub = StreamSubscriber(zmq_ctx, fuzz_node.endpoints[0])
    try:
        for args in ({"exposure_ms": math.nan}, {"exposure_ms": 1e308}, {"exposure_ms": "x"}):
            with pytest.raises(CommandError):
                client.call("set_exposure", args)
        with pytest.raises(CommandError):
            client.call("set_slm_image", {"image": [[math.nan] * 8] * 8})
        seqs = set()
        deadline = time.monotonic() + 5
        while len(seqs) < 3 and time.monotonic() < deadline:
            frame = sub.recv_newest(100)
            if frame is not None:
                seqs.add(frame.header.seq)
        assert len(seqs) >= 3
    finally:
        sub.close()
        client.close()
