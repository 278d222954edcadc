"""Detector parameters estimated from the frames themselves, for a user's first run.

A new user's images differ from the twin in every setting that matters: particle size,
contrast (bright spots, dark spots, brightfield rings), uneven illumination and
background texture. Each is measured here from the data, in this order, so each step
works on what the previous one cleaned:

1. Frame checks: mixed sizes or dtypes, a flat (empty) or saturated frame fail with one
   line saying so.
2. Illumination: medians of coarse blocks (particles barely move a block median); if
   they vary by more than a few noise sigmas, a local background is subtracted.
3. Polarity: the strongest bright and dark local extremes of the lightly smoothed,
   background-free frame (noise: the white pixel noise from neighbour differences,
   since in a dense field the frame's spread is mostly particles); the side whose
   extremes are radially symmetric is the particles' contrast. Strength alone misleads:
   a defocused sphere's dark ring, or overlapping rings, outweigh its bright centre.
4. Size and shape: the median radial profile around the most symmetric particles.
   The candidates are the extremes and the centres of radial symmetry (gradient
   voting, both polarities: it peaks at a ring's centre whatever that centre's
   brightness, so a dark donut in focus or a weak centre inside strong rings is seeded
   at its centre, not on its ring), snapped to an extreme where one is within 3 px;
   the polarity is the sign of the median profile's centre (a centre under a tenth of
   the profile's extreme: the opposite of that extreme). Its
   half maximum gives the core width (smoothing, window, separation of touching
   particles); a significant dip below the background after the core is a brightfield
   ring, and the profile out to where the ring returns to the background becomes the
   ring mode's matched filter. Where the rings overlap (crowded fields, far from focus)
   that median holds the neighbours' rings too, so the profile is then fitted to the
   whole frame at the particles the filter finds (least squares over every pixel,
   ``ring_match.fit_radial_profile``) and the filter rebuilt, twice. Peaks closer than
   the filter's resolution (1.5 half widths of its central lobe) are one particle;
   touching rings are told apart by the joint amplitude fit, not split as blobs.
   Blobs whose images still hold 5 % of their peak at the close neighbour distance
   (darkfield out of focus: flat-topped or heavy-tailed) get the same matched filter
   on their profile where a pair at that distance dips deeper in its response than in
   the smoothed image (not so for Gaussians, which stay with smoothing and splitting).
   Ring mode then keeps the filter matched (``RingTracker``): when a frame's typical
   response moves by 30 % (focus drift, particles at another height, a centre turning
   from bright to dark) the profile is refitted to that frame's own detections.
5. Threshold: the noise of the smoothed background is measured where no particle is,
   not assumed white: texture and out-of-focus debris raise it, and the threshold with
   it. A relative minimum mass (a quarter of the typical particle's peak) drops halos,
   fringes between neighbours and debris that stand far above the noise. Ring mode
   measures the filter's own background noise the same way (5 of its sigmas), and its
   relative floor (40 % of the frame's typical particle) is taken per frame, so frames
   whose particles image more weakly keep them.

Parameters the caller set explicitly (fields in ``base.model_fields_set``, or a given
``diameter_px``) are kept. ``Estimate.summary`` is the one line ``scopeloop detect``
prints; ``Estimate.why_empty`` says why nothing will be found, when that is the case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal
from scipy.spatial import cKDTree

from agent.detection.detect import (
    DetectorConfig,
    ParticleDetector,
    _background,
    _noise_gain_1d,
    white_noise_sigma,
)
from agent.detection.ring_match import RingMatcher, _kernel, central_lobe_px, fit_radial_profile

__all__ = ["Estimate", "RingTracker", "check_frames", "estimate_config"]

_BLOCKS = 16  # illumination grid: blocks per short side
_UNEVEN = 2.0  # block medians spreading over this many times their noise range: uneven
_PEAK_SIGMAS = 6.0  # extremes weaker than this (smoothed-noise sigmas) are not particles
_PROFILE_PEAKS = 30  # strongest particles averaged into the radial profile
_MAX_RADIUS_PX = 40  # radial profile extent
_RING_DEPTH = 0.1  # a dip below -this x peak (and > 4 noise) after the core is a ring
_SATURATED_FRACTION = 0.5  # frames with more pixels than this at the maximum: saturated
_THRESHOLD_SIGMA = 5.0
_MIN_PEAK_FRACTION = 0.25  # of the typical particle's smoothed peak: weaker is not one
_QUIET_FRACTION = 1 / 3
# Ring mode's relative floor (of the frame's typical particle): residual side lobes of
# overlapping rings after the joint fit stay under ~0.35 of a particle up to 2 um defocus.
_RING_RELATIVE = 0.4
_REFITS = 2  # rounds of fitting the ring profile to whole frames at the particles found
_REFIT_FRAMES = 1  # frames the fit uses
_MIN_FIT_PARTICLES = 3
_MIN_CENTRE = 0.2  # a fitted centre weaker than this share of the profile's extreme: stop
_LOBES = 1.5  # separation in half widths of the filter's central lobe
_DRIFT = 1.3  # typical response changed by this factor (either way): refit the profile
_MIN_TRACK = 10  # detections needed to refit the profile on a frame
_TRACK_ROUNDS = 3  # refit, detect, refit ... on the frame that triggered it
_SMOOTH_GAIN = 0.5 / math.sqrt(math.pi)  # white noise through a sigma-1 px Gaussian
_RESOLVE = 2.5  # smoothed images must be narrower than the close distance / this
_SEPARATE = 0.6  # separation: at most this share of the close distance
_QUIET_SNR = 4.0 * _THRESHOLD_SIGMA  # typical particle over noise after smoothing
_CROWDED = 2.0  # close distance under this many merge distances: split merged pairs
_CLOSE_QUANTILE = 0.1  # of nearest-neighbour distances: the touching pairs'
_MIN_CLOSE_PEAKS = 20  # fewer particle-like extremes in a frame: no crowding measured
_SYM_CANDIDATES = 100  # strongest extremes per side scored for symmetry
# Disc (px) of the symmetry score: a few core widths of small particles; on large rings
# it sees the centre (round) against arcs (not round).
_VOTING_SHARE = 0.15  # strongest gradients that vote for symmetry centres
# Centres with fewer votes than this share of the strongest few's are texture or noise
# (a sparse field's edges vote for many chance points).
_MIN_VOTE_FRACTION = 0.5
_CHANCE_VOTES = 3.0  # and than this many times the typical local maximum's (chance)
_VOTE_SMOOTH_PX = 1.5
# A centre weaker than this share of the profile's extreme has no sign of its own (a donut)
_DONUT_CENTRE = 0.1
# Blob images still this share of their peak at a neighbour's centre overlap (they add
# up there): the matched filter's joint fit takes over from smoothing and splitting.
_FADED = 0.05
_OVERLAP = 0.8  # of the close distance: a faded radius beyond it is overlapping images
_SNAP_PX = 3.0  # an extreme this close to a centre of symmetry is the centre
_VOTE_RADIUS_PX = 20  # farthest centre an edge votes for
_SYM_RADIUS_PX = 8  # share of pixels far from features needed to measure texture


@dataclass(frozen=True)
class Estimate:
    """Parameters for a frame set and what was measured to get them."""

    config: DetectorConfig
    diameter_px: float
    contrast: str  # "bright", "dark" or "ring"
    ring_radius_px: float
    illumination_spread: float  # block-median range / the range noise alone would give
    summary: str
    why_empty: str = ""
    peak_snr: float = 0.0  # strongest extreme / noise of the lightly smoothed background


def check_frames(frames: Sequence[np.ndarray]) -> None:
    """One-line ValueError for input no detector can work on."""
    if len(frames) == 0:
        raise ValueError("no frames given")
    first = np.asarray(frames[0])
    for i, f in enumerate(frames):
        f = np.asarray(f)
        if f.ndim != 2:
            raise ValueError(f"frame {i} must be 2-D, got shape {f.shape}")
        if f.shape != first.shape:
            raise ValueError(
                f"frames of mixed sizes: frame 0 is {first.shape[1]}x{first.shape[0]} px, "
                f"frame {i} is {f.shape[1]}x{f.shape[0]} px"
            )
        if f.dtype != first.dtype:
            raise ValueError(
                f"frames of mixed pixel types: frame 0 is {first.dtype}, frame {i} is {f.dtype}"
            )


def _frame_problem(frame: np.ndarray, index: int) -> str:
    """Why a frame cannot hold detectable particles ('' if it can)."""
    lo, hi = float(frame.min()), float(frame.max())
    if np.issubdtype(frame.dtype, np.integer):
        top = float(np.iinfo(frame.dtype).max)
        if np.mean(frame == top) > _SATURATED_FRACTION:
            return (
                f"frame {index} is saturated: {np.mean(frame == top):.0%} of pixels at "
                f"{top:g} (shorten the exposure or lower the illumination)"
            )
    if lo == hi:
        return f"frame {index} is empty: every pixel is {lo:g}"
    return ""


def _block_side(shape: tuple[int, ...]) -> int:
    return max(16, min(shape) // _BLOCKS)


def _illumination(frame: np.ndarray) -> np.ndarray:
    """Smooth background map from block medians, bilinearly resampled to the frame."""
    h, w = frame.shape
    block = _block_side(frame.shape)
    nb_r, nb_c = max(1, h // block), max(1, w // block)
    trimmed = frame[: nb_r * block, : nb_c * block].astype(np.float32)
    med = np.median(
        trimmed.reshape(nb_r, block, nb_c, block).transpose(0, 2, 1, 3).reshape(nb_r, nb_c, -1),
        axis=2,
    )
    rows = (np.arange(h) + 0.5) / block - 0.5
    cols = (np.arange(w) + 0.5) / block - 0.5
    return ndimage.map_coordinates(
        med, np.meshgrid(rows, cols, indexing="ij"), order=1, mode="nearest"
    ).astype(np.float32)


def _robust_sigma(a: np.ndarray) -> float:
    return _background(np.ascontiguousarray(a, dtype=np.float32))[1]


def _texture_sigma(img: np.ndarray, xy: np.ndarray, radius: int, floor: float) -> float:
    """Robust sigma of img outside discs of radius around the particles xy (>= floor);
    floor alone when under a third of the pixels is left."""
    mask = np.zeros(img.shape, dtype=bool)
    rc = np.rint(xy[:, ::-1]).astype(np.intp).reshape(-1, 2)
    rc = np.clip(rc, 0, np.array(img.shape) - 1)
    mask[rc[:, 0], rc[:, 1]] = True
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    mask = ndimage.binary_dilation(mask, structure=yy**2 + xx**2 <= radius**2)
    quiet = img[~mask]
    if quiet.size < _QUIET_FRACTION * img.size:
        return floor
    q1, q3 = np.percentile(quiet[:: max(1, quiet.size // 65536)], (25, 75))
    return max(float(q3 - q1) / 1.34898, floor)


def _extremes(sm: np.ndarray, sigma: float, sign: float) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) and amplitudes of the strongest local extremes of sign, > _PEAK_SIGMAS."""
    img = sign * sm
    peaks = (img == ndimage.maximum_filter(img, size=5)) & (img > _PEAK_SIGMAS * sigma)
    rc = np.argwhere(peaks)
    amp = img[peaks]
    order = np.argsort(-amp)
    return rc[order], amp[order]


