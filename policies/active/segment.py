"""Domain-wall segmentation by an ensemble of small U-Nets; disagreement = uncertainty.

Each member is a two-level U-Net (a few thousand weights) trained from a different
seed on random crops of twin scans labelled with the twin's true walls. The ensemble
mean is the wall probability; the members' spread (std) tells where the nets do not
agree, and a frame whose spread is high overall is out of distribution: the forward
workflow then flags it instead of acting on it (cf. ResHedNet ensembles).

Disagreement alone separates poorly (nets trained together can agree on garbage), so
the OOD decision has two calibrated parts, both fitted on held-out twin scans at
training time and stored in the checkpoint (`OodCalibration`):

- the disagreement score must not exceed its held-out 99th percentile (or the robust
  median + 3 sigma, whichever is larger: a few held-out frames make a noisy quantile);
- every input statistic the nets were trained on (per channel: median, log robust
  scale, log high-frequency energy ratio, saturated-pixel fraction) must lie inside its
  held-out range widened by half the span on each side, and by at least an absolute
  floor. Any non-finite input pixel is OOD outright (the nets never saw one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

IN_CHANNELS = 4


class SmallUNet(nn.Module):
    """conv-conv / pool / conv-conv / up / conv -> 1 logit per pixel."""

    def __init__(self, in_channels: int = IN_CHANNELS, width: int = 8) -> None:
        super().__init__()

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.Conv2d(b, b, 3, padding=1), nn.ReLU()
            )

        self.down = block(in_channels, width)
        self.bottom = block(width, 2 * width)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.out = nn.Sequential(block(2 * width, width), nn.Conv2d(width, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = h % 2, w % 2
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
        d = self.down(x)
        b = self.bottom(nn.functional.max_pool2d(d, 2))
        y = self.out(torch.cat([d, self.up(b)], 1))
        return y[..., :h, :w]


@dataclass
class SegmenterTraining:
    members: int = 3
    steps: int = 300
    crop: int = 32
    batch: int = 16
    lr: float = 3e-3
    width: int = 8
    seed: int = 0


def train_ensemble(
    images: list[np.ndarray], masks: list[np.ndarray], settings: SegmenterTraining
) -> list[SmallUNet]:
    """Train `members` U-Nets on random crops of (C, H, W) images with (H, W) wall masks."""
    if not images or len(images) != len(masks):
        raise ValueError("segmenter: need one wall mask per training image")
    xs = [torch.as_tensor(np.asarray(i, np.float32)) for i in images]
    ys = [torch.as_tensor(np.asarray(m, np.float32)) for m in masks]
    pos = float(np.mean([float(m.mean()) for m in masks]))
    weight = torch.tensor(min(max((1 - pos) / max(pos, 1e-3), 1.0), 20.0))
    nets = []
    for k in range(settings.members):
        gen = torch.Generator().manual_seed(settings.seed * 1000 + k)
        torch.manual_seed(settings.seed * 1000 + k)
        net = SmallUNet(xs[0].shape[0], settings.width)
        opt = torch.optim.Adam(net.parameters(), lr=settings.lr)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)
        c = settings.crop
        for _ in range(settings.steps):
            bx, by = [], []
            for _b in range(settings.batch):
                i = int(torch.randint(len(xs), (1,), generator=gen))
                _, h, w = xs[i].shape
                r = int(torch.randint(max(1, h - c + 1), (1,), generator=gen))
                q = int(torch.randint(max(1, w - c + 1), (1,), generator=gen))
                x, y = xs[i][:, r : r + c, q : q + c], ys[i][r : r + c, q : q + c]
                flips = torch.randint(2, (2,), generator=gen)
                if flips[0]:
                    x, y = x.flip(-1), y.flip(-1)
                if flips[1]:
                    x, y = x.flip(-2), y.flip(-2)
                bx.append(x)
                by.append(y)
            logits = net(torch.stack(bx)).squeeze(1)
            loss = loss_fn(logits, torch.stack(by))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        nets.append(net)
    return nets


class WallSegmenter:
    """An ensemble of trained U-Nets: wall probability and disagreement maps."""

    def __init__(self, nets: list[SmallUNet], ood: OodCalibration | None = None) -> None:
        if not nets:
            raise ValueError("segmenter: the ensemble is empty")
        self.nets = nets
        self.ood = ood

    def check(
        self,
        channels: np.ndarray,
        prob: np.ndarray,
        spread: np.ndarray,
        score_threshold: float | None = None,
    ) -> OodDecision:
        """OOD decision for a frame already predicted; `score_threshold` overrides."""
        if self.ood is None:
            raise ValueError("segmenter: checkpoint has no OOD calibration; retrain it")
        return self.ood.decide(channels, uncertainty_score(prob, spread), score_threshold)

    @torch.no_grad()
    def predict(self, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean probability, std across members), each (H, W), for a (C, H, W) image."""
        x = torch.as_tensor(np.asarray(channels, np.float32))[None]
        probs = torch.stack([torch.sigmoid(n(x))[0, 0] for n in self.nets])
        return probs.mean(0).numpy(), probs.std(0, unbiased=False).numpy()

    def save(self, path: Path) -> None:
        width = self.nets[0].down[0].out_channels
        in_ch = self.nets[0].down[0].in_channels
        blob: dict = {
            "width": width,
            "in_channels": in_ch,
            "states": [n.state_dict() for n in self.nets],
        }
        if self.ood is not None:
            blob["ood"] = self.ood.to_dict()
        torch.save(blob, path)

    @classmethod
    def load(cls, path: Path) -> WallSegmenter:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        nets = []
        for state in blob["states"]:
            net = SmallUNet(int(blob["in_channels"]), int(blob["width"]))
            net.load_state_dict(state)
            net.eval()
            nets.append(net)
        ood = OodCalibration.from_dict(blob["ood"]) if "ood" in blob else None
        return cls(nets, ood)


