"""Holographic optical tweezers: phase holograms for N traps, and the light they make.

A phase-only SLM sits in a plane conjugate to the objective's pupil, so the field at
the sample is the Fourier transform of the SLM field (Fourier optics, scalar,
paraxial). `SlmCalibration` maps FFT bins to sample micrometres: one bin of an
M-point transform is lambda F / (M p) (F the effective SLM-to-sample focal length,
p the SLM pixel pitch), then an affine (rotation, scale, skew) and the zero-order's
position in the sample, as fitted on a real rig by imaging spots.

Phases come from slmsuite's weighted Gerchberg-Saxton (WGS-Kim, phase fixed once the
efficiency is high); `hologram_trap_powers` is the one place that turns any phase
image into the traps it really makes (positions and powers at the sample), which is
what a safety gate must check before the hologram is written.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field

Trap = tuple[float, float, float]  # (x_um, y_um, power_mw)


class SlmCalibration(BaseModel):
    """SLM-to-sample mapping of a Fourier-plane SLM (defaults: a 512 px, 8 um pitch SLM
    relayed so the whole sample field spans ~34 um at 1064 nm)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slm_px: int = Field(512, ge=8, le=4096)  # square SLM, slm_px x slm_px
    pixel_pitch_um: float = Field(8.0, gt=0.0, le=100.0)
    focal_length_um: float = Field(2000.0, gt=0.0, le=1e6)  # effective, SLM -> sample
    wavelength_um: float = Field(1.064, gt=0.2, le=3.0)
    padding: int = Field(2, ge=1, le=8)  # FFT size = padding * slm_px (finer sample grid)
    affine: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 0.0), (0.0, 1.0))
    zero_order_um: tuple[float, float] = (0.0, 0.0)  # where the undiffracted light lands
    # 1/e^2 radius of the Gaussian beam on the SLM in SLM pixels; None: uniform.
    beam_radius_px: float | None = Field(None, gt=0.0, le=1e5)

    @property
    def fft_px(self) -> int:
        return self.slm_px * self.padding

    @property
    def bin_um(self) -> float:
        """Sample-plane size of one FFT bin before the affine, um."""
        return self.wavelength_um * self.focal_length_um / (self.fft_px * self.pixel_pitch_um)

    def _matrix(self) -> np.ndarray:
        return np.asarray(self.affine, dtype=float) * self.bin_um

    def bins_to_um(self, rows_cols: ArrayLike) -> np.ndarray:
        """(N, 2) FFT (row, col) indices (zero order at fft_px // 2) -> (N, 2) sample (x, y) um."""
        rc = np.asarray(rows_cols, dtype=float).reshape(-1, 2)
        centred = np.column_stack((rc[:, 1], rc[:, 0])) - self.fft_px // 2
        return centred @ self._matrix().T + np.asarray(self.zero_order_um)

    def um_to_bins(self, xy_um: ArrayLike) -> np.ndarray:
        """(N, 2) sample (x, y) um -> (N, 2) fractional FFT (col, row) indices."""
        xy = np.asarray(xy_um, dtype=float).reshape(-1, 2) - np.asarray(self.zero_order_um)
        return xy @ np.linalg.inv(self._matrix()).T + self.fft_px // 2

    def field_extent_um(self) -> float:
        """Half-width of the addressable sample field (the Nyquist edge), um."""
        return 0.5 * self.slm_px * self.padding * self.bin_um / 1.0

    def amplitude(self) -> np.ndarray:
        """(slm_px, slm_px) illumination amplitude on the SLM, normalised to unit power."""
        n = self.slm_px
        if self.beam_radius_px is None:
            amp = np.ones((n, n))
        else:
            c = (np.arange(n) - (n - 1) / 2.0) ** 2
            amp = np.exp(-(c[:, None] + c[None, :]) / self.beam_radius_px**2)
        return amp / math.sqrt(float(np.sum(amp * amp)))


def sample_intensity(phase: np.ndarray, calibration: SlmCalibration) -> np.ndarray:
    """(M, M) fraction of the SLM's power in each FFT bin at the sample (sums to 1)."""
    phase = np.asarray(phase, dtype=float)
    n = calibration.slm_px
    if phase.shape != (n, n):
        raise ValueError(f"phase: shape must be ({n}, {n}) for this SLM, got {phase.shape}")
    if not np.all(np.isfinite(phase)):
        raise ValueError("phase: must be finite radians")
    field = calibration.amplitude() * np.exp(1j * phase)
    m = calibration.fft_px
    far = np.fft.fftshift(np.fft.fft2(field, s=(m, m))) / m
    return np.abs(far) ** 2


def _assigned_power(intensity: np.ndarray, seeds_rc: np.ndarray, radius_bins: float) -> np.ndarray:
    """(N,) power of every bin within radius_bins, given to its nearest seed (row, col):
    a spot's side lobes are its light too, so a gate never under-counts a trap."""
    from scipy import ndimage  # imported when used: drivers.config loads this module
    mask = np.ones(intensity.shape, dtype=bool)
    mask[seeds_rc[:, 0], seeds_rc[:, 1]] = False
    dist, (near_r, near_c) = ndimage.distance_transform_edt(mask, return_indices=True)
    label = np.full(intensity.shape, -1)
    label[seeds_rc[:, 0], seeds_rc[:, 1]] = np.arange(len(seeds_rc))
    owner = label[near_r, near_c]
    owner[dist > radius_bins] = -1
    keep = owner >= 0
    return np.bincount(owner[keep], weights=intensity[keep], minlength=len(seeds_rc))


