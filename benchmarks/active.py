"""`scopeloop bench active`: autonomous SPM experiments on twin samples.

Per twin sample the full spectra grid is computed once (switching off) and learners
"measure" from it: the same learner objects the live `spm-active` runner drives.
Metrics: discovery of the top-1% loop-area cells at 10% of the grid (DKL, GP on
position, random, raster), sparse-sampling reconstruction error at 10% and 25%,
decision time per step vs observations, peak memory, and the forward workflow
(walls measured, false positives, out-of-distribution flag).
Seeds are a seed study: each (grid, seed) cell is a Ray task through the sweep
engine's mapper (`agent.sweep.execute.map_on_ray`, 2 workers), and every per-seed
figure is reported as its mean with a 95 % interval (`*_ci95_low`, `*_ci95_high`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _sample_grid(seed: int, n: int) -> tuple[Any, np.ndarray]:
    from drivers.spm_truth import twin_spectra
    from policies.active.grid import CandidateGrid, pfm_channels
    from policies.active.reward import parse_reward
    from simulators.spm import FerroelectricSample, PFMScanner, triangular_waveform

    sample = FerroelectricSample(seed=seed)
    ex, ey = sample.extent_um
    scan = PFMScanner(sample, seed=seed).scan((0.0, 0.0, ex, ey), (n, n))
    chans = pfm_channels(scan["amplitude_pm"], scan["phase_deg"], scan["height_nm"])
    grid = CandidateGrid.over((n, n), (0.0, 0.0), (ex, ey), chans, 5)
    v = triangular_waveform()
    reward = parse_reward("area")
    y = np.array([reward.of_spectrum(v, s) for s in twin_spectra(sample, grid.xy_um, v, seed)])
    return grid, y


def _run(kind: str, grid: Any, y: np.ndarray, budget: int, seed: int, **kw: Any) -> Any:
    from policies.active.learners import ActivePolicyConfig, make_learner

    batch = max(5, budget // 25)
    cfg = ActivePolicyConfig(kind=kind, budget=budget, batch=batch, **kw)  # type: ignore[arg-type]
    learner = make_learner(cfg, grid, seed)
    while not learner.done:
        idx = learner.propose()
        learner.observe(idx, y[idx].tolist())
    return learner


def _top(y: np.ndarray) -> set[int]:
    k = max(1, round(0.01 * y.size))
    return set(np.argsort(y)[-k:].tolist())


def _nrmse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - y) ** 2)) / max(float(y.std()), 1e-12))


KINDS = ("dkl", "gp", "random", "raster")
SEED_WORKERS = 2


def _seed_cell(n: int, seed: int, with_sparse: bool) -> dict[str, Any]:
    """One seed's sample: top-1 % found at a 10 % budget by every learner and, if asked,
    the sparse-reconstruction errors; runs as its own Ray task (one torch thread)."""
    import torch

    torch.set_num_threads(1)
    grid, y = _sample_grid(seed, n)
    top = _top(y)
    budget = max(10, grid.size // 10)
    found, seconds = {}, {}
    for kind in KINDS:
        t0 = time.perf_counter()
        learner = _run(kind, grid, y, budget, seed)
        found[kind] = len(top & set(learner.measured)) / len(top)
        seconds[kind] = time.perf_counter() - t0
    sparse: dict[str, float] = {}
    if with_sparse:
        for pct in (10, 25):
            b = max(10, grid.size * pct // 100)
            for kind, extra in (
                ("gp", {"acquisition": "variance"}),
                ("raster", {}),
                ("random", {}),
            ):
                pred = _run(kind, grid, y, b, seed, **extra).predict()
                sparse[f"{kind}_{pct}"] = _nrmse(pred[0], y) if pred else float("nan")
    return {"n": n, "seed": seed, "found": found, "seconds": seconds, "sparse": sparse}


def _seed_cells(quick: bool, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every (grid size, seed) cell, as Ray tasks through the sweep engine's mapper."""
    from agent.sweep.execute import map_on_ray, ray_session

    plan = [(30, [0, 1])] if quick else [(50, list(range(10))), (100, [0, 1])]
    calls = [
        (n, seed, n == plan[0][0] and seed in seeds[: (1 if quick else 3)])
        for n, seeds in plan
        for seed in seeds
    ]
    cells: list[dict[str, Any]] = []

    def done(_i: int, cell: Any, error: BaseException | None, _s: float) -> None:
        if error is not None:
            raise error
        cells.append(cell)
        for kind in KINDS:
            log(
                f"{cell['n']}x{cell['n']} seed {cell['seed']} {kind}: top1% found "
                f"{cell['found'][kind]:.2f} ({cell['seconds'][kind]:.1f} s)"
            )

    with ray_session(None, SEED_WORKERS, 1.0) as ray:
        map_on_ray(ray, _seed_cell, calls, workers=SEED_WORKERS, cpus_per_call=1.0, on_done=done)
    return sorted(cells, key=lambda c: (c["n"], c["seed"]))


