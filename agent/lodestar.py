"""Self-supervised deep particle detector after LodeSTAR (Midtvedt et al., Nat. Commun. 2022).

A small fully convolutional network is trained on unlabeled crops of single particles.
It outputs, on a 2x-reduced grid, a displacement (dx, dy) from each cell to the object
centre and two weights; a crop's position is the precision-weighted vote (cell centre +
displacement). Training needs no labels because the answer must be *equivariant*: if a
crop is rotated, flipped or shifted by a known sub-pixel amount, the prediction must
move the same way. The loss is the spread of the back-transformed predictions of one
crop's augmented copies plus the weighted spread of the votes inside each image, which
is what makes the weights localise the object.

Two weight maps, because one cannot serve both uses: LodeSTAR's single weight tends to
collapse onto the one or two cells that see the whole spot. That is good for precision
but makes detection scores hinge on one noisy cell (they varied 50x between particles).
So a *precision* weight keeps the LodeSTAR role, and a *confidence* map is trained
(cross-entropy) to predict whether a cell's vote lands within ~1 px of the consensus.

Detection on a frame: the votes are splatted, confidence-weighted, into a full-resolution
density map (weight times vote agreement: only cells whose votes pile up on one point
make a peak), peaks above ``detection_threshold`` are found, mean shift over nearby
votes finds each cluster and its position is the precision-weighted mean of its votes.

Reliability (the published method converges in a minority of runs for some users):
zero-initialised output head (training starts from "every cell votes for itself with
equal weight"), Adam with warm-up and cosine decay, gradient clipping, a curriculum
(precision weights may only sharpen once votes are good), and a label-free self-check
on held-out crops (equivariance error, weight concentration); a failed run is restarted
from a new seed while the time budget lasts, and the most equivariant run is kept.

Reload exactness (the other reported bug): inputs are normalised per frame by median and
IQR-sigma (offset and gain drop out), the constants used are stored in the checkpoint,
everything runs in float32 in eval mode, and the network has no batch-norm or dropout.

Coordinates are ``(x, y) = (column, row)`` in pixels, with the centre of pixel
``(row i, col j)`` at ``(x=j, y=i)``, as in :mod:`agent.detect`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage
from torch import nn

from agent.detect import DetectorConfig, ParticleDetector, estimate_background

__all__ = ["LodeStarConfig", "LodeStarDetector", "crops_from_frames"]

FloatArray = NDArray[np.float64]

_FORMAT = "scopeloop-lodestar-v1"
_DTYPE = torch.float32
_VOTE_SCALE = 2.0  # displacement head output -> px; keeps early gradients O(1).
_SPLAT_SIGMA = 1.0  # px: vote-density smoothing, about the spread of trained votes.
_REFINE_RADIUS = 1.5  # px: votes this close to a peak form its position estimate.
_RING_PX = 3  # border ring of a training crop used for its background statistics.
_HELD_OUT = 0.15  # fraction of crops kept out of training for the self-check.
_N_AUG = 8  # augmented copies per crop in a training group.
_MAX_SHIFT_PX = 2.0  # sub-pixel translation range of the augmentations.
_EQ_TOL_PX = 0.12  # held-out equivariance RMS (px) below which a run counts as converged.
_CONF_PX = 1.0  # px: vote error scale at which a cell's confidence target drops to 0.61.
_PHASE1 = 0.4  # curriculum: share of steps before precision weights may sharpen.
_CONC_MIN = 0.5  # held-out weight fraction whose votes fall within _REFINE_RADIUS.


class LodeStarConfig(BaseModel):
    """Network and training settings; bounds make a bad value fail when loaded, not mid-fit.

    ``detection_threshold`` is on the *score* scale: vote density at a peak divided by
    the median peak density of the held-out training crops, so ~1 means "as strong as a
    typical training particle" and the default 0.3 accepts particles about 3x dimmer.
    """

    model_config = ConfigDict(extra="forbid")

    crop_px: int = Field(32, ge=16, le=128)
    channels: int = Field(16, ge=4, le=128)
    train_steps: int = Field(1500, ge=10, le=100_000)
    batch: int = Field(4, ge=1, le=64, description="crops per step, each as 8 augmented copies")
    lr: float = Field(1e-2, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0)
    detection_threshold: float = Field(0.3, gt=0.0, le=100.0)
    min_distance_px: int = Field(4, ge=1, le=64)
    warmup_steps: int = Field(100, ge=0, le=10_000)
    grad_clip: float = Field(1.0, gt=0.0, le=1e3)
    max_restarts: int = Field(3, ge=0, le=20)
    time_budget_s: float = Field(60.0, gt=0.0, le=3600.0)

    @field_validator("crop_px")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("crop_px must be even")
        return v


class _Net(nn.Module):
    """Space-to-depth then 3x3 convs at half resolution: small and fast on a CPU core.

    Pixel-unshuffle keeps every input value (no pooling loss) while making each conv
    4x cheaper; the receptive field (~18 px) covers a PSF of sigma <= ~3 px.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.PixelUnshuffle(2),
            nn.Conv2d(4, c, 3, padding=1),
            nn.ELU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ELU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ELU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.ELU(),
        )
        self.head = nn.Conv2d(c, 4, 1)  # dx, dy, confidence logit, precision logit
        # Zero head: all cells vote for their own centre with equal weight, a symmetric,
        # non-degenerate start from which equivariance gradients are well defined.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _inference_net(net: _Net) -> _Net:
    """Eval mode, float32, channels-last: ~30 % faster convs on CPU, fixed for reloads."""
    return net.to(_DTYPE).eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _votes(
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(vote_x, vote_y, confidence, precision weight) from a (B, 4, h, w) head output.

    Votes are in full-resolution px. Confidence (detection) and precision (averaging)
    are separate maps: the most precise cell is the one seeing the whole spot, while
    a detection score wants every cell that sees the spot at all.

    Cell (u, v) covers pixels rows 2u..2u+1, cols 2v..2v+1, so its centre is 2v+0.5.
    """
    _, _, h, w = out.shape
    ys = torch.arange(h, dtype=out.dtype) * 2.0 + 0.5
    xs = torch.arange(w, dtype=out.dtype) * 2.0 + 0.5
    vx = xs[None, None, :] + _VOTE_SCALE * out[:, 0]
    vy = ys[None, :, None] + _VOTE_SCALE * out[:, 1]
    return vx, vy, torch.sigmoid(out[:, 2]), torch.sigmoid(out[:, 3])


def _dihedral() -> list[tuple[int, bool, np.ndarray]]:
    """The 8 rot90/flip ops with the 2x2 matrix M mapping new centred (x, y) to old.

    M is measured by applying each op to coordinate images, so no sign can be wrong.
    """
    n = 4
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) - c
    ops = []
    for k in range(4):
        for flip in (False, True):

            def apply(a: np.ndarray, k: int = k, flip: bool = flip) -> np.ndarray:
                a = np.rot90(a, k)
                return a[:, ::-1] if flip else a

            old = np.stack([apply(xx).ravel(), apply(yy).ravel()])  # (2, n*n)
            new = np.stack([xx.ravel(), yy.ravel()])
            m = np.linalg.lstsq(new.T, old.T, rcond=None)[0].T
            ops.append((k, flip, np.rint(m)))
    return ops


_OPS = _dihedral()


def _fourier_shift(img: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Shift (B, H, W) images by (tx, ty) px with sinc interpolation (periodic edges).

    Sinc rather than bilinear keeps the noise spectrum white, so shifted training crops
    look like unshifted camera data (bilinear would smooth the noise the net learns on).
    """
    _, h, w = img.shape
    ky = torch.fft.fftfreq(h, dtype=torch.float64)[None, :, None]
    kx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, None, :]
    phase = -2.0 * math.pi * (kx * tx[:, None, None].double() + ky * ty[:, None, None].double())
    spec = torch.fft.rfft2(img.double()) * torch.polar(torch.ones_like(phase), phase)
    return torch.fft.irfft2(spec, s=(h, w)).to(img.dtype)