def _symmetry(img: np.ndarray, seeds: np.ndarray, radius: int) -> np.ndarray:
    """Per seed, the share of the disc's variance that its radial mean explains (1: a
    perfectly round particle centred there; a piece of a ring or a noise peak: low)."""
    img = np.pad(img, radius, mode="reflect")
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    dist = np.rint(np.hypot(yy, xx)).astype(np.intp).ravel()
    disc = dist <= radius
    dist = dist[disc]
    counts = np.bincount(dist)
    if len(seeds) == 0:
        return np.zeros(0)
    rows = np.asarray(seeds)[:, 0, None] + yy.ravel()[disc] + radius
    cols = np.asarray(seeds)[:, 1, None] + xx.ravel()[disc] + radius
    patch = img[rows, cols].astype(np.float64)
    patch -= patch.mean(axis=1, keepdims=True)
    radial = np.stack([np.bincount(dist, p) / counts for p in patch])[:, dist]
    total = np.sum(patch * patch, axis=1)
    return np.sum(radial * radial, axis=1) / np.where(total > 0, total, 1.0)


def _close_distance(extremes: list[tuple[np.ndarray, np.ndarray]], peak_fraction: float) -> float:
    """The _CLOSE_QUANTILE of nearest-neighbour distances (px) between the particle-like
    extremes (within peak_fraction of the strongest few) of every frame; 0 if too few.
    A low quantile: touching pairs are a minority of a field but must be resolved."""
    dists = []
    for rc, amp in extremes:
        if amp.size < _MIN_CLOSE_PEAKS:
            continue
        keep = rc[amp >= peak_fraction * float(np.median(amp[:5]))].astype(np.float64)
        if len(keep) >= _MIN_CLOSE_PEAKS:
            d, _ = cKDTree(keep).query(keep, k=2)
            dists.append(d[:, 1])
    return float(np.quantile(np.concatenate(dists), _CLOSE_QUANTILE)) if dists else 0.0


