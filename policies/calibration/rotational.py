"""Rotational force fields F = -k r + gamma * Omega z x r from 2-D trajectories (FORMA).

The symmetric part of the fitted drift matrix is the stiffness, the antisymmetric
part the rotation rate (Omega in rad/s, positive counter-clockwise).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.linalg import logm

from .harmonic import UNIT, _make
from .physics import WATER_VISCOSITY_PA_S, check_planar, check_positive, physics
from .simulate import _check_count, _rng
from .types import Estimate


def simulate_rotational(
    k_fn_per_um: float,
    omega_rad_s: float,
    n: int,
    dt: float,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    rng: np.random.Generator | int | None = None,
    *,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
) -> NDArray[np.float64]:
    """Exact (n, 2) trajectory: propagator exp(-k dt/gamma) R(Omega dt), stationary start.

    The rotation commutes with the isotropic trap, so the stationary covariance stays
    kT/k * I and the innovations stay isotropic.
    """
    k = check_positive(k_fn_per_um, "k_fn_per_um")
    dt = check_positive(dt, "dt")
    n = _check_count(n)
    if not math.isfinite(omega_rad_s):
        raise ValueError(f"omega_rad_s must be finite, got {omega_rad_s!r}")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    gen = _rng(rng)
    a = k * dt / gamma
    c, s = math.cos(omega_rad_s * dt), math.sin(omega_rad_s * dt)
    prop = math.exp(-a) * np.array([[c, -s], [s, c]])
    var = kt / k
    sd_q = math.sqrt(var * -math.expm1(-2.0 * a))
    out = np.empty((n, 2))
    out[0] = gen.normal(0.0, math.sqrt(var), 2)
    noise = gen.normal(0.0, sd_q, (n, 2))
    for t in range(1, n):
        out[t] = prop @ out[t - 1] + noise[t]
    return out


def forma_rotational(
    xy: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    exact: bool = True,
) -> tuple[Estimate, Estimate]:
    """(k, Omega) from a least-squares fit of r_{t+1} = A r_t + c.

    ``exact`` takes the drift matrix as logm(A)/dt (no linearisation bias when the
    relaxation time nears dt); otherwise (A - I)/dt, classic FORMA. Stderrs come from
    the regression covariance, propagated to first order.
    """
    arr = check_planar(xy, "xy")
    dt = check_positive(dt, "dt")
    _, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    prev = arr[:-1] - arr[:-1].mean(axis=0)
    nxt = arr[1:] - arr[1:].mean(axis=0)
    gram = prev.T @ prev
    prop = np.linalg.solve(gram, prev.T @ nxt).T  # rows: nxt_i = sum_j A_ij prev_j
    resid = nxt - prev @ prop.T
    res_cov = resid.T @ resid / max(prev.shape[0] - 3, 1)
    inv_gram = np.linalg.inv(gram)
    var_a = np.outer(np.diag(res_cov), np.diag(inv_gram))  # Var(A_ij)
    if exact:
        drift = np.real(logm(prop)) / dt
        scale = 1.0 / math.sqrt(max(abs(float(np.linalg.det(prop))), 1e-12))
    else:
        drift = (prop - np.eye(2)) / dt
        scale = 1.0
    k = -gamma * 0.5 * (drift[0, 0] + drift[1, 1])
    omega = 0.5 * (drift[1, 0] - drift[0, 1])
    se_k = gamma * 0.5 * math.sqrt(var_a[0, 0] + var_a[1, 1]) * scale / dt
    se_w = 0.5 * math.sqrt(var_a[1, 0] + var_a[0, 1]) * scale / dt
    method = "forma_rotational_exact" if exact else "forma_rotational"
    k_est = _make(k, se_k / k if k > 0 else math.inf, method)
    w_int = (omega - 1.959963984540054 * se_w, omega + 1.959963984540054 * se_w)
    w_int = (float(w_int[0]), float(w_int[1]))
    return k_est, Estimate(float(omega), float(se_w), "rad/s", w_int, method)


__all__ = ["UNIT", "forma_rotational", "simulate_rotational"]
