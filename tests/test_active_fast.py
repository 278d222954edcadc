"""Fast DKL steps and drift registration: incremental posteriors, shortlist batches, NCC."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from policies.active.acquisition import select_batch
from policies.active.models import DTYPE, CoordinateGP, fit_adam, predict
from policies.active.posterior import GPPosterior
from policies.active.register import locate


def _fitted() -> tuple[CoordinateGP, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(200, 2, dtype=DTYPE)
    y = torch.sin(6 * x[:, :1]) + 0.1 * torch.randn(200, 1, dtype=DTYPE)
    model = CoordinateGP(x, y)
    fit_adam(model, 40)
    return model, x, y, torch.rand(500, 2, dtype=DTYPE)


def _posterior(model: CoordinateGP, cand: torch.Tensor, **kw: int) -> GPPosterior:
    c = float(model.mean_module.constant.detach())
    return GPPosterior(model.kernel, cand, c, float(model.likelihood.noise.detach()), **kw)


def test_appended_posterior_equals_the_exact_gp() -> None:
    model, x, y, cand = _fitted()
    mean, std = predict(model, cand)
    post = _posterior(model, cand)
    post.condition(x[:120], y[:120])  # a run so far, then two steps of new points
    post.condition(x[:170], y[:170])
    post.condition(x, y)
    m2, s2 = post.predict()
    assert torch.allclose(m2, mean, atol=1e-6) and torch.allclose(s2, std, atol=1e-6)
    jm, jc = post.joint(cand[:6])
    assert torch.allclose(jm, mean[:6], atol=1e-6)
    assert torch.allclose(jc.diagonal().sqrt(), std[:6], atol=1e-6)


def test_sparse_posterior_is_close_to_exact_above_exact_max() -> None:
    model, x, y, cand = _fitted()
    mean, std = predict(model, cand)
    post = _posterior(model, cand, exact_max=100, inducing=80)
    post.condition(x[:150], y[:150])
    post.condition(x, y)
    assert not post.exact and post.size <= 80
    m2, s2 = post.predict()
    scale = float(y.std())
    assert float((m2 - mean).abs().max()) < 0.05 * scale
    assert float((s2 - std).abs().max()) < 0.05 * scale


def test_shortlist_batches_are_distinct_and_favour_high_ucb() -> None:
    model, x, y, cand = _fitted()
    post = _posterior(model, cand)
    post.condition(x, y)
    mean, std = post.predict()
    out = select_batch("ucb", None, cand, mean, std, 8, float(y.max()), beta=1.0, joint=post.joint)
    assert len(set(out)) == 8
    ucb = mean + std
    assert float(ucb[out].min()) >= float(torch.topk(ucb, 64).values.min())


def test_locate_recovers_a_subpixel_shift() -> None:
    rng = np.random.default_rng(3)
    img = ndimage.gaussian_filter(rng.standard_normal((64, 64)), 2)
    for shift in ((1.4, -2.7), (-2.2, 0.6)):
        moved = ndimage.shift(img, shift, mode="wrap") + 0.05 * rng.standard_normal((64, 64))
        dy, dx, score = locate(moved[20:44, 20:44], img[14:50, 14:50], 6)
        assert abs(dy + shift[0]) < 0.25 and abs(dx + shift[1]) < 0.25 and score > 0.8
    noise = rng.standard_normal((24, 24))
    assert locate(noise, img[14:50, 14:50], 6)[2] < 0.6