def _quiet_smoothing(snr_1px: float, sigma_px: float) -> float:
    """Least Gaussian smoothing (>= 1 px, <= sigma_px) that keeps a particle of width
    sigma_px, at snr_1px after 1 px smoothing, _QUIET_SNR above the noise: the noise
    falls as 1/s, the particle's peak as sigma^2 / (sigma^2 + s^2)."""
    for s in np.linspace(1.0, max(sigma_px, 1.0), 25):
        if snr_1px * s * (sigma_px**2 + 1.0) / (sigma_px**2 + s * s) >= _QUIET_SNR:
            return float(s)
    return float(max(sigma_px, 1.0))


def _median_or_zero(a: np.ndarray) -> float:
    return float(np.median(a)) if a.size else 0.0


def _symmetry_centres(sm: np.ndarray, max_radius: int) -> np.ndarray:
    """(rows, cols) of the strongest centres of radial symmetry, most votes first.

    Gradient voting (Loy & Zelinsky's fast radial symmetry transform, both directions,
    magnitude-weighted): every strong edge votes for the points 1 .. max_radius px along
    its gradient, both ways. A round particle's edges, whatever their sign, agree on its
    centre; so the votes peak at a ring's centre even where the centre is no extreme of
    the frame (a dark donut in focus, a bright ring round a grey centre), while an arc
    of a ring spreads its votes. Only centres within _MIN_VOTE_FRACTION of the
    strongest few's votes, and _CHANCE_VOTES over the typical maximum of the vote map
    (in a sparse field mostly chance), are kept."""
    gy, gx = ndimage.sobel(sm, 0), ndimage.sobel(sm, 1)
    mag = np.hypot(gx, gy)
    rows, cols = np.nonzero(mag > np.quantile(mag, 1.0 - _VOTING_SHARE))
    m = mag[rows, cols].astype(np.float64)
    uy, ux = gy[rows, cols] / m, gx[rows, cols] / m
    h, w = sm.shape
    acc = np.zeros(h * w)
    for n in range(1, max_radius + 1):
        for s in (n, -n):
            rr, cc = np.rint(rows + s * uy).astype(np.intp), np.rint(cols + s * ux).astype(np.intp)
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            acc += np.bincount(rr[ok] * w + cc[ok], m[ok], minlength=h * w)
    votes = ndimage.gaussian_filter(acc.reshape(h, w), _VOTE_SMOOTH_PX)
    peaks = votes == ndimage.maximum_filter(votes, size=5)
    rc, amp = np.argwhere(peaks), votes[peaks]
    if amp.size == 0:
        return rc
    chance = _CHANCE_VOTES * float(np.median(amp))
    order = np.argsort(-amp)[:_SYM_CANDIDATES]
    rc, amp = rc[order], amp[order]
    return rc[amp >= max(_MIN_VOTE_FRACTION * float(np.median(amp[:5])), chance)]


def _snap(centres: np.ndarray, extremes: np.ndarray) -> np.ndarray:
    """Each centre (row, col) moved to the nearest extreme within _SNAP_PX, if any."""
    if len(centres) == 0 or len(extremes) == 0:
        return centres
    d, i = cKDTree(extremes).query(centres, distance_upper_bound=_SNAP_PX)
    near = np.isfinite(d)
    out = centres.copy()
    out[near] = extremes[i[near]]
    return out


def _most_symmetric(flat: np.ndarray, *candidates: np.ndarray) -> np.ndarray:
    """The candidate (row, col) seeds, each once, most radially symmetric first."""
    rc = np.unique(np.concatenate([c.reshape(-1, 2) for c in candidates]), axis=0)
    return rc[np.argsort(-_symmetry(flat, rc, _SYM_RADIUS_PX), kind="stable")]


def _centre_sign(flat: np.ndarray, seeds: np.ndarray, radius: int) -> float:
    """The sign that makes the particles' centre positive: the median profile's centre,
    or where that is near zero (a donut), the opposite of its strongest extreme."""
    _, prof = _radial_profile(flat, seeds[:_PROFILE_PEAKS], radius)
    if prof.size == 0:
        return 1.0
    top = float(np.max(np.abs(prof)))
    if abs(float(prof[0])) >= _DONUT_CENTRE * top:
        return 1.0 if prof[0] > 0 else -1.0
    return -1.0 if prof[int(np.argmax(np.abs(prof)))] > 0 else 1.0