def _augment(
    crops: torch.Tensor, gen: torch.Generator, max_shift: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment each crop with _N_AUG random dihedral ops + shifts.

    Returns (images (G*_N_AUG, 1, H, W), matrices (G*_N_AUG, 2, 2) new->old, shifts).
    A point p of the original crop lands at M^-1 (p - c) + c + t.
    """
    n = crops.shape[0] * _N_AUG
    op_idx = torch.randint(0, len(_OPS), (n,), generator=gen)
    t = (torch.rand((n, 2), generator=gen, dtype=torch.float64) * 2.0 - 1.0) * max_shift
    imgs = []
    mats = []
    for i in range(n):
        k, flip, m = _OPS[int(op_idx[i])]
        a = torch.rot90(crops[i // _N_AUG], k, dims=(0, 1))
        imgs.append(torch.flip(a, dims=(1,)) if flip else a)
        mats.append(m)
    stack = torch.stack(imgs)
    stack = _fourier_shift(stack, t[:, 0], t[:, 1])
    return stack[:, None], torch.as_tensor(np.stack(mats), dtype=torch.float64), t


def _crop_predictions(
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image precision-weighted position (B, 2), votes and normalised weights."""
    vx, vy, _, loc = _votes(out)
    wn = loc / loc.sum(dim=(1, 2), keepdim=True)
    px = (wn * vx).sum(dim=(1, 2))
    py = (wn * vy).sum(dim=(1, 2))
    return torch.stack([px, py], dim=1), vx, vy, wn


def _losses(
    out: torch.Tensor,
    mats: torch.Tensor,
    shifts: torch.Tensor,
    size: tuple[int, int],
    sharpen: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(equivariance loss, within-image loss, back-transformed predictions (G, A, 2)).

    sharpen=False is the curriculum's first phase: the within-image term does not yet
    move the precision weights, so they cannot lock onto one cell before votes are good.
    """
    h, w = size
    centre = torch.tensor([(w - 1) / 2.0, (h - 1) / 2.0], dtype=out.dtype)
    pred, vx, vy, wn = _crop_predictions(out)
    # Back to the original crop frame: p = M (p' - c - t) + c.
    rel = (pred - centre - shifts.to(out.dtype))[:, :, None]
    back = (mats.to(out.dtype) @ rel)[:, :, 0] + centre
    back = back.view(-1, _N_AUG, 2)
    spread = back - back.mean(dim=1, keepdim=True)
    l_eq = torch.sqrt((spread**2).sum(-1) + 1e-6).mean()
    d2 = (vx - pred[:, 0, None, None]) ** 2 + (vy - pred[:, 1, None, None]) ** 2
    dist = torch.sqrt(d2 + 1e-6)
    # Precision weights: LodeSTAR's within-image term. It may concentrate them on the
    # few cells that see the whole spot, which is what gives the best positions.
    l_in = ((wn if sharpen else wn.detach()) * dist).sum(dim=(1, 2)).mean()
    # Confidence learns P(my vote is within ~1 px of the consensus), a calibrated score,
    # so a particle's vote mass is the number of cells that see it, not one noisy cell.
    target = torch.exp(-0.5 * d2.detach() / _CONF_PX**2)
    l_conf = nn.functional.binary_cross_entropy_with_logits(out[:, 2], target)
    return l_eq, l_in + l_conf, back


def _robust_stats(values: np.ndarray) -> tuple[float, float]:
    """Median and IQR-sigma, continuous for integer data (via agent.detect)."""
    arr = np.asarray(values)
    if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
        arr = arr.astype(np.int64)  # whole-valued floats are camera counts
    level, sigma = estimate_background(arr.reshape(1, -1))
    if not sigma > 0.0:
        sigma = 1.0
    return level, sigma


def _local_maxima(
    dens: np.ndarray, threshold: float, radius: int
) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Rows, cols of pixels above threshold that are the maximum of their square window.

    Only the few above-threshold pixels are tested (a full maximum filter costs ~5 ms
    at 512^2, a sixth of the frame budget); a frame that is mostly above threshold
    falls back to the filter.
    """
    idx = np.flatnonzero(dens > threshold)
    h, w = dens.shape
    if idx.size > dens.size // 16:
        size = 2 * radius + 1
        peaks = dens == ndimage.maximum_filter(dens, size=size, mode="constant")
        flat = idx[peaks.ravel()[idx]]
        return np.divmod(flat, w)
    r, c = np.divmod(idx, w)
    offs = np.arange(-radius, radius + 1)
    rr = np.clip(r[:, None] + offs, 0, h - 1)
    cc = np.clip(c[:, None] + offs, 0, w - 1)
    window_max = dens[rr[:, :, None], cc[:, None, :]].max(axis=(1, 2))
    keep = dens[r, c] >= window_max
    return r[keep], c[keep]


def _check_frame(frame: np.ndarray) -> np.ndarray:
    """Reject input that would otherwise fail inside torch with a vague error."""
    arr = np.asarray(frame)
    if arr.ndim != 2:
        raise ValueError(f"frame must be a 2-D array, got shape {arr.shape}")
    if arr.shape[0] < 4 or arr.shape[1] < 4:
        raise ValueError(f"frame must be at least 4x4, got shape {arr.shape}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"frame must be a real numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ValueError("frame contains NaN or inf values")
    return arr


def crops_from_frames(
    frames: Sequence[np.ndarray],
    crop_px: int,
    n: int,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Up to n unlabeled (crop_px, crop_px) crops, each around one isolated bright spot.

    Seeds come from the classical ParticleDetector; spots with another detection inside
    the crop (which would give the equivariance loss two valid answers) or too close to
    the frame edge are skipped. Crops keep the frame's dtype (raw ADU): fit normalises
    each by its own border ring, just as detection normalises a frame by its background.
    """
    if crop_px < 4 or crop_px % 2:
        raise ValueError(f"crop_px must be an even number >= 4, got {crop_px}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    det = ParticleDetector(DetectorConfig())
    half = crop_px // 2
    found: list[np.ndarray] = []
    for i, frame in enumerate(frames):
        arr = np.asarray(frame)
        if arr.ndim != 2:
            raise ValueError(f"frames[{i}] must be a 2-D array, got shape {arr.shape}")
        xy = det(arr)
        if len(xy) == 0:
            continue
        d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        np.fill_diagonal(d, np.inf)
        isolated = d.min(axis=1) > half * 1.5 if len(xy) > 1 else np.ones(1, bool)
        rows = np.rint(xy[:, 1]).astype(int)
        cols = np.rint(xy[:, 0]).astype(int)
        h, w = arr.shape
        inside = (rows >= half) & (rows + half <= h) & (cols >= half) & (cols + half <= w)
        for r, c in zip(rows[isolated & inside], cols[isolated & inside], strict=True):
            found.append(arr[r - half : r + half, c - half : c + half])
    if not found:
        raise ValueError("no isolated particles found in frames to crop")
    pick = gen.permutation(len(found))[:n]
    return np.stack([found[k] for k in pick])


class LodeStarDetector:
    """Self-supervised CNN localiser; call it on a frame to get (N, 2) (x, y) positions.

    Untrained instances refuse to detect. Not thread-safe during fit.
    """

    def __init__(self, config: LodeStarConfig | None = None) -> None:
        self.config = config if config is not None else LodeStarConfig()
        self._net = _inference_net(_Net(self.config.channels))
        self._input_scale = 1.0  # robust-sigma units -> net input units
        self._score_scale = 1.0  # peak vote density of a typical training particle
        self._trained = False

    # ----------------------------------------------------------------- training
    def _normalise_crops(self, crops: np.ndarray) -> np.ndarray:
        """Per-crop (x - median) / sigma from the border ring, like a frame's background."""
        out = np.empty(crops.shape, dtype=np.float64)
        ring = np.ones(crops.shape[1:], dtype=bool)
        ring[_RING_PX:-_RING_PX, _RING_PX:-_RING_PX] = False
        for i, c in enumerate(crops):
            level, sigma = _robust_stats(c[ring])
            out[i] = (c.astype(np.float64) - level) / sigma
        return out

    def fit(
        self,
        crops: np.ndarray,
        progress: Callable[[int, float], None] | None = None,
    ) -> dict[str, float]:
        """Train on (N, crop_px, crop_px) unlabeled single-particle crops.

        Returns stats: loss (final), eq_rms_px and concentration (held-out self-check),
        seconds, attempts, steps and converged (1.0/0.0 as a float, so the dict is uniform;
        the bool is also available as ``bool(stats["converged"])``).
        """
        cfg = self.config
        arr = np.asarray(crops)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != (cfg.crop_px, cfg.crop_px):
            raise ValueError(
                f"crops must be (N, {cfg.crop_px}, {cfg.crop_px}), got shape {arr.shape}"
            )
        if not np.isfinite(arr.astype(np.float64)).all():
            raise ValueError("crops contain NaN or inf values")
        norm = self._normalise_crops(arr)
        # Inputs of O(1): divide by a high quantile of the signal, fixed from here on.
        self._input_scale = float(max(np.quantile(norm, 0.999), 1.0))
        data = torch.as_tensor(norm / self._input_scale, dtype=_DTYPE)

        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(data))
        n_val = max(1, round(_HELD_OUT * len(data))) if len(data) > 1 else 0
        val = data[order[:n_val]] if n_val else data
        train = data[order[n_val:]] if n_val else data

        threads = torch.get_num_threads()
        torch.set_num_threads(min(2, threads))
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        best: tuple[float, dict[str, Any], dict[str, float]] | None = None
        try:
            for attempt in range(cfg.max_restarts + 1):
                seed = cfg.seed + 7919 * attempt
                # Forked RNG: seeding for reproducibility must not reseed the caller's torch.
                with torch.random.fork_rng(devices=[]):
                    stats = self._train_once(train, seed, progress)
                check = self._self_check(val, seed)
                stats.update(check)
                stats["attempts"] = float(attempt + 1)
                ok = check["eq_rms_px"] < _EQ_TOL_PX and check["concentration"] > _CONC_MIN
                stats["converged"] = float(ok)
                state = {k: v.clone() for k, v in self._net.state_dict().items()}
                if best is None or check["eq_rms_px"] < best[0]:
                    best = (check["eq_rms_px"], state, dict(stats))
                elapsed = time.perf_counter() - t0
                per_run = elapsed / (attempt + 1)
                if ok or elapsed + per_run > cfg.time_budget_s:
                    break
            assert best is not None
            if not stats["converged"]:
                # Keep the most equivariant attempt rather than merely the last one.
                self._net.load_state_dict(best[1])
                stats = best[2] | {"attempts": stats["attempts"]}
            self._net = _inference_net(self._net)
            self._score_scale = self._typical_score(val)
        finally:
            torch.set_num_threads(threads)
        self._trained = True
        stats["seconds"] = time.perf_counter() - t0
        stats["converged"] = bool(stats["converged"])
        return stats

    def _train_once(
        self,
        train: torch.Tensor,
        seed: int,
        progress: Callable[[int, float], None] | None,
    ) -> dict[str, float]:
        """One training run from a fresh seeded init; returns its last loss values."""
        cfg = self.config
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        self._net = _Net(cfg.channels).to(_DTYPE).train()
        opt = torch.optim.Adam(self._net.parameters(), lr=cfg.lr)
        steps = cfg.train_steps

        def lr_at(step: int) -> float:
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            frac = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
            return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        size = (cfg.crop_px, cfg.crop_px)
        ema = float("nan")
        l_eq = l_in = torch.zeros(())
        for step in range(steps):
            idx = torch.randint(0, len(train), (cfg.batch,), generator=gen)
            imgs, mats, shifts = _augment(train[idx], gen, _MAX_SHIFT_PX)
            # Brightness jitter: robustness to per-frame normalisation differences.
            gain = torch.exp((torch.rand((len(imgs), 1, 1, 1), generator=gen) - 0.5) * 0.5)
            out = self._net(imgs * gain.to(_DTYPE))
            sharpen = step >= _PHASE1 * steps
            l_eq, l_in, _ = _losses(out, mats, shifts, size, sharpen)
            loss = l_eq + l_in
            if not torch.isfinite(loss):
                break  # divergence: the self-check fails and fit restarts
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self._net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            val = float(loss.detach())
            ema = val if math.isnan(ema) else 0.95 * ema + 0.05 * val
            if progress is not None:
                progress(step, val)
        self._net.eval()
        return {
            "loss": ema,
            "loss_equivariance": float(l_eq.detach()),
            "loss_within": float(l_in.detach()),
        }

    @torch.no_grad()
    def _self_check(self, val: torch.Tensor, seed: int) -> dict[str, float]:
        """Label-free convergence test on held-out crops and fresh augmentations.

        eq_rms_px: RMS spread of back-transformed predictions (0 for a perfectly
        equivariant net); concentration: weight share of votes within _REFINE_RADIUS of
        the crop's prediction (low means a diffuse, non-localising weight map).
        """
        gen = torch.Generator().manual_seed(seed + 1)
        size = (val.shape[1], val.shape[2])
        imgs, mats, shifts = _augment(val, gen, _MAX_SHIFT_PX)
        out = self._net(imgs)
        _, _, back = _losses(out, mats, shifts, size)
        spread = back - back.mean(dim=1, keepdim=True)
        eq_rms = float(torch.sqrt((spread**2).sum(-1).mean()))
        pred, vx, vy, wn = _crop_predictions(out)
        near = (vx - pred[:, 0, None, None]) ** 2 + (vy - pred[:, 1, None, None]) ** 2
        conc = float((wn * (near < _REFINE_RADIUS**2)).sum(dim=(1, 2)).mean())
        if not (math.isfinite(eq_rms) and math.isfinite(conc)):
            return {"eq_rms_px": float("inf"), "concentration": 0.0}
        return {"eq_rms_px": eq_rms, "concentration": conc}

    @torch.no_grad()
    def _typical_score(self, val: torch.Tensor) -> float:
        """Median peak vote density over held-out crops: the unit of the score scale."""
        peaks = []
        for img in val:
            dens = self._density(img[None, None])[0]
            peaks.append(float(dens.max()))
        typical = float(np.median(peaks)) if peaks else 1.0
        return typical if typical > 0.0 else 1.0

    # ---------------------------------------------------------------- inference
    def _density(
        self, x: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Vote-density map (H', W'), per-cell vote x, y, confidence and precision (h, w)."""
        out = self._net(x)
        vx_t, vy_t, w_t, l_t = _votes(out)
        vx, vy, wgt = vx_t[0].numpy(), vy_t[0].numpy(), w_t[0].numpy()
        h, w = x.shape[2], x.shape[3]
        r = np.rint(vy).astype(np.intp)
        c = np.rint(vx).astype(np.intp)
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        flat = (r * w + c)[ok]
        dens = np.bincount(flat, weights=wgt[ok].astype(np.float64), minlength=h * w)
        dens = dens.reshape(h, w).astype(np.float32)
        # Peak-normalised kernel: a tight cluster of total weight m gives a peak of ~m.
        dens = ndimage.gaussian_filter(dens, _SPLAT_SIGMA, truncate=3.0)
        dens *= np.float32(2.0 * math.pi * _SPLAT_SIGMA**2)
        return dens, vx, vy, wgt, l_t[0].numpy()

    def _prepare(self, frame: np.ndarray) -> torch.Tensor:
        """(1, 1, H+pad, W+pad) float32 net input: robustly standardised, even-sized."""
        level, sigma = estimate_background(frame)
        if not sigma > 0.0:
            sigma = 1.0
        scale = np.float32(1.0 / (sigma * self._input_scale))
        x = (frame.astype(np.float32) - np.float32(level)) * scale
        h, w = x.shape
        if h % 2 or w % 2:
            x = np.pad(x, ((0, h % 2), (0, w % 2)))  # 0 = background after normalising
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None]
        return t.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict_with_scores(self, frame: np.ndarray) -> tuple[FloatArray, FloatArray]:
        """Positions (N, 2) and scores (N,) best first; scores ~1 for a training-like spot."""
        arr = _check_frame(frame)
        if not self._trained:
            raise RuntimeError("LodeStarDetector is not trained: call fit() or load()")
        cfg = self.config
        h, w = arr.shape
        dens, vx, vy, wgt, loc = self._density(self._prepare(arr))
        dens = dens[:h, :w] / np.float32(self._score_scale)
        pr, pc = _local_maxima(dens, cfg.detection_threshold, cfg.min_distance_px)
        if pr.size == 0:
            return np.zeros((0, 2)), np.zeros(0)
        # Gather the cells whose votes could land near each peak (votes reach <= ~RF).
        hh, ww = vx.shape
        rad = 5
        offs = np.arange(-rad, rad + 1)
        ru = np.clip(pr[:, None] // 2 + offs, 0, hh - 1)
        cu = np.clip(pc[:, None] // 2 + offs, 0, ww - 1)
        gx = vx[ru[:, :, None], cu[:, None, :]].astype(np.float64)
        gy = vy[ru[:, :, None], cu[:, None, :]].astype(np.float64)
        gw = wgt[ru[:, :, None], cu[:, None, :]].astype(np.float64)
        gl = loc[ru[:, :, None], cu[:, None, :]].astype(np.float64)
        # Clipping repeats edge cells; count each cell once.
        dup = (np.diff(ru, axis=1, prepend=-1) == 0)[:, :, None] | (
            np.diff(cu, axis=1, prepend=-1) == 0
        )[:, None, :]
        gw[dup] = 0.0
        gl[dup] = 0.0
        cx, cy = pc.astype(np.float64), pr.astype(np.float64)
        # Mean shift on confidence finds the vote cluster (2-3 iterations from the peak
        # pixel); the last pass averages its votes by precision weight, as in training.
        for it in range(4):
            near = (gx - cx[:, None, None]) ** 2 + (gy - cy[:, None, None]) ** 2
            m = (gl if it == 3 else gw) * (near < _REFINE_RADIUS**2)
            tot = m.sum(axis=(1, 2))
            safe = np.where(tot > 0, tot, 1.0)
            cx = np.where(tot > 0, (m * gx).sum(axis=(1, 2)) / safe, cx)
            cy = np.where(tot > 0, (m * gy).sum(axis=(1, 2)) / safe, cy)
        scores = dens[pr, pc].astype(np.float64)
        order = np.argsort(-scores, kind="stable")
        xy = np.column_stack([cx, cy])[order]
        scores = scores[order]
        # Two peaks that refine onto one particle: keep the stronger.
        keep = np.ones(len(xy), dtype=bool)
        for i in range(len(xy)):
            if keep[i]:
                d = np.hypot(xy[i + 1 :, 0] - xy[i, 0], xy[i + 1 :, 1] - xy[i, 1])
                keep[i + 1 :] &= d >= cfg.min_distance_px
        return xy[keep], scores[keep]

    def __call__(self, frame: np.ndarray) -> FloatArray:
        """Detect particles; (N, 2) float64 (x, y) px, most confident first."""
        return self.predict_with_scores(frame)[0]

    # -------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> None:
        """Write config, normalisation constants and weights (loadable with weights_only)."""
        if not self._trained:
            raise RuntimeError("LodeStarDetector is not trained: nothing to save")
        payload = {
            "format": _FORMAT,
            "config": self.config.model_dump(),
            "input_scale": self._input_scale,
            "score_scale": self._score_scale,
            "state_dict": {k: v.detach().clone() for k, v in self._net.state_dict().items()},
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> LodeStarDetector:
        """Rebuild a detector that reproduces the saved one's predictions bit for bit."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LodeSTAR checkpoint not found: {p}")
        try:
            payload = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"cannot read LodeSTAR checkpoint {p}: {exc}") from exc
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{p} is not a {_FORMAT} checkpoint")
        try:
            det = cls(LodeStarConfig(**payload["config"]))
            det._net.load_state_dict(payload["state_dict"])
            det._input_scale = float(payload["input_scale"])
            det._score_scale = float(payload["score_scale"])
        except Exception as exc:
            raise ValueError(f"invalid LodeSTAR checkpoint {p}: {exc}") from exc
        det._net = _inference_net(det._net)
        det._trained = True
        return det
