"""Stiffness switching in time: k(t) a square wave between k_low and k_high.

Within each half period the motion is exact OU, so for a given (period, phase) the
exact AR(1) likelihood with known D splits into a low and a high part, each with its
own three sufficient statistics. The estimator profiles the likelihood over a
(period, phase) grid (all candidates at once, one matrix product), maximises each part
over ln k on a grid, and refines. Stderrs come from the curvature of the profile
likelihood in ln k_low, ln k_high and the period.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .harmonic import _make, _refine_peak
from .likelihood import ar1_params
from .physics import WATER_VISCOSITY_PA_S, check_positive, check_series, physics
from .simulate import _check_count, _rng
from .types import Estimate

PARAMS = ("k_low", "k_high", "period")
_LN_K = np.linspace(math.log(1e-2), math.log(1e5), 300)


def switching_stiffness(
    t: NDArray[np.float64], k_low: float, k_high: float, period: float, phase_s: float = 0.0
) -> NDArray[np.float64]:
    """k(t): k_high during the first half of each period (from ``phase_s``), else k_low."""
    high = np.floor((np.asarray(t, dtype=float) - phase_s) / (period / 2.0)) % 2 == 0
    return np.where(high, k_high, k_low)


def simulate_switching(
    k_low: float,
    k_high: float,
    period_s: float,
    n: int,
    dt: float,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    rng: np.random.Generator | int | None = None,
    *,
    phase_s: float = 0.0,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
) -> NDArray[np.float64]:
    """Exact OU steps with the stiffness of each step's start time; stationary start."""
    lo = check_positive(k_low, "k_low")
    hi = check_positive(k_high, "k_high")
    period = check_positive(period_s, "period_s")
    n = _check_count(n)
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    gen = _rng(rng)
    ks = switching_stiffness(np.arange(n) * dt, lo, hi, period, phase_s)
    phi, var, q = ar1_params(ks, dt, kt, gamma)
    out = np.empty(n)
    out[0] = gen.normal(0.0, math.sqrt(float(var[0])))
    e = gen.normal(0.0, 1.0, n) * np.sqrt(q)
    for i in range(1, n):
        out[i] = phi[i - 1] * out[i - 1] + e[i]
    return out


