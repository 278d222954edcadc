"""Which unlabeled crops LodeSTAR trains on, for `scopeloop detect` and the live loop alike.

Self-supervised training only needs crops that each hold one particle, but where to cut
them decides what the network learns. Seeds come from two sources, so that particles the
classical detector misses (faint, defocused, brightfield rings, odd-looking ones) are
learned too:

* ``classical``: the adaptive classical detector's hits;
* ``blob``: local maxima of a difference of Gaussians at the estimated particle scale
  (``agent.detection.detect_auto.blob_significance``) that no hit explains.

Every candidate, of either source, must stand out of the frame's own noise: its DoG peak,
in units of the DoG's robust (IQR) sigma over the frame, must pass a threshold set for
``false_alarms_per_frame`` noise peaks per frame. The threshold comes from the expected
Euler characteristic of a smooth Gaussian random field (Worsley et al. 1996): noise peaks
above u in a frame of area A number about A lambda2 / (2 pi)^1.5 u exp(-u^2 / 2), where
lambda2 is the variance of the field's gradient, measured on the frame itself, so
correlated camera noise and the particle scale are accounted for. A fixed 3 sigma gave a
sparse 256^2 stream ~25 noise peaks per real particle; this gives a few per hundred.

Candidates with another candidate inside their crop (two valid answers for the
equivariance loss) or too near the frame edge are dropped. The rest go into a bounded
buffer: at most ``capacity`` crops, at most a fair share from any one frame (so a
crowded frame cannot fill it), and otherwise a uniform reservoir sample of every
candidate seen (so the sources keep their natural proportions and the crops are not
biased to bright particles). On a sparse stream the buffer simply accumulates over more
frames. ``CropSelection.summary`` says how many crops came from which source;
``why_empty`` says why there are none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

from agent.detection.detect import ParticleDetector, estimate_background, white_noise_sigma
from agent.detection.detect_auto import Estimate, _texture_sigma

__all__ = [
    "SEED_SOURCES",
    "CropBuffer",
    "CropSelection",
    "crop_px_for",
    "cut_isolated",
    "noise_peak_threshold",
    "select_crops",
    "significance",
]

SEED_SOURCES = ("classical", "blob")
_FALSE_ALARMS_PER_FRAME = 0.01  # noise peaks per frame the significance threshold admits
_MIN_SIGMAS = 3.0  # the threshold never goes below this, however small the frame
_TYPICAL_FRACTION = 0.5  # a seed weaker than this x the frame's typical particle is not one
_TYPICAL_QUANTILE = 0.9  # of the significant seeds' strengths: the typical particle
_MASK_SIGMAS = 5.0  # peaks this far above white noise are masked when measuring texture
_CROWDED_SHARE = 2 / 3  # particles covering more of the frame leave no texture to measure
_ISOLATION = 0.75  # another candidate closer than this x crop side makes a crop ambiguous


def crop_px_for(diameter_px: float) -> int:
    """Even crop side that holds one particle of this diameter, the shifts of training
    and a border to measure the background on, and no more: in a dense field a larger
    crop is rarely free of neighbours."""
    return int(min(128, max(32, 2 * math.ceil(0.5 * diameter_px + 5.0))))


@lru_cache(maxsize=32)
def _dog_white_gain(scale_px: float) -> float:
    """Factor by which the DoG scales white pixel noise (L2 norm of its kernel)."""
    n = 2 * math.ceil(9.0 * scale_px) + 1
    delta = np.zeros((n, n))
    delta[n // 2, n // 2] = 1.0
    kernel = _dog(delta, scale_px)
    return float(np.sqrt((kernel * kernel).sum()))


def _dog(img: np.ndarray, scale_px: float) -> np.ndarray:
    return ndimage.gaussian_filter(img, scale_px) - ndimage.gaussian_filter(img, 3.0 * scale_px)


def significance(frame: np.ndarray, estimate: Estimate) -> np.ndarray:
    """Difference of Gaussians at the particles' scale and contrast, in noise sigmas.

    The noise is the DoG's robust sigma where no particle is (texture, debris and
    correlated camera noise count), never below white pixel noise carried through the
    filter; a crowded field, whose DoG is mostly particles, gets the white noise alone.
    """
    cfg = estimate.config
    sign = -1.0 if cfg.polarity == "dark" else 1.0
    img = sign * np.asarray(frame, dtype=np.float32)
    dog = _dog(img, cfg.smooth_sigma_px)
    white = white_noise_sigma(img) * _dog_white_gain(cfg.smooth_sigma_px)
    strong = _peaks(dog / white, _MASK_SIGMAS, 3)
    radius = max(1, round(0.5 * estimate.diameter_px))
    if len(strong) * math.pi * radius * radius > _CROWDED_SHARE * dog.size:
        return dog / white  # too crowded to leave background to measure (and slow to mask)
    return dog / _texture_sigma(dog, strong, radius, white)


def _peaks(z: np.ndarray, level: float, size: int) -> np.ndarray:
    """(N, 2) xy of local maxima of z above level in a size x size window."""
    rows, cols = np.nonzero((z == ndimage.maximum_filter(z, size=size)) & (z > level))
    return np.column_stack([cols, rows]).astype(np.float64)


def _suppress(xy: np.ndarray, strength: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the points kept by greedy non-maximum suppression within radius."""
    order = np.argsort(-strength, kind="stable")
    keep = np.ones(len(xy), dtype=bool)
    if len(xy) > 1:
        pairs = cKDTree(xy[order]).query_pairs(radius, output_type="ndarray")
        for i, j in sorted(map(tuple, pairs)):  # i < j: i is the stronger
            if keep[i]:
                keep[j] = False
    return np.sort(order[keep])