def uncertainty_score(prob: np.ndarray, spread: np.ndarray) -> float:
    """Frame-level disagreement: mean member std where any member sees a wall (>=0.2).

    Averaging over the whole frame would let large agreed-empty areas hide a frame the
    nets do not understand; averaging over candidate-wall pixels does not.
    """
    sel = (prob + 2 * spread) >= 0.2
    return float(spread[sel].mean()) if sel.any() else 0.0


# Input statistics per channel and the smallest half-width their allowed range gets
# (normalised-channel units): below these a held-out set is just too small to tell.
STAT_FLOORS = {"median": 0.5, "log_scale": 0.35, "log_hf_ratio": 0.25, "saturated": 0.02}


def input_statistics(channels: np.ndarray) -> dict[str, float]:
    """Per-channel statistics of a (C, H, W) network input, keyed `name[c]`.

    `log_hf_ratio` is log10 of the mean squared neighbour difference over twice the
    variance: the ratio is ~1 for white noise, near 0 for smooth structure (1 - lag-1
    autocorrelation); it depends on noise level and on pixel size. `saturated`
    is the fraction of pixels at the channel's min or max (clipped or flat frames).
    Non-finite pixels are counted in `nonfinite` and set to 0 for the rest.
    """
    x = np.asarray(channels, dtype=np.float64)
    finite = np.isfinite(x)
    out = {"nonfinite": float(1.0 - finite.mean())}
    x = np.where(finite, x, 0.0)
    for c, ch in enumerate(x):
        med = float(np.median(ch))
        mad = 1.4826 * float(np.median(np.abs(ch - med)))
        var = float(ch.var())
        dx = float(np.mean(np.diff(ch, axis=1) ** 2)) if ch.shape[1] > 1 else 0.0
        dy = float(np.mean(np.diff(ch, axis=0) ** 2)) if ch.shape[0] > 1 else 0.0
        lo, hi = float(ch.min()), float(ch.max())
        tol = 1e-6 * max(hi - lo, 1e-12)
        out[f"median[{c}]"] = med
        out[f"log_scale[{c}]"] = float(np.log10(max(mad, 1e-6)))
        hf = 0.25 * (dx + dy) / var if var > 1e-12 else 0.0
        out[f"log_hf_ratio[{c}]"] = float(np.log10(max(hf, 1e-6)))
        out[f"saturated[{c}]"] = float(np.mean((ch <= lo + tol) | (ch >= hi - tol)))
    return out


