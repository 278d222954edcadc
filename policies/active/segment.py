"""Domain-wall segmentation by an ensemble of small U-Nets; disagreement = uncertainty.

Each member is a two-level U-Net (a few thousand weights) trained from a different
seed on random crops of twin scans labelled with the twin's true walls. The ensemble
mean is the wall probability; the members' spread (std) tells where the nets do not
agree, and a frame whose spread is high overall is out of distribution: the forward
workflow then flags it instead of acting on it (cf. ResHedNet ensembles).
"""

from __future__ import annotations

from dataclasses import dataclass
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

    def __init__(self, nets: list[SmallUNet]) -> None:
        if not nets:
            raise ValueError("segmenter: the ensemble is empty")
        self.nets = nets

    @torch.no_grad()
    def predict(self, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean probability, std across members), each (H, W), for a (C, H, W) image."""
        x = torch.as_tensor(np.asarray(channels, np.float32))[None]
        probs = torch.stack([torch.sigmoid(n(x))[0, 0] for n in self.nets])
        return probs.mean(0).numpy(), probs.std(0, unbiased=False).numpy()

    def save(self, path: Path) -> None:
        width = self.nets[0].down[0].out_channels
        in_ch = self.nets[0].down[0].in_channels
        torch.save(
            {"width": width, "in_channels": in_ch, "states": [n.state_dict() for n in self.nets]},
            path,
        )

    @classmethod
    def load(cls, path: Path) -> WallSegmenter:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        nets = []
        for state in blob["states"]:
            net = SmallUNet(int(blob["in_channels"]), int(blob["width"]))
            net.load_state_dict(state)
            net.eval()
            nets.append(net)
        return cls(nets)


def uncertainty_score(prob: np.ndarray, spread: np.ndarray) -> float:
    """Frame-level disagreement: mean member std where any member sees a wall (>=0.2).

    Averaging over the whole frame would let large agreed-empty areas hide a frame the
    nets do not understand; averaging over candidate-wall pixels does not.
    """
    sel = (prob + 2 * spread) >= 0.2
    return float(spread[sel].mean()) if sel.any() else 0.0


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
