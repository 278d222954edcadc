"""Learned stiffness estimator: a small conv + GRU network trained on twin trajectories.

DeepCalib-style: trained on exact OU trajectories (``simulate_ou``, optional noise and
blur) with k log-uniform over the configured range, it outputs ln k and a log-variance
(Gaussian NLL head), so each estimate carries an uncertainty. The GRU reads any length;
with ``n_points_min`` each batch has its own length, log-uniform up to ``n_points``, so
one network serves (and states its uncertainty for) short and long records alike.
Positions are centred on their mean and scaled by fixed physical scales (the stationary
sd at the geometric mid k, and the free-diffusion step sqrt(2 D dt)), so the variance
information is kept.
The checkpoint stores the physics it was trained for; using it at another dt,
temperature or radius is refused rather than silently wrong.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .physics import WATER_VISCOSITY_PA_S, check_positive, check_series, physics
from .simulate import simulate_ou
from .types import Estimate

Z95 = 1.959963984540054


class TrainCalibrationConfig(BaseModel):
    """`scopeloop train` config for kind: calibration-estimator."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "calibration-estimator"
    name: str = "calibration-estimator"
    checkpoint: str = "runs/calibration-estimator.pt"
    dt: float = Field(0.01, gt=0.0, le=10.0)
    n_points: int = Field(1000, ge=20, le=100_000)
    n_points_min: int | None = Field(None, ge=20, le=100_000)
    k_min: float = Field(0.3, gt=0.0)
    k_max: float = Field(316.0, gt=0.0)
    temperature_k: float = Field(300.0, gt=0.0, le=1000.0)
    radius_um: float = Field(0.1, gt=0.0, le=100.0)
    viscosity_pa_s: float = Field(WATER_VISCOSITY_PA_S, gt=0.0)
    noise_um: float = Field(0.0, ge=0.0, le=1.0)
    blur: bool = False
    # D unknown: each trajectory's drag is the configured one times a log-uniform factor
    # in [1/diffusion_spread, diffusion_spread] (1 = D known, DeepCalib's protocol).
    diffusion_spread: float = Field(1.0, ge=1.0, le=100.0)
    # Train (and then require) the trap centre known at 0 instead of each record's mean.
    known_center: bool = False
    hidden: int = Field(48, ge=4, le=512)
    stride: int = Field(4, ge=1, le=64)
    steps: int = Field(400, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=2, le=4096)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    seed: int = 0
    threads: int = Field(1, ge=1, le=64)
    log_every: int = Field(25, ge=1)

    @model_validator(mode="after")
    def _range(self) -> TrainCalibrationConfig:
        if self.k_max <= self.k_min:
            raise ValueError(f"k_max must exceed k_min ({self.k_min})")
        if self.n_points_min is not None and self.n_points_min > self.n_points:
            raise ValueError(f"n_points_min must not exceed n_points ({self.n_points})")
        return self


def _net(hidden: int, stride: int) -> Any:
    import torch
    from torch import nn

    class CalibNet(nn.Module):
        """Strided conv front end (shortens the sequence) + GRU + (mean, log var) head."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, hidden, kernel_size=stride, stride=stride)
            self.gru = nn.GRU(hidden, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 2)

        def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, T, 3) -> (B, 2)
            h = torch.relu(self.conv(feats.transpose(1, 2))).transpose(1, 2)
            _, last = self.gru(h)
            return self.head(last[-1])

    return CalibNet()


def _scales(meta: dict[str, float]) -> tuple[float, float]:
    kt, gamma = physics(meta["temperature_k"], meta["radius_um"], meta["viscosity_pa_s"])
    k_mid = math.sqrt(meta["k_min"] * meta["k_max"])
    return math.sqrt(kt / k_mid), math.sqrt(2.0 * kt / gamma * meta["dt"])


def _features(xs: np.ndarray, meta: dict[str, float], center_um: float | None = None) -> np.ndarray:
    """(B, T) positions -> (B, T, 3): centred position, step, squared centred position.

    Centred on ``center_um`` when the trap centre is known, else on each record's mean."""
    s_pos, s_step = _scales(meta)
    centre = xs.mean(axis=1, keepdims=True) if center_um is None else center_um
    z = (xs - centre) / s_pos
    step = np.diff(xs, axis=1, prepend=xs[:, :1]) / s_step
    return np.stack([np.arcsinh(z), step, np.log1p(z * z)], axis=-1).astype(np.float32)


def _length(cfg: TrainCalibrationConfig, rng: np.random.Generator) -> int:
    """This batch's trajectory length: fixed, or log-uniform from n_points_min."""
    if cfg.n_points_min is None:
        return cfg.n_points
    return round(math.exp(rng.uniform(math.log(cfg.n_points_min), math.log(cfg.n_points))))


def _batch(cfg: TrainCalibrationConfig, rng: np.random.Generator, size: int, n: int):
    ln_k = rng.uniform(math.log(cfg.k_min), math.log(cfg.k_max), size)
    spread = math.log(cfg.diffusion_spread)
    visc = cfg.viscosity_pa_s * np.exp(rng.uniform(-spread, spread, size))
    xs = np.stack(
        [
            simulate_ou(
                math.exp(v),
                n,
                cfg.dt,
                cfg.temperature_k,
                cfg.radius_um,
                rng,
                noise_um=float(rng.uniform(0.0, cfg.noise_um)) if cfg.noise_um else 0.0,
                blur=cfg.blur,
                viscosity_pa_s=float(eta),
            )
            for v, eta in zip(ln_k, visc, strict=True)
        ]
    )
    return xs, ln_k