@dataclass
class OodDecision:
    """Why a frame is (not) out of distribution: the score and what was out of range."""

    flagged: bool
    score: float
    score_threshold: float
    reasons: list[str] = field(default_factory=list)
    statistics: dict[str, float] = field(default_factory=dict)


@dataclass
class OodCalibration:
    """Held-out twin scans -> disagreement threshold and allowed input-statistic ranges."""

    score_threshold: float
    ranges: dict[str, tuple[float, float]]
    held_out_scores: list[float] = field(default_factory=list)

    @classmethod
    def fit(cls, scores: list[float], stats: list[dict[str, float]]) -> OodCalibration:
        """Calibrate from held-out frames' disagreement scores and input statistics."""
        if len(scores) < 2 or len(stats) != len(scores):
            raise ValueError("OOD calibration: need >= 2 held-out frames with statistics")
        s = np.asarray(scores, dtype=float)
        med = float(np.median(s))
        sigma = 1.4826 * float(np.median(np.abs(s - med)))
        threshold = max(float(np.quantile(s, 0.99)), med + 3.0 * sigma)
        ranges = {}
        for key in stats[0]:
            if key == "nonfinite":
                continue
            v = np.array([st[key] for st in stats], dtype=float)
            lo, hi = float(v.min()), float(v.max())
            floor = STAT_FLOORS[key.split("[")[0]]
            margin = max(0.5 * (hi - lo), floor)
            ranges[key] = (lo - margin, hi + margin)
        return cls(threshold, ranges, [float(v) for v in s])

    def decide(
        self, channels: np.ndarray, score: float, score_threshold: float | None = None
    ) -> OodDecision:
        """Flag when the input is non-finite, a statistic leaves its range, or score is high."""
        stats = input_statistics(channels)
        thr = self.score_threshold if score_threshold is None else float(score_threshold)
        reasons = []
        if stats["nonfinite"] > 0:
            reasons.append(f"nonfinite={stats['nonfinite']:.3g} (allowed 0)")
        for key, (lo, hi) in self.ranges.items():
            v = stats.get(key)
            if v is None:
                reasons.append(f"{key} missing (channel count differs from training)")
            elif not lo <= v <= hi:
                reasons.append(f"{key}={v:.3g} outside [{lo:.3g}, {hi:.3g}]")
        if not np.isfinite(score) or score > thr:
            reasons.append(f"disagreement={score:.3g} above {thr:.3g}")
        return OodDecision(bool(reasons), float(score), thr, reasons, stats)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ranges"] = {k: list(v) for k, v in self.ranges.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OodCalibration:
        ranges = {str(k): (float(v[0]), float(v[1])) for k, v in d["ranges"].items()}
        scores = [float(v) for v in d.get("held_out_scores", [])]
        return cls(float(d["score_threshold"]), ranges, scores)


def pick_wall_points(
    prob: np.ndarray, spread: np.ndarray, n: int, min_sep_px: float = 3.0, threshold: float = 0.5
) -> list[tuple[int, int]]:
    """Up to n (row, col) pixels on confident walls, strongest first, >= min_sep_px apart.

    Confidence is the ensemble mean minus its spread, so pixels the members argue about
    are not spent on.
    """
    score = prob - spread
    order = np.argsort(score, axis=None)[::-1]
    out: list[tuple[int, int]] = []
    w = prob.shape[1]
    for flat in order:
        if score.flat[flat] < threshold or len(out) >= n:
            break
        r, c = divmod(int(flat), w)
        if all((r - a) ** 2 + (c - b) ** 2 >= min_sep_px**2 for a, b in out):
            out.append((r, c))
    return out