def _window(calibration: SlmCalibration) -> int:
    """Bins either side of a spot centre in its diffraction-limited main lobe."""
    return calibration.padding


def hologram_trap_powers(
    phase: np.ndarray,
    calibration: SlmCalibration,
    total_power_mw: float,
    min_fraction: float = 0.01,
) -> list[Trap]:
    """The traps a phase hologram makes at the sample: [(x_um, y_um, power_mw)], brightest first.

    Spots are the local maxima of the Fourier-plane intensity whose diffraction-limited
    window holds at least `min_fraction` of the SLM's power; each spot's power is all
    the light within `4 * padding` bins that is nearer to it than to any other spot
    (side lobes included), times `total_power_mw` (the laser power reaching the SLM).
    The zero order counts as a trap: it is light.
    """
    if not (math.isfinite(total_power_mw) and total_power_mw >= 0.0):
        raise ValueError(f"total_power_mw: must be finite and >= 0, got {total_power_mw}")
    if not (0.0 < min_fraction < 1.0):
        raise ValueError(f"min_fraction: must be in (0, 1), got {min_fraction}")
    from scipy import ndimage

    intensity = sample_intensity(phase, calibration)
    half = _window(calibration)
    size = 2 * half + 1
    held = ndimage.uniform_filter(intensity, size=size, mode="wrap") * size * size
    peaks = (intensity == ndimage.maximum_filter(intensity, size=size, mode="wrap")) & (
        held >= min_fraction
    )
    seeds = np.argwhere(peaks)
    if len(seeds) == 0:
        return []
    powers = _assigned_power(intensity, seeds, 4.0 * half)
    offsets = np.arange(-half, half + 1)
    traps = []
    for (r, c), power in zip(seeds, powers, strict=True):
        # Centroid of the main lobe: a spot between bins lands where its light is.
        rr = np.arange(r - half, r + half + 1) % intensity.shape[0]
        cc = np.arange(c - half, c + half + 1) % intensity.shape[1]
        patch = intensity[np.ix_(rr, cc)]
        dr = float(np.sum(patch.sum(axis=1) * offsets) / patch.sum())
        dc = float(np.sum(patch.sum(axis=0) * offsets) / patch.sum())
        x, y = calibration.bins_to_um([[r + dr, c + dc]])[0]
        traps.append((float(x), float(y), float(power) * total_power_mw))
    traps.sort(key=lambda t: -t[2])
    return traps


class HologramResult(BaseModel):
    """Quality of a computed hologram, as measured by the twin's own Fourier optics."""

    model_config = ConfigDict(extra="forbid")

    iterations: int
    uniformity: float  # 1 - (max - min) / (max + min) of the trap powers
    efficiency: float  # fraction of the SLM's power in the requested traps


def trap_fractions(
    phase: np.ndarray, calibration: SlmCalibration, traps_um: ArrayLike
) -> np.ndarray:
    """(N,) fraction of the SLM's power each requested trap (x, y um) gets, counted as
    `hologram_trap_powers` counts it."""
    intensity = sample_intensity(phase, calibration)
    colrow = np.rint(calibration.um_to_bins(traps_um)).astype(int) % calibration.fft_px
    return _assigned_power(intensity, colrow[:, ::-1], 4.0 * _window(calibration))


def phase_for_traps(
    traps_um: ArrayLike,
    calibration: SlmCalibration,
    weights: Sequence[float] | None = None,
    iterations: int = 30,
    method: str = "WGS-Kim",
) -> tuple[np.ndarray, HologramResult]:
    """Phase (radians, slm_px x slm_px) putting light on each trap (x, y um), with relative
    powers `weights` (default equal), by slmsuite's weighted Gerchberg-Saxton."""
    traps = np.asarray(traps_um, dtype=float).reshape(-1, 2)
    if len(traps) == 0:
        raise ValueError("traps_um: give at least one trap")
    if not (1 <= iterations <= 10_000):
        raise ValueError(f"iterations: must be in [1, 10000], got {iterations}")
    knm = calibration.um_to_bins(traps)
    edge = calibration.fft_px
    if np.any(knm < 1) or np.any(knm > edge - 2):
        raise ValueError(
            f"traps_um: every trap must lie within +-{calibration.field_extent_um():.1f} um "
            "of the zero order (the SLM's addressable field)"
        )
    amp = None
    if weights is not None:
        w = np.asarray(weights, dtype=float)
        if w.shape != (len(traps),) or np.any(w <= 0) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights: need {len(traps)} positive powers, got {weights}")
        amp = np.sqrt(w)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # slmsuite warns that cupy (GPU) is absent
        logging.getLogger("slmsuite").setLevel(logging.WARNING)
        from slmsuite.holography.algorithms import SpotHologram

        holo = SpotHologram(
            (edge, edge),
            knm.T,
            basis="knm",
            spot_amp=amp,
            slm_shape=(calibration.slm_px, calibration.slm_px),
            amp=calibration.amplitude(),
        )
        holo.optimize(method=method, maxiter=iterations, verbose=False)
        phase = np.mod(np.asarray(holo.get_phase(), dtype=float), 2.0 * math.pi)
    fractions = trap_fractions(phase, calibration, traps)
    if weights is not None:
        fractions = fractions / np.asarray(weights, dtype=float)
    hi, lo = float(fractions.max()), float(fractions.min())
    result = HologramResult(
        iterations=iterations,
        uniformity=1.0 - (hi - lo) / (hi + lo) if hi + lo > 0 else 0.0,
        efficiency=float(trap_fractions(phase, calibration, traps).sum()),
    )
    return phase, result
