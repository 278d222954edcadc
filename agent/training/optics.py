"""`scopeloop train` kind `optical-force`: the learned surrogate of the exact optical force.

Exact generalised Lorenz-Mie forces (`simulators.optics.forces`) on random spheres
and positions of the configured domain are the training set; a small MLP with
Fourier input features learns (rho, z, a) -> (Q_rho, Q_phi, Q_z) (Adam, then L-BFGS
on the full set). Training points reach `pad_fraction` beyond every edge of the
domain so the net is not judged on its own boundary. The weights are exported to an
.npz that `simulators.optics.surrogate.ForceSurrogate` evaluates in numpy, so the twin
needs no torch; the shipped file is what `configs/train-optical-force.yaml` makes.

Like the other trainers it reaches the twin's model through the driver side
(`drivers/optics_model.py`), imported only inside the entry point.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from agent.config import load_model_config


class TrainOpticalForceConfig(BaseModel):
    """`scopeloop train` config for kind: optical-force."""

    model_config = ConfigDict(extra="forbid")

    kind: str = "optical-force"
    name: str = "optical-force"
    checkpoint: str = "runs/optical-force-surrogate.npz"
    optics: dict[str, Any] = Field(default_factory=dict)  # TrapOptics fields
    domain: dict[str, Any] = Field(default_factory=dict)  # SurrogateDomain fields
    n_train: int = Field(30_000, ge=100, le=1_000_000)
    n_val: int = Field(4_000, ge=100, le=1_000_000)
    pad_fraction: float = Field(0.08, ge=0.0, le=0.5)
    hidden: int = Field(64, ge=4, le=512)
    layers: int = Field(3, ge=1, le=8)
    fourier_features: int = Field(16, ge=0, le=256)
    fourier_scale: float = Field(1.0, gt=0.0, le=20.0)
    steps: int = Field(6000, ge=1, le=1_000_000)
    batch_size: int = Field(2048, ge=16, le=1_000_000)
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    lbfgs_iterations: int = Field(100, ge=0, le=100_000)
    seed: int = 0
    threads: int = Field(1, ge=1, le=64)
    log_every: int = Field(1000, ge=1)


def _network(
    cfg: TrainOpticalForceConfig, generator: Any, lower: np.ndarray, span: np.ndarray
) -> Any:
    import torch
    from torch import nn

    freqs = torch.randn(3, cfg.fourier_features, generator=generator) * cfg.fourier_scale

    class FourierFeatures(nn.Module):
        """[u, sin(2 pi u B), cos(2 pi u B)]: lets a small MLP follow Mie ripples in size."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("freqs", freqs)

        def forward(self, u: torch.Tensor) -> torch.Tensor:
            p = (2.0 * math.pi) * u @ self.freqs
            return torch.cat((u, torch.sin(p), torch.cos(p)), dim=1)

    class AxisymmetricForce(nn.Module):
        """(rho, z, a) -> (Q_rho, Q_phi, Q_z) with Q_rho, Q_phi = rho * g(rho^2, z, a): odd
        in rho by construction, so the force vanishes on the axis exactly."""

        def __init__(self) -> None:
            super().__init__()
            width_in = 3 + 2 * cfg.fourier_features
            layers: list[nn.Module] = [FourierFeatures()]
            for i in range(cfg.layers):
                layers += [nn.Linear(width_in if i == 0 else cfg.hidden, cfg.hidden), nn.SiLU()]
            layers.append(nn.Linear(cfg.hidden, 3))
            self.trunk = nn.Sequential(*layers)
            self.register_buffer("lower", torch.tensor(lower, dtype=torch.float32))
            self.register_buffer("span", torch.tensor(span, dtype=torch.float32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rho = x[:, :1]
            u = torch.cat((rho * rho, x[:, 1:]), dim=1)
            g = self.trunk(2.0 * (u - self.lower) / self.span - 1.0)
            return torch.cat((rho * g[:, :2], g[:, 2:]), dim=1)

    return AxisymmetricForce()


def _export(net: Any, path: Path, meta: dict[str, Any]) -> int:
    """Weights as plain arrays (the evaluator rebuilds the Fourier features and the
    rho * g structure); returns the file size in bytes."""
    mods = list(net.trunk)
    arrays: dict[str, np.ndarray] = {"freqs": mods[0].freqs.detach().numpy().astype(np.float32)}
    linears = [m for m in mods if m.__class__.__name__ == "Linear"]
    for i, lin in enumerate(linears):
        arrays[f"w{i}"] = lin.weight.detach().numpy().T.astype(np.float32)
        arrays[f"b{i}"] = lin.bias.detach().numpy().astype(np.float32)
    meta = {**meta, "n_layers": len(linears)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    return path.stat().st_size


def train_surrogate(cfg: TrainOpticalForceConfig, log: Any = print) -> dict[str, Any]:
    """Build the exact training set, fit, export, and measure error and speed."""
    import torch

    from drivers.optics_model import (
        ExactForceModel,
        ForceSurrogate,
        SurrogateDomain,
        TrapOptics,
        exact_samples,
    )

    optics = TrapOptics.model_validate(cfg.optics)
    domain = SurrogateDomain.model_validate(cfg.domain)
    lo, hi = domain.lower(), domain.upper()
    pad = cfg.pad_fraction * (hi - lo)
    padded = SurrogateDomain(
        rho_max_um=domain.rho_max_um + pad[0],
        z_min_um=domain.z_min_um - pad[1],
        z_max_um=domain.z_max_um + pad[1],
        radius_min_um=max(domain.radius_min_um - pad[2], 0.5 * domain.radius_min_um),
        radius_max_um=domain.radius_max_um + pad[2],
    )
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.process_time()
    exact = ExactForceModel(optics, padded.radius_max_um, padded.reach_um)
    x_train, y_train = exact_samples(exact, padded, cfg.n_train, rng)
    x_val, y_val = exact_samples(exact, domain, cfg.n_val, rng)
    data_s = time.process_time() - t0
    n_points = cfg.n_train + cfg.n_val
    log(
        f"exact forces: {n_points} points in {data_s:.1f} s CPU "
        f"({1e3 * data_s / n_points:.2f} ms each), n_max {exact.n_max}"
    )
    scale = float(np.abs(y_train).max())
    # The trunk sees (rho^2, z, a) scaled to [-1, 1] on the padded domain.
    lower = np.array([0.0, padded.z_min_um, padded.radius_min_um])
    upper = np.array([padded.rho_max_um**2, padded.z_max_um, padded.radius_max_um])
    xt = torch.tensor(x_train, dtype=torch.float32)
    yt = torch.tensor(y_train / scale, dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    net = _network(cfg, gen, lower, upper - lower)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps)
    t1 = time.process_time()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(xt), (min(cfg.batch_size, len(xt)),), generator=gen)
        loss = torch.mean((net(xt[idx]) - yt[idx]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % cfg.log_every == 0:
            log(f"step {step + 1}: loss {loss.item():.3e}")
    if cfg.lbfgs_iterations:
        lbfgs = torch.optim.LBFGS(
            net.parameters(),
            lr=1.0,
            max_iter=cfg.lbfgs_iterations,
            history_size=50,
            line_search_fn="strong_wolfe",
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

        def closure() -> Any:
            lbfgs.zero_grad()
            full = torch.mean((net(xt) - yt) ** 2)
            full.backward()
            return full

        lbfgs.step(closure)
    train_s = time.process_time() - t1
    meta = {
        "optics": optics.model_dump(mode="json"),
        "domain": domain.model_dump(mode="json"),
        "input_lower": lower.tolist(),
        "input_upper": upper.tolist(),
        "output_scale": scale,
        "units": "efficiency Q (F = Q n_medium P / c); inputs rho_um, z_um, radius_um",
        "structure": "Q_rho, Q_phi = rho * g(rho^2, z, a)[:2]; Q_z = g[2]",
    }
    path = Path(cfg.checkpoint)
    size = _export(net, path, meta)
    surrogate = ForceSurrogate(path)
    pred = surrogate.cylindrical(x_val)
    peak = float(np.abs(y_val).max())
    err = np.abs(pred - y_val)
    # Speed per force evaluation, both batched over the same points, same process, one
    # BLAS thread (a shared machine's threads would time the scheduler, not the model).
    from threadpoolctl import threadpool_limits

    probe = x_val[: min(len(x_val), 1000)]
    pts = np.column_stack((probe[:, 0], np.zeros(len(probe)), probe[:, 1]))
    reps = 20
    with threadpool_limits(1):
        t2 = time.process_time()
        exact.efficiency(pts, probe[:, 2])
        exact_s = (time.process_time() - t2) / len(probe)
        t3 = time.process_time()
        for _ in range(reps):
            surrogate.cylindrical(probe)
        surrogate_s = (time.process_time() - t3) / (reps * len(probe))
    summary = {
        "checkpoint": str(path),
        "checkpoint_bytes": size,
        "val_force_error_max": float(err.max() / peak),
        "val_force_error_rms": float(np.sqrt(np.mean(err**2)) / peak),
        "val_peak_efficiency": peak,
        "peak_force_fn_per_mw": peak * optics.fn_per_mw,
        "exact_ms_per_eval": exact_s * 1e3,
        "surrogate_us_per_eval": surrogate_s * 1e6,
        "speedup": exact_s / surrogate_s,
        "data_cpu_s": data_s,
        "train_cpu_s": train_s,
        "n_train": cfg.n_train,
        "parameters": int(sum(p.numel() for p in net.parameters())),
    }
    return summary


def train_optical_force(config_path: Path, overrides: list[str], console: Any) -> dict[str, Any]:
    """TRAIN_KINDS entry "optical-force" (`scopeloop train CONFIG`)."""
    from pydantic import ValidationError

    from agent.config import ConfigError, format_validation_error
    from drivers.optics_model import SurrogateDomain, TrapOptics

    cfg = load_model_config(config_path, overrides, TrainOpticalForceConfig)
    for section, model in (("optics", TrapOptics), ("domain", SurrogateDomain)):
        try:
            model.model_validate(getattr(cfg, section))
        except ValidationError as exc:
            raise ConfigError(f"{section}: {format_validation_error(exc)}") from None
    summary = train_surrogate(cfg, log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(
        f"surrogate saved to {summary['checkpoint']} "
        f"({summary['checkpoint_bytes'] / 1e3:.0f} kB): "
        f"val max error {100 * summary['val_force_error_max']:.2f} % of peak, rms "
        f"{100 * summary['val_force_error_rms']:.3f} %; {summary['surrogate_us_per_eval']:.2f} us "
        f"vs exact {summary['exact_ms_per_eval']:.2f} ms per force ({summary['speedup']:.0f}x)",
        highlight=False,
        markup=False,
    )
    return summary
