"""Choosing the next measurements: analytic screening, then a botorch q-acquisition.

Every acquisition here is maximised and rewards are to be maximised (UCB, EI) or the
map's uncertainty reduced (max variance, integrated variance). A batch of q points is
picked by botorch's sequential-greedy ``optimize_acqf_discrete`` over a shortlist of
the best candidates by the analytic value, so joint (q-) acquisitions stay affordable
on 10^4-point grids. An optional tip-travel penalty subtracts
``penalty * distance / grid diagonal`` from the acquisition (botorch
``PenalizedAcquisitionFunction``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from botorch.acquisition import (
    AcquisitionFunction,
    qExpectedImprovement,
    qUpperConfidenceBound,
)
from botorch.acquisition.active_learning import qNegIntegratedPosteriorVariance
from botorch.acquisition.penalized import PenalizedAcquisitionFunction
from botorch.models import SingleTaskGP
from botorch.models.model import Model
from botorch.optim import optimize_acqf_discrete
from botorch.posteriors.gpytorch import GPyTorchPosterior
from botorch.sampling import SobolQMCNormalSampler
from gpytorch.distributions import MultivariateNormal
from torch import Tensor, nn

JointPosterior = Callable[[Tensor], tuple[Tensor, Tensor]]


class ShortlistModel(Model):
    """A botorch model whose posterior is a fixed joint Gaussian over a few candidates.

    Inputs are rows ``[shortlist index, x, y]``: the index selects the mean and the
    covariance block, the position is there for the travel penalty. The joint posterior
    over the shortlist is computed once per step, so sequential-greedy q-acquisitions
    cost microseconds instead of one GP posterior over all observations per batch point.
    """

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        self._mean = mean
        jitter = 1e-9 * float(cov.diagonal().mean().clamp_min(1e-12))
        self._cov = cov + jitter * torch.eye(cov.shape[0], dtype=cov.dtype)

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def batch_shape(self) -> torch.Size:
        return torch.Size()

    def posterior(  # type: ignore[override]
        self, X: Tensor, posterior_transform: Any = None, **_: Any
    ) -> GPyTorchPosterior:
        idx = X[..., 0].round().long()
        cov = self._cov[idx.unsqueeze(-1), idx.unsqueeze(-2)]
        post = GPyTorchPosterior(MultivariateNormal(self._mean[idx], cov))
        return posterior_transform(post) if posterior_transform is not None else post


AcquisitionKind = Literal["ucb", "ei", "variance", "ipv"]


class TravelPenalty(nn.Module):
    """Distance (in normalised coordinates) of each batch point from the tip, summed."""

    def __init__(self, tip_xy: Tensor) -> None:
        super().__init__()
        self.tip_xy = tip_xy

    def forward(self, x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x[..., -2:] - self.tip_xy, dim=-1).sum(-1) / math.sqrt(2)


def analytic_scores(
    kind: AcquisitionKind, mean: Tensor, std: Tensor, best: float, beta: float
) -> Tensor:
    """Single-point acquisition values from a posterior mean/std (for screening)."""
    if kind == "ucb":
        return mean + math.sqrt(beta) * std
    if kind == "ei":
        s = std.clamp_min(1e-12)
        z = (mean - best) / s
        normal = torch.distributions.Normal(0.0, 1.0)
        return s * (z * normal.cdf(z) + normal.log_prob(z).exp())
    return std  # variance / ipv: put points where the model knows least


def q_acquisition(
    kind: AcquisitionKind,
    model: Model,
    best: float,
    beta: float,
    mc_points: Tensor | None,
    samples: int = 64,
    seed: int = 0,
) -> AcquisitionFunction:
    """The botorch q-acquisition of `kind` (max variance uses qUCB with a huge beta)."""
    sampler = SobolQMCNormalSampler(sample_shape=torch.Size([samples]), seed=seed)
    if kind == "ucb":
        return qUpperConfidenceBound(model, beta=beta, sampler=sampler)
    if kind == "ei":
        return qExpectedImprovement(model, best_f=best, sampler=sampler)
    if kind == "ipv":
        assert mc_points is not None
        return qNegIntegratedPosteriorVariance(model, mc_points=mc_points)
    # Pure exploration: qUCB's beta-weighted spread term dominates the mean.
    return qUpperConfidenceBound(model, beta=1e6, sampler=sampler)


def select_batch(
    kind: AcquisitionKind,
    model: SingleTaskGP | None,
    candidates: Tensor,
    mean: Tensor,
    std: Tensor,
    q: int,
    best: float,
    beta: float = 4.0,
    shortlist: int = 64,
    mc_points: int = 256,
    tip_xy: Tensor | None = None,
    travel_penalty: float = 0.0,
    seed: int = 0,
    joint: JointPosterior | None = None,
) -> list[int]:
    """Indices (into `candidates`) of the next q measurements; never repeats one.

    `mean`/`std` are the model's posterior over all candidates in outcome units;
    already-measured candidates must be excluded by the caller (drop them). With
    `joint` (rows -> posterior mean, covariance) the q-acquisition runs on a
    `ShortlistModel` of the shortlist's joint posterior instead of on `model`
    (not for ``ipv``, which needs the model itself to fantasise).
    """
    n = candidates.shape[0]
    q = min(q, n)
    if q <= 0:
        return []
    scores = analytic_scores(kind, mean, std, best, beta)
    if tip_xy is not None and travel_penalty > 0:
        dist = torch.linalg.vector_norm(candidates[:, -2:] - tip_xy, dim=-1) / math.sqrt(2)
        scale = float(scores[torch.isfinite(scores)].std()) if n > 1 else 1.0
        scores = scores - travel_penalty * dist * max(scale, 1e-12)
    m = min(n, max(shortlist, 2 * q))
    top = torch.topk(torch.nan_to_num(scores, nan=-math.inf), m).indices
    if q == 1 or m == q:
        return top[:q].tolist()
    choices = candidates[top]
    if joint is not None and kind != "ipv":
        mu, cov = joint(choices)
        index = torch.arange(m, dtype=candidates.dtype).unsqueeze(-1)
        choices = torch.cat([index, choices[:, -2:]], -1)
        acqf = q_acquisition(kind, ShortlistModel(mu, cov), best, beta, None, seed=seed)
    else:
        assert model is not None, "select_batch: a model or a joint posterior is needed"
        gen = torch.Generator().manual_seed(seed)
        mc = candidates[torch.randperm(n, generator=gen)[: min(n, mc_points)]]
        acqf = q_acquisition(kind, model, best, beta, mc, seed=seed)
    if tip_xy is not None and travel_penalty > 0:
        scale = float(std.mean()) if kind in ("variance", "ipv") else float(mean.std())
        acqf = PenalizedAcquisitionFunction(
            acqf, TravelPenalty(tip_xy), regularization_parameter=travel_penalty * max(scale, 1e-9)
        )
    with torch.no_grad():
        picked, _ = optimize_acqf_discrete(acqf, q=q, choices=choices, max_batch_size=512)
    # Map chosen rows back to candidate indices (rows are unique within `choices`).
    out: list[int] = []
    for row in picked:
        hit = torch.nonzero((choices == row).all(-1)).flatten()
        idx = int(top[int(hit[0])]) if hit.numel() else -1
        if idx >= 0 and idx not in out:
            out.append(idx)
    for idx in top.tolist():  # top up if duplicates collapsed the batch
        if len(out) >= q:
            break
        if idx not in out:
            out.append(idx)
    return out
