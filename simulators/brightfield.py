"""Brightfield and darkfield images of dielectric spheres, for the twin camera.

Physical model (scalar wave optics, documented approximations):

* The sphere is a thin phase object: the plane wave leaving it is delayed by
  k0 (n_p - n_m) 2 sqrt(a^2 - r^2) (projection approximation); an optional absorption
  attenuates it the same way. This keeps the sphere's lensing (bright focus beyond it)
  and the strong deflection at its rim, which the objective cannot collect.
* The exit field is propagated to the focal plane by the angular spectrum (defocus
  dz: phase 2 pi dz sqrt((n_m / lambda)^2 - f^2)) and band-limited by the objective's
  pupil (|f| <= NA / lambda). The image is |E|^2 (brightfield) or, with the
  unscattered plane wave removed, |E - 1|^2 (darkfield: only scattered light).
* Partially coherent illumination (condenser NA) is approximated by blurring the
  coherent image with a Gaussian of sigma 0.21 lambda / NA_condenser.

The result is a radial contrast profile c(r), tabulated once per setting, so that
rendering costs one interpolation per window pixel (point-sampled at pixel centres; the
profile is already smooth at the optical resolution). Several particles add their
contrasts (single scattering: no optical coupling between touching spheres).

Checked against the real frames in shared/data/brightfield (tests/test_brightfield.py):
a 2.1 um polystyrene-like sphere 1-2 um out of focus gives the bright centre inside a
dark ring, with the ring at the radius measured there.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import ndimage

__all__ = ["contrast_profile", "render_contrast"]

_GRID = 512  # FFT grid side
_OVERSAMPLE = 4  # field samples per camera pixel


@lru_cache(maxsize=16)
def contrast_profile(
    radius_um: float,
    n_particle: float,
    n_medium: float,
    wavelength_um: float,
    numerical_aperture: float,
    defocus_um: float,
    pixel_um: float,
    darkfield: bool = False,
    condenser_na: float = 0.3,
    absorption_per_um: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(r in px, contrast) of one sphere: I / I_background - 1 (brightfield) or I / I_0
    of the illuminating wave (darkfield). Radii extend to where the contrast has decayed."""
    dx = pixel_um / _OVERSAMPLE
    n = _GRID
    coords = (np.arange(n) - n // 2) * dx
    r2 = coords[:, None] ** 2 + coords[None, :] ** 2
    inside = r2 < radius_um**2
    thickness = 2.0 * np.sqrt(np.where(inside, radius_um**2 - r2, 0.0))
    k0 = 2.0 * math.pi / wavelength_um
    field = np.exp((1j * k0 * (n_particle - n_medium) - absorption_per_um) * thickness)
    f = np.fft.fftfreq(n, d=dx)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    pupil = f2 <= (numerical_aperture / wavelength_um) ** 2
    kz = np.sqrt(np.maximum((n_medium / wavelength_um) ** 2 - f2, 0.0))
    transfer = pupil * np.exp(2j * math.pi * defocus_um * (kz - n_medium / wavelength_um))
    spectrum = np.fft.fft2(np.fft.ifftshift(field - 1.0 if darkfield else field))
    image = np.abs(np.fft.fftshift(np.fft.ifft2(spectrum * transfer))) ** 2
    blur = 0.21 * wavelength_um / max(condenser_na, 1e-3) / dx
    image = ndimage.gaussian_filter(image, blur, mode="wrap")
    contrast = image if darkfield else image - 1.0
    centre = n // 2
    r_px = np.hypot(*np.meshgrid(coords, coords, indexing="ij")).ravel() / pixel_um
    bins = np.rint(r_px * _OVERSAMPLE).astype(np.intp)
    counts = np.bincount(bins)
    keep = counts > 0
    prof = np.bincount(bins, contrast.ravel())[keep] / counts[keep]
    radii = (np.bincount(bins, r_px)[keep] / counts[keep])[:centre]
    prof = prof[: radii.size]
    # Cut where the profile stays within 0.2 % of the background.
    alive = np.flatnonzero(np.abs(prof) > 2e-3)
    end = min(radii.size, (alive[-1] + 2) if alive.size else 2)
    prof = prof[:end].copy()
    prof[-1] = 0.0
    return radii[:end], prof


def render_contrast(
    shape: tuple[int, int], xy_px: np.ndarray, profile: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """(H, W) float32 sum of the radial contrast profile at each (x, y) px position."""
    h, w = shape
    out = np.zeros(h * w, dtype=np.float32)
    radii, prof = profile
    xy = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    half = math.ceil(radii[-1])
    keep = (xy[:, 0] > -half) & (xy[:, 0] < w + half) & (xy[:, 1] > -half) & (xy[:, 1] < h + half)
    xy = xy[keep]
    if len(xy) == 0 or half < 1:
        return out.reshape(h, w)
    offs = np.arange(-half, half + 1)
    jx, jy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    cols = jx[:, None] + offs
    rows = jy[:, None] + offs
    dx = cols - xy[:, 0, None]
    dy = rows - xy[:, 1, None]
    dist = np.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)
    vals = np.interp(dist, radii, prof, right=0.0).astype(np.float32)
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    idx = (np.clip(rows, 0, h - 1)[:, :, None] * w + np.clip(cols, 0, w - 1)[:, None, :])[valid]
    np.add.at(out, idx, vals[valid])
    return out.reshape(h, w)
