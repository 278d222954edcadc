"""Candidate grids: where a probe may measure, and what the scan shows around each place.

A grid is H x W measurement locations over a scanned area. Each location carries its
normalised coordinates (for a GP on position) and a flattened local patch of the scan
(for deep kernel learning: structure -> property). Channels are normalised per image
with robust statistics so the same network sees twin and instrument scans alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def robust_normalise(image: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 * MAD); a flat image gives zeros, never NaN."""
    x = np.asarray(image, dtype=np.float64)
    med = float(np.median(x))
    mad = 1.4826 * float(np.median(np.abs(x - med)))
    scale = mad if mad > 1e-12 else max(float(x.std()), 1e-12)
    return (x - med) / scale


def detrend_plane(image: np.ndarray) -> np.ndarray:
    """Remove a least-squares plane (sample tilt) from a height image."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.column_stack([np.ones(h * w), xx.ravel(), yy.ravel()])
    coef, *_ = np.linalg.lstsq(a, image.ravel().astype(np.float64), rcond=None)
    return image - (a @ coef).reshape(h, w)


def pfm_channels(amplitude: np.ndarray, phase_deg: np.ndarray, height: np.ndarray) -> np.ndarray:
    """(4, H, W) structure channels: amplitude, in-phase, quadrature, flattened height.

    Amplitude (response magnitude) is kept as its own channel; with the phase it also
    becomes the signed lock-in components (so c+ and c- domains have opposite signs
    and walls are dips); height loses its tilt. Each is normalised.
    """
    ph = np.radians(np.asarray(phase_deg, dtype=np.float64))
    amp = np.asarray(amplitude, dtype=np.float64)
    x, y = amp * np.cos(ph), amp * np.sin(ph)
    return np.stack(
        [
            robust_normalise(amp),
            robust_normalise(x),
            robust_normalise(y),
            robust_normalise(detrend_plane(np.asarray(height, dtype=np.float64))),
        ]
    )


def patches(channels: np.ndarray, size: int) -> np.ndarray:
    """(H*W, C*size*size) patch around every pixel, edges reflected; size must be odd."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"patch: size must be an odd number >= 1, got {size}")
    c, h, w = channels.shape
    r = size // 2
    padded = np.pad(channels, ((0, 0), (r, r), (r, r)), mode="reflect" if min(h, w) > r else "edge")
    win = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
    # win: (C, H, W, size, size) -> (H, W, C, size, size)
    return np.ascontiguousarray(win.transpose(1, 2, 0, 3, 4)).reshape(h * w, c * size * size)


@dataclass
class CandidateGrid:
    """H x W locations; `xy_um` (N, 2) positions, `coords` (N, 2) in [0, 1], `features`."""

    shape: tuple[int, int]
    xy_um: np.ndarray
    coords: np.ndarray
    features: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.shape[0] * self.shape[1])

    @classmethod
    def over(
        cls,
        shape: tuple[int, int],
        origin_um: tuple[float, float],
        extent_um: tuple[float, float],
        channels: np.ndarray | None = None,
        patch: int = 5,
    ) -> CandidateGrid:
        """Cell centres of an (H, W) grid over a (w, h) um area starting at origin_um.

        ``channels`` (C, H, W), a scan at the grid's resolution, gives patch features.
        """
        h, w = shape
        ys = origin_um[1] + (np.arange(h) + 0.5) * extent_um[1] / h
        xs = origin_um[0] + (np.arange(w) + 0.5) * extent_um[0] / w
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        xy = np.column_stack([xx.ravel(), yy.ravel()])
        ii, jj = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        coords = np.column_stack([jj.ravel(), ii.ravel()])
        feats = None
        if channels is not None:
            if channels.shape[1:] != (h, w):
                raise ValueError(f"channels: shape {channels.shape[1:]} does not match {shape}")
            feats = patches(channels, patch).astype(np.float32)
        return cls(shape=(h, w), xy_um=xy, coords=coords, features=feats)

    def to_map(self, values: np.ndarray) -> np.ndarray:
        """(N,) values as an (H, W) map."""
        return np.asarray(values).reshape(self.shape)
