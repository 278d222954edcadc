"""Image registration: how far the sample moved between two scans (drift correction).

Thermal drift moves the sample under the tip between the scan that located a feature
and the spectrum taken on it; a few pixels are enough to miss a domain wall. A quick
re-scan of a small window is matched against the same area of the first scan, padded
by the largest shift expected: normalised cross-correlation (NCC) at every integer
offset, then a parabolic fit around the best one for sub-pixel precision. Matching the
whole window inside a larger reference avoids the edge bias of cropped-FFT (phase)
correlation, where content leaving the crop pulls the estimate towards zero.
"""

from __future__ import annotations

import numpy as np


def _subpixel(c_minus: float, c0: float, c_plus: float) -> float:
    denom = c_minus - 2.0 * c0 + c_plus
    if abs(denom) < 1e-12:
        return 0.0
    return float(np.clip(0.5 * (c_minus - c_plus) / denom, -0.5, 0.5))


def ncc_map(template: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """NCC of `template` at every placement inside the (larger) `reference`."""
    t = np.asarray(template, dtype=np.float64)
    t = (t - t.mean()) / max(float(t.std()), 1e-12)
    win = np.lib.stride_tricks.sliding_window_view(np.asarray(reference, np.float64), t.shape)
    mu = win.mean(axis=(-2, -1), keepdims=True)
    sd = win.std(axis=(-2, -1))
    return np.einsum("ijkl,kl->ij", win - mu, t) / (t.size * np.maximum(sd, 1e-12))


def locate(template: np.ndarray, reference: np.ndarray, pad: int) -> tuple[float, float, float]:
    """(dy, dx, score): `template` matches `reference[pad + dy :, pad + dx :]` best.

    `reference` is the first scan's area around the window, `pad` pixels wider on each
    side; (dy, dx) is where the window's content was in the first scan relative to where
    it is now, in pixels (sub-pixel), and `score` the peak NCC (1 = identical).
    """
    th, tw = np.shape(template)
    rh, rw = np.shape(reference)
    if rh != th + 2 * pad or rw != tw + 2 * pad:
        raise ValueError(f"register: reference must be template + 2*{pad} pixels per axis")
    corr = ncc_map(template, reference)
    r, c = np.unravel_index(int(np.argmax(corr)), corr.shape)
    dy = dx = 0.0
    if 0 < r < corr.shape[0] - 1:
        dy = _subpixel(corr[r - 1, c], corr[r, c], corr[r + 1, c])
    if 0 < c < corr.shape[1] - 1:
        dx = _subpixel(corr[r, c - 1], corr[r, c], corr[r, c + 1])
    return float(r - pad + dy), float(c - pad + dx), float(corr[r, c])
