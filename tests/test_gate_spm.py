"""The SPM node's gate: any arguments are within the limits or refused in one line."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.protocol import ProtocolError
from drivers.spm_config import SpmLimits
from drivers.spm_gate import SpmGate

LIMITS = SpmLimits(bias_v=(-2.0, 2.0), x_um=(-1.0, 1.0), y_um=(-1.0, 1.0), max_scan_pixels=64)
GATE = SpmGate(LIMITS)

anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=3),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.lists(st.floats(min_value=-2, max_value=2), max_size=3),
)
fields = st.sampled_from(
    [
        "x_um", "y_um", "bias_v", "width_um", "height_um", "angle_deg", "pixels", "lines",
        "channels", "bias_from_v", "bias_to_v", "points", "sweeps", "backward", "positions_um",
    ]
)  # fmt: skip
argument_maps = st.dictionaries(fields, anything, max_size=10)


def _within(value: float, rng: tuple[float, float]) -> bool:
    return math.isfinite(value) and rng[0] <= value <= rng[1]


@settings(max_examples=300, deadline=None)
@given(argument_maps)
def test_every_spm_command_is_within_limits_or_refused(args: dict[str, Any]) -> None:
    checks = {
        "move_tip": lambda: GATE.tip("move_tip", args),
        "set_bias": lambda: GATE.bias("set_bias", args),
        "scan": lambda: GATE.scan(args),
        "spectrum": lambda: GATE.spectrum("spectrum", args),
        "spectra": lambda: GATE.positions("spectra", args.get("positions_um")),
    }
    for cmd, check in checks.items():
        try:
            result = check()
        except ProtocolError as exc:
            assert exc.code in {"bad_args", "out_of_limits"} and "\n" not in str(exc), cmd
            continue
        if cmd == "move_tip":
            assert _within(result[0], LIMITS.x_um) and _within(result[1], LIMITS.y_um)
        elif cmd == "set_bias":
            assert _within(result, LIMITS.bias_v)
        elif cmd == "scan":
            w = result.window
            a = math.radians(w["angle_deg"])
            cos, sin = abs(math.cos(a)), abs(math.sin(a))
            half_x = 0.5 * (w["width_um"] * cos + w["height_um"] * sin)
            half_y = 0.5 * (w["width_um"] * sin + w["height_um"] * cos)
            for centre, half, rng in (
                (w["x_um"], half_x, LIMITS.x_um),
                (w["y_um"], half_y, LIMITS.y_um),
            ):
                assert _within(centre - half, rng) and _within(centre + half, rng)
            assert 1 <= result.pixels <= 64 and 1 <= result.lines <= 64
        elif cmd == "spectrum":
            assert _within(result.start_v, LIMITS.bias_v) and _within(result.end_v, LIMITS.bias_v)
            assert 1 <= result.sweeps <= LIMITS.max_spectrum_sweeps


@pytest.mark.parametrize(
    ("cmd", "args"),
    [
        ("set_bias", {"bias_v": math.nan}),
        ("set_bias", {"bias_v": True}),
        ("move_tip", {"x_um": math.inf, "y_um": 0.0}),
        ("spectrum", {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 64,
                      "sweeps": 2**31 - 1}),
        ("spectrum", {"x_um": 0, "y_um": 0, "bias_from_v": -1, "bias_to_v": 1, "points": 64.0}),
        ("scan", {"x_um": 0, "y_um": 0, "width_um": math.nan, "height_um": 1, "pixels": 8,
                  "lines": 8, "channels": ["Z"]}),
    ],
)  # fmt: skip
def test_nan_inf_bool_and_huge_sweeps_are_refused(cmd: str, args: dict[str, Any]) -> None:
    check = {
        "set_bias": lambda: GATE.bias(cmd, args),
        "move_tip": lambda: GATE.tip(cmd, args),
        "spectrum": lambda: GATE.spectrum(cmd, args),
        "scan": lambda: GATE.scan(args),
    }[cmd]
    with pytest.raises(ProtocolError) as info:
        check()
    assert info.value.code in {"bad_args", "out_of_limits"} and str(info.value).startswith(cmd)
