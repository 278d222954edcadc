"""Brightfield rings found by a matched filter on their measured radial profile.

A sphere in transmitted light images as a radial profile c(r) that changes with its
defocus: a dark blob in focus, then a bright centre inside a dark ring whose weight
grows with defocus, with a bright outer fringe far out. No single-polarity peak finder
sees all of these: the bright centre is weak near focus and the dark ring dominates far
out. Correlating the frame with the profile itself (zero mean, unit norm) uses every
pixel of the particle whatever its sign, so the response peaks at each centre:

* it is the maximum-likelihood detector for a known shape in white noise, and its noise
  is exactly the pixel noise (unit-norm kernel), so thresholds are in pixel sigmas;
* a zero-mean symmetric kernel removes a constant and a linear background, so uneven
  illumination needs no separate background pass;
* its central lobe is as narrow as the particle's bright core, so touching particles
  (rings overlapping each other's centres) give separate peaks.

Defocus varies from particle to particle (they sit at different heights), so the frame
is correlated with the profile stretched over a few radial scales around the estimated
one and each pixel keeps its best response (a ring vote over a radius range). The
correlation runs as real FFTs on a reflect-padded float32 frame: its cost does not grow
with the ring's size.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import fft
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.linalg import spsolve
from scipy.spatial import cKDTree

__all__ = [
    "RingMatcher",
    "explain_away",
    "fit_radial_profile",
    "refine_without_neighbours",
    "subpixel_peaks",
    "synthetic_ring_profile",
]

FloatArray = NDArray[np.float64]
_STEPS = np.arange(-1, 2)
_REFINE_RING_WEIGHT = 0.5  # weight of the dark ring in the refinement kernel (core: 1)
_FIT_PARTICLES = 100  # particles whose neighbourhood the profile fit uses at most

# Radial stretch factors of the template bank: +-15 % covers the ring-radius spread of
# spheres a few um apart in height at NA 0.3-1.0 (measured on the twin's Mie-free model
# and the real frames); each costs one inverse FFT.
DEFAULT_SCALES = (0.87, 1.0, 1.15)


def synthetic_ring_profile(ring_radius_px: float) -> tuple[float, ...]:
    """A documented stand-in when only the ring radius is known: a bright Gaussian core
    (sigma 0.35 R) and a dark Gaussian ring at R (sigma 0.2 R, depth 0.5), sampled per px."""
    r = np.arange(math.ceil(1.6 * ring_radius_px) + 1, dtype=np.float64)
    core = np.exp(-0.5 * (r / (0.35 * ring_radius_px)) ** 2)
    ring = 0.5 * np.exp(-0.5 * ((r - ring_radius_px) / (0.2 * ring_radius_px)) ** 2)
    return tuple(float(v) for v in core - ring)


def _kernel(profile: NDArray[np.float64], scale: float, disc_of: int = 0) -> NDArray[np.float32]:
    """Zero-mean, unit-norm 2-D kernel of the profile (sampled at 0, 1, 2 ... px) stretched
    radially by scale, over the disc it covers (or that of disc_of samples)."""
    n = max(profile.size, disc_of)
    extent = (n - 1) * scale
    half = math.ceil(extent)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    r = np.hypot(yy, xx) / scale
    disc = r <= n - 1
    k = np.where(disc, np.interp(r, np.arange(profile.size), profile, right=0.0), 0.0)
    k[disc] -= k[disc].mean()
    norm = math.sqrt(float(np.sum(k * k)))
    return (k / norm if norm > 0 else k).astype(np.float32)


def _radial_correlation(
    full: NDArray[np.float32], other: NDArray[np.float32], step: float
) -> FloatArray:
    """Correlation of two same-size unit-norm radial kernels against distance (0, step,
    2 step ...), over full's autocorrelation at 0: the response (through other) that a
    particle of unit full-kernel response gives at that distance from its centre."""
    n = 2 * full.shape[0]
    spec = np.fft.rfft2(full.astype(np.float64), s=(n, n))
    spec_o = np.fft.rfft2(other.astype(np.float64), s=(n, n))
    ac = np.fft.fftshift(np.fft.irfft2(spec * np.conj(spec_o), s=(n, n)))
    c = n // 2
    yy, xx = np.mgrid[-c : n - c, -c : n - c]
    dist = np.hypot(yy, xx).ravel()
    bins = np.rint(dist / step).astype(np.intp)
    counts = np.bincount(bins)
    table = np.bincount(bins, ac.ravel()) / np.maximum(counts, 1)
    table = table[: int(full.shape[0] / step) + 2]
    table[-1] = 0.0
    return table / float(np.sum(full.astype(np.float64) ** 2))


class RingMatcher:
    """Best matched-filter response over a bank of radial scales, per frame shape.

    Kernel spectra are computed once per frame shape; one instance is not thread-safe.
    """

    def __init__(self, profile: tuple[float, ...], scales: tuple[float, ...] = DEFAULT_SCALES):
        self.key = (tuple(profile), tuple(scales))
        prof = np.asarray(profile, dtype=np.float64)
        if prof.size < 3:
            raise ValueError(f"ring_profile needs at least 3 samples, got {prof.size}")
        self.kernels = [_kernel(prof, s) for s in scales]
        # Positions are refined on the profile with its dark ring at half weight: the
        # ring's darkness follows illumination asymmetries (on the real frames in
        # shared/data/brightfield the full profile sits 0.4 px off trackpy's ring fit,
        # the core alone 0.2 px), while the ring pins the centre of a far-defocused
        # sphere whose core is weak (3 um on the twin: recall 0.97 full, 0.88 core only).
        dark = np.flatnonzero(prof < 0)
        start = dark[0] if dark.size else prof.size
        core = np.where(np.arange(prof.size) < start, prof, _REFINE_RING_WEIGHT * prof)
        self.kernels.append(_kernel(core, 1.0))
        self.ac_step = 0.25
        full = _kernel(prof, 1.0)
        self.ac = _radial_correlation(full, full, self.ac_step)
        # A particle's refinement response around it, per unit of its full response.
        self.cross = _radial_correlation(full, self.kernels[-1], self.ac_step)
        self.pad = max(k.shape[0] // 2 for k in self.kernels)
        self._shape: tuple[int, int] = (0, 0)
        self._spectra: list[NDArray[np.complex64]] = []
        self._fft_shape: tuple[int, int] = (0, 0)

    def _prepare(self, shape: tuple[int, int]) -> None:
        p = self.pad
        fs = (
            fft.next_fast_len(shape[0] + 2 * p, real=True),
            fft.next_fast_len(shape[1] + 2 * p, real=True),
        )
        spectra = []
        for k in self.kernels:
            full = np.zeros(fs, dtype=np.float32)
            h = k.shape[0] // 2
            full[: k.shape[0], : k.shape[1]] = k
            # Kernel centre at the origin (wrapped), so the response is not shifted.
            full = np.roll(full, (-h, -h), axis=(0, 1))
            spectra.append(fft.rfft2(full).astype(np.complex64))
        self._spectra, self._shape, self._fft_shape = spectra, shape, fs

    def response(self, frame: np.ndarray) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(H, W) best response over the scales, and the refinement kernel's response; in
        the frame's units x unit-norm kernel, so white pixel noise of sigma gives sigma."""
        shape = (int(frame.shape[0]), int(frame.shape[1]))
        if shape != self._shape:
            self._prepare(shape)
        p = self.pad
        work = np.pad(np.asarray(frame, dtype=np.float32), p, mode="reflect")
        spec = fft.rfft2(work, s=self._fft_shape)
        maps = [
            fft.irfft2(spec * kspec, s=self._fft_shape)[p : p + shape[0], p : p + shape[1]]
            for kspec in self._spectra
        ]
        best = maps[0].astype(np.float32)
        for m in maps[1:-1]:
            np.maximum(best, m, out=best)
        return best, maps[-1]


