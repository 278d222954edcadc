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
Candidates are density peaks above a floor calibrated on pure noise; each is then refined
by a weighted Gaussian MLE on the raw pixels (PSF sigma, shot-noise slope and brightness
unit are estimated label-free from the training crops), which reaches the Cramer-Rao bound
from the network's start, removes its bias on out-of-range brightness, and gives a score
(fitted brightness) that stays calibrated at any SNR.

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
``(row i, col j)`` at ``(x=j, y=i)``, as in :mod:`agent.detection.detect`.
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
from scipy import ndimage, special
from torch import nn

from agent.detection.detect import DetectorConfig, ParticleDetector, estimate_background
from agent.detection.training_crops import cut_isolated

__all__ = ["LodeStarConfig", "LodeStarDetector", "crops_from_frames"]

FloatArray = NDArray[np.float64]

_FORMAT = "scopeloop-lodestar-v2"
_FORMATS = ("scopeloop-lodestar-v1", _FORMAT)  # v1: no spot fit (legacy scores)
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
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)
_FIT_ITERS = 8  # Gauss-Newton steps of the final spot fit (3-4 from a good CNN start).
_FIT_RADIUS_SIGMAS = 3.0  # fit window half-width in PSF sigmas (>99 % of the information).
_FIT_MAX_STEP_PX = 0.5  # per-iteration position step clamp of the spot fit.
_FIT_MAX_MOVE_PX = 3.0  # a fit that moves farther from the CNN position is rejected.
_NOISE_FRAMES = 4  # synthetic 128^2 noise-only frames that calibrate the candidate floor.
_NOISE_FLOOR_X = 2.0  # candidate floor = this times the largest noise-only density peak.


class LodeStarConfig(BaseModel):
    """Network and training settings; bounds make a bad value fail when loaded, not mid-fit.

    ``detection_threshold`` is on the *score* scale: a spot's fitted brightness divided by
    the median fitted brightness of the training crops, so ~1 means "as bright as a
    typical training particle" and the default 0.3 accepts particles about 3x dimmer.
    (v1 checkpoints score by vote density relative to the training crops instead.)
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
    """Median and IQR-sigma, continuous for integer data (via agent.detection.detect)."""
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


def _pixel_profiles(
    centre: np.ndarray, sigma: np.ndarray, coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-integrated 1-D Gaussians (N, W), d/d centre and d/d sigma, unit area.

    Pixel j spans [j - 0.5, j + 0.5] (coords (W,) relative to each spot's window origin).
    """
    s = sigma[:, None]
    lo = (coords[None, :] - 0.5 - centre[:, None]) / s
    hi = lo + 1.0 / s
    prof = 0.5 * (special.erf(hi / _SQRT2) - special.erf(lo / _SQRT2))
    g_lo = np.exp(-0.5 * lo**2) / _SQRT2PI
    g_hi = np.exp(-0.5 * hi**2) / _SQRT2PI
    d_centre = (g_lo - g_hi) / s
    d_sigma = (lo * g_lo - hi * g_hi) / s
    return prof, d_centre, d_sigma


