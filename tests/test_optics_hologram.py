"""Phase holograms for many traps: Fourier optics, calibration, WGS, the phase-SLM twin."""

from __future__ import annotations

import math

import numpy as np
import pytest

from drivers.config import DeviceNames, TwinSettings
from drivers.slm_optics import PhaseSlmSettings, phase_image_traps, phase_to_levels
from drivers.twin_devices import build_twin_core
from simulators.optics.hologram import (
    SlmCalibration,
    hologram_trap_powers,
    phase_for_traps,
    sample_intensity,
)

CAL = SlmCalibration(slm_px=128, pixel_pitch_um=8.0, focal_length_um=500.0)


def _grating(cal: SlmCalibration, period_px: float, angle: float = 0.0) -> np.ndarray:
    """A blazed grating: all light into one first order."""
    n = cal.slm_px
    rows, cols = np.mgrid[0:n, 0:n]
    along = cols * math.cos(angle) + rows * math.sin(angle)
    return np.mod(2.0 * math.pi * along / period_px, 2.0 * math.pi)


def test_blazed_grating_deflects_by_lambda_f_over_period() -> None:
    """Fourier optics: a grating of period L pixels puts the spot at lambda F / (L p)."""
    period = 8.0
    traps = hologram_trap_powers(_grating(CAL, period), CAL, total_power_mw=20.0)
    expected_x = CAL.wavelength_um * CAL.focal_length_um / (period * CAL.pixel_pitch_um)
    x, y, p = traps[0]
    assert x == pytest.approx(expected_x, abs=0.5 * CAL.bin_um)
    assert abs(y) < 0.5 * CAL.bin_um
    assert p == pytest.approx(20.0, rel=0.1)  # a perfect blaze: (almost) all the light
    assert sample_intensity(_grating(CAL, period), CAL).sum() == pytest.approx(1.0)


def test_calibration_affine_and_zero_order_move_the_spots() -> None:
    rotated = CAL.model_copy(
        update={"affine": ((0.0, -1.0), (1.0, 0.0)), "zero_order_um": (10.0, 5.0)}
    )
    x0, y0, _ = hologram_trap_powers(_grating(CAL, 8.0), CAL, 1.0)[0]
    x1, y1, _ = hologram_trap_powers(_grating(CAL, 8.0), rotated, 1.0)[0]
    assert (x1, y1) == pytest.approx((10.0 - y0, 5.0 + x0), abs=1e-6)
    back = rotated.um_to_bins(rotated.bins_to_um([[40.0, 77.0]]))
    assert back[0] == pytest.approx([77.0, 40.0])


def test_weighted_gs_makes_ten_uniform_traps_where_asked() -> None:
    angle = np.linspace(0.0, 2.0 * math.pi, 10, endpoint=False)
    wanted = np.column_stack((6.0 * np.cos(angle) + 2.0, 6.0 * np.sin(angle) - 1.0))
    phase, result = phase_for_traps(wanted, CAL, iterations=20)
    assert result.uniformity >= 0.9
    assert result.efficiency > 0.5
    traps = hologram_trap_powers(phase, CAL, total_power_mw=100.0, min_fraction=0.02)
    assert len(traps) == 10
    found = np.array([(x, y) for x, y, _ in traps])
    nearest = np.min(np.linalg.norm(found[:, None, :] - wanted[None, :, :], axis=2), axis=0)
    assert nearest.max() < CAL.bin_um
    powers = np.array([p for *_, p in traps])
    assert powers.sum() == pytest.approx(100.0 * result.efficiency, rel=0.05)


def test_bad_holograms_and_traps_are_refused() -> None:
    with pytest.raises(ValueError, match="phase: shape"):
        hologram_trap_powers(np.zeros((64, 64)), CAL, 1.0)
    with pytest.raises(ValueError, match="phase: must be finite"):
        hologram_trap_powers(np.full((128, 128), np.nan), CAL, 1.0)
    with pytest.raises(ValueError, match="total_power_mw"):
        hologram_trap_powers(np.zeros((128, 128)), CAL, -1.0)
    with pytest.raises(ValueError, match="traps_um"):
        phase_for_traps([[500.0, 0.0]], CAL)


def test_twin_phase_slm_shows_the_hologram_traps() -> None:
    """The Micro-Manager SLM device takes 8-bit phase images; the twin lights their traps."""
    slm = PhaseSlmSettings(calibration=CAL, laser_power_mw=8.0)
    settings = TwinSettings(slm_px=128, realtime=False)
    names = DeviceNames(laser_kind="slm", slm_phase=slm)
    core, rig = build_twin_core(settings, seed=0, exposure_ms=10.0, names=names)
    image = phase_to_levels(_grating(CAL, 8.0, angle=math.pi / 2))
    core.setSLMImage(names.slm, image)
    core.displaySLMImage(names.slm)
    assert len(rig.slm_spots) >= 1
    spot = rig.slm_spots[0]
    # The trap the hologram makes, with the light no trap claims charged to it (the gate's
    # model of the same image: drivers.light.slm_image_spots).
    x, y, p = phase_image_traps(image, slm)[0]
    assert (spot.x_um, spot.y_um) == pytest.approx((x, y))
    assert p <= spot.power_mw == pytest.approx(8.0)
    assert abs(spot.x_um) < CAL.bin_um and spot.y_um > 5.0
    assert spot.power_mw == pytest.approx(8.0, rel=0.1)
    with pytest.raises(ValueError, match=r"slm_phase\.calibration\.slm_px"):
        build_twin_core(TwinSettings(slm_px=64, realtime=False), 0, 10.0, names)
