"""Active learners: which grid cells to measure next, and what the map looks like so far.

One interface for every strategy (``propose`` -> measure -> ``observe`` -> ``predict``),
used unchanged by the live SPM runner and the offline benchmark:

- ``dkl``: deep kernel GP on scan patches + position; structure -> property.
- ``gp``: exact GP on position only (adaptive sparse sampling / GP baseline).
- ``random`` and ``raster``: the baselines; their maps come from a position GP fitted
  to what they measured, so every strategy is compared with the same reconstructor.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from botorch.models import SingleTaskGP
from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.active.acquisition import AcquisitionKind, select_batch
from policies.active.grid import CandidateGrid
from policies.active.models import (
    DTYPE,
    CoordinateGP,
    DeepKernelGP,
    fit_adam,
    transfer_state,
)
from policies.active.posterior import GPPosterior

LearnerKind = Literal["dkl", "gp", "random", "raster"]


class ActivePolicyConfig(BaseModel):
    """Strategy, budget and model settings; every field bounded for one-line errors."""

    model_config = ConfigDict(extra="forbid")

    kind: LearnerKind = "dkl"
    budget: int = Field(250, ge=1, le=1_000_000)  # measurements in the whole run
    batch: int = Field(10, ge=1, le=512)  # measurements proposed per step
    initial: int = Field(20, ge=1, le=100_000)  # space-filling random start
    acquisition: AcquisitionKind = "ucb"
    beta: float = Field(1.0, ge=0.0, le=1e4)  # UCB exploration weight
    travel_penalty: float = Field(0.0, ge=0.0, le=100.0)  # per unit of grid diagonal
    patch: int = Field(5, ge=1, le=31)  # odd patch side (grid cells) for the DKL
    latent: int = Field(3, ge=1, le=16)
    hidden: int = Field(32, ge=2, le=1024)
    fit_steps_first: int = Field(300, ge=1, le=100_000)
    fit_steps: int = Field(20, ge=1, le=100_000)  # Adam steps per kernel refit, warm-started
    refit_every: int = Field(3, ge=1, le=1000)  # steps between kernel/network refits
    fit_points: int = Field(384, ge=16, le=100_000)  # most observations a refit sees
    exact_max: int = Field(768, ge=16, le=100_000)  # above: SGPR posterior (inducing points)
    inducing: int = Field(384, ge=8, le=100_000)
    lr: float = Field(0.02, gt=0.0, le=1.0)
    shortlist: int = Field(64, ge=1, le=100_000)  # candidates the q-acquisition considers
    log_target: bool = False  # model log(reward): for positive, heavy-tailed rewards

    @field_validator("patch")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"must be odd (got {v})")
        return v


class ActiveLearner:
    """Base: bookkeeping of measured cells and values; subclasses choose and predict."""

    def __init__(self, config: ActivePolicyConfig, grid: CandidateGrid, seed: int = 0) -> None:
        self.config = config
        self.grid = grid
        self.seed = int(seed)
        self.rng = np.random.default_rng(seed)
        self.measured: list[int] = []
        self.values: list[float] = []
        self._taken = np.zeros(grid.size, dtype=bool)
        self.last_fit_s = 0.0

    @property
    def done(self) -> bool:
        return len(self.measured) >= min(self.config.budget, self.grid.size)

    def remaining(self) -> int:
        return min(self.config.budget, self.grid.size) - len(self.measured)

    def observe(self, indices: list[int], values: list[float]) -> None:
        """Record measurements (NaN values count as measured but are not modelled)."""
        for i, v in zip(indices, values, strict=True):
            if not self._taken[i]:
                self._taken[i] = True
                self.measured.append(int(i))
                self.values.append(float(v))

    def _random_unmeasured(self, n: int) -> list[int]:
        free = np.flatnonzero(~self._taken)
        return [int(i) for i in self.rng.choice(free, size=min(n, free.size), replace=False)]

    def propose(self, n: int | None = None) -> list[int]:
        raise NotImplementedError

    def predict(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Posterior mean and std (reward units) over the whole grid; None without data."""
        raise NotImplementedError

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(self.measured, dtype=int)
        y = np.asarray(self.values, dtype=float)
        ok = np.isfinite(y)
        if self.config.log_target:
            ok &= y > 0
            y = np.where(ok, np.log(np.where(ok, y, 1.0)), y)
        return idx[ok], y[ok]


