"""Calibration beyond the plain harmonic trap: exposure blur in the exact likelihood,
double-well and switching fields, exact rotational ML, online tracking, learned model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.calibration import bayes_ou, simulate_ou, stokes_friction, thermal_energy
from policies.calibration.doublewell import (
    exact_double_well,
    forma_double_well,
    simulate_double_well,
)
from policies.calibration.likelihood import ou_loglik
from policies.calibration.online import OnlineStiffness
from policies.calibration.rotational import (
    exact_rotational,
    forma_rotational,
    simulate_rotational,
)
from policies.calibration.switching import estimate_switching, simulate_switching

DT = 0.01
KT = thermal_energy(300.0)
GAMMA = stokes_friction(0.1)


def test_exact_blur_simulation_matches_brute_force_averaging() -> None:
    k, m = 200.0, 100
    exact = simulate_ou(k, 100_000, DT, rng=0, blur=True)
    fine = simulate_ou(k, 10_000 * m, DT / m, rng=1).reshape(10_000, m).mean(axis=1)
    assert exact.var() == pytest.approx(fine.var(), rel=0.06)
    lag = [np.corrcoef(v[:-1], v[1:])[0, 1] for v in (exact, fine)]
    assert lag[0] == pytest.approx(lag[1], abs=0.03)
    assert exact.var() < 0.8 * KT / k


def test_blur_aware_bayes_removes_the_blur_bias() -> None:
    rng = np.random.default_rng(3)
    k = 200.0
    aware, naive = [], []
    for _ in range(6):
        x = simulate_ou(k, 1000, DT, rng=rng, blur=True, noise_um=0.02)
        aware.append(math.log(bayes_ou(x, DT, noise_um=None, exposure_s=DT).value / k))
        naive.append(math.log(bayes_ou(x, DT, noise_um=None).value / k))
    assert abs(np.mean(aware)) < 0.1
    assert np.mean(naive) > 0.2  # blur hides motion: ignoring it overstates k
    with pytest.raises(ValueError, match="exposure_s"):
        bayes_ou(simulate_ou(5.0, 100, DT, rng=1), DT, exposure_s=2 * DT)


def test_vanishing_exposure_recovers_the_unblurred_likelihood() -> None:
    x = simulate_ou(20.0, 300, DT, rng=4)
    ks = np.array([2.0, 20.0, 200.0])
    np.testing.assert_allclose(
        ou_loglik(x, ks, DT, KT, GAMMA, 0.0, None, True, 1e-9),
        ou_loglik(x, ks, DT, KT, GAMMA, 0.0),
        rtol=1e-6,
    )


def test_double_well_exact_likelihood_beats_forma_on_the_barrier() -> None:
    x = simulate_double_well(1.5, 3.0, 4000, DT, rng=5)
    exact, lin = exact_double_well(x, DT), forma_double_well(x, DT)
    assert exact["L"].value == pytest.approx(1.5, rel=0.05)
    assert abs(exact["barrier"].value - 3.0) < 3 * exact["barrier"].stderr + 0.1
    assert abs(exact["barrier"].value - 3.0) < abs(lin["barrier"].value - 3.0)
    assert exact["barrier"].unit == "kT" and exact["L"].unit == "um"


@pytest.mark.parametrize(("k_low", "k_high", "period"), [(5.0, 50.0, 2.0), (2.0, 20.0, 0.5)])
def test_switching_estimator_recovers_levels_and_period(
    k_low: float, k_high: float, period: float
) -> None:
    x = simulate_switching(k_low, k_high, period, 3000, DT, rng=6, phase_s=0.3)
    est = estimate_switching(x, DT)
    assert est["period"].value == pytest.approx(period, rel=0.02)
    assert est["k_high"].value == pytest.approx(k_high, rel=0.35)
    assert est["k_low"].value < 0.5 * est["k_high"].value
    assert est["k_low"].interval[0] <= k_low <= est["k_low"].interval[1] * 1.5


def test_exact_rotational_ml_beats_linear_forma_on_fast_traps() -> None:
    rng = np.random.default_rng(7)
    err_exact, err_forma = [], []
    for _ in range(10):
        xy = simulate_rotational(150.0, 10.0, 1000, DT, rng=rng)
        err_exact.append(abs(math.log(exact_rotational(xy, DT)[0].value / 150.0)))
        err_forma.append(abs(math.log(forma_rotational(xy, DT, exact=False)[0].value / 150.0)))
    assert np.mean(err_exact) < 0.5 * np.mean(err_forma)
    k, w = exact_rotational(simulate_rotational(20.0, 5.0, 5000, DT, rng=8), DT)
    assert w.value == pytest.approx(5.0, abs=4 * w.stderr)
    assert k.interval[0] <= 20.0 <= k.interval[1]


def test_online_estimate_tracks_a_step_within_four_half_lives() -> None:
    half_life = 100
    x = np.concatenate([simulate_ou(10.0, 3000, DT, rng=9), simulate_ou(50.0, 3000, DT, rng=10)])
    est = OnlineStiffness(DT, half_life_frames=half_life)
    ks = np.array([est.update(v) for v in x])
    assert math.isnan(ks[5]) and ks[2999] == pytest.approx(10.0, rel=0.3)
    assert ks[3000 + 4 * half_life] == pytest.approx(50.0, rel=0.3)  # stated lag: 4 half-lives
    assert ks[3000 + half_life // 4] < 30.0  # but it does not jump on a single frame
    settled = ks[3000 + 6 * half_life :]
    assert np.median(np.abs(np.log(settled / 50.0))) < 0.2
    assert est.n_eff == pytest.approx(1 / (1 - 2 ** (-1 / half_life)), rel=0.01)
    with pytest.raises(ValueError, match="half_life_frames"):
        OnlineStiffness(DT, half_life_frames=1)


def test_tiny_learned_estimator_beats_the_prior_midpoint(tmp_path) -> None:
    from policies.calibration.learned import (
        TrainCalibrationConfig,
        learned_estimate,
        train_estimator,
    )

    ck = tmp_path / "ck.pt"
    cfg = TrainCalibrationConfig(
        checkpoint=str(ck),
        n_points=200,
        steps=150,
        batch_size=16,
        hidden=16,
        lr=1e-2,
        log_every=1000,
    )
    summary = train_estimator(cfg, log=lambda _m: None)
    assert ck.is_file()
    assert summary["val_mae_lnk"] < 0.7 * summary["prior_mid_mae_lnk"]
    est = learned_estimate(simulate_ou(30.0, 200, DT, rng=11), DT, ck)
    assert est.unit == "fN/um" and est.stderr > 0 and est.interval[0] < est.value
    with pytest.raises(ValueError, match="dt"):
        learned_estimate(simulate_ou(30.0, 200, DT, rng=11), 2 * DT, ck)


def test_learned_estimator_trains_on_variable_lengths(tmp_path) -> None:
    from pathlib import Path

    from agent.config import load_model_config
    from policies.calibration.learned import (
        TrainCalibrationConfig,
        _length,
        learned_estimate,
        load_estimator,
        train_estimator,
    )

    yaml_path = Path(__file__).resolve().parents[1] / "configs" / "train-calibration.yaml"
    shipped = load_model_config(yaml_path, [], TrainCalibrationConfig)
    assert (shipped.n_points_min, shipped.n_points) == (100, 3000)  # the bench protocol's N
    lengths = np.array([_length(shipped, np.random.default_rng(s)) for s in range(400)])
    assert lengths.min() >= 100 and lengths.max() <= 3000
    assert lengths.min() < 150 and lengths.max() > 2000  # spans the range ...
    assert 400 < np.median(lengths) < 750  # ... log-uniformly (geometric mid 548)
    with pytest.raises(ValueError, match="n_points_min"):
        TrainCalibrationConfig(n_points=100, n_points_min=500)
    ck = tmp_path / "var.pt"
    cfg = TrainCalibrationConfig(
        checkpoint=str(ck), n_points=120, n_points_min=40, steps=20, batch_size=8, hidden=8
    )
    assert train_estimator(cfg, log=lambda _m: None)["steps"] == 20
    assert load_estimator(ck)[1]["n_points_min"] == 40
    for n in (40, 120):
        est = learned_estimate(simulate_ou(30.0, n, DT, rng=n), DT, ck)
        assert math.isfinite(est.value) and est.value > 0 and est.stderr > 0


def test_learned_estimator_with_known_centre_and_unknown_drag(tmp_path) -> None:
    from policies.calibration.learned import (
        TrainCalibrationConfig,
        learned_estimate,
        train_estimator,
    )

    ck = tmp_path / "free.pt"
    cfg = TrainCalibrationConfig(
        checkpoint=str(ck),
        n_points=120,
        steps=10,
        batch_size=8,
        hidden=8,
        diffusion_spread=3.0,
        known_center=True,
    )
    train_estimator(cfg, log=lambda _m: None)
    x = simulate_ou(30.0, 120, DT, rng=1, radius_um=0.25)
    # trained over D within x/3: another bead size is not refused
    est = learned_estimate(x, DT, ck, center_um=0.0, radius_um=0.25)
    assert math.isfinite(est.value) and est.interval[0] < est.value < est.interval[1]
    with pytest.raises(ValueError, match="center_um"):
        learned_estimate(x, DT, ck)
