"""Phase-hologram SLMs on the driver side: grey levels <-> phase, and the traps a
hologram makes, through the one function a safety gate calls before writing it.

A phase SLM shows 8-bit images whose level l means a phase of 2 pi l / 256 (the
usual linear LUT; a real SLM's LUT calibration goes into the levels it is sent).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simulators.optics.hologram import SlmCalibration, Trap, hologram_trap_powers

LEVELS = 256


class PhaseSlmSettings(BaseModel):
    """A Fourier-plane phase SLM: its calibration and the laser power reaching it."""

    model_config = ConfigDict(extra="forbid")

    calibration: SlmCalibration = SlmCalibration()
    laser_power_mw: float = Field(50.0, ge=0.0, le=100_000.0)


def phase_to_levels(phase: np.ndarray) -> np.ndarray:
    """Radians (any range) -> uint8 grey levels of a linear 0..2 pi LUT."""
    wrapped = np.mod(np.asarray(phase, dtype=float), 2.0 * math.pi)
    return (np.rint(wrapped * (LEVELS / (2.0 * math.pi))) % LEVELS).astype(np.uint8)


def levels_to_phase(image: np.ndarray) -> np.ndarray:
    """uint8 grey levels -> radians in [0, 2 pi)."""
    return np.asarray(image, dtype=float) * (2.0 * math.pi / LEVELS)


def phase_image_traps(image: np.ndarray, settings: PhaseSlmSettings) -> list[Trap]:
    """The traps (x_um, y_um, power_mw) an 8-bit phase image would make at the sample."""
    return hologram_trap_powers(
        levels_to_phase(image), settings.calibration, settings.laser_power_mw
    )


__all__ = [
    "PhaseSlmSettings",
    "hologram_trap_powers",
    "levels_to_phase",
    "phase_image_traps",
    "phase_to_levels",
]
