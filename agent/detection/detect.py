"""Fast particle detection and sub-pixel localisation for live camera frames.

Detection runs inside the feedback loop (30-200 fps), so everything after
segmentation is vectorised over objects: seeds come from one sort of the
above-threshold pixels and refinement windows are gathered into one stack.

Segmentation cost is kept down on large frames (short side >= 512 px) by finding
candidates on a binned copy: a b x b sum is itself a matched smoothing, divides
the pixel count by b**2, and its (deliberately lower) threshold comes from the
binned image's own robust noise. A binned peak that clears the full threshold by the
binned-to-full SNR margin is decided there and seeds from its sub-bin position (radial
symmetry does not depend on where its window sits). Each marginal candidate is mapped
back and re-checked on a small full-resolution patch, smoothed exactly as the whole
frame would be: the seed is the brightest smoothed pixel near it, and it must pass the usual
per-pixel threshold and minimum area. So the accepted seeds, refinement windows
and false-alarm rate are those of the full-resolution path, at a fraction of its cost.

Coordinates are ``(x, y) = (column, row)`` in pixels, with the centre of pixel
``(row i, col j)`` at ``(x=j, y=i)``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from agent.detection.pair_split import resolved_radius, split_elongated
from agent.detection.ring_match import (
    DEFAULT_SCALES,
    RingMatcher,
    explain_away,
    refine_without_neighbours,
    subpixel_peaks,
    synthetic_ring_profile,
)

__all__ = [
    "DetectorConfig",
    "ParticleDetector",
    "centroid_center",
    "estimate_background",
    "radial_symmetry_center",
]

FloatArray = NDArray[np.float64]

_IQR_TO_SIGMA = 1.34898  # interquartile range of a unit normal.
_BG_SAMPLES = 16384  # enough for a stable median, small enough to stay < 0.3 ms.
_TRUNCATE = 4.0  # Gaussian pre-filter truncation, shared with the noise-gain maths.
_MIN_DIST = 1e-3  # floor on the radial-symmetry 1/d weight to avoid inf at the centroid.
_MIN_BIN_SIDE = 400  # frames with a shorter side are segmented at full resolution.
_MAX_SEG_SIDE = 1024  # bin beyond 2 x 2 only while the binned short side stays above this.
# Smoothing floor on the binned image, in binned px: below ~0.7 a peak falling between
# two coarse samples loses up to ~40 % of its detection SNR (measured for PSF sigma 2 px).
_MIN_BINNED_SIGMA = 0.7
# Binned candidates use this fraction of threshold_sigma; the full-resolution check then
# applies the real threshold. 0.75 covers the worst-case binned SNR loss for a PSF as
# sharp as smooth_sigma_px (about 0.72 of full-resolution SNR at 2 x 2).
_CANDIDATE_FRACTION = 0.75
# Marginal binned candidates (under the full threshold) are confirmed only while their
# confirmation patches smooth at most this share of the frame's pixels (else dropped).
_DENSE_CONFIRM = 0.5
_RING_CANDIDATE_FRACTION = 0.5  # of threshold_sigma: ring-mode candidates for the joint fit
_BG_BLOCK = 4  # local background: block side of the coarse grid it is computed on
# Local maxima: whole-image passes beat reading 8 neighbours of each candidate once the
# candidates are more than 1/_GATHER_VS_PASS of the pixels (measured ~1/40).
_GATHER_VS_PASS = 40
_BOX_LABEL_FACTOR = 64  # label in the bounding box while it holds <= this many px per candidate.


class DetectorConfig(BaseModel):
    """Detector settings; validated so a bad config fails at load, not mid-run."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["centroid", "radial_symmetry"] = "radial_symmetry"
    threshold_sigma: float = Field(default=5.0, gt=0, le=100)
    smooth_sigma_px: float = Field(default=1.0, ge=0, le=10)
    min_area_px: int = Field(default=3, ge=1)
    window_px: int = Field(default=5, ge=2, le=50)
    max_objects: int = Field(default=1000, ge=1, le=100000)
    # Segmentation binning: 0 picks it from the frame size and smooth_sigma_px, 1 never bins.
    segment_bin_px: int = Field(default=0, ge=0, le=8)
    # Contrast of the particles: "bright" spots (fluorescence, darkfield), "dark" spots
    # (absorbing, inverted brightfield) or "ring": a bright centre inside a dark ring
    # (brightfield out of focus), found by a matched filter on the particles' radial
    # profile (agent.detection.ring_match; smoothing and window do not apply).
    polarity: Literal["bright", "dark", "ring"] = "bright"
    ring_radius_px: float = Field(default=0.0, ge=0, le=100)
    # Ring mode's matched filter: the particles' radial profile sampled at 0, 1, 2 ... px
    # (any units; measured from the frames by agent.detection.detect_auto). Empty: a
    # stand-in built from ring_radius_px (agent.detection.ring_match).
    ring_profile: tuple[float, ...] = Field(default=(), max_length=201)
    # Ring mode: also drop detections under this fraction of the frame's typical
    # particle (median of the strong ones): residual side lobes of overlapping rings and
    # fringes. A monodisperse sample's particles image alike; 0 turns it off.
    relative_threshold: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Ring mode: refit ring_profile to a frame's own detections when their response moves
    # away from what it was (focus drift, particles at another height) and detect again
    # (agent.detection.detect_auto.RingTracker).
    ring_refit: bool = False
    # Radial stretches of the profile tried at every pixel (particles at other heights).
    ring_scales: tuple[Annotated[float, Field(ge=0.3, le=3.0)], ...] = Field(
        default=DEFAULT_SCALES, min_length=1, max_length=9
    )

    # > 0: every local maximum of the smoothed frame is a seed, and of detections closer
    # than this the dimmer goes: touching particles stay apart. 0: one per blob.
    separation_px: float = Field(default=0.0, ge=0, le=200)
    # > 0: subtract a local background (box mean of this side, px) first, for uneven
    # illumination; 0: one flat level per frame (cheapest).
    background_px: int = Field(default=0, ge=0, le=2001)
    # > 0: centre distance (px) of touching particles whose images merge into one blob;
    # elongated blobs are split into two (agent.detection.pair_split). 0: never.
    contact_px: float = Field(default=0.0, ge=0, le=200)
    # Estimate every unset parameter above from the first frame seen (agent.detection.detect_auto).
    adapt: bool = False

    @property
    def refine_half_px(self) -> int:
        """Half-width of the refinement window: window_px, or from the ring radius."""
        if self.polarity == "ring" and self.ring_radius_px > 0:
            return int(min(max(round(0.85 * self.ring_radius_px), 2), 50))
        return self.window_px