def noise_peak_threshold(z: np.ndarray, false_alarms: float = _FALSE_ALARMS_PER_FRAME) -> float:
    """Level u of a unit-variance smooth noise field z exceeded by ~`false_alarms` local
    maxima over the whole field (expected Euler characteristic, 2-D leading term)."""
    dx = estimate_background(np.diff(z, axis=1))[1]
    dy = estimate_background(np.diff(z, axis=0))[1]
    lam2 = 0.5 * (dx * dx + dy * dy)
    scale = z.size * lam2 / (2.0 * math.pi) ** 1.5
    if not scale > 0.0:
        return _MIN_SIGMAS

    def excess(u: float) -> float:
        return math.log(scale * u) - 0.5 * u * u - math.log(false_alarms)

    if excess(_MIN_SIGMAS) <= 0.0:
        return _MIN_SIGMAS
    return float(optimize.brentq(excess, _MIN_SIGMAS, 40.0))


def cut_isolated(
    frame: np.ndarray, xy: np.ndarray, crop_px: int, neighbours: np.ndarray | None = None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Crops around each xy with no neighbour (default: the other xy) inside the crop.

    Returns (crops, crowded mask, off-edge mask) over xy; crops are cut where neither.
    """
    half = crop_px // 2
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    others = xy if neighbours is None else np.asarray(neighbours, np.float64).reshape(-1, 2)
    if len(xy) and len(others):
        d = np.hypot(xy[:, None, 0] - others[None, :, 0], xy[:, None, 1] - others[None, :, 1])
        d[d < 1e-9] = np.inf  # a seed is not its own neighbour
        crowded = d.min(axis=1) <= half * 2 * _ISOLATION
    else:
        crowded = np.zeros(len(xy), dtype=bool)
    rows = np.rint(xy[:, 1]).astype(int)
    cols = np.rint(xy[:, 0]).astype(int)
    h, w = frame.shape
    edge = ~((rows >= half) & (rows + half <= h) & (cols >= half) & (cols + half <= w))
    keep = ~crowded & ~edge
    crops = [
        frame[r - half : r + half, c - half : c + half]
        for r, c in zip(rows[keep], cols[keep], strict=True)
    ]
    return crops, crowded, edge


@dataclass
class CropSelection:
    """The crops chosen and, per seed source, what was seen and why the rest was dropped."""

    crops: np.ndarray  # (N, crop_px, crop_px), the frames' dtype
    sources: tuple[str, ...]  # seed source of each crop
    origins: np.ndarray  # (N, 3): frame index, x, y (px) of each crop's centre
    frames: int  # frames examined
    threshold_sigma: float  # last frame's significance threshold (DoG sigmas)
    candidates: dict[str, int] = field(default_factory=dict)  # significant, per source
    dropped: dict[str, int] = field(default_factory=dict)  # faint, crowded, edge, surplus
    estimate_why_empty: str = ""

    def used(self) -> dict[str, int]:
        return {s: self.sources.count(s) for s in SEED_SOURCES}

    def summary(self) -> str:
        used = self.used()
        parts = " + ".join(
            f"{used[s]} {'classical hits' if s == 'classical' else 'DoG blobs'}"
            for s in SEED_SOURCES
            if s in self.candidates
        )
        dropped = ", ".join(f"{v} {k}" for k, v in self.dropped.items() if v)
        return (
            f"{len(self.crops)} crops from {self.frames} frames ({parts}; candidates above "
            f"{self.threshold_sigma:.1f} sigma of the frame's DoG noise"
            + (f"; dropped: {dropped}" if dropped else "")
            + ")"
        )

    def why_empty(self) -> str:
        """Why no crop could be cut ('' when there are crops)."""
        if len(self.crops):
            return ""
        if self.estimate_why_empty:
            return self.estimate_why_empty
        seen = sum(self.candidates.values())
        if seen == 0:
            faint = self.dropped.get("faint", 0)
            return (
                f"no candidate stood above {self.threshold_sigma:.1f} sigma of the noise in "
                f"{self.frames} frames" + (f" ({faint} classical hits fainter)" if faint else "")
            )
        return (
            f"all {seen} candidates in {self.frames} frames had a neighbour inside the crop "
            f"({self.dropped.get('crowded', 0)}) or were within half a crop of the edge "
            f"({self.dropped.get('edge', 0)})"
        )


class CropBuffer:
    """Bounded training-crop buffer fed one frame at a time (a live stream or files)."""

    def __init__(
        self,
        estimate: Estimate,
        crop_px: int,
        capacity: int,
        rng: np.random.Generator | int | None = None,
        *,
        sources: Sequence[str] = SEED_SOURCES,
        per_frame: int | None = None,
        false_alarms_per_frame: float = _FALSE_ALARMS_PER_FRAME,
    ) -> None:
        unknown = set(sources) - set(SEED_SOURCES)
        if unknown or not sources:
            raise ValueError(f"seed sources must be among {SEED_SOURCES}, got {tuple(sources)}")
        if crop_px < 4 or crop_px % 2:
            raise ValueError(f"crop_px must be an even number >= 4, got {crop_px}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.estimate = estimate
        self.crop_px = crop_px
        self.capacity = capacity
        self.sources = tuple(sources)
        self.per_frame = per_frame if per_frame is not None else capacity
        self.false_alarms = false_alarms_per_frame
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._classical = ParticleDetector(estimate.config)
        self._merge_px = max(3.0, 0.5 * estimate.diameter_px)
        self._crops: list[np.ndarray] = []
        self._source: list[str] = []
        self._origin: list[tuple[float, float, float]] = []
        self._offered = 0
        self.frames = 0
        self.threshold_sigma = _MIN_SIGMAS
        self.candidates = {s: 0 for s in self.sources}
        self.dropped = {"faint": 0, "crowded": 0, "edge": 0, "surplus": 0}

    def __len__(self) -> int:
        return len(self._crops)

    def _candidates(self, frame: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Significant, particle-like seeds of this frame, (N, 2) xy, and their sources."""
        z = significance(frame, self.estimate)
        u = noise_peak_threshold(z, self.false_alarms)
        hits = np.zeros((0, 2))
        hit_z = np.zeros(0)
        if "classical" in self.sources:
            hits = np.asarray(self._classical(frame), dtype=np.float64).reshape(-1, 2)
            # A hit's strength: the DoG peak within a pixel of it.
            r = np.clip(np.rint(hits[:, 1]).astype(int), 0, z.shape[0] - 1)
            c = np.clip(np.rint(hits[:, 0]).astype(int), 0, z.shape[1] - 1)
            hit_z = ndimage.maximum_filter(z, size=3)[r, c]
        blobs = np.zeros((0, 2))
        blob_z = np.zeros(0)
        if "blob" in self.sources:
            # Blobs of one particle (a ring's outer fringe) merge into its strongest.
            blobs = _peaks(z, u, 3)
            blob_z = z[blobs[:, 1].astype(int), blobs[:, 0].astype(int)]
            strong = _suppress(blobs, blob_z, self._merge_px)
            blobs, blob_z = blobs[strong], blob_z[strong]
        # Particle-like: a monodisperse sample's particles image alike, so a peak far
        # weaker than the typical particle is a fringe between neighbours, a ring's
        # outer fringe, a halo or debris, however far above the noise. Typical: a high
        # quantile, as fringes can outnumber particles (defocused rings: 3 to 2).
        pooled = np.concatenate([hit_z, blob_z])
        pooled = pooled[pooled > u]
        typical = float(np.quantile(pooled, _TYPICAL_QUANTILE)) if pooled.size else 0.0
        if len(hits) and len(blobs):
            d = np.hypot(*(blobs[:, None, :] - hits[None, :, :]).transpose(2, 0, 1))
            other = d.min(axis=1) > self._merge_px  # else the same particle as a hit
            blobs, blob_z = blobs[other], blob_z[other]
        floor = max(u, _TYPICAL_FRACTION * typical)
        self.threshold_sigma = floor
        self.dropped["faint"] += int((hit_z <= floor).sum()) + int((blob_z <= floor).sum())
        xy = np.vstack([hits[hit_z > floor], blobs[blob_z > floor]])
        strength = np.concatenate([hit_z[hit_z > floor], blob_z[blob_z > floor]])
        names = np.array(
            ["classical"] * int((hit_z > floor).sum()) + ["blob"] * int((blob_z > floor).sum())
        )
        # One seed per particle: a ring's fringes and halo make hits and blobs of their
        # own next to its centre; the strongest within half a diameter stands for all.
        keep = _suppress(xy, strength, self._merge_px)
        return xy[keep], names[keep].tolist()

    def add(self, frame: np.ndarray) -> int:
        """Examine one frame; returns how many of its crops entered the buffer."""
        arr = np.asarray(frame)
        if arr.ndim != 2:
            raise ValueError(f"frame {self.frames} must be a 2-D array, got shape {arr.shape}")
        xy, names = self._candidates(arr)
        self.frames += 1
        for name in names:
            self.candidates[name] += 1
        crops, crowded, edge = cut_isolated(arr, xy, self.crop_px)
        self.dropped["crowded"] += int(crowded.sum())
        self.dropped["edge"] += int((edge & ~crowded).sum())
        ok = ~crowded & ~edge
        kept = [n for n, k in zip(names, ok, strict=True) if k]
        where = [(float(self.frames - 1), float(x), float(y)) for x, y in np.rint(xy[ok])]
        order = self.rng.permutation(len(crops))
        self.dropped["surplus"] += max(0, len(crops) - self.per_frame)
        added = 0
        for k in order[: self.per_frame]:
            # Reservoir sampling: every crop offered so far is kept with equal chance.
            self._offered += 1
            if len(self._crops) < self.capacity:
                self._crops.append(np.array(crops[k]))
                self._source.append(kept[k])
                self._origin.append(where[k])
                added += 1
                continue
            j = int(self.rng.integers(self._offered))
            self.dropped["surplus"] += 1
            if j < self.capacity:
                self._crops[j] = np.array(crops[k])
                self._source[j] = kept[k]
                self._origin[j] = where[k]
                added += 1
        return added

    def selection(self) -> CropSelection:
        crops = (
            np.stack(self._crops)
            if self._crops
            else np.zeros((0, self.crop_px, self.crop_px), dtype=np.float64)
        )
        return CropSelection(
            crops=crops,
            sources=tuple(self._source),
            origins=np.array(self._origin, dtype=np.float64).reshape(-1, 3),
            frames=self.frames,
            threshold_sigma=self.threshold_sigma,
            candidates=dict(self.candidates),
            dropped=dict(self.dropped),
            estimate_why_empty=self.estimate.why_empty,
        )


def select_crops(
    frames: Iterable[np.ndarray],
    estimate: Estimate,
    crop_px: int,
    capacity: int,
    rng: np.random.Generator | int | None = None,
    sources: Sequence[str] = SEED_SOURCES,
) -> CropSelection:
    """The buffer filled from a finite set of frames, a fair share from each."""
    listed = list(frames)
    per_frame = max(1, math.ceil(capacity / max(1, len(listed))))
    buffer = CropBuffer(estimate, crop_px, capacity, rng, sources=sources, per_frame=per_frame)
    for frame in listed:
        buffer.add(frame)
    return buffer.selection()
