"""The feedback bench's theory against an independent direct simulation, and its metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.control.theory import (
    LoopTiming,
    continuous_delay_variance,
    information_bound_variance,
    optimal_gain,
    position_variance,
    predictor_coefficients,
)


def _direct_variance(timing: LoopTiming, gain: float, predictor: bool, seed: int = 0) -> float:
    """Brute force: many replicas, fine substeps, blur by trapezoid, commands in a queue."""
    rng = np.random.default_rng(seed)
    reps, frames, sub = 3000, 260, 30
    t, d = timing.period_s, timing.diffusion_um2_s
    h = t / sub
    n_exp, n_delay = round(timing.exposure_s / h), round(timing.delay_s / h)
    x = np.zeros(reps)
    u_now = np.zeros(reps)
    queue: list[tuple[int, np.ndarray]] = []
    sent: list[tuple[int, np.ndarray]] = []  # (start step, command) for the predictor
    samples = []
    step = 0
    for _ in range(frames):
        blur = np.zeros(reps)
        for j in range(sub):
            while queue and queue[0][0] <= step:
                u_now = queue.pop(0)[1]
            if j == sub - n_exp:
                blur += 0.5 * x
            x = x + u_now * h + rng.normal(0.0, math.sqrt(2 * d * h), reps)
            step += 1
            if j >= sub - n_exp:
                blur += x if j < sub - 1 else 0.5 * x
        y = blur / n_exp + rng.normal(0.0, timing.noise_um, reps)
        if predictor:  # displacement of the sent commands from blur centre to application
            t0, t1 = step - n_exp / 2, step + n_delay
            for k, (start, u) in enumerate(sent):
                end = sent[k + 1][0] if k + 1 < len(sent) else math.inf
                span = min(end, t1) - max(start, t0)
                if span > 0:
                    y = y + u * span * h
        u = -gain * y
        queue.append((step + n_delay, u))
        sent.append((step + n_delay, u))
        sent = sent[-20:]
        samples.append(x.copy())
    return float(np.var(np.array(samples[60:])))


@pytest.mark.parametrize("predictor", [False, True])
def test_theory_matches_direct_simulation(predictor: bool) -> None:
    timing = LoopTiming(0.03, 0.02, 0.07, 0.33, noise_um=0.02)
    gain = 12.0 if predictor else 6.0
    theory = position_variance(timing, gain, predictor)
    direct = _direct_variance(timing, gain, predictor)
    # ~600k correlated samples: a few percent of statistical error at most.
    assert direct == pytest.approx(theory, rel=0.04)


def test_small_period_limit_is_the_continuous_delay_formula() -> None:
    timing = LoopTiming(0.0005, 0.0005, 0.1, 0.33)
    assert position_variance(timing, 5.0) == pytest.approx(
        continuous_delay_variance(0.33, 5.0, 0.1 + 0.0005), rel=0.01
    )
    # Past g * tau = pi / 2 the delayed loop has no steady state.
    assert position_variance(LoopTiming(0.01, 0.01, 0.4, 0.33), 5.0) == math.inf


def test_predictor_coefficients_cover_the_gap_and_bound_holds() -> None:
    timing = LoopTiming(0.03, 0.03, 0.125, 0.33)
    c = predictor_coefficients(timing, 8)
    # Commands cover [blur centre, application] = E/2 + L exactly once.
    assert c.sum() == pytest.approx(0.015 + 0.125)
    g, var = optimal_gain(timing, predictor=True)
    assert information_bound_variance(timing) <= var < position_variance(timing, 4.0)
    assert 0 < g <= 1 / 0.03 + 1e-9


def test_quick_bench_reports_consistent_metrics() -> None:
    from benchmarks.feedback import run

    m = run(True, lambda _msg: None)
    assert m["sweep_var_rel_dev_max"] < 0.15  # measured variance follows the theory
    for key in ("sweep_g4_d0ms", "sweep_g4_d125ms"):
        assert m[f"{key}_k_fn_per_um"] == pytest.approx(m[f"{key}_k_theory_fn_per_um"], rel=0.2)
    # Delay lowers the stiffness a P trap really imposes.
    assert m["sweep_g4_d125ms_k_theory_fn_per_um"] < m["sweep_g4_d0ms_k_theory_fn_per_um"]
    assert 0.0 < m["rms_reduction_delay_comp"] <= m["rms_reduction_bound"] + 0.05
    assert m["double_well_barrier_kt"] > 0.5 and m["double_well_crossings"] >= 1
    assert m["path_rms_um"] < m["path_p_rms_um"]
    assert m["multi_hold_rms_um"] < 0.6
