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

import numpy as np
from numpy.typing import NDArray
from scipy.spatial import cKDTree

__all__ = ["split_elongated"]

FloatArray = NDArray[np.float64]
_REACH = 0.8  # blob window radius, in contact distances
_MIN_SPLIT = 0.7  # a pair closer than this share of the contact distance: one particle
_RESOLVED = 1.5  # a neighbour detection within this many contact distances: resolved


def split_elongated(
    frame: np.ndarray, xy: FloatArray, sign: float, contact_px: float
) -> tuple[FloatArray, NDArray[np.intp]]:
    """(M, 2) positions with merged pairs split, and for each the index of the detection
    it came from (so scores and confidences follow). `sign` is +1 for particles brighter
    than the background around them, -1 for darker; `contact_px` the distance of
    touching particles' centres."""
    n = len(xy)
    src = np.arange(n)
    if n == 0 or contact_px <= 0:
        return xy, src
    radius = max(round(_REACH * contact_px), 2)
    h, w = frame.shape
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1] if n > 1 else np.full(n, np.inf)
    rows, cols = np.rint(xy[:, 1]).astype(np.intp), np.rint(xy[:, 0]).astype(np.intp)
    inside = (rows >= radius) & (cols >= radius) & (rows < h - radius) & (cols < w - radius)
    cand = np.flatnonzero(inside & (nn >= _RESOLVED * contact_px))
    if cand.size == 0:
        return xy, src
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    border = np.hypot(yy, xx) >= radius - 0.5
    r_idx = rows[cand, None, None] + yy
    c_idx = cols[cand, None, None] + xx
    patch = sign * np.asarray(frame)[r_idx, c_idx].astype(np.float32)
    level = np.median(patch[:, border], axis=1)
    wgt = np.clip(patch - level[:, None, None], 0.0, None).reshape(len(cand), -1)
    # Weighted sums of 1, x, y, x^2, y^2, xy in one product; central moments from them.
    x, y = xx.ravel().astype(np.float32), yy.ravel().astype(np.float32)
    basis = np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y])
    sums = (wgt @ basis).astype(np.float64)
    total = np.maximum(sums[:, 0], 1e-12)
    mx, my = sums[:, 1] / total, sums[:, 2] / total
    cxx = sums[:, 3] / total - mx * mx
    cyy = sums[:, 4] / total - my * my
    cxy = sums[:, 5] / total - mx * my
    half_diff = 0.5 * (cxx - cyy)
    root = np.sqrt(half_diff**2 + cxy**2)
    half = np.sqrt(2.0 * root)  # sqrt(lambda_max - lambda_min)
    angle = 0.5 * np.arctan2(2.0 * cxy, cxx - cyy)
    split = 2.0 * half > _MIN_SPLIT * contact_px
    if not np.any(split):
        return xy, src
    k = cand[split]
    centre = np.column_stack([cols[k] + mx[split], rows[k] + my[split]])
    step = half[split, None] * np.column_stack([np.cos(angle[split]), np.sin(angle[split])])
    keep = np.ones(n, dtype=bool)
    keep[k] = False
    out = np.concatenate([xy[keep], centre + step, centre - step])
    return out, np.concatenate([src[keep], k, k])