def _windows(
    img: np.ndarray, x0: np.ndarray, y0: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(N, W, W) pixel windows around rounded (x0, y0), in-frame mask, origins (col, row).

    img is one (H, W) frame, or an (N, H, W) stack holding spot i in image i.
    """
    h, w = img.shape[-2:]
    offs = np.arange(-radius, radius + 1)
    c0 = np.rint(x0).astype(np.intp)
    r0 = np.rint(y0).astype(np.intp)
    rr = r0[:, None] + offs
    cc = c0[:, None] + offs
    mask = ((rr >= 0) & (rr < h))[:, :, None] & ((cc >= 0) & (cc < w))[:, None, :]
    rr = np.clip(rr, 0, h - 1)
    cc = np.clip(cc, 0, w - 1)
    if img.ndim == 3:
        idx = np.arange(len(x0))[:, None, None]
        win = img[idx, rr[:, :, None], cc[:, None, :]].astype(np.float64)
    else:
        win = img[rr[:, :, None], cc[:, None, :]].astype(np.float64)
    return win, mask.astype(np.float64), c0.astype(np.float64), r0.astype(np.float64)


def _fit_spots(
    img: np.ndarray,
    x0: np.ndarray,
    y0: np.ndarray,
    sigma: float,
    kappa: float,
    *,
    fit_sigma: bool = False,
    radius: int | None = None,
    iters: int = _FIT_ITERS,
) -> dict[str, np.ndarray]:
    """Gaussian MLE (IRLS) of pixel-integrated spots on a background-standardised image.

    Noise model: variance 1 + kappa * (model - background), i.e. unit background noise
    plus shot noise of the spot; weights are refreshed each Gauss-Newton step, which is
    the quasi-likelihood solution and reaches the Cramer-Rao bound for Poisson-like data.
    Fitted per spot: x, y, amplitude (total signal) and background (plus sigma if asked).
    A spot whose fit fails or wanders more than _FIT_MAX_MOVE_PX keeps its start.
    """
    n = len(x0)
    rad = radius if radius is not None else max(3, math.ceil(_FIT_RADIUS_SIGMAS * sigma))
    win, mask, c0, r0 = _windows(img, x0, y0, rad)
    coords = np.arange(-rad, rad + 1, dtype=np.float64)
    x = x0 - c0
    y = y0 - r0
    s = np.full(n, float(sigma))
    npar = 5 if fit_sigma else 4

    def design(x: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, ...]:
        px, dpx, spx = _pixel_profiles(x, s, coords)
        py, dpy, spy = _pixel_profiles(y, s, coords)
        psf = py[:, :, None] * px[:, None, :]
        return psf, px, dpx, spx, py, dpy, spy

    def linear_amp_bg(psf: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a11 = (wt * psf * psf).sum(axis=(1, 2))
        a12 = (wt * psf).sum(axis=(1, 2))
        a22 = wt.sum(axis=(1, 2))
        b1 = (wt * psf * win).sum(axis=(1, 2))
        b2 = (wt * win).sum(axis=(1, 2))
        det = a11 * a22 - a12**2
        det = np.where(np.abs(det) > 1e-12, det, 1e-12)
        return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det

    psf = design(x, y, s)[0]
    amp, bg = linear_amp_bg(psf, mask)
    for _ in range(iters):
        psf, px, dpx, spx, py, dpy, spy = design(x, y, s)
        sig = np.maximum(amp[:, None, None] * psf, 0.0)
        wt = mask / (1.0 + kappa * sig)
        resid = win - bg[:, None, None] - amp[:, None, None] * psf
        cols = [
            amp[:, None, None] * py[:, :, None] * dpx[:, None, :],
            amp[:, None, None] * dpy[:, :, None] * px[:, None, :],
            psf,
            np.ones_like(psf),
        ]
        if fit_sigma:
            cols.append(
                amp[:, None, None]
                * (py[:, :, None] * spx[:, None, :] + spy[:, :, None] * px[:, None, :])
            )
        jac = np.stack(cols, axis=-1).reshape(n, -1, npar)
        wj = jac * wt.reshape(n, -1, 1)
        hess = np.einsum("nkp,nkq->npq", wj, jac)
        grad = np.einsum("nkp,nk->np", wj, resid.reshape(n, -1))
        hess += np.eye(npar)[None] * (1e-9 + 1e-6 * np.trace(hess, axis1=1, axis2=2))[:, None, None]
        try:
            step = np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            break
        step = np.where(np.isfinite(step), step, 0.0)
        x = x + np.clip(step[:, 0], -_FIT_MAX_STEP_PX, _FIT_MAX_STEP_PX)
        y = y + np.clip(step[:, 1], -_FIT_MAX_STEP_PX, _FIT_MAX_STEP_PX)
        amp = amp + step[:, 2]
        bg = bg + step[:, 3]
        if fit_sigma:
            s = np.clip(s + np.clip(step[:, 4], -0.3, 0.3), 0.3, float(rad))
    x = x + c0
    y = y + r0
    moved = np.hypot(x - x0, y - y0)
    ok = (
        np.isfinite(x)
        & np.isfinite(y)
        & np.isfinite(amp)
        & (amp > 0.0)
        & (moved <= _FIT_MAX_MOVE_PX)
    )
    if not ok.all():
        # Failed fits keep the network's position and a linear amplitude there.
        psf_fail = design(x0 - c0, y0 - r0, np.full(n, float(sigma)))[0]
        amp_f, bg_f = linear_amp_bg(psf_fail, mask)
        x = np.where(ok, x, x0)
        y = np.where(ok, y, y0)
        amp = np.where(ok, amp, amp_f)
        bg = np.where(ok, bg, bg_f)
        s = np.where(ok, s, sigma)
    return {"x": x, "y": y, "amp": amp, "bg": bg, "sigma": s, "ok": ok}


def crops_from_frames(
    frames: Sequence[np.ndarray],
    crop_px: int,
    n: int,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Up to n unlabeled (crop_px, crop_px) crops around the default classical detector's
    isolated hits: clean fluorescence frames, as in the benches and tests. (Training on
    a user's frames or a live stream chooses crops with agent.detection.training_crops.)

    Crops keep the frame's dtype (raw ADU): fit normalises each by its own border ring,
    just as detection normalises a frame by its background.
    """
    if crop_px < 4 or crop_px % 2:
        raise ValueError(f"crop_px must be an even number >= 4, got {crop_px}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    find = ParticleDetector(DetectorConfig())
    found: list[np.ndarray] = []
    for i, frame in enumerate(frames):
        arr = np.asarray(frame)
        if arr.ndim != 2:
            raise ValueError(f"frames[{i}] must be a 2-D array, got shape {arr.shape}")
        found += cut_isolated(arr, find(arr), crop_px)[0]
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
        # Spot fit (checkpoint v2; None = a v1 checkpoint, legacy density scores):
        self._psf_sigma: float | None = None  # px, median over the training crops
        self._shot_kappa = 0.0  # excess variance per unit of signal (sigma units)
        self._amp_scale = 1.0  # fitted amplitude of a typical training particle
        self._noise_floor = 0.0  # candidate floor on the raw vote density
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
            self._calibrate(norm, seed=cfg.seed)
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

    def _calibrate(self, norm: np.ndarray, seed: int) -> None:
        """Label-free constants of the final spot fit, from the (standardised) crops.

        PSF sigma: median of free-sigma fits; shot-noise slope: regression of squared
        residuals on the fitted signal; amplitude unit: median fitted amplitude (so a
        score of 1 is a typical training particle and scores scale with brightness);
        candidate floor: a multiple of the highest vote-density peak on pure noise.
        """
        half = norm.shape[1] // 2
        start = np.full(len(norm), float(half))
        rad = max(3, min(half - 2, 8))
        free = _fit_spots(norm, start, start, 1.5, 0.0, fit_sigma=True, radius=rad, iters=15)
        good = free["ok"] & (free["sigma"] > 0.4) & (free["sigma"] < rad / 2.0)
        sigma = float(np.median(free["sigma"][good])) if good.any() else 1.5
        # Shot noise: fit with uniform weights, then var(resid) = a + kappa * signal.
        fit0 = _fit_spots(norm, free["x"], free["y"], sigma, 0.0)
        r = max(3, math.ceil(_FIT_RADIUS_SIGMAS * sigma))
        win, mask, c0, r0 = _windows(norm, fit0["x"], fit0["y"], r)
        coords = np.arange(-r, r + 1, dtype=np.float64)
        px = _pixel_profiles(fit0["x"] - c0, fit0["sigma"], coords)[0]
        py = _pixel_profiles(fit0["y"] - r0, fit0["sigma"], coords)[0]
        sig = fit0["amp"][:, None, None] * py[:, :, None] * px[:, None, :]
        res2 = (win - fit0["bg"][:, None, None] - sig) ** 2
        use = (mask > 0) & fit0["ok"][:, None, None]
        design = np.column_stack([np.ones(int(use.sum())), sig[use]])
        coef = np.linalg.lstsq(design, res2[use], rcond=None)[0]
        kappa = float(np.clip(coef[1] / max(coef[0], 1e-3), 0.0, 100.0))
        fit = _fit_spots(norm, fit0["x"], fit0["y"], sigma, kappa)
        amps = fit["amp"][fit["ok"]]
        amp_scale = float(np.median(amps)) if amps.size else 0.0
        self._psf_sigma = sigma
        self._shot_kappa = kappa if math.isfinite(kappa) else 0.0
        self._amp_scale = amp_scale if amp_scale > 0.0 else 1.0
        # Noise-only density: standard normal frames, as _prepare would standardise them.
        gen = np.random.default_rng(seed + 104729)
        peak = 0.0
        with torch.no_grad():
            for _ in range(_NOISE_FRAMES):
                noise = gen.standard_normal((128, 128)) / self._input_scale
                x = torch.as_tensor(noise, dtype=_DTYPE)[None, None]
                x = x.contiguous(memory_format=torch.channels_last)
                peak = max(peak, float(self._density(x)[0].max()))
        self._noise_floor = _NOISE_FLOOR_X * peak

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

    @staticmethod
    def _frame_stats(frame: np.ndarray) -> tuple[float, float]:
        """Background level and noise sigma that standardise a frame."""
        level, sigma = estimate_background(frame)
        return level, (sigma if sigma > 0.0 else 1.0)

    def _prepare(self, frame: np.ndarray) -> torch.Tensor:
        """(1, 1, H+pad, W+pad) float32 net input: robustly standardised, even-sized."""
        level, sigma = self._frame_stats(frame)
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
        if self._psf_sigma is None:  # v1 checkpoint: score = relative vote density
            dens = dens[:h, :w] / np.float32(self._score_scale)
            floor = cfg.detection_threshold
        else:  # candidates: any peak clearly above pure noise; the fit scores them
            dens = dens[:h, :w]
            floor = self._noise_floor
        pr, pc = _local_maxima(dens, floor, cfg.min_distance_px)
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
        if self._psf_sigma is None:
            scores = dens[pr, pc].astype(np.float64)
        else:
            # Final position: Gaussian MLE on the raw pixels from the CNN's start (the
            # net is robust, the fit reaches the bound); score = fitted brightness
            # relative to a typical training particle, which stays calibrated at any SNR.
            level, sigma = self._frame_stats(arr)
            img = (arr.astype(np.float64) - level) / sigma
            fit = _fit_spots(img, cx, cy, self._psf_sigma, self._shot_kappa)
            bad = ~fit["ok"]
            if bad.any():
                # The net can misplace spots far brighter than its training crops: retry
                # those fits from the smoothed intensity peak next to the net's position.
                rad = max(3, math.ceil(_FIT_RADIUS_SIGMAS * self._psf_sigma))
                win, mask, c0, r0 = _windows(img, cx[bad], cy[bad], rad)
                sm = ndimage.gaussian_filter(win * mask, (0, self._psf_sigma, self._psf_sigma))
                peak = np.argmax(sm.reshape(len(sm), -1), axis=1)
                pr_, pc_ = np.divmod(peak, sm.shape[2])
                retry = _fit_spots(
                    img, c0 + pc_ - rad, r0 + pr_ - rad, self._psf_sigma, self._shot_kappa
                )
                for key in ("x", "y", "amp"):
                    fit[key][bad] = np.where(retry["ok"], retry[key], fit[key][bad])
            cx, cy = fit["x"], fit["y"]
            scores = fit["amp"] / self._amp_scale
            sel = scores >= cfg.detection_threshold
            cx, cy, scores = cx[sel], cy[sel], scores[sel]
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
            "psf_sigma": self._psf_sigma,
            "shot_kappa": self._shot_kappa,
            "amp_scale": self._amp_scale,
            "noise_floor": self._noise_floor,
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
        if not isinstance(payload, dict) or payload.get("format") not in _FORMATS:
            raise ValueError(f"{p} is not a {_FORMAT} checkpoint")
        try:
            det = cls(LodeStarConfig(**payload["config"]))
            det._net.load_state_dict(payload["state_dict"])
            det._input_scale = float(payload["input_scale"])
            det._score_scale = float(payload["score_scale"])
            if payload["format"] != _FORMATS[0]:
                sig = payload["psf_sigma"]
                det._psf_sigma = None if sig is None else float(sig)
                det._shot_kappa = float(payload["shot_kappa"])
                det._amp_scale = float(payload["amp_scale"])
                det._noise_floor = float(payload["noise_floor"])
        except Exception as exc:
            raise ValueError(f"invalid LodeSTAR checkpoint {p}: {exc}") from exc
        det._net = _inference_net(det._net)
        det._trained = True
        return det