def run(quick: bool, log: Callable[[str], None]) -> dict[str, float | int | str]:
    from agent.sweep.results import put_mean_interval

    metrics: dict[str, float | int | str] = {}
    cells = _seed_cells(quick, log)
    metrics["seeds"] = len(cells)
    found = {kind: [c["found"][kind] for c in cells] for kind in KINDS}
    for kind, vals in found.items():
        put_mean_interval(metrics, f"{kind}_top1pct_found_at_10pct", vals)
    random_found = float(metrics["random_top1pct_found_at_10pct"])
    # Undefined (null in --json) when random found none: too few draws to form a ratio.
    metrics["dkl_vs_random"] = (
        metrics["dkl_top1pct_found_at_10pct"] / random_found if random_found > 0 else float("nan")
    )
    metrics["dkl_top1pct_found_min"] = float(np.min(found["dkl"]))
    sparse_keys = sorted({k for c in cells for k in c["sparse"]})
    for key in sparse_keys:
        kind, pct = key.split("_")
        name = "sparse" if kind == "gp" else kind
        put_mean_interval(
            metrics,
            f"{name}_nrmse_at_{pct}pct",
            [c["sparse"][key] for c in cells if key in c["sparse"]],
        )
    metrics.update(_timing(quick, log))
    metrics.update(_forward(quick, log))
    return metrics


def _timing(quick: bool, log: Callable[[str], None]) -> dict[str, float]:
    """Decision time per step at N observations, on a 100x100 grid (30x30 with --quick).

    One step = everything between "measurements arrived" and "next batch chosen":
    the model update (a warm-started kernel/network refit when due, every
    ``refit_every`` steps, plus the posterior on all N observations), the posterior
    mean and std over every candidate, and the q-batch selection. The learner first
    runs a cold fit on N - 40 observations (the run so far), then 4 consecutive live
    steps of 10 measurements are timed on 2 torch threads; ``dkl_step_s_N`` is their
    mean (so a refit's cost is amortised as in a run) and ``dkl_step_max_s_N`` the
    slowest (a refit step).
    """
    import torch

    from policies.active.grid import CandidateGrid
    from policies.active.learners import ActivePolicyConfig, make_learner

    n = 30 if quick else 100
    rng = np.random.default_rng(0)
    grid = CandidateGrid.over((n, n), (0.0, 0.0), (2.0, 2.0), rng.standard_normal((4, n, n)), 5)
    y = rng.standard_normal(grid.size) + grid.features[:, 12]  # type: ignore[index]
    out: dict[str, float] = {}
    threads = torch.get_num_threads()
    steps = 4
    for obs in (100, 500) if quick else (100, 500, 2000):
        cfg = ActivePolicyConfig(
            kind="dkl", budget=obs + 10 * steps, batch=10, initial=10, fit_steps_first=30
        )
        learner = make_learner(cfg, grid, 0)
        idx = rng.choice(grid.size, obs - 10 * steps, replace=False).tolist()
        learner.observe(idx, y[idx].tolist())
        learner.fit()  # the run so far (cold fit); the timed steps are live ones
        times = []
        torch.set_num_threads(2)
        try:
            for _ in range(steps):
                t0 = time.perf_counter()
                batch = learner.propose()
                times.append(time.perf_counter() - t0)
                learner.observe(batch, y[batch].tolist())
        finally:
            torch.set_num_threads(threads)
        out[f"dkl_step_s_{obs}"] = float(np.mean(times))
        out[f"dkl_step_max_s_{obs}"] = float(np.max(times))
        log(
            f"dkl step at {obs} observations: mean {np.mean(times):.3f} s, "
            f"max {np.max(times):.3f} s ({', '.join(f'{t:.3f}' for t in times)})"
        )
    out["dkl_peak_mb_2000" if not quick else "dkl_peak_mb_500"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    )
    return out


def _forward(quick: bool, log: Callable[[str], None]) -> dict[str, float]:
    """Walls found on held-out twin scans, and the calibrated out-of-distribution flag
    (the one the live forward run uses) on twin scans vs pure-noise frames."""
    from agent.plans.spm_active import forward_scores
    from agent.training.spm_segmenter import (
        SegmenterTrainConfig,
        train_segmenter,
        twin_training_scans,
    )
    from policies.active.segment import pick_wall_points, uncertainty_score

    px = 64 if quick else 96
    config = SegmenterTrainConfig(
        seeds=[10_001, 10_002] if quick else list(range(10_001, 10_007)),
        calib_seeds=list(range(20_001, 20_005 if quick else 20_013)),
        pixels=px,
        steps=60 if quick else 300,
    )
    t0 = time.perf_counter()
    seg, _stats = train_segmenter(config)
    train_s = time.perf_counter() - t0
    test_seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    test_img, test_mask = twin_training_scans(test_seeds, px, jitter=False)
    scores: dict[str, list[float]] = {}
    unc_in, flags_in = [], []
    for img, mask in zip(test_img, test_mask, strict=True):
        prob, spread = seg.predict(img)
        unc_in.append(uncertainty_score(prob, spread))
        flags_in.append(seg.check(img, prob, spread).flagged)
        pts = pick_wall_points(prob, spread, 40)
        for k, v in forward_scores(mask, prob, pts).items():
            scores.setdefault(k, []).append(v)
    rng = np.random.default_rng(5)
    unc_ood, flags_ood = [], []
    for _ in range(3):
        noise = rng.standard_normal(test_img[0].shape)
        prob, spread = seg.predict(noise)
        unc_ood.append(uncertainty_score(prob, spread))
        flags_ood.append(seg.check(noise, prob, spread).flagged)
    out = {f"forward_{k}": float(np.mean(v)) for k, v in scores.items()}
    out["forward_train_s"] = train_s
    out["forward_uncertainty_in_dist"] = float(np.mean(unc_in))
    out["forward_uncertainty_ood"] = float(np.mean(unc_ood))
    out["forward_ood_flag_rate_in_dist"] = float(np.mean(flags_in))
    out["forward_ood_flag_rate_ood"] = float(np.mean(flags_ood))
    log(f"forward: {out}")
    return out
