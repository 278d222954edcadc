"""Fixed-drag check of the rotational, double-well and switching models (dragcheck)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.calibration import simulate_ou, stokes_friction, thermal_energy
from policies.calibration.doublewell import simulate_double_well
from policies.calibration.dragcheck import (
    increment_statistics,
    mode_expectation,
    model_fit,
    switching_expectation,
)
from policies.calibration.rotational import simulate_rotational
from policies.calibration.switching import simulate_switching

DT = 0.01
KT = thermal_energy(300.0)
D = KT / stokes_friction(0.1)


def test_short_lag_statistics_ignore_localisation_noise() -> None:
    # free diffusion with noise twice the step: G_1 = G_2 = D dt, the noise cancels
    rng = np.random.default_rng(1)
    steps = rng.normal(0.0, math.sqrt(2 * D * DT), 20000)
    x = np.cumsum(steps) + rng.normal(0.0, 0.4, steps.size)
    stats, cov = increment_statistics(x)
    se = np.sqrt(np.diag(cov))
    assert np.all(np.abs(stats - D * DT) < 4 * se)
    naive = np.mean(np.diff(x) ** 2) / 2  # what the noise does to the plain estimate
    assert naive > 5 * D * DT


@pytest.mark.parametrize("k", [5.0, 200.0])
def test_ou_expectation_matches_blurred_noisy_simulation(k: float) -> None:
    x = simulate_ou(k, 40000, DT, rng=2, noise_um=0.03, blur=True)
    stats, cov = increment_statistics(x)
    se = np.sqrt(np.diag(cov))
    v = KT / k
    # a blur-blind fit sees the frames' variance; the expectation undoes the narrowing
    seen = float(np.var(simulate_ou(k, 40000, DT, rng=3, blur=True)))
    model = mode_expectation(np.array([seen]), np.array([1 / seen]), np.zeros(1), DT, DT, 0.0)
    assert np.all(np.abs(stats - model(np.array([D]), (0.0,))[0]) < 4 * se)
    unblurred = mode_expectation(np.array([v]), np.array([1 / v]), np.zeros(1), DT, 0.0, 0.0)
    off = np.abs(stats - unblurred(np.array([D]), (0.0,))[0]) > 4 * se
    assert off.any() == (k > 100)  # blur matters once the relaxation nears the exposure


def test_switching_expectation_with_one_stiffness_is_the_ou_one() -> None:
    v = KT / 40.0
    ou = mode_expectation(np.array([v]), np.array([1 / v]), np.zeros(1), DT, DT, 0.0)
    sw = switching_expectation(np.full(999, 40.0), KT, DT, DT, (0.0, 0.0))
    d = np.array([0.5 * D, D, 3 * D])
    np.testing.assert_allclose(sw(d, (0.0, 0.0)), ou(d, (0.0,)), rtol=1e-6)


@pytest.mark.parametrize(
    ("model", "cols"),
    [
        (
            "rotational",
            dict(zip("xy", simulate_rotational(60.0, 8.0, 1500, DT, rng=4).T, strict=True)),
        ),
        ("double-well", {"x": simulate_double_well(1.5, 3.0, 1500, DT, rng=5)}),
        ("switching", {"x": simulate_switching(5.0, 80.0, 1.5, 1200, DT, rng=7)}),
    ],
)
def test_true_drag_accepted_and_11x_off_refused(model: str, cols: dict) -> None:
    data = model_fit(model, cols, DT, 0.0, 300.0)
    assert data is not None
    right = data.check(D)
    assert right.consistent and right.checkable
    lo, hi = right.interval
    assert lo < D < hi
    assert not data.check(11 * D).consistent
    assert not data.check(D / 11).consistent


def test_too_short_a_record_is_not_checked() -> None:
    x = simulate_double_well(1.2, 3.0, 100, DT, rng=6)
    assert model_fit("double-well", {"x": x}, DT, 0.0, 300.0) is None