def _meta(cfg: TrainCalibrationConfig) -> dict[str, Any]:
    keys = (
        "dt",
        "n_points",
        "n_points_min",
        "k_min",
        "k_max",
        "temperature_k",
        "radius_um",
        "viscosity_pa_s",
        "noise_um",
        "blur",
        "diffusion_spread",
        "known_center",
        "hidden",
        "stride",
    )
    return {k: getattr(cfg, k) for k in keys}


def train_estimator(cfg: TrainCalibrationConfig, log: Any = print) -> dict[str, Any]:
    """Train on freshly simulated batches, save the checkpoint, return a summary.

    The validation MAE is measured on 128 trajectories of ``n_points`` points.
    """
    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    meta = _meta(cfg)
    net = _net(cfg.hidden, cfg.stride)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    val_x, val_y = _batch(cfg, np.random.default_rng(cfg.seed + 10_000), 128, cfg.n_points)
    centre = 0.0 if cfg.known_center else None
    val_f = torch.from_numpy(_features(val_x, meta, centre))
    t0 = time.perf_counter()
    loss_v = math.nan
    for step in range(1, cfg.steps + 1):
        xs, ln_k = _batch(cfg, rng, cfg.batch_size, _length(cfg, rng))
        out = net(torch.from_numpy(_features(xs, meta, centre)))
        target = torch.from_numpy(ln_k.astype(np.float32))
        mean, log_var = out[:, 0], out[:, 1].clamp(-10.0, 6.0)
        loss = 0.5 * (log_var + (target - mean) ** 2 / log_var.exp()).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                mae = float((net(val_f)[:, 0].numpy() - val_y).__abs__().mean())
            log(
                f"step {step}/{cfg.steps}  nll {loss_v:.3f}  val MAE ln k {mae:.3f}  "
                f"{time.perf_counter() - t0:.0f} s"
            )
    with torch.no_grad():
        val_mae = float(np.abs(net(val_f)[:, 0].numpy() - val_y).mean())
    baseline = float(np.abs(val_y - 0.5 * (math.log(cfg.k_min) + math.log(cfg.k_max))).mean())
    path = Path(cfg.checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "meta": meta}, path)
    return {
        "checkpoint": str(path),
        "val_mae_lnk": val_mae,
        "prior_mid_mae_lnk": baseline,
        "final_nll": loss_v,
        "seconds": time.perf_counter() - t0,
        "steps": cfg.steps,
    }


_CACHE: dict[str, tuple[Any, dict[str, Any]]] = {}


def load_estimator(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(network, meta) from a checkpoint; ValueError naming the checkpoint if unusable."""
    import torch

    key = str(Path(path).resolve())
    if key not in _CACHE:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"checkpoint {path} does not exist")
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
            meta = dict(blob["meta"])
            net = _net(int(meta["hidden"]), int(meta["stride"]))
            net.load_state_dict(blob["state_dict"])
        except Exception as exc:  # any unreadable file is the same user error
            raise ValueError(
                f"checkpoint {path} is not a calibration-estimator checkpoint "
                f"({type(exc).__name__})"
            ) from None
        net.eval()
        _CACHE[key] = (net, meta)
    return _CACHE[key]


def learned_estimate(
    x: ArrayLike,
    dt: float,
    checkpoint: str | Path,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    center_um: float | None = None,
) -> Estimate:
    """k (fN/um) with stderr and 95 % interval from the network's Gaussian head.

    ``center_um``: the known trap centre, used instead of the record's own mean (which
    on a short record sits closer to the path than the centre does, so the variance,
    hence k, comes out biased high); only for a checkpoint trained with
    ``known_center``, which requires it. A checkpoint trained with ``diffusion_spread``
    > 1 does not assume the drag (D unknown within that factor)."""
    import torch

    arr = check_series(x, "x", min_len=max(10, 1))
    dt = check_positive(dt, "dt")
    net, meta = load_estimator(checkpoint)
    checked = [("dt", dt), ("temperature_k", temperature_k)]
    if float(meta.get("diffusion_spread", 1.0)) == 1.0:  # trained for one drag only
        checked.append(("radius_um", radius_um))
    for name, value in checked:
        if abs(value / float(meta[name]) - 1.0) > 0.01:
            raise ValueError(
                f"{name}={value} differs from the checkpoint's {meta[name]} "
                "(train one for these settings)"
            )
    trained_centre = bool(meta.get("known_center", False))
    if trained_centre and center_um is None:
        raise ValueError("this checkpoint was trained with the trap centre known: pass center_um")
    if center_um is not None and not trained_centre:
        raise ValueError(
            "center_um given but this checkpoint centres each record on its mean "
            "(train with known_center: true to use a known centre)"
        )
    if arr.size < int(meta["stride"]):
        raise ValueError(f"x needs at least {meta['stride']} samples for this checkpoint")
    with torch.no_grad():
        feats = _features(arr[None, :], meta, center_um)
        out = net(torch.from_numpy(feats))[0].numpy()
    ln_k, sd = float(out[0]), float(math.exp(0.5 * float(np.clip(out[1], -10.0, 6.0))))
    k = math.exp(ln_k)
    return Estimate(
        k, k * sd, "fN/um", (k * math.exp(-Z95 * sd), k * math.exp(Z95 * sd)), "learned"
    )


__all__ = [
    "TrainCalibrationConfig",
    "learned_estimate",
    "load_estimator",
    "train_estimator",
]