def _neighbourhoods(
    resp: NDArray[np.float32], rows: NDArray[np.intp], cols: NDArray[np.intp]
) -> FloatArray:
    """(N, 3, 3) response around each integer peak (edges repeat the edge pixel)."""
    h, w = resp.shape
    r = np.clip(rows[:, None] + _STEPS, 0, h - 1)
    c = np.clip(cols[:, None] + _STEPS, 0, w - 1)
    return resp[r[:, :, None], c[:, None, :]].astype(np.float64)


def _parabola_peaks(
    values: FloatArray, rows: NDArray[np.intp], cols: NDArray[np.intp], reach: float
) -> FloatArray:
    """(N, 2) (x, y): a parabola per axis through the centre row / column of each 3x3."""

    def offset(a: FloatArray, centre: FloatArray, b: FloatArray) -> FloatArray:
        curv = a - 2.0 * centre + b
        safe = np.where(curv < 0, curv, -1.0)
        return np.where(curv < 0, np.clip(0.5 * (a - b) / safe, -reach, reach), 0.0)

    mid = values[:, 1, 1]
    dx = offset(values[:, 1, 0], mid, values[:, 1, 2])
    dy = offset(values[:, 0, 1], mid, values[:, 2, 1])
    return np.column_stack([cols + dx, rows + dy]).astype(np.float64)


