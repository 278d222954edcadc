"""Drag-free calibration: the scale-family posterior equals brute force, recovers k and D
with the drag unknown, keeps its intervals honest on short records, and the advice
(recommendation, drag check, refusals) reads the data correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policies.calibration import simulate_ou, stokes_friction, thermal_energy
from policies.calibration.advice import diagnose, drag_check, refuse_untrapped
from policies.calibration.dragfree import (
    drag_free_posterior,
    known_noise_posterior,
    posterior_estimates,
    profile_estimate,
)
from policies.calibration.likelihood import blurred_ou, blurred_ou_rate, state_space_loglik
from policies.calibration.physics import drag_coefficient, faxen_lateral_factor

KT = thermal_energy(300.0)


def test_rate_parametrisation_is_the_same_transition() -> None:
    a = blurred_ou(30.0, 0.01, KT, 1.885, 0.006)
    b = blurred_ou_rate(30.0 / 1.885, KT / 30.0, 0.01, 0.006)
    for f in ("a_x", "a_b", "q_xx", "q_xb", "q_bb", "var"):
        assert float(getattr(a, f)) == pytest.approx(float(getattr(b, f)), rel=1e-12)


def test_long_gain_converged_record_matches_the_plain_filter() -> None:
    import policies.calibration.likelihood as lik

    x = simulate_ou(40.0, 3000, 0.01, rng=2, noise_um=0.01, blur=True)
    model = blurred_ou(np.array([[10.0], [40.0], [200.0]]), 0.01, KT, 1.885, 0.01)
    fast = state_space_loglik(x, model, np.array([[1e-4, 4e-4]]))
    old, lik._STEADY_RTOL = lik._STEADY_RTOL, -1.0  # never switch to the lfilter tail
    try:
        slow = state_space_loglik(x, model, np.array([[1e-4, 4e-4]]))
    finally:
        lik._STEADY_RTOL = old
    np.testing.assert_allclose(fast, slow, rtol=1e-9)


def test_mixture_posterior_matches_brute_force_grid() -> None:
    """The closed-form k | (lambda, r) gamma must equal the explicit lattice (noise 0)."""
    x = simulate_ou(20.0, 400, 0.01, rng=3)
    post = drag_free_posterior(x, 0.01, noise_um=0.0)
    lam = post.lam
    ln_k = post.ln_k[5::10]  # block centres of the 10-cell blocks summed below
    model = blurred_ou_rate(lam[:, None], KT / np.exp(ln_k)[None, :], 0.01, 0.0)
    ll = state_space_loglik(x, model, 0.0)
    ll += 0.9 * np.log(0.5 * lam * x.size * 0.01 + 0.5)[:, None]
    brute = np.exp(ll - ll.max()).sum(axis=0)
    brute /= brute.sum()
    mine = post.joint.sum(axis=0).reshape(-1, 10).sum(axis=1)
    mine /= mine.sum()
    assert np.abs(np.cumsum(brute) - np.cumsum(mine)).max() < 0.03


def test_drag_free_recovers_k_and_d_where_a_wrong_stokes_drag_is_11x_off() -> None:
    """The issue's example: k = 50, D = 0.2 um^2/s (a ~1.1 um bead), no radius given."""
    radius = KT / 0.2 / stokes_friction(1.0)  # um, so that D = 0.2
    x = simulate_ou(50.0, 20_000, 0.01, rng=4, radius_um=radius)
    post = drag_free_posterior(x, 0.01)
    est = posterior_estimates(post)
    k, d = est["k"], est["D"]
    assert k.interval[0] <= 50.0 <= k.interval[1] and k.interval[1] / k.interval[0] < 1.5
    assert d.interval[0] <= 0.2 <= d.interval[1] and d.unit == "um^2/s"
    mle = profile_estimate(post)
    assert mle.interval[0] <= 50.0 <= mle.interval[1]
    warn = drag_check(post, KT / stokes_friction(0.1), "the Stokes drag")
    assert warn is not None and "11x" in warn and "\n" not in warn
    assert drag_check(post, 0.2, "the right drag") is None


def test_short_records_intervals_cover_and_are_skewed() -> None:
    rng = np.random.default_rng(5)
    covered, ratios, skew = [], [], []
    for _ in range(30):
        k = math.exp(rng.uniform(math.log(0.3), math.log(1000.0)))
        dt = rng.uniform(3.0, 10.0) * stokes_friction(0.1) / k / 1000
        x = simulate_ou(k, 1000, dt, rng=rng, noise_um=0.1 * math.sqrt(KT / k))
        est = posterior_estimates(drag_free_posterior(x, dt))["k"]
        covered.append(est.interval[0] <= k <= est.interval[1])
        ratios.append(est.value / k)
        up, down = math.log(est.interval[1] / est.value), math.log(est.value / est.interval[0])
        skew.append(abs(up - down) / (up + down))
    assert np.mean(covered) >= 0.85
    assert 0.6 < np.median(ratios) < 1.6
    assert np.mean(skew) > 0.1  # not a symmetric +-1.96 sd interval on ln k


def test_known_noise_limit_is_at_least_as_sharp() -> None:
    x = simulate_ou(30.0, 800, 0.01, rng=6, noise_um=0.03, blur=True)
    unknown = drag_free_posterior(x, 0.01, exposure_s=0.01)
    known = known_noise_posterior(x, 0.01, 0.03, exposure_s=0.01)
    width = lambda p: p.ln_k_quantile(0.975) - p.ln_k_quantile(0.025)  # noqa: E731
    assert width(known) <= 1.1 * width(unknown)
    assert known.ln_k_quantile(0.025) < math.log(30.0) < known.ln_k_quantile(0.975)


def test_drifting_record_is_refused_with_what_is_needed() -> None:
    x = simulate_ou(20.0, 2000, 0.01, rng=7) + np.linspace(0.0, 30.0, 2000)
    post = drag_free_posterior(x, 0.01)
    with pytest.raises(ValueError, match="no restoring force") as info:
        refuse_untrapped(post, diagnose(post, 0.01, 0.0), "x")
    assert "relaxation times" in str(info.value)


def test_faxen_wall_correction() -> None:
    assert faxen_lateral_factor(1.0, 1e6) == pytest.approx(1.0, abs=1e-5)
    assert faxen_lateral_factor(1.0, 2.0) == pytest.approx(
        1.0 / (1 - 9 / 32 + 1 / 64 - 45 / 4096 - 1 / 512)
    )
    assert drag_coefficient(0.5, surface_distance_um=1.0) > drag_coefficient(0.5)
    with pytest.raises(ValueError, match="surface_distance_um"):
        faxen_lateral_factor(1.0, 0.9)
