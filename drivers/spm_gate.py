"""The SPM node's actuation gate: tip position, bias, scan frames and sweep settings are
checked here, once, against ``SpmLimits`` before the Nanonis controller sees a value.

Every check is a one-line ProtocolError naming the field and its allowed range; NaN,
inf, bools-as-numbers and wrong types are refused. The node applies only what the gate
returned, so a refused command sends nothing to the controller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from drivers.node import check_within, number_arg
from drivers.protocol import ProtocolError
from drivers.spm_config import SpmLimits


@dataclass(frozen=True)
class SpectrumSettings:
    """One bias sweep's settings, as sent to BiasSpectr.PropsSet/LimitsSet."""

    start_v: float
    end_v: float
    points: int
    sweeps: int
    backward: bool


@dataclass(frozen=True)
class ScanRequest:
    """A checked scan: its frame (um, deg), pixels per line, lines and channel names."""

    window: dict[str, float]
    pixels: int
    lines: int
    channels: list[str]


def int_arg(cmd: str, args: dict[str, Any], name: str, default: int | None = None) -> int:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_args", f"{cmd}: field '{name}' must be an integer, got {value!r}")
    return value


def bool_arg(cmd: str, args: dict[str, Any], name: str, default: bool) -> bool:
    value = args.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(
            "bad_args", f"{cmd}: field '{name}' must be true or false, got {value!r}"
        )
    return value


class SpmGate:
    """The limits of one SPM node."""

    def __init__(self, limits: SpmLimits) -> None:
        self.limits = limits

    def tip(self, cmd: str, args: dict[str, Any]) -> tuple[float, float]:
        x = number_arg(cmd, args, "x_um")
        y = number_arg(cmd, args, "y_um")
        check_within(cmd, "x_um", x, self.limits.x_um, "um")
        check_within(cmd, "y_um", y, self.limits.y_um, "um")
        return x, y

    def bias(self, cmd: str, args: dict[str, Any]) -> float:
        bias = number_arg(cmd, args, "bias_v")
        check_within(cmd, "bias_v", bias, self.limits.bias_v, "V")
        return bias

    def positions(self, cmd: str, raw: Any) -> list[tuple[float, float]]:
        """A `spectra` batch's positions, every one within the limits (before any move)."""
        top = self.limits.max_spectra_per_batch
        if not isinstance(raw, list) or not 1 <= len(raw) <= top:
            raise ProtocolError(
                "bad_args",
                f"{cmd}: field 'positions_um' must be a list of 1 to {top} [x_um, y_um] pairs",
            )
        positions = []
        for i, item in enumerate(raw):
            if not isinstance(item, list | tuple) or len(item) != 2:
                raise ProtocolError(
                    "bad_args", f"{cmd}: positions_um[{i}] must be [x_um, y_um], got {item!r}"
                )
            pair = {"x_um": item[0], "y_um": item[1]}
            positions.append(self.tip(f"{cmd}: positions_um[{i}]", pair))
        return positions

    def spectrum(self, cmd: str, args: dict[str, Any]) -> SpectrumSettings:
        start = number_arg(cmd, args, "bias_from_v")
        end = number_arg(cmd, args, "bias_to_v")
        check_within(cmd, "bias_from_v", start, self.limits.bias_v, "V")
        check_within(cmd, "bias_to_v", end, self.limits.bias_v, "V")
        points = int_arg(cmd, args, "points")
        sweeps = int_arg(cmd, args, "sweeps", 1)
        backward = bool_arg(cmd, args, "backward", True)
        check_within(cmd, "points", points, (2, self.limits.max_spectrum_points), "points")
        check_within(cmd, "sweeps", sweeps, (1, self.limits.max_spectrum_sweeps), "sweeps")
        return SpectrumSettings(start, end, points, sweeps, backward)

    def scan(self, args: dict[str, Any]) -> ScanRequest:
        cmd = "scan"
        window = self._scan_window(cmd, args)
        pixels = int_arg(cmd, args, "pixels")
        lines = int_arg(cmd, args, "lines")
        top = self.limits.max_scan_pixels
        check_within(cmd, "pixels", pixels, (1, top), "pixels")
        check_within(cmd, "lines", lines, (1, top), "lines")
        wanted = args.get("channels")
        if (
            not isinstance(wanted, list)
            or not wanted
            or not all(isinstance(c, str) and c for c in wanted)
        ):
            raise ProtocolError(
                "bad_args",
                f"scan: field 'channels' must be a non-empty list of names, got {wanted!r}",
            )
        return ScanRequest(window, pixels, lines, list(wanted))

    def _scan_window(self, cmd: str, args: dict[str, Any]) -> dict[str, float]:
        x, y = self.tip(cmd, args)
        width = number_arg(cmd, args, "width_um")
        height = number_arg(cmd, args, "height_um")
        angle = number_arg(cmd, {"angle_deg": 0.0, **args}, "angle_deg")
        for name, size in (("width_um", width), ("height_um", height)):
            if size <= 0:
                raise ProtocolError("bad_args", f"{cmd}: field '{name}' = {size:g} um must be > 0")
        check_within(cmd, "angle_deg", angle, (-360.0, 360.0), "deg")
        a = math.radians(angle)
        half_x = 0.5 * (width * abs(math.cos(a)) + height * abs(math.sin(a)))
        half_y = 0.5 * (width * abs(math.sin(a)) + height * abs(math.cos(a)))
        for axis, centre, half, (lo, hi) in (
            ("x", x, half_x, self.limits.x_um),
            ("y", y, half_y, self.limits.y_um),
        ):
            if centre - half < lo or centre + half > hi:
                raise ProtocolError(
                    "out_of_limits",
                    f"{cmd}: frame {axis} span [{centre - half:g}, {centre + half:g}] um "
                    f"(fields '{axis}_um', 'width_um', 'height_um', 'angle_deg') is outside "
                    f"the allowed range [{lo:g}, {hi:g}] um",
                )
        return {"x_um": x, "y_um": y, "width_um": width, "height_um": height, "angle_deg": angle}