def _class_ll(
    s00: NDArray,
    s11: NDArray,
    s01: NDArray,
    m: NDArray,
    dt: float,
    kt: float,
    gamma: float,
    ln_k: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Conditional AR(1) log-likelihood over ln_k (last axis) for stats of shape (...)."""
    phi, _, q = ar1_params(np.exp(ln_k), dt, kt, gamma)
    r2 = s11[..., None] - 2.0 * phi * s01[..., None] + phi**2 * s00[..., None]
    return -0.5 * (m[..., None] * np.log(q) + r2 / q)


def _parabolic_max(ll: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """Max over the last (ln k grid) axis, refined by a parabola, and where it is.

    A bare grid maximum makes the profile over (period, phase) jagged, which can pull
    the period off; the parabola makes it smooth.
    """
    i = np.clip(np.argmax(ll, axis=-1), 1, ll.shape[-1] - 2)[..., None]
    l0, l1, l2 = (np.take_along_axis(ll, i + d, axis=-1)[..., 0] for d in (-1, 0, 1))
    curv = l0 - 2.0 * l1 + l2
    ok = curv < 0.0
    safe = np.where(ok, curv, -1.0)
    shift = np.where(ok, 0.5 * (l0 - l2) / safe, 0.0)
    h = _LN_K[1] - _LN_K[0]
    peak = np.where(ok, l1 - 0.125 * (l0 - l2) ** 2 / safe, l1)
    return peak, _LN_K[i[..., 0]] + h * np.clip(shift, -1.0, 1.0)


@dataclass(frozen=True)
class SwitchingFit:
    """The estimates and what produced them: which steps were stiff, at what k each."""

    estimates: dict[str, Estimate]
    stiffness_per_step: NDArray[np.float64]  # fN/um during step i -> i+1, (n-1,)
    gamma: float  # the drag used (fitted with ``free_drag``), fN s/um


def estimate_switching(
    x: ArrayLike,
    dt: float,
    **kw: Any,
) -> dict[str, Estimate]:
    """(k_low, k_high, period) by profile maximum likelihood; see ``fit_switching``."""
    return fit_switching(x, dt, **kw).estimates


def fit_switching(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    min_period_s: float | None = None,
    max_period_s: float | None = None,
    free_drag: bool = False,
) -> SwitchingFit:
    """(k_low, k_high, period) by profile maximum likelihood, trap centre = mean position.

    The period is first located from the spectrum of a per-step log-likelihood ratio
    (stiff vs soft), between ``min_period_s`` (default 4 dt) and ``max_period_s``
    (default half the record), because the profile likelihood is far too sharp in
    period and phase for a blind grid; then period and phase are refined jointly.
    With ``free_drag`` the drag starts from the frame-to-frame steps and is then fitted
    jointly with both stiffnesses once the period and phase are known (k_low, k_high
    stderrs are conditional on it).
    """
    arr = check_series(x, "x", min_len=40)
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    if free_drag:
        steps = np.diff(arr)
        gamma = kt * 2.0 * dt / float(np.einsum("i,i->", steps, steps) / steps.size)
    n = arr.size
    p_lo = 4.0 * dt if min_period_s is None else check_positive(min_period_s, "min_period_s")
    p_hi = n * dt / 2.0 if max_period_s is None else check_positive(max_period_s, "max_period_s")
    if p_hi <= p_lo:
        raise ValueError(f"max_period_s must exceed min_period_s ({p_lo}), got {p_hi}")
    z = arr - arr.mean()
    prev, nxt = z[:-1], z[1:]
    feats = np.stack([prev * prev, nxt * nxt, prev * nxt, np.ones_like(prev)])  # (4, n-1)
    t = np.arange(n - 1) * dt

    def profile(period: float, starts: NDArray) -> tuple[NDArray, NDArray, NDArray]:
        """ll per phase start (s), and the best ln k of each class, for one period."""
        high = np.floor((t[None, :] - starts[:, None]) / (period / 2.0)) % 2 == 0
        s_hi = high.astype(float) @ feats.T  # (F, 4)
        s_lo = feats.sum(axis=1) - s_hi
        parts, best = [], []
        for st in (s_lo, s_hi):
            ll = _class_ll(st[:, 0], st[:, 1], st[:, 2], st[:, 3], dt, kt, gamma, _LN_K)
            peak, arg = _parabolic_max(ll)
            parts.append(peak)
            best.append(arg)
        return parts[0] + parts[1], best[0], best[1]

    # 1. the period from the spectrum of the per-step "looks stiff" log-likelihood ratio
    pooled = _class_ll(*(np.array(v) for v in feats.sum(axis=1)), dt, kt, gamma, _LN_K)
    k0 = math.exp(float(_LN_K[int(np.argmax(pooled))]))
    lr = np.zeros(n - 1)
    for sign, factor in ((1.0, 3.0), (-1.0, 1.0 / 3.0)):
        phi, _, q = ar1_params(k0 * factor, dt, kt, gamma)
        lr += sign * -0.5 * (np.log(q) + (nxt - phi * prev) ** 2 / q)
    pad = 16 * (n - 1)
    power = np.abs(np.fft.rfft(lr - lr.mean(), pad)) ** 2
    freq = np.fft.rfftfreq(pad, dt)
    band = (freq >= 1.0 / p_hi) & (freq <= 1.0 / p_lo)
    if not np.any(band):
        raise ValueError("the record is too short for the period range; widen max_period_s")
    f0 = float(freq[band][np.argmax(power[band])])
    # 2. period (near the fundamental or, for a harmonic pick, 3x) and phase jointly
    best_ll, period, start = -math.inf, 1.0 / f0, 0.0
    for cand in (1.0 / f0, 3.0 / f0):
        if not p_lo <= cand <= p_hi:
            continue
        d_p = cand * cand / ((n - 1) * dt)  # one spectral bin in period
        for per in np.linspace(cand - 1.5 * d_p, cand + 1.5 * d_p, 31):
            if per < 2.0 * dt:
                continue
            starts = np.linspace(0.0, per, min(int(2 * per / dt), 400), endpoint=False)
            ll, _, _ = profile(float(per), starts)
            i = int(np.argmax(ll))
            if ll[i] > best_ll:
                best_ll, period, start = float(ll[i]), float(per), float(starts[i])
    near = np.linspace(period * (1 - 2e-3), period * (1 + 2e-3), 21)
    ll_p = np.array([profile(float(p), np.array([start]))[0][0] for p in near])
    _, p_sd = _refine_peak(np.log(near), ll_p)
    frac = start / period
    _, lo_b, hi_b = profile(period, np.array([start]))
    lo_f, hi_f = lo_b[None, :], hi_b[None, :]
    jp, jf = 0, 0
    # final per-class likelihood on a fine ln k grid around the best values
    half = period / 2.0
    high = (np.floor((t - frac * period) / half) % 2 == 0).astype(float)
    s_hi = feats @ high
    s_lo = feats.sum(axis=1) - s_hi
    out: dict[str, Estimate] = {}
    if free_drag:
        gamma, lo_f, hi_f = _fit_gamma(s_lo, s_hi, gamma, dt, kt)
    ests = []
    for s, guess in ((s_lo, float(lo_f[jp, jf])), (s_hi, float(hi_f[jp, jf]))):
        grid = np.linspace(guess - 0.3, guess + 0.3, 121)
        ll_k = _class_ll(s[0], s[1], s[2], s[3], dt, kt, gamma, grid)
        ln_k, sd = _refine_peak(grid, ll_k)
        ests.append((ln_k, sd))
    per_step = np.where(high > 0.5, math.exp(ests[1][0]), math.exp(ests[0][0]))
    ests.sort()
    out["k_low"] = _make(math.exp(ests[0][0]), ests[0][1], "switching_mle")
    out["k_high"] = _make(math.exp(ests[1][0]), ests[1][1], "switching_mle")
    out["period"] = Estimate(
        period,
        period * p_sd,
        "s",
        (period * math.exp(-1.96 * p_sd), period * math.exp(1.96 * p_sd))
        if math.isfinite(p_sd)
        else (0.0, math.inf),
        "switching_mle",
    )
    return SwitchingFit(out, per_step, gamma)


def _fit_gamma(
    s_lo: NDArray, s_hi: NDArray, gamma0: float, dt: float, kt: float
) -> tuple[float, NDArray, NDArray]:
    """Drag maximising both classes' profile likelihood; (gamma, best ln k low, high)."""
    best = (-math.inf, gamma0, np.zeros((1, 1)), np.zeros((1, 1)))
    for g in gamma0 * np.exp(np.linspace(-2.0, 2.0, 81)):
        peaks, args = [], []
        for s in (s_lo, s_hi):
            ll = _class_ll(*(np.array(v) for v in s), dt, kt, float(g), _LN_K)
            peak, arg = _parabolic_max(ll)
            peaks.append(float(peak))
            args.append(np.array([[float(arg)]]))
        if sum(peaks) > best[0]:
            best = (sum(peaks), float(g), args[0], args[1])
    return best[1], best[2], best[3]


__all__ = [
    "SwitchingFit",
    "estimate_switching",
    "fit_switching",
    "simulate_switching",
    "switching_stiffness",
]