def subpixel_peaks(
    resp: NDArray[np.float32], rows: NDArray[np.intp], cols: NDArray[np.intp]
) -> FloatArray:
    """(N, 2) (x, y) of each integer peak refined by a parabola through it and its
    4-neighbours per axis."""
    return _parabola_peaks(_neighbourhoods(resp, rows, cols), rows, cols, 0.5)


def refine_without_neighbours(
    matcher: RingMatcher,
    fine: NDArray[np.float32],
    xy: FloatArray,
    amp: FloatArray,
    rounds: int = 3,
) -> FloatArray:
    """Positions refined on the refinement kernel's response, with the neighbours' side
    lobes there (their amplitude x the cross-correlation of the two kernels, from their
    current positions) taken out of each 3x3 neighbourhood first: a touching
    neighbour's lobe tilts the peak towards or away from it by a good part of a pixel."""
    table_r = np.arange(matcher.cross.size) * matcher.ac_step
    pairs = np.zeros((0, 2), dtype=np.intp)
    if len(xy) > 1:
        pairs = cKDTree(xy).query_pairs(float(table_r[-1]), output_type="ndarray")
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])  # the peak being refined
    nbr = np.concatenate([pairs[:, 1], pairs[:, 0]])  # the neighbour taken out
    h, w = fine.shape
    for _ in range(rounds):
        rows = np.clip(np.rint(xy[:, 1]).astype(np.intp), 0, h - 1)
        cols = np.clip(np.rint(xy[:, 0]).astype(np.intp), 0, w - 1)
        values = _neighbourhoods(fine, rows, cols)
        if src.size:
            px = cols[src, None, None] + _STEPS[None, None, :] - xy[nbr, 0, None, None]
            py = rows[src, None, None] + _STEPS[None, :, None] - xy[nbr, 1, None, None]
            lobe = amp[nbr, None, None] * np.interp(np.hypot(px, py), table_r, matcher.cross)
            np.subtract.at(values, src, lobe)
        xy = _parabola_peaks(values, rows, cols, 1.0)
    return xy


def explain_away(
    matcher: RingMatcher, xy: FloatArray, vals: FloatArray, rounds: int = 3
) -> FloatArray:
    """Amplitudes of candidate peaks fitted jointly (least squares, negatives dropped).

    A particle's response spreads to its neighbours as the kernel's autocorrelation;
    where rings overlap these side lobes add up to peaks no particle sits under. Solving
    G a = r over the candidates (G_ij = autocorrelation at their distance) gives each
    candidate the amplitude its own particle needs: side-lobe peaks, explained by their
    neighbours, get none; touching pairs, whose responses add, get their own.
    """
    n = len(xy)
    amp = np.zeros(n)
    if n == 0:
        return amp
    reach = (matcher.ac.size - 1) * matcher.ac_step
    pairs = cKDTree(xy).query_pairs(reach, output_type="ndarray")
    d = np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T)
    g = np.interp(d, np.arange(matcher.ac.size) * matcher.ac_step, matcher.ac)
    active = np.ones(n, dtype=bool)
    for _ in range(rounds):
        idx = np.flatnonzero(active)
        pos = np.full(n, -1)
        pos[idx] = np.arange(idx.size)
        both = active[pairs[:, 0]] & active[pairs[:, 1]]
        i, j, w = pos[pairs[both, 0]], pos[pairs[both, 1]], g[both]
        gram = csr_matrix(
            (
                np.concatenate([w, w, np.ones(idx.size)]),
                (
                    np.concatenate([i, j, np.arange(idx.size)]),
                    np.concatenate([j, i, np.arange(idx.size)]),
                ),
            ),
            shape=(idx.size, idx.size),
        )
        sol = spsolve(gram.tocsc(), vals[idx].astype(np.float64))
        amp[:] = 0.0
        amp[idx] = sol
        if np.all(sol > 0):
            break
        active &= amp > 0
    return np.maximum(amp, 0.0)


