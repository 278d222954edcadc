"""What a light command puts on the sample: spots with powers, and the limits on them.

One model of the light path for every laser kind. A galvo (or AOD) makes one spot from
its position and power properties; an SLM image becomes spots through the SLM's
calibration (`slm_image_spots`, the single place that conversion lives: a phase-hologram
model replaces that one function). The driver's gate checks the *whole* light on the
sample (galvo spot plus every SLM spot) against the limits, and frame headers report it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drivers.config import DeviceNames, Limits
from drivers.protocol import ProtocolError
from drivers.slm_optics import PhaseSlmSettings, phase_image_traps

SLM_FULL_SCALE = 255  # 8-bit SLM images: 255 delivers the calibrated full power


@dataclass(frozen=True)
class LaserState:
    """One lit spot, in camera-field coordinates."""

    x_um: float
    y_um: float
    power_mw: float


@dataclass(frozen=True)
class SlmCalibration:
    """Where an SLM pixel lands on the sample and what power full scale delivers."""

    pixel_um: float
    origin_um: tuple[float, float]
    max_power_mw: float
    phase: PhaseSlmSettings | None = None  # a phase SLM: the image is a hologram

    @staticmethod
    def from_devices(names: DeviceNames) -> SlmCalibration:
        return SlmCalibration(
            names.slm_pixel_um, names.slm_origin_um, names.slm_max_power_mw, names.slm_phase
        )


def slm_image_spots(image: np.ndarray, calibration: SlmCalibration) -> list[LaserState]:
    """The spots an 8-bit SLM image puts on the sample: one per lit pixel for an imaged
    SLM; for a phase SLM, the traps its hologram forms at the sample (Fourier optics),
    with the light no trap claims charged to the brightest one, so the power limits
    see all the laser power a phase-only SLM passes on.

    Why one function: the gate, the frame headers and the twin all ask "what is on the
    sample"; a second model of the SLM anywhere would let an image pass the gate that
    lights the sample differently.
    """
    if calibration.phase is not None:
        return hologram_spots(image, calibration.phase)
    rows, cols = np.nonzero(image)
    x0, y0 = calibration.origin_um
    return [
        LaserState(
            x0 + float(c) * calibration.pixel_um,
            y0 + float(r) * calibration.pixel_um,
            float(image[r, c]) / SLM_FULL_SCALE * calibration.max_power_mw,
        )
        for r, c in zip(rows, cols, strict=True)
    ]


def hologram_spots(image: np.ndarray, phase: PhaseSlmSettings) -> list[LaserState]:
    """A phase image's traps as spots, every milliwatt of the laser accounted for."""
    traps = phase_image_traps(image, phase)
    total = phase.laser_power_mw
    if not traps:  # light too diffuse for any trap: still light, at the zero order
        x0, y0 = phase.calibration.zero_order_um
        return [LaserState(x0, y0, total)] if total > 0.0 else []
    spots = [LaserState(x, y, p) for x, y, p in traps]
    unclaimed = total - sum(s.power_mw for s in spots)
    if unclaimed > 0.0:
        brightest = spots[0]
        spots[0] = LaserState(brightest.x_um, brightest.y_um, brightest.power_mw + unclaimed)
    return spots


def spot_power_ceiling_mw(limits: Limits, names: DeviceNames) -> float:
    """Most power one spot may carry: the limit, and for an SLM laser its full scale."""
    if names.laser_kind == "slm" and names.slm_phase is not None:  # all of it in one trap
        return min(limits.max_laser_power_mw, names.slm_phase.laser_power_mw)
    if names.laser_kind == "slm":
        return min(limits.max_laser_power_mw, names.slm_max_power_mw)
    return limits.max_laser_power_mw


def max_spots(limits: Limits, names: DeviceNames) -> int:
    """Spots allowed at once: a galvo steers one, an SLM laser up to max_laser_spots."""
    return limits.max_laser_spots if names.laser_kind == "slm" else 1


@dataclass(frozen=True)
class LightLimits:
    """The limits on the whole light on the sample, in camera-field coordinates."""

    x_um: tuple[float, float]
    y_um: tuple[float, float]
    spot_mw: float
    total_mw: float
    spots: int

    @staticmethod
    def from_config(
        limits: Limits, names: DeviceNames, field_um: tuple[float, float]
    ) -> LightLimits:
        spots = max_spots(limits, names)
        spot_mw = spot_power_ceiling_mw(limits, names)
        total = limits.max_total_power_mw
        return LightLimits(
            x_um=limits.laser_x_um or (0.0, field_um[0]),
            y_um=limits.laser_y_um or (0.0, field_um[1]),
            spot_mw=spot_mw,
            total_mw=spot_mw * spots if total is None else total,
            spots=spots,
        )

    def check(self, cmd: str, field: str, spots: list[LaserState]) -> None:
        """Refuse light beyond any limit, naming the field and the allowed range."""
        lit = [s for s in spots if s.power_mw > 0]
        if len(lit) > self.spots:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field '{field}' puts {len(lit)} spots on the sample, the allowed "
                f"range is [0, {self.spots}] (limits.max_laser_spots, laser kind included)",
            )
        for i, spot in enumerate(lit):
            for name, value, (lo, hi), unit in (
                ("x_um", spot.x_um, self.x_um, "um"),
                ("y_um", spot.y_um, self.y_um, "um"),
                ("power_mw", spot.power_mw, (0.0, self.spot_mw), "mW"),
            ):
                if not lo <= value <= hi:
                    raise ProtocolError(
                        "out_of_limits",
                        f"{cmd}: field '{field}' spot {i} {name} = {value:g} {unit} is outside "
                        f"the allowed range [{lo:g}, {hi:g}] {unit}",
                    )
        total = sum(s.power_mw for s in lit)
        if total > self.total_mw + 1e-9:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field '{field}' puts {total:g} mW in total on the sample, the allowed "
                f"range is [0, {self.total_mw:g}] mW (limits.max_total_power_mw)",
            )
