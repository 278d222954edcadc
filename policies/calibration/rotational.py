"""Rotational force fields F = -k r + gamma * Omega z x r from 2-D trajectories (FORMA).

The symmetric part of the fitted drift matrix is the stiffness, the antisymmetric
part the rotation rate (Omega in rad/s, positive counter-clockwise).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.linalg import logm

from .harmonic import UNIT, _make, _numeric_hessian
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
    free_drag: bool = False,
) -> tuple[Estimate, Estimate]:
    """(k, Omega) from a least-squares fit of r_{t+1} = A r_t + c.

    With ``free_drag`` the drag comes from the residual covariance (the innovation
    variance q = D / lambda (1 - e^{-2 lambda dt}) per axis, or 2 D dt for classic FORMA).

    ``exact`` takes the drift matrix as logm(A)/dt (no linearisation bias when the
    relaxation time nears dt); otherwise (A - I)/dt, classic FORMA. Stderrs come from
    the regression covariance, propagated to first order.
    """
    arr = check_planar(xy, "xy")
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
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
    rel_d = 0.0
    if free_drag:
        lam = -0.5 * (drift[0, 0] + drift[1, 1])
        q = 0.5 * float(np.trace(res_cov))
        shrink = -math.expm1(-2.0 * lam * dt) / lam if exact and lam > 0 else 2.0 * dt
        gamma = kt / (q / shrink)
        rel_d = math.sqrt(1.0 / max(prev.shape[0] - 3, 1))  # 2(n-3) residuals, chi^2
    k = -gamma * 0.5 * (drift[0, 0] + drift[1, 1])
    omega = 0.5 * (drift[1, 0] - drift[0, 1])
    se_k = gamma * 0.5 * math.sqrt(var_a[0, 0] + var_a[1, 1]) * scale / dt
    se_w = 0.5 * math.sqrt(var_a[1, 0] + var_a[0, 1]) * scale / dt
    method = "forma_rotational_exact" if exact else "forma_rotational"
    k_est = _make(k, math.hypot(se_k / k, rel_d) if k > 0 else math.inf, method)
    w_int = (omega - 1.959963984540054 * se_w, omega + 1.959963984540054 * se_w)
    w_int = (float(w_int[0]), float(w_int[1]))
    return k_est, Estimate(float(omega), float(se_w), "rad/s", w_int, method)


def exact_rotational(
    xy: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    center_um: tuple[float, float] | None = None,
    free_drag: bool = False,
) -> tuple[Estimate, Estimate]:
    """Exact maximum likelihood of (k, Omega), known D (or ``free_drag``), stationary start.

    The propagator is e^{-a} R(Omega dt) with isotropic innovations of known variance
    kT/k (1 - e^{-2a}), so for each k the best rotation angle is closed-form
    (atan2 of the summed cross and dot products of successive positions) and the
    likelihood is profiled over a ln k grid. Unlike FORMA it also uses the stationary
    variance (D known). Stderrs from the curvature of the 2-parameter likelihood. With
    ``free_drag`` the parameters are (stationary variance kT/k, relaxation rate,
    angle): the variance is closed-form for each rate, the rate profiled on a grid.
    """
    arr = check_planar(xy, "xy")
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    z = arr - (arr.mean(axis=0) if center_um is None else np.asarray(center_um, dtype=float))
    prev, nxt = z[:-1], z[1:]
    s00, s11 = float(np.sum(prev * prev)), float(np.sum(nxt * nxt))
    dot = float(np.sum(prev * nxt))
    cross = float(np.sum(prev[:, 0] * nxt[:, 1] - prev[:, 1] * nxt[:, 0]))
    r0 = float(z[0] @ z[0])
    m = prev.shape[0]

    def loglik(ln_k: NDArray[np.float64], theta: NDArray[np.float64]) -> NDArray[np.float64]:
        k = np.exp(ln_k)
        a = k * dt / gamma
        var = kt / k
        q = var * -np.expm1(-2.0 * a)
        phi = np.exp(-a)
        proj = np.cos(theta) * dot + np.sin(theta) * cross
        resid = s11 - 2.0 * phi * proj + phi * phi * s00
        return -(np.log(var) + r0 / (2.0 * var)) - m * np.log(q) - resid / (2.0 * q)

    theta_hat = math.atan2(cross, dot)
    if free_drag:
        return _exact_rotational_free(z, dt, kt, theta_hat, (s00, s11, dot, cross, r0, m))
    grid = np.linspace(math.log(1e-3), math.log(1e6), 2000)
    ll = loglik(grid, np.full_like(grid, theta_hat))
    i = int(np.argmax(ll))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)], 201)
    ln_k = float(fine[int(np.argmax(loglik(fine, np.full_like(fine, theta_hat))))])

    def nll(p: NDArray[np.float64]) -> float:
        return float(-loglik(np.array(p[0]), np.array(p[1])))

    hess = _numeric_hessian(nll, np.array([ln_k, theta_hat]), h=1e-4)
    try:
        cov = np.linalg.inv(hess)
        sd_lnk = math.sqrt(cov[0, 0]) if cov[0, 0] > 0 else math.inf
        sd_th = math.sqrt(cov[1, 1]) if cov[1, 1] > 0 else math.inf
    except np.linalg.LinAlgError:
        sd_lnk = sd_th = math.inf
    k_est = _make(math.exp(ln_k), sd_lnk, "exact_mle")
    omega, se_w = theta_hat / dt, sd_th / dt
    w_int = (omega - 1.959963984540054 * se_w, omega + 1.959963984540054 * se_w)
    return k_est, Estimate(omega, se_w, "rad/s", w_int, "exact_mle")


def _exact_rotational_free(
    z: NDArray[np.float64],
    dt: float,
    kt: float,
    theta_hat: float,
    stats: tuple[float, float, float, float, float, int],
) -> tuple[Estimate, Estimate]:
    """Maximum likelihood of (var, lambda, theta) with the drag unknown; k = kT / var."""
    s00, s11, dot, cross, r0, m = stats

    def loglik(ln_var: NDArray, ln_lam: NDArray, theta: NDArray) -> NDArray:
        var, lam = np.exp(ln_var), np.exp(ln_lam)
        phi = np.exp(-lam * dt)
        q = var * -np.expm1(-2.0 * lam * dt)
        proj = np.cos(theta) * dot + np.sin(theta) * cross
        resid = s11 - 2.0 * phi * proj + phi * phi * s00
        return -(np.log(var) + r0 / (2.0 * var)) - m * np.log(q) - resid / (2.0 * q)

    def best_var(ln_lam: NDArray) -> NDArray:
        lam = np.exp(ln_lam)
        phi = np.exp(-lam * dt)
        qn = -np.expm1(-2.0 * lam * dt)
        resid = s11 - 2.0 * phi * math.hypot(dot, cross) + phi * phi * s00
        return np.log((0.5 * r0 + 0.5 * resid / qn) / (1.0 + m))

    grid = np.linspace(math.log(1e-3 / (m * dt)), math.log(100.0 / dt), 1500)
    ll = loglik(best_var(grid), grid, np.full_like(grid, theta_hat))
    ln_lam = float(grid[int(np.argmax(ll))])
    ln_var = float(best_var(np.array(ln_lam)))

    def nll(p: NDArray[np.float64]) -> float:
        return float(-loglik(np.array(p[0]), np.array(p[1]), np.array(p[2])))

    hess = _numeric_hessian(nll, np.array([ln_var, ln_lam, theta_hat]), h=1e-4)
    try:
        cov = np.linalg.inv(hess)
        sd_var = math.sqrt(cov[0, 0]) if cov[0, 0] > 0 else math.inf
        sd_th = math.sqrt(cov[2, 2]) if cov[2, 2] > 0 else math.inf
    except np.linalg.LinAlgError:
        sd_var = sd_th = math.inf
    k_est = _make(kt * math.exp(-ln_var), sd_var, "exact_mle")
    omega, se_w = theta_hat / dt, sd_th / dt
    w_int = (omega - 1.959963984540054 * se_w, omega + 1.959963984540054 * se_w)
    return k_est, Estimate(omega, se_w, "rad/s", w_int, "exact_mle")


__all__ = ["UNIT", "exact_rotational", "forma_rotational", "simulate_rotational"]
