"""Touching particles whose images merged into one blob, found by its elongation.

Where particles' images are wider than the distance between touching ones (a defocused
or in-focus sphere blurred over its own diameter), two touching particles give one
peak whatever the detector, and no smoothing or matched filter splits it. Their blob
is elongated, though: two identical round images at +-h along an axis add h^2 to the
blob's variance along it and nothing across, so the difference of the weighted second
moments' eigenvalues measures h, and a blob whose h implies a pair near the expected
contact distance is replaced by two detections on its major axis. Detections with a
neighbour closer than the blob's reach are already resolved and are left alone.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

__all__ = ["resolved_radius", "split_elongated"]

FloatArray = NDArray[np.float64]
_REACH = 0.8  # blob window radius, in contact distances
_MIN_SPLIT = 0.7  # a pair closer than this share of the contact distance: one particle
_RESOLVED = 1.5  # a neighbour detection within this many contact distances: resolved


def resolved_radius(contact_px: float) -> float:
    """A detection with another this close is resolved (its blob is not split)."""
    return _RESOLVED * contact_px


def split_elongated(
    frame: np.ndarray,
    xy: FloatArray,
    sign: float,
    contact_px: float,
    crowded: NDArray[np.bool_] | None = None,
) -> tuple[FloatArray, NDArray[np.intp]]:
    """(M, 2) positions with merged pairs split, and for each the index of the detection
    it came from (so scores and confidences follow). `sign` is +1 for particles brighter
    than the background around them, -1 for darker; `contact_px` the distance of
    touching particles' centres. `crowded`, if the caller knows it, says which
    detections have another within resolved_radius (otherwise found here)."""
    n = len(xy)
    src = np.arange(n)
    if n == 0 or contact_px <= 0:
        return xy, src
    radius = max(round(_REACH * contact_px), 2)
    frame = np.asarray(frame)
    h, w = frame.shape
    rows, cols = np.rint(xy[:, 1]).astype(np.intp), np.rint(xy[:, 0]).astype(np.intp)
    inside = (rows >= radius) & (cols >= radius) & (rows < h - radius) & (cols < w - radius)
    if crowded is None:
        crowded = _has_neighbour(xy, resolved_radius(contact_px))
    cand = np.flatnonzero(inside & ~crowded)
    if cand.size == 0:
        return xy, src
    window = _window(radius, w)
    # One flat gather (fixed offsets from each centre) and one sort of the border ring
    # for its median: the stack is small, so passes and temporaries set the cost.
    at = (rows[cand] * w + cols[cand])[:, None] + window.offsets
    patch = frame.ravel()[at].astype(np.float32)
    if sign < 0:
        np.negative(patch, out=patch)
    ring = np.sort(patch[:, window.border], axis=1)
    mid = ring.shape[1] // 2
    level = ring[:, mid] if ring.shape[1] % 2 else 0.5 * (ring[:, mid - 1] + ring[:, mid])
    patch -= level[:, None]
    np.maximum(patch, 0.0, out=patch)
    # Weighted sums of 1, x, y, x^2, y^2, xy in one product; central moments from them.
    sums = (patch @ window.basis).astype(np.float64)
    total = np.maximum(sums[:, 0], 1e-12)
    mx, my = sums[:, 1] / total, sums[:, 2] / total
    cxx = sums[:, 3] / total - mx * mx
    cyy = sums[:, 4] / total - my * my
    cxy = sums[:, 5] / total - mx * my
    half_diff = 0.5 * (cxx - cyy)
    root = np.sqrt(half_diff**2 + cxy**2)
    half = np.sqrt(2.0 * root)  # sqrt(lambda_max - lambda_min)
    split = 2.0 * half > _MIN_SPLIT * contact_px
    if not np.any(split):
        return xy, src
    k = cand[split]
    angle = 0.5 * np.arctan2(2.0 * cxy[split], cxx[split] - cyy[split])
    centre = np.column_stack([cols[k] + mx[split], rows[k] + my[split]])
    step = half[split, None] * np.column_stack([np.cos(angle), np.sin(angle)])
    keep = np.ones(n, dtype=bool)
    keep[k] = False
    out = np.concatenate([xy[keep], centre + step, centre - step])
    return out, np.concatenate([src[keep], k, k])


def _has_neighbour(xy: FloatArray, radius: float) -> NDArray[np.bool_]:
    """Which points have another within radius (one tree, its close pairs counted)."""
    if len(xy) < 2:
        return np.zeros(len(xy), dtype=bool)
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    return np.bincount(pairs.ravel(), minlength=len(xy)) > 0


class _Window(NamedTuple):
    offsets: NDArray[np.intp]  # flat offsets of the (2r + 1)^2 window from its centre
    border: NDArray[np.bool_]  # the ring at radius r, for the local level
    basis: NDArray[np.float32]  # columns 1, x, y, x^2, y^2, xy


@lru_cache(maxsize=16)
def _window(radius: int, width: int) -> _Window:
    """The blob window of this radius in a frame of this width (cached: both are fixed)."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    x, y = xx.ravel().astype(np.float32), yy.ravel().astype(np.float32)
    return _Window(
        offsets=(yy * width + xx).ravel(),
        border=(np.hypot(yy, xx) >= radius - 0.5).ravel(),
        basis=np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y]),
    )