class ModelLearner(ActiveLearner):
    """GP (position) or DKL (patch + position): periodic kernel refits, exact updates.

    A step's model update is cheap by construction: the kernel (and the DKL network)
    is refitted with warm-started Adam only every ``refit_every`` data updates, on at
    most ``fit_points`` observations (the best quarter plus a random rest), and the
    candidates' encoder features are recomputed only then. Every data update rebuilds
    the posterior from *all* observations with the kernel held fixed (`GPPosterior`:
    exact, or SGPR above ``exact_max``), so new measurements always count at once.
    """

    def __init__(self, config: ActivePolicyConfig, grid: CandidateGrid, seed: int = 0) -> None:
        super().__init__(config, grid, seed)
        use_patches = config.kind == "dkl"
        if use_patches and grid.features is None:
            raise ValueError("policy.kind: 'dkl' needs scan patches (grid has no features)")
        parts = [grid.features] if use_patches and grid.features is not None else []
        self.patch_dim = int(parts[0].shape[1]) if parts else 0
        self.x = torch.as_tensor(np.hstack([*parts, grid.coords]), dtype=DTYPE)
        self.model: CoordinateGP | DeepKernelGP | None = None
        self.acq_x = self.x  # candidate rows the kernel reads (encoded for the DKL)
        self.posterior: GPPosterior | None = None
        self._fit_n = -1  # observations the current posterior was built from
        self._updates_since_refit = 0
        self._cache: tuple[np.ndarray, np.ndarray] | None = None
        self._cache_n = -1
        torch.manual_seed(seed)

    def _build(self, idx: np.ndarray, y: np.ndarray) -> CoordinateGP | DeepKernelGP:
        tx = self.x[torch.as_tensor(idx)]
        ty = torch.as_tensor(y, dtype=DTYPE).unsqueeze(-1)
        if self.config.kind == "dkl":
            channels = self.patch_dim // (self.config.patch * self.config.patch)
            return DeepKernelGP(
                tx, ty, self.patch_dim, channels, self.config.latent, self.config.hidden
            )
        return CoordinateGP(tx, ty)

    def _fit_subset(self, y: np.ndarray) -> np.ndarray:
        """Rows a kernel refit sees: all, or the best quarter plus a random rest."""
        cap = self.config.fit_points
        if y.size <= cap:
            return np.arange(y.size)
        best = np.argsort(y)[-(cap // 4) :]
        rest = np.setdiff1d(np.arange(y.size), best)
        rng = np.random.default_rng(self.seed + y.size)
        return np.concatenate([best, rng.choice(rest, cap - best.size, replace=False)])

    def _refit_kernel(self, idx: np.ndarray, y: np.ndarray) -> None:
        sub = self._fit_subset(y)
        old = self.model
        torch.manual_seed(self.seed + idx.size)
        model = self._build(idx[sub], y[sub])
        warm = transfer_state(model, old)
        fit_adam(
            model, self.config.fit_steps if warm else self.config.fit_steps_first, self.config.lr
        )
        self.model = model
        self.acq_x = model.encode(self.x) if isinstance(model, DeepKernelGP) else self.x
        self._updates_since_refit = 0
        self.posterior = GPPosterior(
            model.kernel,
            self.acq_x,
            float(model.mean_module.constant.detach().reshape(-1)[0]),
            float(model.likelihood.noise.detach().reshape(-1)[0]),
            self.config.exact_max,
            self.config.inducing,
        )

    def fit(self) -> bool:
        """Posterior on all finite measurements (kernel refitted when due); False if too few."""
        import time

        if self._fit_n == len(self.measured) and self.posterior is not None:
            return True
        idx, y = self.training_data()
        if idx.size < 3 or float(np.ptp(y)) == 0.0:
            return False
        t0 = time.perf_counter()
        self._updates_since_refit += 1
        if self.model is None or self._updates_since_refit >= self.config.refit_every:
            self._refit_kernel(idx, y)
        assert self.posterior is not None
        self.posterior.condition(self.acq_x[torch.as_tensor(idx)], torch.as_tensor(y, dtype=DTYPE))
        self._fit_n = len(self.measured)
        self.last_fit_s = time.perf_counter() - t0
        return True

    def _posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.posterior is not None
        return self.posterior.predict()

    def _acq_model(self, idx: np.ndarray, y: np.ndarray) -> SingleTaskGP:
        """A botorch GP on all data with the current kernel (for ``ipv`` fantasies)."""
        assert self.model is not None
        model = self._build(idx, y)
        transfer_state(model, self.model)
        if isinstance(model, DeepKernelGP):
            return model.freeze()
        model.eval()
        return model

    def _to_reward_units(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[np.ndarray, ...]:
        m, s = mean.numpy(), std.numpy()
        if self.config.log_target:  # lognormal moments back in reward units
            m, s = np.exp(m + 0.5 * s**2), np.exp(m + 0.5 * s**2) * np.sqrt(np.expm1(s**2))
        return m, s

    def predict(self) -> tuple[np.ndarray, np.ndarray] | None:
        if self._cache_n == len(self.measured) and self._cache is not None:
            return self._cache
        if not self.fit():
            return None
        m, s = self._to_reward_units(*self._posterior())
        self._cache, self._cache_n = (m, s), len(self.measured)
        return self._cache

    def propose(self, n: int | None = None) -> list[int]:
        q = min(n or self.config.batch, self.remaining())
        if q <= 0:
            return []
        if len(self.measured) < self.config.initial or not self.fit():
            return self._random_unmeasured(min(q, max(1, self.config.initial - len(self.measured))))
        assert self.posterior is not None
        mean, std = self._posterior()
        free = torch.as_tensor(np.flatnonzero(~self._taken))
        idx, y = self.training_data()
        best = float(np.max(y)) if y.size else 0.0
        tip = None
        if self.config.travel_penalty > 0 and self.measured:
            tip = self.acq_x[self.measured[-1], -2:]
        ipv = self.config.acquisition == "ipv"
        chosen = select_batch(
            self.config.acquisition,
            self._acq_model(idx, y) if ipv else None,
            self.acq_x[free],
            mean[free],
            std[free],
            q,
            best,
            beta=self.config.beta,
            shortlist=self.config.shortlist,
            tip_xy=tip,
            travel_penalty=self.config.travel_penalty,
            seed=self.seed + len(self.measured),
            joint=None if ipv else self.posterior.joint,
        )
        self._cache, self._cache_n = self._to_reward_units(mean, std), len(self.measured)
        return [int(free[i]) for i in chosen]


class RandomLearner(ActiveLearner):
    """Uniformly random cells; map reconstructed by a position GP."""

    def __init__(self, config: ActivePolicyConfig, grid: CandidateGrid, seed: int = 0) -> None:
        super().__init__(config, grid, seed)
        self._recon = ModelLearner(config.model_copy(update={"kind": "gp"}), grid, seed)

    def propose(self, n: int | None = None) -> list[int]:
        return self._random_unmeasured(min(n or self.config.batch, self.remaining()))

    def predict(self) -> tuple[np.ndarray, np.ndarray] | None:
        rec = self._recon
        rec.measured, rec.values = list(self.measured), list(self.values)
        rec.model, rec.posterior = None, None  # one full fit on everything, like a post-hoc map
        rec._fit_n = rec._cache_n = -1
        return rec.predict()


class RasterLearner(RandomLearner):
    """A regular sub-lattice sized to the budget, measured row by row (then the rest)."""

    def __init__(self, config: ActivePolicyConfig, grid: CandidateGrid, seed: int = 0) -> None:
        super().__init__(config, grid, seed)
        h, w = grid.shape
        budget = min(config.budget, grid.size)
        step = max(1.0, math.sqrt(grid.size / budget))
        rows = np.unique(np.floor(np.arange(step / 2, h, step)).astype(int).clip(0, h - 1))
        cols = np.unique(np.floor(np.arange(step / 2, w, step)).astype(int).clip(0, w - 1))
        lattice = [int(r * w + c) for r in rows for c in cols]
        on_lattice = set(lattice)
        rest = [i for i in range(grid.size) if i not in on_lattice]
        self.order = lattice + rest

    def propose(self, n: int | None = None) -> list[int]:
        q = min(n or self.config.batch, self.remaining())
        return [i for i in self.order if not self._taken[i]][:q]


def make_learner(config: ActivePolicyConfig, grid: CandidateGrid, seed: int = 0) -> ActiveLearner:
    """The learner for `config.kind` over `grid`."""
    if config.kind in ("dkl", "gp"):
        return ModelLearner(config, grid, seed)
    if config.kind == "random":
        return RandomLearner(config, grid, seed)
    return RasterLearner(config, grid, seed)