def _check_2d(arr: np.ndarray, name: str) -> np.ndarray:
    """Reject input that would otherwise fail deep inside numpy with a vague error."""
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def _quantiles(sample: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """Quantiles that stay continuous for integer camera data.

    Plain median/MAD of integer ADUs snap to whole counts, which at a few ADU of
    noise mis-states sigma by up to ~25 % and swings the false-alarm rate wildly.
    Treating each integer value as a uniform unit bin and interpolating the CDF fixes it.
    """
    if not np.issubdtype(sample.dtype, np.integer):
        # A full sort (SIMD) is several times faster than np.quantile's partitions here.
        ordered = np.sort(sample)
        at = np.asarray(qs) * (ordered.size - 1)
        lo = np.floor(at).astype(np.intp)
        hi = np.minimum(lo + 1, ordered.size - 1)
        vals = ordered[lo] + (at - lo) * (ordered[hi].astype(np.float64) - ordered[lo])
        return [float(v) for v in vals]
    lo = int(sample.min())
    counts = np.bincount((sample - lo).astype(np.intp))
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        target = q * sample.size
        k = min(int(np.searchsorted(cum, target, side="left")), counts.size - 1)
        below = cum[k] - counts[k]
        frac = (target - below) / counts[k] if counts[k] else 0.5
        out.append(lo + k - 0.5 + float(frac))
    return out


def estimate_background(frame: np.ndarray) -> tuple[float, float]:
    """Return (level, robust noise sigma): median and interquartile range of a subsample.

    Quantiles ignore the few bright particle pixels; the IQR (rather than the lower
    half alone) cancels most of the Poisson skew. A strided subsample of about 16k
    pixels keeps the cost flat regardless of frame size.
    """
    return _background(_check_2d(frame, "frame"))


def white_noise_sigma(frame: np.ndarray) -> float:
    """Pixel noise sigma from neighbour differences (robust IQR of a subsample): blind to
    illumination and to structure smoother than a pixel, so dense fields, where the
    frame's own spread is mostly particles, do not inflate it."""
    step = max(1, int(np.sqrt(frame.size / _BG_SAMPLES)))
    # Integer frames keep integer differences: continuous quantiles of whole values.
    integer = np.issubdtype(frame.dtype, np.integer)
    sub = frame[::step].astype(np.int64 if integer else np.float32)
    d = (sub[:, 1:] - sub[:, :-1])[:, ::step].ravel()
    q1, q3 = _quantiles(d, (0.25, 0.75))
    return max((q3 - q1) / _IQR_TO_SIGMA / np.sqrt(2.0), 1e-12)


def _background(frame: np.ndarray, integer: bool | None = None) -> tuple[float, float]:
    """estimate_background without the input check; integer=True marks whole-valued floats.

    Binned integer frames are held as float32 sums (exact below 2**24), so their sample
    is cast back to integers to keep the continuous-quantile treatment of integer data.
    """
    step = _sample_step(frame.size)
    sample = frame[::step, ::step].ravel()
    if integer:
        sample = sample.astype(np.int64)
    return _level_and_sigma(sample)


def _sample_step(size: int) -> int:
    """Stride (both axes) of the background's subsample: about _BG_SAMPLES pixels."""
    return max(1, int(np.sqrt(size / _BG_SAMPLES)))


def _level_and_sigma(sample: np.ndarray) -> tuple[float, float]:
    """(median, IQR sigma) of a flat pixel sample; std where the IQR is 0."""
    q1, level, q3 = _quantiles(sample, (0.25, 0.5, 0.75))
    sigma = (q3 - q1) / _IQR_TO_SIGMA
    if sigma <= 0.0:
        # Nearly flat float data can have IQR == 0; std beats a zero threshold.
        sigma = float(np.std(sample.astype(np.float64)))
    return level, sigma


def _noise_gain_1d(sigma_px: float, n: int) -> NDArray[np.float64]:
    """Per-position factor by which a 1-D Gaussian filter (reflect mode) scales white noise.

    Near the edges the reflected kernel counts some pixels twice, so smoothed noise
    is up to ~40 % (per axis) larger there; a flat threshold would fire on edge noise.
    """
    if sigma_px <= 0:
        return np.ones(n)
    radius = int(_TRUNCATE * sigma_px + 0.5)
    length = min(n, 4 * radius + 2)
    # Row m of the response to an impulse at m; column sums of squares are output gains.
    resp = ndimage.gaussian_filter1d(
        np.eye(length), sigma_px, axis=1, mode="reflect", truncate=_TRUNCATE
    )
    short = np.sqrt(np.sum(resp * resp, axis=0))
    if length == n:
        return short
    gain = np.full(n, short[length // 2])
    gain[:radius] = short[:radius]
    gain[n - radius :] = short[length - radius :]
    return gain


def _centroid_batch(patches: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Intensity-weighted centroids of the positive part of each (N, H, W) patch."""
    _, h, w = patches.shape
    pos = np.maximum(patches, 0.0)
    col_sum = pos.sum(axis=1, dtype=np.float64)  # (N, W)
    row_sum = pos.sum(axis=2, dtype=np.float64)  # (N, H)
    total = col_sum.sum(axis=1)
    ok = total > 0
    safe = np.where(ok, total, 1.0)
    x = np.where(ok, col_sum @ np.arange(w, dtype=np.float64) / safe, (w - 1) / 2.0)
    y = np.where(ok, row_sum @ np.arange(h, dtype=np.float64) / safe, (h - 1) / 2.0)
    return x, y


@lru_cache(maxsize=32)
def _corner_layout(
    h: int, w: int
) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]]:
    """Pixel-corner midpoints of an h x w patch in the patch's own flat layout: corner
    k = i * w + j lies between pixels k, k + 1, k + w and k + w + 1. Only i < h - 1 and
    j < w - 1 are corners; (inside, x, y, [inside, x, y] as columns) are 0 elsewhere."""
    i, j = np.divmod(np.arange(h * w), w)
    inside = ((i < h - 1) & (j < w - 1)).astype(np.float32)
    x = ((j + 0.5) * inside).astype(np.float32)
    y = ((i + 0.5) * inside).astype(np.float32)
    basis = np.column_stack([inside, x, y])
    for arr in (inside, x, y, basis):
        arr.flags.writeable = False
    return inside, x, y, basis


def _radial_symmetry_batch(
    patches: FloatArray, valid: NDArray[np.bool_] | None = None
) -> tuple[FloatArray, FloatArray, NDArray[np.bool_]]:
    """Parthasarathy (Nat. Methods 2012) centres for a (N, H, W) stack.

    Each smoothed gradient defines a line through its pixel-corner midpoint; the
    centre is the point with least weighted squared perpendicular distance to all
    lines, weights |grad|^2 / distance-to-gradient-centroid as in the paper.
    Written with normal vectors instead of slopes so vertical lines need no special case.
    Returns (x, y, ok) where ok is False for degenerate fits. Pixels outside `valid`
    (windows clipped by the frame edge) give no gradient, exactly as a window cut to
    the valid part would (its boxcar zero-pads there too).
    """
    n, h, w = patches.shape
    if h < 3 or w < 3 or n == 0:
        return (
            np.zeros(n, dtype=np.float64),
            np.zeros(n, dtype=np.float64),
            np.zeros(n, dtype=bool),
        )
    # The whole stack as one flat float32 line, each patch in its own row-major layout:
    # a neighbour is a fixed flat offset (1 across, w down), so every pass is one long
    # contiguous loop. The positions that are no corner (last row and column of each
    # patch) are zeroed and then serve as the boxcar's zero padding, like the paper's
    # conv2(..., 'same'). Scale factors (the gradients' 0.5, the boxcar's 1/9) cancel in
    # the fit and are left out. The weighted sums are one BLAS product with [1, x, y].
    size = h * w
    total = n * size
    p = np.ascontiguousarray(patches, dtype=np.float32).reshape(total)
    inside, xm, ym, basis = _corner_layout(h, w)
    pad = w + 1
    m = total - pad  # corners with all four pixels in the stack
    # Few, reused buffers (the stack is ~0.2 MB per array): the pass count is fixed,
    # so what stays in cache sets the cost.
    gx = np.zeros(total + 2 * pad, dtype=np.float32)
    gy = np.zeros(total + 2 * pad, dtype=np.float32)
    tmp = np.empty(total + 2 * w, dtype=np.float32)
    np.add(p[:-w], p[w:], out=tmp[: total - w])  # pixel + the one below
    np.subtract(tmp[1 : m + 1], tmp[:m], out=gx[pad : pad + m])
    np.add(p[:-1], p[1:], out=tmp[: total - 1])  # pixel + the one right
    np.subtract(tmp[w : w + m], tmp[:m], out=gy[pad : pad + m])
    keep: NDArray[np.float32] = inside
    if valid is not None:
        v = valid.reshape(total)
        corner_ok = np.zeros(total, dtype=bool)
        corner_ok[:m] = v[:m] & v[1 : m + 1] & v[w : w + m] & v[w + 1 :]
        keep = corner_ok.reshape(n, size) * inside
    gx[pad : pad + total].reshape(n, size)[...] *= keep
    gy[pad : pad + total].reshape(n, size)[...] *= keep

    def box(g: NDArray[np.float32]) -> NDArray[np.float32]:
        """3 x 3 sums of g, written over g's own start (it is not read there again)."""
        r = tmp[: total + 2 * w]
        np.add(g[:-2], g[1:-1], out=r)
        r += g[2:]
        out = g[:total]
        np.add(r[:total], r[w : w + total], out=out)
        out += r[2 * w : 2 * w + total]
        return out.reshape(n, size)

    bx, by = box(gx), box(gy)
    if valid is not None:
        bx *= keep
        by *= keep
    gxy = bx * by
    gxx, gyy = np.multiply(bx, bx, out=bx), np.multiply(by, by, out=by)
    mag2 = np.add(gxx, gyy, out=tmp[:total].reshape(n, size))
    mom = (mag2 @ basis).astype(np.float64)
    smag = mom[:, 0]
    safe = np.where(smag > 0, smag, 1.0)
    # 1 / distance of each corner to the gradient-weighted centroid, in place.
    dist = np.subtract(xm, (mom[:, 1] / safe).astype(np.float32)[:, None], out=mag2)
    dy = ym - (mom[:, 2] / safe).astype(np.float32)[:, None]
    dist *= dist
    dy *= dy
    dist += dy
    np.maximum(dist, np.float32(_MIN_DIST * _MIN_DIST), out=dist)
    np.sqrt(dist, out=dist)
    np.reciprocal(dist, out=dist)
    s = np.empty((3, n, 3))
    for k, g in enumerate((gxx, gyy, gxy)):
        g *= dist
        s[k] = g @ basis
    # Line k: n_k . c = n_k . p_k with n_k = (-gy, gx) (unnormalised: |g|^2 weight built in).
    a22, a11, a12 = s[0, :, 0], s[1, :, 0], -s[2, :, 0]
    b1 = s[1, :, 1] - s[2, :, 2]
    b2 = s[0, :, 2] - s[2, :, 1]
    det = a11 * a22 - a12 * a12
    trace = a11 + a22
    ok = (smag > 0) & (det > 1e-9 * trace * trace)
    safe_det = np.where(ok, det, 1.0)
    x = (a22 * b1 - a12 * b2) / safe_det
    y = (a11 * b2 - a12 * b1) / safe_det
    ok &= np.isfinite(x) & np.isfinite(y)
    ok &= (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
    return x, y, ok


def _refine_batch(
    patches: FloatArray, method: str, valid: NDArray[np.bool_] | None = None
) -> tuple[FloatArray, FloatArray]:
    """Refine a stack with the chosen method, falling back to centroid where it fails.
    Pixels outside `valid` (if given) must be zero in patches."""
    if method == "centroid":
        return _centroid_batch(patches)
    rx, ry, ok = _radial_symmetry_batch(patches, valid)
    if not ok.all():
        bad = ~ok
        rx[bad], ry[bad] = _centroid_batch(patches[bad])
    return rx, ry


def _as_patch(patch: np.ndarray) -> FloatArray:
    """Validate a single patch and lift it to a (1, H, W) float stack."""
    arr = _check_2d(patch, "patch")
    return arr.astype(np.float64)[None]


def radial_symmetry_center(patch: np.ndarray) -> tuple[float, float]:
    """Radial-symmetry centre (x, y) of a background-subtracted patch, patch pixel coords.

    Unbiased by a residual constant offset, unlike the centroid; falls back to the
    centroid if the fit is degenerate or lands outside the patch.
    """
    x, y = _refine_batch(_as_patch(patch), "radial_symmetry")
    return float(x[0]), float(y[0])


def centroid_center(patch: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centroid (x, y) of the positive part of a background-subtracted patch.

    Returns the patch centre if nothing is positive.
    """
    x, y = _centroid_batch(_as_patch(patch))
    return float(x[0]), float(y[0])


def _label_sparse(idx: NDArray[np.intp], shape: tuple[int, int]) -> NDArray[np.intp]:
    """4-connected component labels of the sorted flat pixel indices idx in an image of shape.

    Cost follows the candidates, not the frame: a compact set is labelled inside its
    bounding box; a scattered one (noise candidates all over a big frame) as a graph of
    its neighbour pairs, since a full-frame ndimage.label pass costs ~1.6 ms at 1024^2.
    """
    rows, cols = np.divmod(idx, shape[1])
    r0, c0 = rows.min(), cols.min()
    box_shape = (int(rows.max() - r0 + 1), int(cols.max() - c0 + 1))
    if box_shape[0] * box_shape[1] <= _BOX_LABEL_FACTOR * idx.size:
        box = np.zeros(box_shape, dtype=bool)
        box[rows - r0, cols - c0] = True
        labels, _ = ndimage.label(box)
        return labels[rows - r0, cols - c0]
    width = shape[1]
    right = np.flatnonzero((np.diff(idx) == 1) & (cols[1:] != 0))
    below = np.minimum(np.searchsorted(idx, idx + width), idx.size - 1)
    down = np.flatnonzero(idx[below] == idx + width)
    src = np.concatenate((right, down))
    if src.size == 0:
        return np.arange(idx.size)
    dst = np.concatenate((right + 1, below[down]))
    graph = csr_matrix((np.ones(src.size, dtype=np.int8), (src, dst)), shape=(idx.size,) * 2)
    return connected_components(graph, directed=False)[1]


def _local_maxima(
    img: NDArray[np.float32], idx: NDArray[np.intp], vals: NDArray[np.float32]
) -> NDArray[np.bool_]:
    """Which of the pixels idx (values vals) are strict maxima of their in-image 8-neighbours."""
    return vals > _neighbours_max_at(img, idx)


def _neighbours_max_at(img: NDArray[np.float32], idx: NDArray[np.intp]) -> NDArray[np.float32]:
    """The maximum over the in-image 8-neighbours of each pixel idx (-inf: none).

    Few candidates read their neighbours at fixed flat offsets (only the few on the
    frame's border need clipped coordinates); many (a dense field) read one image of
    every pixel's neighbour maximum, a few whole-image passes, instead: a random read
    costs several streamed pixels."""
    h, w = img.shape
    if idx.size * _GATHER_VS_PASS > img.size:
        return _neighbour_max(img).ravel()[idx]
    rows, cols = np.divmod(idx, w)
    flat = img.ravel()
    out = np.full(idx.size, -np.inf, dtype=np.float32)
    inner = (rows > 0) & (rows < h - 1) & (cols > 0) & (cols < w - 1)
    at = idx[inner]
    nb = flat[at - w - 1]
    for off in (-w, -w + 1, -1, 1, w - 1, w, w + 1):
        np.maximum(nb, flat[at + off], out=nb)
    out[inner] = nb
    edge = np.flatnonzero(~inner)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if edge.size == 0 or (dr == 0 and dc == 0):
                continue
            r, c = rows[edge] + dr, cols[edge] + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            v = img[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]
            out[edge] = np.maximum(out[edge], np.where(inside, v, -np.inf))
    return out


def _neighbour_max(img: NDArray[np.float32]) -> NDArray[np.float32]:
    """Each pixel's maximum over its 8 neighbours (outside the image counts as -inf)."""
    h, w = img.shape
    pad = np.full((h + 2, w + 2), -np.inf, dtype=np.float32)
    pad[1:-1, 1:-1] = img
    row3 = np.maximum(pad[:, :-2], pad[:, 2:])  # left and right, every padded row
    side = row3[1:-1].copy()
    np.maximum(row3, pad[:, 1:-1], out=row3)  # and the pixel itself: 3 wide
    out = np.maximum(row3[:-2], row3[2:])  # the rows above and below
    return np.maximum(out, side, out=out)


def _merge_seeds(
    a: tuple[NDArray[np.intp], NDArray[np.intp]],
    b: tuple[NDArray[np.intp], NDArray[np.intp]],
    width: int,
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Union of two (rows, cols) seed sets; seeds on one pixel merge."""
    flat = np.union1d(a[0] * width + a[1], b[0] * width + b[1])
    return np.divmod(flat, width)


def _auto_bin(shape: tuple[int, ...], smooth_sigma_px: float) -> int:
    """Segmentation bin factor from the frame size and the PSF scale implied by the smoothing.

    Small frames are already cheap, so they stay at full resolution. A b-pixel box has a
    standard deviation of b / sqrt(12); keeping b <= 4 * smooth_sigma_px keeps the box
    no wider than the smoothing asked for, so a user who turns smoothing off gets no
    binning either. Beyond 2 x 2, bin further only while the binned image stays large.
    """
    short = min(shape)
    cap = int(4.0 * smooth_sigma_px + 1e-9)
    if short < _MIN_BIN_SIDE or cap < 2:
        return 1
    b = 2
    while 2 * b <= cap and short // b > _MAX_SEG_SIDE:
        b *= 2
    return b


def _reflect_index(idx: NDArray[np.intp], n: int) -> NDArray[np.intp]:
    """Map indices onto [0, n) the way ndimage's 'reflect' mode extends an axis."""
    idx = np.mod(idx, 2 * n)
    return np.where(idx >= n, 2 * n - 1 - idx, idx)


def _gaussian_weights(sigma_px: float) -> NDArray[np.float64]:
    """The exact 1-D kernel ndimage.gaussian_filter1d uses (same truncation)."""
    radius = int(_TRUNCATE * sigma_px + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    return ndimage.gaussian_filter1d(impulse, sigma_px, mode="constant", truncate=_TRUNCATE)


@lru_cache(maxsize=16)
def _band_kernel(sigma_px: float, span: int) -> NDArray[np.float32]:
    """(span, span + 2r) matrix whose row i is the Gaussian kernel starting at column i:
    ``band @ x`` is the filtered x on the span inside its r-sample margins, exactly as
    gaussian_filter1d gives there (same weights and truncation)."""
    weights = _gaussian_weights(sigma_px)
    r = (weights.size - 1) // 2
    band = np.zeros((span, span + 2 * r), dtype=np.float32)
    for i in range(span):
        band[i, i : i + 2 * r + 1] = weights
    band.flags.writeable = False
    return band


def _label_stack(mask: NDArray[np.bool_]) -> NDArray[np.int32]:
    """4-connected labels within each (H, W) slice of an (N, H, W) stack, none across:
    the slices stacked as one 2-D image with an empty row between them (a 2-D label is
    several times cheaper than a 3-D one)."""
    n, h, w = mask.shape
    sheet = np.zeros((n, h + 1, w), dtype=bool)
    sheet[:, :h] = mask
    labels, _ = ndimage.label(sheet.reshape(n * (h + 1), w))
    return labels.reshape(n, h + 1, w)[:, :h]


def _flatten(frame: np.ndarray, box_px: int, sign: float) -> NDArray[np.float32]:
    """sign x frame minus its box mean of side box_px (0: no background), as float32.

    Illumination varies slowly, so the box mean is taken on 4 x 4 block means and
    subtracted block-wise in the same pass as the sign flip and the float conversion
    (a broadcast into a view: no full-size temporary); a 4 px step of a smooth
    background is far below the noise. Small boxes or frames use the exact
    full-resolution filter.
    """
    h, w = frame.shape
    b = _BG_BLOCK
    hb, wb = h // b, w // b
    if box_px == 0 or box_px < 4 * b or hb < 2 or wb < 2:
        work = frame.astype(np.float32)
        if sign < 0:
            np.negative(work, out=work)
        if box_px:
            side = min(box_px, h, w)
            work -= ndimage.uniform_filter(work, side - 1 + side % 2)
        return work
    core = frame[: hb * b, : wb * b]
    rows_sum = core[0::b].astype(np.float32)
    for k in range(1, b):
        rows_sum += core[k::b]
    small = rows_sum[:, 0::b].copy()
    for k in range(1, b):
        small += rows_sum[:, k::b]
    small = _block_background(small, box_px)
    work = np.empty((h, w), dtype=np.float32)
    bg = np.repeat(small, b, axis=1)
    for k in range(b):  # whole rows at a stride: contiguous inner loops
        a, c = (bg, core[k::b]) if sign < 0 else (core[k::b], bg)
        np.subtract(a, c, out=work[k : hb * b : b, : wb * b], dtype=np.float32)
    # Leftover bottom rows and right columns take the nearest block.
    if h > hb * b:
        rows = np.repeat(small[-1], b)[None, :]
        rest = frame[hb * b :, : wb * b].astype(np.float32)
        work[hb * b :, : wb * b] = rows - rest if sign < 0 else rest - rows
    if w > wb * b:
        col = np.repeat(small[:, -1], b)
        col = np.concatenate((col, np.full(h - col.size, col[-1], dtype=col.dtype)))[:, None]
        rest = frame[:, wb * b :].astype(np.float32)
        work[:, wb * b :] = col - rest if sign < 0 else rest - col
    return work


def _block_background(block_sums: NDArray[np.float32], box_px: int) -> NDArray[np.float32]:
    """The local background on the _BG_BLOCK grid from its block sums: their means
    under a centred box of about box_px (an odd number of blocks: an even one is off by
    half a block, a 2 px shift of the map)."""
    b = _BG_BLOCK
    side = min(round(box_px / b), *block_sums.shape)
    return ndimage.uniform_filter(block_sums / np.float32(b * b), side - 1 + side % 2)


def _lazy_flatten(box_px: int, b: int, shape: tuple[int, int]) -> bool:
    """Whether the spot path can flatten on the fly: the segmentation bins (b) tile the
    background's blocks or are tiled by them, and the block map is what _flatten uses."""
    b_bg = _BG_BLOCK
    hb, wb = shape[0] // b_bg, shape[1] // b_bg
    return b in (2, 4) and (box_px == 0 or (box_px >= 4 * b_bg and hb >= 2 and wb >= 2))


def _subtract_blocks(
    img: NDArray[np.float32], blocks: NDArray[np.float32], k: int, sign: float
) -> None:
    """img := sign x img - blocks, in place, each block value covering k x k pixels of
    img; rows and columns past the last whole block take the nearest block. Strided
    views, one per phase: no expanded copy of the block map."""
    hb, wb = blocks.shape
    parts = []
    for j in range(k):
        parts += [(img[i : hb * k : k, j : wb * k : k], blocks) for i in range(k)]
        if img.shape[0] > hb * k:  # bottom rows, nearest block row
            parts.append((img[hb * k :, j : wb * k : k], blocks[-1:]))
    if img.shape[1] > wb * k:  # right columns, nearest block column (all rows)
        col = np.repeat(blocks[:, -1:], k, axis=0)
        col = np.concatenate((col, np.repeat(col[-1:], img.shape[0] - col.shape[0], axis=0)))
        parts.append((img[:, wb * k :], col))
    for view, bg in parts:
        if sign < 0:
            np.subtract(bg, view, out=view)
        else:
            view -= bg


class _FlatFrame:
    """sign x frame minus its local background (a map on the _BG_BLOCK grid), read only
    where asked: the spot path needs the flattened frame binned (done from the raw sums)
    and at a few thousand pixels (the background sample and the refinement windows), so
    the full-size float copy _flatten makes is never written. Pixels read are those of
    _flatten, in the same float32 arithmetic; the binned image is _flatten's binned to
    float rounding (a sum of differences taken as a difference of sums)."""

    def __init__(
        self, frame: np.ndarray, sign: float = 1.0, small: NDArray[np.float32] | None = None
    ) -> None:
        self.frame = frame
        self.sign = sign
        self.small = small
        self.shape: tuple[int, int] = (frame.shape[0], frame.shape[1])
        self.size = frame.size
        self._raw: np.ndarray | None = None
        # Plain (unflipped, unflattened) frames keep integer data's quantile treatment.
        self.integer = bool(sign > 0 and small is None and np.issubdtype(frame.dtype, np.integer))
        if small is not None:
            # Pixels past the last whole block take the nearest block, as in _flatten.
            h, w = self.shape
            self.block_row = np.minimum(np.arange(h) // _BG_BLOCK, small.shape[0] - 1)
            self.block_col = np.minimum(np.arange(w) // _BG_BLOCK, small.shape[1] - 1)

    def take(self, rows: NDArray[np.intp], cols: NDArray[np.intp]) -> NDArray[np.float32]:
        """Flattened values at broadcastable in-frame row and column indices, as float32
        (flat takes: several times cheaper than indexing with two arrays)."""
        if self._raw is None:
            self._raw = self.frame.ravel()  # a view of a contiguous frame
        raw = self._raw.take(rows * self.shape[1] + cols)
        if self.small is None:
            out = raw.astype(np.float32)
            return np.negative(out, out=out) if self.sign < 0 else out
        wb = self.small.shape[1]
        bg = self.small.ravel().take(self.block_row[rows] * wb + self.block_col[cols])
        a, c = (bg, raw) if self.sign < 0 else (raw, bg)
        return np.subtract(a, c, dtype=np.float32)

    def level_and_sigma(self) -> tuple[float, float]:
        """_background of the flattened frame, from its strided subsample alone."""
        if self.sign > 0 and self.small is None:
            return _background(self.frame)
        step = _sample_step(self.size)
        raw = self.frame[::step, ::step]
        if self.small is None:
            return _level_and_sigma(np.negative(raw, dtype=np.float32).ravel())
        bg = self.small.take(self.block_row[::step], axis=0).take(self.block_col[::step], axis=1)
        a, c = (bg, raw) if self.sign < 0 else (raw, bg)
        return _level_and_sigma(np.subtract(a, c, dtype=np.float32).ravel())


def _isolated(xy: FloatArray, radius: float) -> NDArray[np.intp]:
    """Indices of xy (strongest first) kept when each suppresses weaker ones within radius."""
    return _suppress(xy, radius)[0]


def _suppress(
    xy: FloatArray, radius: float, near: float = 0.0, limit: int | None = None
) -> tuple[NDArray[np.intp], NDArray[np.bool_] | None]:
    """_isolated's indices (the first `limit` of them), and for near > 0 which of those
    have another of them within near: both from one tree of close pairs."""
    n = len(xy)
    pairs = np.zeros((0, 2), dtype=np.intp)
    if n > 1:
        pairs = cKDTree(xy).query_pairs(max(radius, near), output_type="ndarray")
    close = pairs
    if near > radius and pairs.size:
        dist = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
        close = pairs[dist <= radius]
    keep = np.ones(n, dtype=bool)
    if close.size:
        # Greedy, strongest first: by the time i's pairs come, i's own fate is settled.
        # A plain Python loop over lists: numpy scalars would cost ~10x per pair.
        flags = [True] * n
        for i, j in close[np.lexsort((close[:, 1], close[:, 0]))].tolist():
            if flags[i]:
                flags[j] = False
        keep = np.array(flags)
    kept = np.flatnonzero(keep)[:limit]
    if near <= 0:
        return kept, None
    keep[kept[-1] + 1 if kept.size else 0 :] = False  # those past the limit are gone too
    if near < radius and pairs.size:
        pairs = pairs[np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T) <= near]
    both = pairs[keep[pairs[:, 0]] & keep[pairs[:, 1]]]
    return kept, np.bincount(both.ravel(), minlength=n)[kept] > 0


class _SegPlan:
    """Per-frame-shape segmentation state: bin factor, kernel, threshold gains and buffers.

    The smoothing is a separable, reflect-mode Gaussian done with whole-row float32
    slices into preallocated buffers: ndimage filters along axis 0 walk strided lines
    and cost ~4x more per pixel, and fresh buffers would page-fault on every frame.
    """

    def __init__(self, frame_shape: tuple[int, int], b: int, sigma: float) -> None:
        self.b = b
        self.sigma = sigma
        h, w = frame_shape[0] // b, frame_shape[1] // b
        self.shape = (h, w)
        r = int(_TRUNCATE * sigma + 0.5) if sigma > 0 else 0
        self.r = r
        # One reflection per side is all the slice version handles; tiny frames use ndimage.
        self.fast = r <= min(h, w)
        weights = _gaussian_weights(sigma) if sigma > 0 else np.ones(1)
        self.weights = [np.float32(v) for v in weights[r:]]
        self.pad = np.empty((h + 2 * r, w), dtype=np.float32)
        self.src = self.pad[r : r + h]
        self.rowsum = np.empty((h, w * b), dtype=np.float32) if b > 1 else self.src
        self.tmp = np.empty((h, w + 2 * r), dtype=np.float32)
        self.scratch = np.empty((h, w), dtype=np.float32)
        self.out = np.empty((h, w), dtype=np.float32)
        self.mask = np.empty((h, w), dtype=bool)
        gain = np.outer(_noise_gain_1d(sigma, h), _noise_gain_1d(sigma, w))
        self.scale = gain.astype(np.float32).ravel()
        self.min_scale = self.scale.min()
        # Full-resolution per-axis noise gains for the candidate check (binned path only).
        self.full_gains = (np.ones(0), np.ones(0))
        self.confirm_px = 0  # pixels one candidate's confirmation patch smooths

    def load(self, frame: np.ndarray) -> NDArray[np.float32]:
        """Write the (binned) frame into the padded buffer; returns the unpadded view."""
        b = self.b
        if b == 1:
            np.copyto(self.src, frame, casting="unsafe")
            return self.src
        h, w = self.shape
        f = frame[: h * b, : w * b]
        rows = self.rowsum
        np.add(f[0::b], f[1::b], out=rows, dtype=np.float32)
        for k in range(2, b):
            np.add(rows, f[k::b], out=rows, dtype=np.float32)
        np.add(rows[:, 0::b], rows[:, 1::b], out=self.src)
        for k in range(2, b):
            np.add(self.src, rows[:, k::b], out=self.src)
        return self.src

    def smooth(self) -> NDArray[np.float32]:
        """Gaussian-smooth the loaded image (reflect mode); returns a reused buffer."""
        if self.sigma <= 0:
            return self.src
        if not self.fast:
            return ndimage.gaussian_filter(self.src, self.sigma, truncate=_TRUNCATE)
        r, (h, w), wts = self.r, self.shape, self.weights
        pad, tmp, scr = self.pad, self.tmp, self.scratch
        # Reflect-pad rows ('d c b a | a b c d | d c b a'), filter along axis 0 into the
        # middle of tmp, reflect-pad its columns, then filter along axis 1.
        pad[:r] = pad[r : 2 * r][::-1]
        pad[r + h :] = pad[h : h + r][::-1]
        mid = tmp[:, r : r + w]
        np.multiply(self.src, wts[0], out=mid)
        for k in range(1, r + 1):
            np.add(pad[r - k : r - k + h], pad[r + k : r + k + h], out=scr)
            scr *= wts[k]
            mid += scr
        tmp[:, :r] = tmp[:, r : 2 * r][:, ::-1]
        tmp[:, r + w :] = tmp[:, w : w + r][:, ::-1]
        out = self.out
        np.multiply(mid, wts[0], out=out)
        for k in range(1, r + 1):
            np.add(tmp[:, r - k : r - k + w], tmp[:, r + k : r + k + w], out=scr)
            scr *= wts[k]
            out += scr
        return out


def _empty() -> tuple[FloatArray, FloatArray]:
    """No detections: (0, 2) positions and (0,) scores."""
    return np.zeros((0, 2), dtype=np.float64), np.zeros(0, dtype=np.float64)


class ParticleDetector:
    """Threshold-and-refine detector; call it on a frame to get (N, 2) (x, y) positions.

    Segmentation buffers are cached per frame shape, so one instance must not be
    called from several threads at once (use one detector per thread).
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config if config is not None else DetectorConfig()
        self._plan_shape: tuple[int, ...] = ()
        self._plan: _SegPlan | None = None
        # Fixed offsets of the refinement window, reused for every frame.
        self._offsets = np.arange(-self.config.refine_half_px, self.config.refine_half_px + 1)
        self._last_confidence = np.zeros(0)
        # Spot path: which detections have a resolved neighbour (pair split's test).
        self._last_crowded: NDArray[np.bool_] | None = None
        self._matcher: RingMatcher | None = None
        self._ring_tracker: object | None = None  # detect_auto.RingTracker, with ring_refit
        self.adapted: object | None = None  # the estimate, when adapt=True has run

    def __call__(self, frame: np.ndarray) -> FloatArray:
        """Detect particles, brightest (window-integrated, background-subtracted) first."""
        return self._detect(frame)[0]

    def detect_with_scores(self, frame: np.ndarray) -> tuple[FloatArray, FloatArray]:
        """Positions as from calling the detector, plus an SNR-like score per detection.

        The score is the background-subtracted sum over the refinement window divided by
        the noise of that sum (robust pixel sigma x sqrt(window pixels)), so offline
        analysis can rank or cut detections without recomputing anything.
        """
        return self._detect(frame)

    def detect_with_confidence(
        self, frame: np.ndarray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Positions, scores and a confidence in [0, 1] per detection.

        Confidence is how far the seed's smoothed peak stands above the detection
        threshold, in units of that threshold: 0 for one just at it, 1 at twice it or
        more. Policies can drop weak detections without knowing any camera units.
        """
        xy, score = self._detect(frame)
        return xy, score, self._last_confidence

    def _detect(self, frame: np.ndarray) -> tuple[FloatArray, FloatArray]:
        """Shared detection path: (N, 2) positions and (N,) scores, brightest first;
        merged touching pairs split when contact_px is set (agent.detection.pair_split)."""
        frame = _check_2d(frame, "frame")
        if self.config.adapt:
            self._adapt(frame)
        self._last_confidence = np.zeros(0)
        self._last_crowded = None
        xy, score = (
            self._detect_rings(frame)
            if self.config.polarity == "ring"
            else (self._detect_spots(frame))
        )
        cfg = self.config
        if cfg.contact_px <= 0 or len(xy) == 0:
            return xy, score
        if cfg.polarity == "ring":
            sign = -1.0 if cfg.ring_profile and cfg.ring_profile[0] < 0 else 1.0
        else:
            sign = -1.0 if cfg.polarity == "dark" else 1.0
        xy, src = split_elongated(frame, xy, sign, cfg.contact_px, self._last_crowded)
        if self._last_confidence.size == score.size:
            self._last_confidence = self._last_confidence[src]
        return xy, score[src]

    def _detect_spots(self, frame: np.ndarray) -> tuple[FloatArray, FloatArray]:
        """Spot modes: threshold the smoothed frame, seed, refine."""
        cfg = self.config
        plan = self._get_plan(frame.shape)
        work = self._prepare(frame, plan)
        level, sigma = work.level_and_sigma()
        if plan.b > 1:
            # Threshold from the binned image's own noise: exact, and immune to any
            # pixel-to-pixel correlation that would break a sqrt(b**2) scaling.
            seg_level, seg_sigma = _background(plan.src, integer=work.integer)
        else:
            seg_level, seg_sigma = level, sigma
        seg = plan.smooth()

        # Threshold against the smallest edge-noise gain first (one cheap scalar compare),
        # then apply the exact per-pixel threshold to the few candidates.
        k_sigma = cfg.threshold_sigma * seg_sigma
        if plan.b > 1:
            k_sigma *= _CANDIDATE_FRACTION
        np.greater(seg, seg_level + k_sigma * plan.min_scale, out=plan.mask)
        idx = np.flatnonzero(plan.mask)
        if idx.size:
            vals = seg.ravel()[idx]
            keep = vals > seg_level + k_sigma * plan.scale[idx]
            idx, vals = idx[keep], vals[keep]
        if idx.size == 0:
            return _empty()
        nb = (
            _neighbours_max_at(seg, idx)
            if plan.b > 1 or cfg.separation_px > 0
            else np.full(idx.size, np.inf, dtype=np.float32)
        )
        peak = vals > nb
        if plan.b > 1:
            # Over the binned level, in units of the full (per-pixel) threshold.
            z = (vals - seg_level) / ((k_sigma / _CANDIDATE_FRACTION) * plan.scale[idx])
            flat_top = np.any((vals == nb) & ~peak)  # a component may have no strict peak
            rows, cols = self._binned_seeds(
                work, seg, idx, vals, peak, z, plan, level, sigma, flat_top
            )
        else:
            rows, cols = self._component_seeds(work, idx, vals, peak, plan, level, sigma)
        if rows.size == 0:
            return _empty()
        xy, brightness = self._refine(work, rows, cols, level)

        keep = np.argsort(-brightness, kind="stable")
        if cfg.separation_px > 0:
            # One tree for suppression and for pair split's test of resolved neighbours.
            near = resolved_radius(cfg.contact_px) if cfg.contact_px > 0 else 0.0
            kept, self._last_crowded = _suppress(xy[keep], cfg.separation_px, near, cfg.max_objects)
            keep = keep[kept]
        keep = keep[: cfg.max_objects]
        # Noise of a window sum is sigma * sqrt(pixels); edge windows are clipped, as in _refine.
        half, (n_rows, n_cols) = cfg.refine_half_px, work.shape
        r, c = rows[keep], cols[keep]
        n_pix = (np.minimum(r + half + 1, n_rows) - np.maximum(r - half, 0)) * (
            np.minimum(c + half + 1, n_cols) - np.maximum(c - half, 0)
        )
        noise = max(sigma, np.finfo(np.float64).tiny) * np.sqrt(n_pix.astype(np.float64))
        self._last_confidence = self._confidence(seg, r, c, plan, seg_level, seg_sigma)
        return xy[keep], brightness[keep] / noise

    def _detect_rings(
        self, frame: np.ndarray, again: bool = False
    ) -> tuple[FloatArray, FloatArray]:
        """Ring mode: peaks of the matched filter (agent.detection.ring_match), brightest
        first; the score is the response in pixel-noise sigmas (the kernel is unit-norm)."""
        xy, z = self._match_rings(frame)
        if self.config.ring_refit:
            from agent.detection.detect_auto import RingTracker

            if self._ring_tracker is None:
                self._ring_tracker = RingTracker()
            assert isinstance(self._ring_tracker, RingTracker)
            refit = self._ring_tracker.update(frame, xy, z, self.config, settle=again)
            if refit is not None and not again:
                self.config = refit
                return self._detect_rings(frame, again=True)
        return xy, z

    def _match_rings(self, frame: np.ndarray) -> tuple[FloatArray, FloatArray]:
        cfg = self.config
        profile = cfg.ring_profile or synthetic_ring_profile(
            cfg.ring_radius_px if cfg.ring_radius_px > 0 else max(cfg.window_px / 0.85, 2.0)
        )
        if self._matcher is None or self._matcher.key != (profile, cfg.ring_scales):
            self._matcher = RingMatcher(profile, cfg.ring_scales)
        sigma = white_noise_sigma(frame)
        if sigma <= 1e-12:  # a noiseless (flat or synthetic) frame: no scale for a threshold
            return _empty()
        resp, fine = self._matcher.response(frame)
        # Candidates at half the threshold: neighbours' negative side lobes can pull a
        # particle's response under it, and the joint fit below gives it back.
        idx = np.flatnonzero(resp > _RING_CANDIDATE_FRACTION * cfg.threshold_sigma * sigma)
        if idx.size == 0:
            return _empty()
        vals = resp.ravel()[idx]
        peak = _local_maxima(resp, idx, vals)
        idx, vals = idx[peak], vals[peak]
        order = np.argsort(-vals, kind="stable")
        rows, cols = np.divmod(idx[order], frame.shape[1])
        xy = subpixel_peaks(resp, rows, cols)
        # Candidates closer than the separation are one particle: keep the strongest,
        # then fit all amplitudes jointly so side lobes of overlapping rings drop out.
        keep = _isolated(xy, max(cfg.separation_px, 1.0))
        xy, vals = xy[keep], vals[order][keep]
        amp = explain_away(self._matcher, xy, vals)
        z = amp / sigma
        floor = cfg.threshold_sigma
        if cfg.relative_threshold > 0 and z.size:
            # The strong ones among those over the threshold: the candidates under it
            # (down to half, for the joint fit) can be many and would drag it down.
            over = z[z > floor]
            over = over if over.size else z
            top = over[over >= 0.5 * np.percentile(over, 90)]
            floor = max(floor, cfg.relative_threshold * float(np.median(top)))
        strong = np.argsort(-z, kind="stable")
        keep = strong[z[strong] > floor][: cfg.max_objects]
        xy, z = refine_without_neighbours(self._matcher, fine, xy[keep], amp[keep]), z[keep]
        keep = np.arange(len(xy))
        k = cfg.threshold_sigma
        self._last_confidence = np.clip((z[keep] - k) / k, 0.0, 1.0)
        return xy[keep], z[keep]

    def _confidence(
        self,
        seg: NDArray[np.float32],
        rows: NDArray[np.intp],
        cols: NDArray[np.intp],
        plan: _SegPlan,
        seg_level: float,
        seg_sigma: float,
    ) -> FloatArray:
        """(z - k) / k clipped to [0, 1]: z the seed's smoothed SNR, k the threshold."""
        b, (h, w) = plan.b, plan.shape
        flat = np.minimum(rows // b, h - 1) * w + np.minimum(cols // b, w - 1)
        z = (seg.ravel()[flat] - seg_level) / (
            max(seg_sigma, np.finfo(np.float64).tiny) * plan.scale[flat]
        )
        k = self.config.threshold_sigma
        return np.clip((z - k) / k, 0.0, 1.0).astype(np.float64)

    def _adapt(self, frame: np.ndarray) -> None:
        """Replace unset parameters by ones estimated from this frame (once)."""
        from agent.detection.detect_auto import estimate_config

        estimate = estimate_config([frame], base=self.config)
        self.config = estimate.config.model_copy(update={"adapt": False})
        self.adapted = estimate
        self._plan = None
        self._offsets = np.arange(-self.config.refine_half_px, self.config.refine_half_px + 1)

    def _prepare(self, frame: np.ndarray, plan: _SegPlan) -> _FlatFrame:
        """Load the plan's segmentation image with the flattened (polarity, background)
        frame, binned; returns the flattened frame for reading windows from.

        Where the bins and the background's blocks nest (_lazy_flatten), the raw frame is
        binned and the background removed on the binned grid, so the only full-frame pass
        is the binning itself; otherwise the frame is flattened whole first."""
        cfg = self.config
        sign = -1.0 if cfg.polarity == "dark" else 1.0
        b = plan.b
        if (sign > 0 and cfg.background_px == 0) or not _lazy_flatten(
            cfg.background_px, b, frame.shape
        ):
            work = self._preprocess(frame)
            plan.load(work)
            return _FlatFrame(work)
        binned = plan.load(frame)
        if cfg.background_px == 0:
            np.negative(binned, out=binned)
            return _FlatFrame(frame, sign)
        hb, wb = frame.shape[0] // _BG_BLOCK, frame.shape[1] // _BG_BLOCK
        blocks = binned
        if b == 2:  # 2 x 2 bins make the 4 x 4 blocks' sums
            rows = binned[0 : 2 * hb : 2] + binned[1 : 2 * hb : 2]
            blocks = rows[:, 0 : 2 * wb : 2] + rows[:, 1 : 2 * wb : 2]
        small = _block_background(blocks[:hb, :wb], cfg.background_px)
        _subtract_blocks(binned, small * np.float32(b * b), _BG_BLOCK // b, sign)
        return _FlatFrame(frame, sign, small)

    def _preprocess(self, frame: np.ndarray) -> np.ndarray:
        """Polarity flip and local background removal, only when asked (they cost a pass)."""
        cfg = self.config
        if cfg.polarity != "dark" and cfg.background_px == 0:
            return frame
        return _flatten(frame, cfg.background_px, -1.0 if cfg.polarity == "dark" else 1.0)

    def _get_plan(self, shape: tuple[int, ...]) -> _SegPlan:
        """Segmentation plan for this frame shape; cached as the shape rarely changes."""
        if self._plan is None or shape != self._plan_shape:
            cfg = self.config
            sig = cfg.smooth_sigma_px
            b = cfg.segment_bin_px or _auto_bin(shape, sig)
            b = max(1, min(b, *shape))
            if b > 1 and sig > 0:
                # Top the b x b box (variance b**2 / 12) up to the requested smoothing,
                # but never below the sampling floor of the coarse grid.
                sig = max(np.sqrt(max(sig * sig - b * b / 12.0, 0.0)) / b, _MIN_BINNED_SIGMA)
            self._plan = _SegPlan((shape[0], shape[1]), b, sig)
            if b > 1:
                full = cfg.smooth_sigma_px
                self._plan.full_gains = (
                    _noise_gain_1d(full, shape[0]),
                    _noise_gain_1d(full, shape[1]),
                )
                side = b + 2 * (b // 2 + 1) + 2 * int(_TRUNCATE * full + 0.5)
                self._plan.confirm_px = side * side
            self._plan_shape = shape
        return self._plan

    def _binned_seeds(
        self,
        work: _FlatFrame,
        seg: NDArray[np.float32],
        idx: NDArray[np.intp],
        vals: NDArray[np.float32],
        peak: NDArray[np.bool_],
        z: NDArray[np.float32],
        plan: _SegPlan,
        level: float,
        sigma: float,
        flat_top: bool,
    ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Full-resolution seeds for the binned candidates idx (z: their smoothed binned
        value over the level in units of the full threshold).

        Confirmation at full resolution is for the candidates the binned image cannot
        decide. Binned peaks that clear the full threshold by the binned-to-full SNR
        margin (1 / _CANDIDATE_FRACTION) seed directly from their sub-bin position when
        the refinement does not depend on where its window sits (radial symmetry; a
        centroid does); the rest are confirmed. In a dense field, whose confirmation
        patches would cost more than the frame, every peak over the full threshold seeds
        directly and the rest are dropped. flat_top: some candidate ties its largest
        neighbour (a component may have no strict peak), so components are labelled."""
        dense = np.count_nonzero(peak) * plan.confirm_px > _DENSE_CONFIRM * work.size
        if dense:
            return self._seeds_from_bins(work, seg, idx[peak & (z > 1.0)], plan)
        if self.config.method != "radial_symmetry":
            return self._component_seeds(work, idx, vals, peak, plan, level, sigma)
        decided = peak & (z > 1.0 / _CANDIDATE_FRACTION)
        rows, cols = self._seeds_from_bins(work, seg, idx[decided], plan)
        if not flat_top and np.all(decided[peak]):
            # Every component's brightest pixel is a decided peak: nothing to confirm.
            return rows, cols
        more = self._component_seeds(work, idx, vals, peak, plan, level, sigma, decided)
        return _merge_seeds((rows, cols), more, work.shape[1])

    def _component_seeds(
        self,
        work: _FlatFrame,
        idx: NDArray[np.intp],
        vals: NDArray[np.float32],
        peak: NDArray[np.bool_],
        plan: _SegPlan,
        level: float,
        sigma: float,
        decided: NDArray[np.bool_] | None = None,
    ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Seeds from the connected above-threshold components: each one's brightest
        pixel (and, to separate touching particles, every local maximum). Binned
        candidates marked decided (seeded already) are not confirmed again."""
        cfg = self.config
        lab = _label_sparse(idx, plan.shape)
        # Seeds without a Python loop: sort above-threshold pixels by (label, value);
        # the last pixel of each label run is that component's brightest.
        order = np.lexsort((vals, lab))
        lab_sorted = lab[order]
        last = np.flatnonzero(np.diff(lab_sorted, append=lab_sorted[-1] + 1))
        seeds = idx[order[last]]
        if plan.b == 1:
            area = np.bincount(lab)
            seeds = seeds[area[lab_sorted[last]] >= cfg.min_area_px]
            if cfg.separation_px > 0:
                # Touching particles share one blob: each local maximum seeds its own.
                seeds = np.union1d(seeds, idx[peak & (area[lab] >= cfg.min_area_px)])
            return np.divmod(seeds, plan.shape[1])
        # The coarser, lower-threshold binned mask merges close neighbours that are
        # separate at full resolution, so other local maxima are candidates too.
        is_max = np.zeros(idx.size, dtype=bool)
        is_max[order[last]] = True
        extra = peak & ~is_max
        if decided is not None:
            seeds = seeds[~decided[order[last]]]
            extra &= ~decided
        rows, cols = np.divmod(np.concatenate((seeds, idx[extra])), plan.shape[1])
        primary = np.arange(rows.size) < seeds.size
        if rows.size == 0:
            return rows, cols
        return self._confirm(work, rows, cols, primary, plan, level, sigma)

    def _seeds_from_bins(
        self, frame: _FlatFrame, seg: NDArray[np.float32], flat: NDArray[np.intp], plan: _SegPlan
    ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Full-resolution seeds for binned peaks (flat indices into seg): each peak's
        sub-bin position (a parabola through its smoothed neighbours) on the full grid,
        rounded; peaks that land on one pixel merge."""
        b = plan.b
        rows, cols = np.divmod(flat, plan.shape[1])
        xy = (subpixel_peaks(seg, rows, cols) + 0.5) * b - 0.5
        n_rows, n_cols = frame.shape
        r = np.clip(np.rint(xy[:, 1]).astype(np.intp), 0, n_rows - 1)
        c = np.clip(np.rint(xy[:, 0]).astype(np.intp), 0, n_cols - 1)
        _, first = np.unique(r * n_cols + c, return_index=True)
        return r[first], c[first]

    def _confirm(
        self,
        frame: _FlatFrame,
        rows: NDArray[np.intp],
        cols: NDArray[np.intp],
        primary: NDArray[np.bool_],
        plan: _SegPlan,
        level: float,
        sigma: float,
    ) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
        """Full-resolution seeds for binned candidates, keeping only those that pass.

        Around each candidate bin (plus about half a bin each side) a patch is gathered
        with a smoothing margin and reflected indices, so after smoothing it holds exactly
        the values the whole-frame reflect-mode filter would give. The seed is the
        brightest in-frame pixel; it must clear the full-resolution per-pixel threshold
        and its 4-connected above-threshold area inside the patch must reach min_area_px,
        as on the unbinned path. A secondary candidate (not its component's brightest)
        must also peak strictly inside its search box; one that only climbs towards a
        brighter neighbour's peak is a flank, not a particle. Candidates on one pixel merge.
        """
        cfg = self.config
        b = plan.b
        sig = cfg.smooth_sigma_px
        rf = int(_TRUNCATE * sig + 0.5)
        m = b // 2 + 1
        span = b + 2 * m
        off = np.arange(-m - rf, b + m + rf)
        n_rows, n_cols = frame.shape
        raw_r = rows[:, None] * b + off
        raw_c = cols[:, None] * b + off
        ri = _reflect_index(raw_r, n_rows)
        ci = _reflect_index(raw_c, n_cols)
        patch = frame.take(ri[:, :, None], ci[:, None, :])
        inner = slice(rf, rf + span)
        if sig > 0:
            # Only the inner span is read, and its margin is in the patch: the separable
            # filter there is one small band matrix per side (two BLAS products).
            band = _band_kernel(sig, span)
            sm = np.matmul(np.matmul(band, patch), band.T)
        else:
            sm = patch[:, inner, inner]
        ri, ci = ri[:, inner], ci[:, inner]
        valid = ((raw_r[:, inner] >= 0) & (raw_r[:, inner] < n_rows))[:, :, None] & (
            (raw_c[:, inner] >= 0) & (raw_c[:, inner] < n_cols)
        )[:, None, :]
        g_rows, g_cols = plan.full_gains
        scale = (g_rows[ri][:, :, None] * g_cols[ci][:, None, :]).astype(np.float32)
        mask = (sm > level + (cfg.threshold_sigma * sigma) * scale) & valid
        labels = _label_stack(mask)

        n = np.arange(rows.size)
        best = np.argmax(np.where(valid, sm, -np.inf).reshape(rows.size, -1), axis=1)
        br, bc = np.divmod(best, span)
        seed_label = labels[n, br, bc]
        area = np.bincount(labels.ravel())[seed_label]
        ok = (seed_label > 0) & (area >= cfg.min_area_px)
        inside = (br > 0) & (br < span - 1) & (bc > 0) & (bc < span - 1)
        ok &= primary | inside
        r, c = ri[n, br][ok], ci[n, bc][ok]
        _, first = np.unique(r * n_cols + c, return_index=True)
        return r[first], c[first]

    def _refine(
        self,
        frame: np.ndarray | _FlatFrame,
        rows: NDArray[np.intp],
        cols: NDArray[np.intp],
        level: float,
    ) -> tuple[FloatArray, FloatArray]:
        """Sub-pixel positions and window brightness for each seed, all in one stack:
        windows the frame edge clips are gathered whole and masked (no per-seed loop)."""
        flat = frame if isinstance(frame, _FlatFrame) else _FlatFrame(frame)
        half = self.config.refine_half_px
        n_rows, n_cols = flat.shape
        r = rows[:, None] + self._offsets[None, :]
        c = cols[:, None] + self._offsets[None, :]
        vr = (r >= 0) & (r < n_rows)
        vc = (c >= 0) & (c < n_cols)
        patches = flat.take(
            np.clip(r, 0, n_rows - 1)[:, :, None], np.clip(c, 0, n_cols - 1)[:, None, :]
        )
        patches -= np.float32(level)
        valid = None
        if not (vr.all() and vc.all()):
            valid = vr[:, :, None] & vc[:, None, :]
            patches *= valid
        x, y = _refine_batch(patches, self.config.method, valid)
        xy = np.column_stack([x + (cols - half), y + (rows - half)])
        brightness = patches.sum(axis=(1, 2), dtype=np.float64)
        return xy, brightness