def fit_radial_profile(frame: np.ndarray, xy: FloatArray, radius: int) -> tuple[FloatArray, float]:
    """One particle's radial profile c(k), k = 0 .. radius px, fitted to the whole frame,
    and the share of the frame's variance about the background that the fit explains
    (how well particles of that profile at xy account for the image).

    In a crowded field the mean profile around a particle holds its neighbours' rings
    too (far from focus they overlap at every distance), so the shape is solved for
    instead: frame = quadratic background + sum_i c(|x - x_i|) over all particles at xy,
    c linear between integer radii, least squares over every pixel. The quadratic
    takes the camera offset and vignetting. c is in the frame's units.

    A few hundred particles pin a profile of a few tens of values, so in a large frame
    only a central window holding about _FIT_PARTICLES of them is fitted (the particles
    around it still count where their rings reach in): the cost stays ~0.1 s."""
    img = np.asarray(frame, dtype=np.float64)
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    h, w = img.shape
    if len(pts) > _FIT_PARTICLES:
        side = math.sqrt(h * w * _FIT_PARTICLES / len(pts))
        sh, sw = int(min(h, max(side, 4 * radius))), int(min(w, max(side, 4 * radius)))
        y0, x0 = (h - sh) // 2, (w - sw) // 2
        img = img[y0 : y0 + sh, x0 : x0 + sw]
        pts = pts - np.array([x0, y0])
        near = (
            (pts[:, 0] > -radius)
            & (pts[:, 0] < sw + radius)
            & (pts[:, 1] > -radius)
            & (pts[:, 1] < sh + radius)
        )
        pts = pts[near]
        h, w = img.shape
    offs = np.arange(-radius - 1, radius + 2)
    cols = np.rint(pts[:, 0]).astype(np.intp)[:, None, None] + offs[None, None, :]
    rows = np.rint(pts[:, 1]).astype(np.intp)[:, None, None] + offs[None, :, None]
    dist = np.hypot(cols - pts[:, 0, None, None], rows - pts[:, 1, None, None])
    inside = (dist < radius) & (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    dist = dist[inside]
    pix = (np.broadcast_to(rows, inside.shape) * w + np.broadcast_to(cols, inside.shape))[inside]
    k = np.floor(dist).astype(np.intp)
    t = dist - k
    n = radius + 1
    design = coo_matrix(
        (np.concatenate([1.0 - t, t]), (np.concatenate([pix, pix]), np.concatenate([k, k + 1]))),
        shape=(h * w, n + 1),
    ).tocsr()[:, :n]
    u = np.tile(np.arange(w) / w - 0.5, h)
    v = np.repeat(np.arange(h) / h - 0.5, w)
    poly = np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)
    b = img.ravel()
    m = n + poly.shape[1]
    normal = np.empty((m, m))
    normal[:n, :n] = (design.T @ design).toarray()
    normal[:n, n:] = design.T @ poly
    normal[n:, :n] = normal[:n, n:].T
    normal[n:, n:] = poly.T @ poly
    rhs = np.concatenate([design.T @ b, poly.T @ b])
    # A whisker of ridge: radii no particle reaches (small frames) stay at 0.
    normal[np.arange(m), np.arange(m)] += 1e-9 * np.trace(normal) / m
    sol = np.linalg.solve(normal, rhs)
    residual = b - design @ sol[:n] - poly @ sol[n:]
    background_only = b - poly @ np.linalg.lstsq(poly, b, rcond=None)[0]
    total = float(background_only @ background_only)
    explained = 1.0 - float(residual @ residual) / total if total > 0 else 0.0
    return sol[:n], explained


def central_lobe_px(profile: tuple[float, ...]) -> float:
    """Half width at half maximum (px) of the matched filter's response to one particle
    (the kernel's autocorrelation along an axis): two particles closer than about 1.7
    times this give one peak, so closer peaks are one particle."""
    k = _kernel(np.asarray(profile, dtype=np.float64), 1.0).astype(np.float64)
    ac = [float(np.sum(k * k))]
    for d in range(1, k.shape[1]):
        ac.append(float(np.sum(k[:, d:] * k[:, :-d])))
        if ac[-1] < 0.5 * ac[0]:
            a, b = ac[-2], ac[-1]
            return d - 1 + (a - 0.5 * ac[0]) / (a - b)
    return float(k.shape[1] // 2)