def _by_symmetry(
    flat: np.ndarray, extremes: tuple[np.ndarray, np.ndarray], sign: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The strongest extremes (rows, cols), amplitudes and symmetry scores, most
    symmetric first. Only extremes within _MIN_PEAK_FRACTION of the strongest few count:
    in a sparse field the rest are noise peaks, some round by chance."""
    rc, amp = extremes[0][:_SYM_CANDIDATES], extremes[1][:_SYM_CANDIDATES]
    if amp.size:
        strong = amp >= _MIN_PEAK_FRACTION * float(np.median(amp[:5]))
        rc, amp = rc[strong], amp[strong]
    score = _symmetry(sign * flat, rc, _SYM_RADIUS_PX)
    order = np.argsort(-score, kind="stable")
    return rc[order], amp[order], score[order]


def _radial_profile(
    img: np.ndarray, seeds: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """(mean distance, median over seeds of the mean value) per rounded distance 0..radius.

    The abscissa is each bin's mean pixel distance, not its integer label: the bin "1"
    holds pixels at 1 and 1.41 px, and labelling it 1 would shrink every width by ~15 %.
    """
    # Reflect-padded, so particles near the edge count too (small frames have few).
    img = np.pad(img, radius, mode="reflect")
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    exact = np.hypot(yy, xx).ravel()
    dist = np.rint(exact).astype(np.intp)
    counts = np.bincount(dist)[: radius + 1]
    where = np.bincount(dist, exact)[: radius + 1] / counts
    profiles = []
    for r, c in seeds:
        patch = img[r : r + 2 * radius + 1, c : c + 2 * radius + 1].ravel()
        profiles.append(np.bincount(dist, patch)[: radius + 1] / counts)
    if not profiles:
        return where, np.zeros(0)
    return where, np.median(profiles, axis=0)


def _crossing(r: np.ndarray, profile: np.ndarray, level: float, start: int = 0) -> float:
    """First radius (index >= start) where the profile falls to level, interpolated."""
    for i in range(max(start, 1), profile.size):
        if profile[i] <= level:
            a, b = profile[i - 1], profile[i]
            t = (a - level) / (a - b) if a != b else 1.0
            return float(r[i - 1] + t * (r[i] - r[i - 1]))
    return float(r[-1])


def _shape(
    flats: list[np.ndarray],
    seeds: list[tuple[np.ndarray, np.ndarray]],
    sign: float,
    pix_sigma: float,
    radius: int,
) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """(radii, median profile, core half width at half maximum, ring radius, ring outer
    edge) of the particles at seeds; ring radius 0 where no dark ring follows the core."""
    profiles = []
    where = np.arange(2.0)
    for f, (rc, _) in zip(flats, seeds, strict=True):
        where, prof = _radial_profile(sign * f, rc[:_PROFILE_PEAKS], radius)
        if prof.size:
            profiles.append(prof)
    if not profiles:
        return where, np.zeros(where.size), 1.5, 0.0, 0.0
    prof = np.median(profiles, axis=0)
    # 4 sigma of a profile bin: each averages >= 8 pixels of every seed.
    n_seeds = sum(min(len(rc), _PROFILE_PEAKS) for rc, _ in seeds)
    noise = 4.0 * pix_sigma / math.sqrt(8.0 * max(n_seeds, 1))
    return (where, prof, *_features(where, prof, noise))


def _features(where: np.ndarray, prof: np.ndarray, noise: float) -> tuple[float, float, float]:
    """(core half width at half maximum, ring radius, ring outer edge) of a radial
    profile whose centre is positive; ring radius 0 where no significant dip (deeper than
    _RING_DEPTH of the centre and than noise) follows the core."""
    peak = float(prof[0])
    if peak <= 0:  # no centre of this sign
        return 0.5, 0.0, 0.0
    hwhm = _crossing(where, prof, 0.5 * peak)
    core = math.ceil(hwhm)
    after = prof[core:]
    if after.size <= 2 or -after.min() <= max(_RING_DEPTH * peak, noise):
        return hwhm, 0.0, 0.0
    k = core + int(np.argmin(after))
    # Sub-pixel ring radius: parabola through the minimum and its neighbours.
    ring_r = float(where[k])
    if 0 < k < prof.size - 1:
        a, b, c = prof[k - 1], prof[k], prof[k + 1]
        curv = a - 2 * b + c
        ring_r += 0.5 * (a - c) / curv if curv > 0 else 0.0
    outer = _crossing(where, -prof, 0.25 * float(-prof[k]), start=k + 1)
    return hwhm, ring_r, outer


def _describe(est: dict[str, float | str], cfg: DetectorConfig) -> str:
    contrast = {
        "bright": "bright spots",
        "dark": "dark spots",
        "ring": (
            f"brightfield rings ({'bright' if est['sign'] > 0 else 'dark'} centre, "
            f"{'dark' if est['sign'] > 0 else 'bright'} ring r={cfg.ring_radius_px:.1f} px)"
        ),
    }[str(est["contrast"])]
    bg = (
        f"local {cfg.background_px} px box (illumination spread {est['spread']:.0f}x its noise)"
        if cfg.background_px
        else "flat"
    )
    pairs = (
        f", blobs elongated by touching pairs (images merge under {cfg.contact_px:.1f} px) split"
        if cfg.contact_px
        else ""
    )
    if cfg.polarity == "ring":
        scales = f"{min(cfg.ring_scales):g}-{max(cfg.ring_scales):g}"
        return (
            f"auto: {contrast}, diameter {est['diameter']:.0f} px, matched filter on the "
            f"measured profile (r <= {len(cfg.ring_profile) - 1} px, stretched {scales}x), "
            f"separation {cfg.separation_px:.1f} px, threshold {cfg.threshold_sigma:.1f} "
            f"sigma and {cfg.relative_threshold:.0%} of the typical particle, background "
            f"removed by the filter (illumination spread {est['spread']:.0f}x its noise)"
            + (", profile refitted to a frame when its response drifts" if cfg.ring_refit else "")
            + pairs
        )
    return (
        f"auto: {contrast}, diameter {est['diameter']:.0f} px, smoothing "
        f"{cfg.smooth_sigma_px:.2f} px, window +-{cfg.window_px} px, separation "
        f"{cfg.separation_px:.1f} px, threshold {cfg.threshold_sigma:.1f} sigma, background {bg}"
        + pairs
    )


def estimate_config(
    frames: Sequence[np.ndarray],
    base: DetectorConfig | None = None,
    diameter_px: float | None = None,
) -> Estimate:
    """Detector settings for these frames; fields set in `base` and `diameter_px` are kept.

    Uses up to the first five frames (pooled profile). Raises ValueError (one line) for
    input no detector can use; frames that are merely particle-free give an Estimate
    whose `why_empty` says so.
    """
    base = base if base is not None else DetectorConfig()
    check_frames(frames)
    given = base.model_fields_set
    use = [np.asarray(f) for f in frames[:5]]
    if diameter_px is not None and diameter_px > 0.8 * min(use[0].shape):
        raise ValueError(
            f"diameter {diameter_px:g} px does not fit in the {use[0].shape[1]}x"
            f"{use[0].shape[0]} px frame (at most {0.8 * min(use[0].shape):.0f} px)"
        )
    problems = [p for i, f in enumerate(use) if (p := _frame_problem(f, i))]
    if len(problems) == len(use):
        raise ValueError(problems[0])
    use = [f for i, f in enumerate(use) if not _frame_problem(f, i)]

    frame = use[0]
    pix_sigma = white_noise_sigma(frame)
    illum = _illumination(frame)
    # Spread of the block medians in units of what noise alone gives them (a median of
    # n pixels scatters by 1.25 sigma / sqrt(n); the range of M of them ~ 2 sqrt(2 ln M)).
    block = _block_side(frame.shape)
    n_blocks = max(2, (frame.shape[0] // block) * (frame.shape[1] // block))
    noise_range = 2.0 * math.sqrt(2.0 * math.log(n_blocks)) * 1.2533 * pix_sigma / block
    spread = float(np.ptp(illum)) / noise_range
    flats = [f.astype(np.float32) - _illumination(f) for f in use]
    sm = [ndimage.gaussian_filter(f, 1.0) for f in flats]
    # Noise of the smoothed frame: the white pixel noise through the filter, unless the
    # frame's own spread is lower; in a dense field that spread is mostly particles.
    sm_sigma = max(min(_robust_sigma(sm[0]), pix_sigma * _SMOOTH_GAIN), 1e-12)

    # Polarity: the side whose extremes look like particle centres, i.e. are radially
    # symmetric. The strongest extremes are not always centres: the dark ring of a
    # defocused sphere, or two overlapping rings, outweigh its bright centre.
    all_b = [_extremes(s, sm_sigma, 1.0) for s in sm]
    all_d = [_extremes(s, sm_sigma, -1.0) for s in sm]
    bright = [_by_symmetry(f, e, 1.0) for f, e in zip(flats, all_b, strict=True)]
    dark = [_by_symmetry(f, e, -1.0) for f, e in zip(flats, all_d, strict=True)]
    top_b = np.concatenate([a[:_PROFILE_PEAKS] for _, a, _ in bright])
    top_d = np.concatenate([a[:_PROFILE_PEAKS] for _, a, _ in dark])
    amp_b = float(np.median(top_b)) if top_b.size else 0.0
    amp_d = float(np.median(top_d)) if top_d.size else 0.0
    sym_b = _median_or_zero(np.concatenate([y[:_PROFILE_PEAKS] for _, _, y in bright]))
    sym_d = _median_or_zero(np.concatenate([y[:_PROFILE_PEAKS] for _, _, y in dark]))
    # Seeds for the profile: the centres of radial symmetry (extremes of either sign
    # land on rings where the centre is no extreme of the frame), with the extremes'
    # amplitudes kept for the noise and crowding measures.
    radius = max(int(min(_MAX_RADIUS_PX, min(frame.shape) // 2 - 1)), 2)
    centres = [_symmetry_centres(s, min(_VOTE_RADIUS_PX, radius)) for s in sm]
    if "polarity" in given:
        sign = -1.0 if base.polarity == "dark" else 1.0
    elif all(len(c) for c in centres):
        sign = _centre_sign(flats[0], centres[0], radius)
    else:
        sign = 1.0 if sym_b >= sym_d else -1.0
    # Where the centre is an extreme of that sign, the extreme is the better centre: the
    # votes follow illumination asymmetries of the ring (2 px off on the real frames).
    if all(len(c) for c in centres):
        # Extremes and centres compete on roundness: the votes of a touching pair meet
        # between the two (elongated), an extreme on a ring is an arc.
        centres = [
            _most_symmetric(f, _snap(c, (e_b if sign > 0 else e_d)[0]), (b if sign > 0 else d)[0])
            for f, c, e_b, e_d, b, d in zip(flats, centres, all_b, all_d, bright, dark, strict=True)
        ]
        bright = [
            (c, s[c[:, 0], c[:, 1]], b[2]) for c, s, b in zip(centres, sm, bright, strict=True)
        ]
        dark = [(c, -s[c[:, 0], c[:, 1]], d[2]) for c, s, d in zip(centres, sm, dark, strict=True)]
    why_empty = ""
    if max(amp_b, amp_d) == 0.0:
        why_empty = (
            f"nothing stands out: no local extreme above {_PEAK_SIGMAS:g} sigma of the "
            f"smoothed background ({sm_sigma:.3g}) in the frames examined"
        )

    # Size and shape from the median radial profile of the most symmetric particles.
    # Bright centres inside a dark annulus are brightfield rings.
    seeds_b = [(rc, a) for rc, a, _ in bright]
    seeds_d = [(rc, a) for rc, a, _ in dark]
    shape = _shape(flats, seeds_b, 1.0, pix_sigma, radius)
    if sign > 0 and (shape[3] > 0 or "polarity" in given):
        forced_spots = "polarity" in given and base.polarity == "bright"
        contrast = "ring" if shape[3] > 0 and not forced_spots else "bright"
    else:
        contrast = "dark" if sign < 0 else "bright"
        if sign < 0:
            # A dark centre inside a bright ring (a sphere on the other side of focus,
            # darkfield-like halos) is a ring too, of the other sign.
            shape = _shape(flats, seeds_d, -1.0, pix_sigma, radius)
            if shape[3] > 0 and "polarity" not in given:
                contrast = "ring"
            else:
                shape = (*shape[:3], 0.0, 0.0)
    where, prof, hwhm, ring_r, outer = shape
    if contrast != "ring":
        ring_r = outer = 0.0
    sigma_core = max(hwhm / 1.1774, 0.5)
    if diameter_px is not None:
        sigma_core = max(diameter_px / 4.0, 0.5)
        diameter = float(diameter_px)
        if contrast == "ring" and ring_r > 0.5 * diameter_px:
            ring_r = max(0.5 * (diameter_px - 1) - 1.0, 1.0)
            outer = 0.5 * (diameter_px - 1)
    elif contrast == "ring":
        diameter = 2.0 * math.ceil(outer) + 1.0
    else:
        diameter = 2.0 * round(2.0 * sigma_core) + 1.0

    updates: dict[str, object] = {}

    def put(name: str, value: object) -> None:
        if name not in given:
            updates[name] = value

    # Crowding: touching particles must stay two peaks. Smoothing widens each image to
    # sqrt(sigma^2 + s^2), and two Gaussians merge once closer than twice that, so the
    # smoothing is cut to what the closest common neighbour distance allows (noise
    # permitting: not under the 1 px the extremes were found at), as are the window and
    # the separation. Sparse fields keep the matched smoothing (the particle's width).
    close = _close_distance((all_b if sign > 0 else all_d), peak_fraction=_MIN_PEAK_FRACTION)
    spot_sigma = sigma_core
    if contrast != "ring" and diameter_px is None and close > 0:
        room = (close / _RESOLVE) ** 2 - sigma_core**2
        snr_1px = (amp_b if sign > 0 else amp_d) / sm_sigma
        spot_sigma = min(
            sigma_core,
            max(math.sqrt(max(room, 0.0)), _quiet_smoothing(snr_1px, sigma_core)),
        )
        hwhm = min(hwhm, max(0.5 * _SEPARATE * close, spot_sigma))
    # Blobs whose images reach into their neighbours' centres (wide or heavy-tailed
    # images in a crowded field: darkfield out of focus) add up into merged peaks: they
    # get the matched filter on their measured profile, whose joint amplitude fit
    # explains the overlap away as for rings, where that filter resolves a touching pair
    # better than the smoothed image does (a sharp-edged or heavy-tailed profile; not a
    # Gaussian, whose matched response is wider than the image).
    overlapping = (
        contrast != "ring"
        and diameter_px is None
        and not given & {"polarity", "ring_profile", "smooth_sigma_px"}
        and close > 0
        and prof.size > 2
        and prof[0] > 0
        and _faded_px(where, prof) >= _OVERLAP * close
        and _matched_resolves_better(_blob_template(where, prof), close, spot_sigma)
    )
    smooth = float(min(max(spot_sigma, 0.5), 10.0))
    put("smooth_sigma_px", smooth)
    # Images merge into one peak when closer than about twice their width: where the
    # field is that crowded, touching pairs are one blob and are split by its elongation.
    merge = 2.0 * sigma_core
    if diameter_px is None and 0 < close < _CROWDED * merge and contrast != "ring":
        put("contact_px", float(min(merge, 200.0)))
    if contrast != "ring":
        put("polarity", contrast)
        put("window_px", int(min(max(round(2.5 * spot_sigma), 2), 50)))
        put("separation_px", float(min(max(2.0 * hwhm, 1.0), 200.0)))
    extent = max(diameter, 2.0 * outer + 1.0)
    if contrast != "ring":  # the ring filter is blind to smooth illumination
        put("background_px", int(min(4 * extent + 1, 2001)) if spread > _UNEVEN else 0)

    if overlapping:
        seeds = (seeds_b if sign > 0 else seeds_d)[0][0]
        blob = (where, prof, hwhm, 0.0, 0.0)
        updates |= _ring_fit(use, base, given, sign, blob, seeds, radius, refit=False)[0]
    elif contrast == "ring":
        refit = diameter_px is None and "ring_profile" not in given
        seeds_of = {1.0: seeds_b, -1.0: seeds_d}
        shape = (where, prof, hwhm, ring_r, outer)
        ring, shape, explained = _ring_fit(
            use, base, given, sign, shape, seeds_of[sign][0][0], radius, refit
        )
        # Crowded rings of either sign look alike in places (the bright fringes between
        # dark-centred rings are round too): where the whole-frame fit ran, the centres
        # of the other sign are tried as well, and the model explaining more of the
        # frame's variance wins.
        if refit and "polarity" not in given and np.isfinite(explained):
            other = _shape(flats, seeds_of[-sign], -sign, pix_sigma, radius)
            if other[3] > 0 and len(seeds_of[-sign][0][0]):
                ring_o, shape_o, explained_o = _ring_fit(
                    use, base, given, -sign, other, seeds_of[-sign][0][0], radius, refit
                )
                if explained_o > explained:
                    sign, ring, shape = -sign, ring_o, shape_o
        updates |= ring
        _, _, hwhm, ring_r, outer = shape
        if diameter_px is None:
            diameter = 2.0 * math.ceil(outer) + 1.0
    else:
        put(
            "threshold_sigma",
            _spot_threshold(
                frame,
                base.model_copy(update=updates),
                extent,
                seeds_b if contrast != "dark" else seeds_d,
            ),
        )
    cfg = base.model_copy(update=updates)
    est = {"contrast": contrast, "diameter": diameter, "spread": spread, "sign": sign}
    return Estimate(
        config=cfg,
        diameter_px=diameter,
        contrast=contrast,
        ring_radius_px=ring_r,
        illumination_spread=spread,
        summary=_describe(est, cfg)
        + "".join(f"; {p} (left out of the estimate)" for p in problems),
        why_empty=why_empty,
        peak_snr=max(amp_b, amp_d) / sm_sigma,
    )


def _ring_template(where: np.ndarray, prof: np.ndarray, ring_r: float) -> tuple[float, ...]:
    """The measured ring profile per px from the centre (= 1) out through the dark ring
    and the bright fringe beyond it, to where that fringe has fallen to a quarter: the
    matched filter's extent. Far out of focus the fringe is strong, and a filter that
    leaves it out sees neighbours' fringes as particles it cannot explain away."""
    end = float(where[-1])
    beyond = np.flatnonzero((where > ring_r) & (prof >= 0.0))
    if beyond.size:
        top = beyond[0] + int(np.argmax(prof[beyond[0] :]))
        fallen = np.flatnonzero((np.arange(prof.size) > top) & (prof <= 0.25 * prof[top]))
        # A "fringe" that never falls back is no fringe but the crowd's mean level
        # (neighbours' rings, a background biased by them): stop where the ring ends.
        end = float(where[fallen[0]] if fallen.size else where[beyond[0]])
    radii = np.arange(math.ceil(end) + 1, dtype=np.float64)
    values = np.interp(radii, where, prof) / max(float(prof[0]), 1e-12)
    return tuple(round(float(v), 4) for v in values)


def _faded_px(where: np.ndarray, prof: np.ndarray) -> float:
    """Radius (px) where a blob's profile (centre positive) has fallen to _FADED of it."""
    return _crossing(where, prof, _FADED * float(prof[0]))


def _blob_template(where: np.ndarray, prof: np.ndarray) -> tuple[float, ...]:
    """A blob's measured profile per px from the centre (= 1) to where it has faded."""
    radii = np.arange(max(math.ceil(_faded_px(where, prof)), 2) + 1, dtype=np.float64)
    values = np.interp(radii, where, prof) / max(float(prof[0]), 1e-12)
    return tuple(round(float(v), 4) for v in values)


def _pair_dips(template: tuple[float, ...], distance: float, smooth: float) -> tuple[float, float]:
    """How deep the dip between two particles of this profile, distance px apart, is in
    the matched filter's response and in the image smoothed by smooth px (share of the
    peaks' height; <= 0: one peak)."""
    n = len(template) - 1
    half = math.ceil(distance / 2 + 2 * n + 3 * smooth) + 1
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    image = sum(
        np.interp(np.hypot(xx - dx, yy), np.arange(n + 1), template, right=0.0)
        for dx in (-distance / 2, distance / 2)
    )
    kernel = _kernel(np.asarray(template, dtype=np.float64), 1.0).astype(np.float64)
    dips = []
    for resp in (
        signal.fftconvolve(image, kernel, mode="same"),
        ndimage.gaussian_filter(image, max(smooth, 1e-3)),
    ):
        row = resp[half]
        peak = float(np.interp(half + distance / 2, np.arange(row.size), row))
        dips.append(1.0 - float(row[half]) / peak if peak > 0 else 0.0)
    return dips[0], dips[1]


def _matched_resolves_better(template: tuple[float, ...], distance: float, smooth: float) -> bool:
    """Whether the matched filter parts a pair distance px apart more than smoothing does."""
    matched, smoothed = _pair_dips(template, distance, smooth)
    return matched > smoothed


def _ring_settings(
    where: np.ndarray, prof: np.ndarray, sign: float, ring_r: float
) -> dict[str, object]:
    """Ring mode's shape settings from a radial profile (centre positive after sign):
    the matched filter, its ring radius and refinement window, and the separation."""
    if ring_r > 0:
        template = tuple(sign * v for v in _ring_template(where, prof, ring_r))
        window = 0.85 * ring_r
    else:  # a blob: the matched filter is its profile out to where it has faded
        template = tuple(sign * v for v in _blob_template(where, prof))
        window = _crossing(where, prof, 0.5 * float(prof[0]))
    return {
        "ring_radius_px": float(min(max(ring_r, 1.0), 100.0)),
        "window_px": int(min(max(round(window), 2), 50)),
        # Peaks of the filter's response closer than its resolution are one particle
        # (touching spheres sit inside each other's rings: only the response's central
        # lobes are apart, and the joint fit tells them apart).
        "separation_px": float(min(max(_LOBES * central_lobe_px(template), 1.0), 200.0)),
        "ring_profile": template,
    }


def _typical_response(z: np.ndarray) -> float:
    """The frame's typical particle response: median of the strong detections."""
    return _median_or_zero(z[z >= 0.5 * np.percentile(z, 90)]) if z.size else 0.0


class RingTracker:
    """Keeps ring mode's matched filter matched as the image changes (focus drift,
    a stage move to particles at another height): when the typical detection's
    response moves by more than _DRIFT from its reference, the profile is refitted to
    that frame's own detections and the frame detected again. One per detector."""

    def __init__(self) -> None:
        self.reference = 0.0

    def update(
        self, frame: np.ndarray, xy: np.ndarray, z: np.ndarray, cfg: DetectorConfig, settle: bool
    ) -> DetectorConfig | None:
        """A config with the refitted profile, or None (no change needed or possible).
        settle: this is the detection with a new profile: only take its reference."""
        typical = _typical_response(z)
        if settle or self.reference <= 0.0:
            self.reference = typical
            return None
        ratio = typical / self.reference if self.reference > 0 else 0.0
        if 1.0 / _DRIFT <= ratio <= _DRIFT or len(xy) < _MIN_TRACK:
            return None
        self.reference = typical  # refit or not, judge the next frames against this one
        radius = int(min(_MAX_RADIUS_PX, 2 * len(cfg.ring_profile), min(frame.shape) // 2 - 1))
        refit = None
        for _ in range(_TRACK_ROUNDS):  # a far-off start needs a few rounds to converge
            # Either sign: far enough out a sphere's centre turns from bright to dark.
            measured = _profile_at(frame, xy, 0.0, max(radius, 3), crowded_only=False)
            if measured is None:
                break
            where, fitted, sign, _ = measured
            ring_r = _features(where, fitted, 0.0)[1]
            if ring_r <= 0:
                break
            refit = cfg.model_copy(update=_ring_settings(where, fitted, sign, ring_r))
            xy = ParticleDetector(refit.model_copy(update={"ring_refit": False}))(frame)
            if len(xy) < _MIN_TRACK:
                break
            cfg = refit
        return refit


def _profile_at(
    frame: np.ndarray, xy: np.ndarray, sign: float, radius: int, crowded_only: bool
) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """(radii, profile, sign, explained) (centre 1, positive after sign; sign 0: the
    fitted centre's sign; explained: the fit's share of the frame's variance, NaN for
    the median) of the particles at xy in one frame, out to radius: fitted to the whole frame
    where the rings overlap (median nearest neighbour under 2 radius), else the median
    profile around them (or None where crowded_only: the profile already measured
    around isolated particles is the same shape). None also when too few, or the
    centre lost its sign or weight."""
    if len(xy) < _MIN_FIT_PARTICLES:
        return None
    given_sign, sign = sign, (sign or 1.0)
    nearest = cKDTree(xy).query(xy, k=2)[0][:, 1]
    explained = math.nan
    if float(np.median(nearest)) < 2.0 * radius:
        where = np.arange(radius + 1, dtype=np.float64)
        fit, explained = fit_radial_profile(frame, xy, radius)
        fit = sign * fit
    elif crowded_only:
        return None
    else:
        flat = frame.astype(np.float32) - _illumination(frame)
        rc = np.clip(np.rint(xy[:, ::-1]).astype(np.intp), 0, np.array(frame.shape) - 1)
        where, fit = _radial_profile(sign * flat, rc, radius)
    if given_sign == 0.0 and fit.size and fit[0] < 0:  # either polarity: the centre's
        fit, sign = -fit, -1.0
    if fit.size == 0 or fit[0] <= _MIN_CENTRE * float(np.max(np.abs(fit))):
        return None
    return where, fit / fit[0], sign, explained


def _fitted_profile(
    frames: list[np.ndarray], cfg: DetectorConfig, sign: float, radius: int
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(radii, mean profile, mean explained variance) over the first frames, fitted at
    the particles cfg finds where their rings overlap (see _profile_at); None where
    they do not."""
    det = ParticleDetector(cfg)
    fits = [_profile_at(f, det(f), sign, radius, crowded_only=True) for f in frames[:_REFIT_FRAMES]]
    fits = [f for f in fits if f is not None]
    if not fits:
        return None
    profile = np.mean([f[1] for f in fits], axis=0)
    return fits[0][0], profile, float(np.mean([f[3] for f in fits]))


def _ring_fit(
    frames: list[np.ndarray],
    base: DetectorConfig,
    given: set[str],
    sign: float,
    shape: tuple[np.ndarray, np.ndarray, float, float, float],
    seeds: np.ndarray,
    radius: int,
    refit: bool,
) -> tuple[dict[str, object], tuple[np.ndarray, np.ndarray, float, float, float], float]:
    """Ring mode's settings for centres of this sign (updates not in given), the final
    (radii, profile, hwhm, ring radius, outer edge), and the share of the first frames'
    variance particles of that profile explain (NaN where no fit to whole frames ran).

    The median profile around the most symmetric particles holds their neighbours'
    rings in a crowded field: with refit, the shape is fitted to whole frames at the
    particles found with it, and again with the better shape."""
    updates: dict[str, object] = {}

    def put(name: str, value: object) -> None:
        if name not in given:
            updates[name] = value

    where, prof, _, ring_r, _ = shape
    put("polarity", "ring")
    put("relative_threshold", _RING_RELATIVE)
    put("ring_refit", True)
    put("background_px", 0)  # the zero-mean filter is blind to smooth illumination
    put("contact_px", 0.0)  # no blob split: the joint amplitude fit separates touching rings
    for name, value in _ring_settings(where, prof, sign, ring_r).items():
        put(name, value)
    put("threshold_sigma", _ring_threshold(frames[0], base.model_copy(update=updates), seeds))
    explained = math.nan
    for _ in range(_REFITS if refit else 0):
        measured = _fitted_profile(frames, base.model_copy(update=updates), sign, radius)
        if measured is None:
            break
        where_f, fitted, explained_f = measured
        features = _features(where_f, fitted, 0.0)
        if features[1] <= 0:
            break
        shape, explained = (where_f, fitted, *features), explained_f
        for name, value in _ring_settings(where_f, fitted, sign, features[1]).items():
            put(name, value)
        put("threshold_sigma", _ring_threshold(frames[0], base.model_copy(update=updates), seeds))
    return updates, shape, explained


def _ring_threshold(frame: np.ndarray, cfg: DetectorConfig, seeds: np.ndarray) -> float:
    """Ring filter threshold in pixel sigmas: _THRESHOLD_SIGMA of the filter's noise as
    measured where no particle is (texture, dust and debris raise it above the white
    pixel noise, which a unit-norm filter passes unchanged). The particles masked out
    are those over _MIN_PEAK_FRACTION of the typical one's response (at the seeds);
    crowded fields leave too little background to measure and get the white noise.
    Halos and side lobes far above the noise are the relative threshold's job (per
    frame, in detect), so a frame of particles at another height keeps its own."""
    white = white_noise_sigma(frame)
    if white <= 1e-12:
        return _THRESHOLD_SIGMA
    resp = RingMatcher(cfg.ring_profile, cfg.ring_scales).response(frame)[0]
    z = resp[seeds[:_PROFILE_PEAKS, 0], seeds[:_PROFILE_PEAKS, 1]] / white
    provisional = max(_THRESHOLD_SIGMA, _MIN_PEAK_FRACTION * _median_or_zero(z))
    found = ParticleDetector(cfg.model_copy(update={"threshold_sigma": min(provisional, 100.0)}))(
        frame
    )
    measured = _texture_sigma(resp, found, max(1, len(cfg.ring_profile) - 1), white)
    return float(min(max(_THRESHOLD_SIGMA * measured / white, _THRESHOLD_SIGMA), 100.0))


def _spot_threshold(
    frame: np.ndarray,
    cfg: DetectorConfig,
    extent: float,
    seeds: list[tuple[np.ndarray, np.ndarray]],
) -> float:
    """Spot threshold in the detector's sigma units (see the module docstring, step 5)."""
    # Threshold: 5 sigma of the smoothed background's noise as measured (texture,
    # debris and fixed pattern count; particles do not: they are clipped out), in the
    # detector's units (its sigma is the frame's pixel IQR, inflated in dense fields).
    gain = float(_noise_gain_1d(cfg.smooth_sigma_px, 64)[32] ** 2)
    probe = ParticleDetector(cfg.model_copy(update={"segment_bin_px": 1, "adapt": False}))
    work = probe._preprocess(frame)
    smooth_bg = ndimage.gaussian_filter(work.astype(np.float32), cfg.smooth_sigma_px)
    white = white_noise_sigma(work) * gain
    detector_sigma = _background(work)[1] * gain
    # The minimum mass, relative: a monodisperse sample's particles image alike, so a
    # peak under _MIN_PEAK_FRACTION of the typical particle's is a halo, an interference
    # fringe between neighbours or debris, however far above the noise it stands. The
    # typical particle is the median of all extremes (the strongest are pairs whose
    # light adds).
    level = float(np.median(smooth_bg))
    top = seeds[0][0]
    typical = float(np.median(smooth_bg[top[:, 0], top[:, 1]])) - level if len(top) else 0.0
    # Texture: the smoothed background's noise where no particle is. Particles are
    # found provisionally (white-noise threshold and the relative floor), masked, and
    # the rest measured; crowded fields leave too little and get white noise alone.
    provisional = max(_THRESHOLD_SIGMA * white, _MIN_PEAK_FRACTION * typical)
    probe.config = probe.config.model_copy(
        update={"threshold_sigma": float(min(max(provisional / detector_sigma, 1.0), 100.0))}
    )
    measured = _texture_sigma(smooth_bg, probe(frame), max(1, round(0.5 * extent)), white)
    floor = max(_THRESHOLD_SIGMA * measured, _MIN_PEAK_FRACTION * typical)
    return float(min(max(floor / detector_sigma, 1.0), 100.0))
