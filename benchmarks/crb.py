"""Cramer-Rao lower bound for localising a pixel-integrated Gaussian spot.

The localisation bench divides each detector's error by this bound, so the number it
reports says how much of the information in the pixels a detector uses, independent
of SNR, PSF width or pixel size.

Model (per pixel k, in electrons): mu_k = qe * (photons * P_k(x0, y0) + background),
P_k the Gaussian integrated exactly over the pixel (erf differences). Noise is
Poisson shot noise plus Gaussian read noise, taken as Gaussian with variance
mu_k + read_noise**2 (the usual sCMOS approximation, exact in the Poisson limit for
read_noise = 0 and accurate whenever mu_k + read_noise**2 is more than a few e).
For a Gaussian with mean-only dependence on x0 the Fisher information is
I_xx = sum_k (d mu_k / d x0)**2 / (mu_k + read_noise**2).

Only x0 is treated as unknown. Amplitude, background and y0 enter I's off-diagonal
terms only through odd moments that vanish for a spot centred on a pixel or pixel
corner and stay negligible elsewhere, so fitting them too costs (almost) nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import erfc

__all__ = ["mean_position_crb_px", "pixel_profile", "position_crb_px"]

_SQRT2 = math.sqrt(2.0)


def pixel_profile(centre_px: float, sigma_px: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """1-D pixel-integrated unit Gaussian on pixels 0..n-1 and its derivative w.r.t. centre.

    Pixel j spans [j - 0.5, j + 0.5]; the 2-D PSF is the outer product of two of these.
    """
    edges = np.arange(n + 1, dtype=np.float64) - 0.5 - centre_px
    inv = 1.0 / (_SQRT2 * sigma_px)
    lo, hi = edges[:-1] * inv, edges[1:] * inv
    # erfc differences on the far side of each tail: erf's would round to exactly 0 there
    # while the derivative does not, and I = sum dmu^2 / mu would blow up without background.
    prof = 0.5 * np.where(
        lo > 0.0,
        erfc(lo) - erfc(hi),
        np.where(hi < 0.0, erfc(-hi) - erfc(-lo), 2.0 - erfc(hi) - erfc(-lo)),
    )
    gauss = np.exp(-0.5 * (edges / sigma_px) ** 2) / (math.sqrt(2.0 * math.pi) * sigma_px)
    # d/dc of the integral over [a - c, b - c] is g(a - c) - g(b - c).
    deriv = gauss[:-1] - gauss[1:]
    return prof, deriv


def position_crb_px(
    psf_sigma_px: float,
    photons: float,
    background_per_px: float,
    read_noise_e: float = 0.0,
    qe: float = 1.0,
    window_px: int = 15,
    subpixel: tuple[float, float] = (0.0, 0.0),
) -> float:
    """Lower bound (px) on the per-axis std of an unbiased estimate of x.

    photons and background_per_px (photons per pixel) are before QE; read_noise_e is in
    electrons. The spot sits at subpixel (dx, dy) px from the centre of a
    window_px x window_px window; light outside the window is lost, as in a fit to a crop.
    """
    if psf_sigma_px <= 0 or photons <= 0 or window_px < 1:
        raise ValueError("psf_sigma_px, photons and window_px must be positive")
    if background_per_px < 0 or read_noise_e < 0 or not 0 < qe <= 1:
        raise ValueError("background and read noise must be >= 0 and 0 < qe <= 1")
    mid = (window_px - 1) / 2.0
    px, dpx = pixel_profile(mid + subpixel[0], psf_sigma_px, window_px)
    py, _ = pixel_profile(mid + subpixel[1], psf_sigma_px, window_px)
    signal = qe * photons
    mu = signal * np.outer(py, px) + qe * background_per_px
    dmu = signal * np.outer(py, dpx)
    var = mu + read_noise_e**2
    pos = var > 0.0  # pixels with no light and no noise carry no information
    info = float(np.sum(dmu[pos] ** 2 / var[pos]))
    return 1.0 / math.sqrt(info) if info > 0 else math.inf


def mean_position_crb_px(
    psf_sigma_px: float,
    photons: float,
    background_per_px: float,
    read_noise_e: float = 0.0,
    qe: float = 1.0,
    window_px: int = 15,
    offsets: Sequence[float] = (-0.375, -0.125, 0.125, 0.375),
) -> float:
    """Bound for a spot at a uniformly random sub-pixel position: RMS over a grid.

    Variances (not stds) are averaged, so the result is comparable to an RMSE taken over
    random positions. The default 4 x 4 grid samples each quarter-pixel cell centre.
    """
    variances = [
        position_crb_px(
            psf_sigma_px, photons, background_per_px, read_noise_e, qe, window_px, (dx, dy)
        )
        ** 2
        for dx in offsets
        for dy in offsets
    ]
    return math.sqrt(float(np.mean(variances)))
