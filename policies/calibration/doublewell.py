"""Double-well force fields U(x) = dU * (s^2 - 1)^2, s = 2 (x - c) / L.

Wells at c -/+ L/2, barrier height dU (in kT) at c. Two estimators: FORMA (least
squares of the Euler drift on a cubic force basis, mapped to (c, L, dU)) and the
maximum likelihood with the exact one-frame transition density (Fokker-Planck on a
grid), which stays unbiased when the well relaxation time nears dt, where Euler-based
FORMA underestimates the curvature. Stderrs: FORMA from the regression covariance
(delta method), the likelihood from the observed information.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.linalg import eigh_tridiagonal
from scipy.optimize import minimize

from .harmonic import _numeric_hessian
from .physics import WATER_VISCOSITY_PA_S, check_positive, check_series, physics
from .simulate import _check_count, _rng
from .types import Estimate

Z95 = 1.959963984540054
PARAMS = ("L", "barrier", "center")
UNITS = {"L": "um", "barrier": "kT", "center": "um"}


def double_well_force(
    x: ArrayLike, length_um: float, barrier_kt: float, kt: float, center_um: float = 0.0
) -> NDArray[np.float64]:
    """F = -dU/dx in fN for positions ``x`` (um)."""
    s = 2.0 * (np.asarray(x, dtype=float) - center_um) / length_um
    return 8.0 * barrier_kt * kt / length_um * (s - s**3)


def simulate_double_well(
    length_um: float,
    barrier_kt: float,
    n: int,
    dt: float,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    rng: np.random.Generator | int | None = None,
    *,
    center_um: float = 0.0,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    substeps: int | None = None,
) -> NDArray[np.float64]:
    """Positions sampled every dt, integrated with Euler-Maruyama on fine sub-steps.

    The sub-step is chosen at most 1/50 of the well relaxation time (and of dt), so the
    integrator error is far below the estimators'; the start is drawn from a well.
    """
    length = check_positive(length_um, "length_um")
    barrier = check_positive(barrier_kt, "barrier_kt")
    n = _check_count(n)
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    k_well = 32.0 * barrier * kt / length**2
    m = substeps or max(10, math.ceil(50.0 * dt * k_well / gamma))
    m = _check_count(m, "substeps", 1)
    h = dt / m
    gen = _rng(rng)
    sd = math.sqrt(2.0 * kt / gamma * h)
    x = center_um + length / 2.0 * gen.choice([-1.0, 1.0]) + gen.normal(0, math.sqrt(kt / k_well))
    out = np.empty(n)
    for i in range(n):
        kicks = gen.normal(0.0, sd, m)
        for j in range(m):
            s = 2.0 * (x - center_um) / length
            x += 8.0 * barrier * kt / length * (s - s * s * s) / gamma * h + kicks[j]
        out[i] = x
    return out


def _to_params(a1: float, a3: float) -> tuple[float, float] | None:
    """F = a1 u - a3 u^3 (u = x - c, fN) -> (L, dU in fN um); None unless a double well."""
    if a1 <= 0.0 or a3 <= 0.0:
        return None
    return 2.0 * math.sqrt(a1 / a3), a1 * a1 / (4.0 * a3)


def _estimates(values: dict[str, float], sds: dict[str, float], method: str) -> dict[str, Estimate]:
    out = {}
    for name in PARAMS:
        v, s = values[name], sds[name]
        s = s if math.isfinite(s) else math.inf
        out[name] = Estimate(v, s, UNITS[name], (v - Z95 * s, v + Z95 * s), method)
    return out


def forma_double_well(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    free_drag: bool = False,
) -> dict[str, Estimate]:
    """FORMA: gamma (x_{t+1} - x_t)/dt = b0 + b1 x + b2 x^2 + b3 x^3, mapped to (L, dU, c).

    With ``free_drag`` gamma = kT / D, D from the variance of the drift residuals (2 D / dt).
    """
    arr = check_series(x, "x", min_len=20)
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    if free_drag:
        gamma = kt / _increment_diffusion(arr, dt)
    shift, scale = float(arr.mean()), float(arr.std()) or 1.0
    u = (arr[:-1] - shift) / scale
    basis = np.stack([np.ones_like(u), u, u**2, u**3], axis=1)
    force = gamma * np.diff(arr) / dt
    coef, *_ = np.linalg.lstsq(basis, force, rcond=None)
    resid = force - basis @ coef
    cov = np.linalg.inv(basis.T @ basis) * float(resid @ resid) / max(u.size - 4, 1)

    def mapped(b: NDArray[np.float64]) -> NDArray[np.float64]:
        c0, c1, c2, c3 = b[0], b[1] / scale, b[2] / scale**2, b[3] / scale**3
        if c3 >= 0.0:
            return np.array([math.nan] * 3)
        c = -c2 / (3.0 * c3)  # inflection point of the cubic = barrier top
        a1 = c1 + 2.0 * c2 * c + 3.0 * c3 * c * c
        p = _to_params(a1, -c3)
        if p is None:
            return np.array([math.nan] * 3)
        del c0
        return np.array([p[0], p[1] / kt, c * 1.0 + shift])

    est = mapped(coef)
    jac = np.zeros((3, 4))
    for j in range(4):
        step = 1e-6 * max(abs(coef[j]), 1e-12)
        bp = coef.copy()
        bp[j] += step
        jac[:, j] = (mapped(bp) - est) / step
    sd = np.sqrt(np.clip(np.diag(jac @ cov @ jac.T), 0.0, None))
    values = dict(zip(PARAMS, (float(v) for v in est), strict=True))
    return _estimates(values, dict(zip(PARAMS, (float(v) for v in sd), strict=True)), "forma")


def _increment_diffusion(arr: NDArray[np.float64], dt: float) -> float:
    """D from the drift-corrected frame-to-frame steps (cubic drift regressed out)."""
    u = (arr[:-1] - arr.mean()) / (float(arr.std()) or 1.0)
    basis = np.stack([np.ones_like(u), u, u**2, u**3], axis=1)
    steps = np.diff(arr)
    coef, *_ = np.linalg.lstsq(basis, steps, rcond=None)
    resid = steps - basis @ coef
    return float(np.einsum("i,i->", resid, resid)) / max(resid.size - 4, 1) / (2.0 * dt)


def potential_kt(
    grid: NDArray[np.float64], length_um: float, barrier_kt: float, center_um: float
) -> NDArray[np.float64]:
    """U / kT on ``grid``, shifted so its minimum is 0."""
    u = barrier_kt * ((2.0 * (grid - center_um) / length_um) ** 2 - 1.0) ** 2
    return u - u.min()


def generator_spectrum(
    u: NDArray[np.float64], rate: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(eigenvalues <= 0, eigenvectors, e^{-u/2}) of the symmetrised Fokker-Planck generator.

    A reversible nearest-neighbour jump process on the grid, w(i->i+1) = rate *
    exp(-(u_{i+1} - u_i) / 2) with rate = D / h^2, so its stationary law is exactly the
    Boltzmann one; symmetrised with e^{-u/2} it is tridiagonal with off-diagonal ``rate``.
    """
    du = np.diff(u)
    up, down = rate * np.exp(-du / 2.0), rate * np.exp(du / 2.0)
    diag = -(np.concatenate([up, [0.0]]) + np.concatenate([[0.0], down]))
    lam, vec = eigh_tridiagonal(diag, rate * np.ones(du.size))
    return lam, vec, np.exp(-u / 2.0)


def _fp_nll(
    theta: NDArray[np.float64],
    x0: NDArray[np.float64],
    x1: NDArray[np.float64],
    grid: NDArray[np.float64],
    dt: float,
    kt: float,
    gamma: float,
) -> float:
    """-log L from the exact (discretised Fokker-Planck) transition density."""
    length, energy, c = math.exp(theta[0]), math.exp(theta[1]), theta[2]
    h = float(grid[1] - grid[0])
    u = potential_kt(grid, length, energy / kt, c)
    if u.max() > 600.0:
        return 1e30
    lam, vec, half = generator_spectrum(u, kt / gamma / h**2)
    prop = (vec * np.exp(lam * dt)) @ vec.T  # symmetric kernel
    dens = prop * (np.outer(1.0 / half, half) / h)  # dens[j, i]: from i to j, per um
    fi = np.clip((x0 - grid[0]) / h, 0.0, grid.size - 1.000001)
    fj = np.clip((x1 - grid[0]) / h, 0.0, grid.size - 1.000001)
    i0, j0 = fi.astype(int), fj.astype(int)
    wi, wj = fi - i0, fj - j0
    p = (
        dens[j0, i0] * (1 - wi) * (1 - wj)
        + dens[j0, i0 + 1] * wi * (1 - wj)
        + dens[j0 + 1, i0] * (1 - wi) * wj
        + dens[j0 + 1, i0 + 1] * wi * wj
    )
    return float(-np.sum(np.log(np.maximum(p, 1e-300))))


def exact_double_well(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    n_grid: int = 120,
    free_drag: bool = False,
) -> dict[str, Estimate]:
    """Maximum likelihood of (L, dU, c) with the exact transition density, known D.

    The density over one frame is exp(dt G) of the Fokker-Planck generator G
    discretised on a grid spanning the data (a reversible nearest-neighbour jump
    process, so it has the Boltzmann distribution exactly), via a symmetric tridiagonal
    eigendecomposition: no short-time (Euler/Ozaki) approximation, so no bias when the
    well relaxation time is near or below dt. Starts from FORMA; stderr from the
    observed information. With ``free_drag`` ln D is a fourth parameter (reported as D).
    """
    arr = check_series(x, "x", min_len=20)
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    start = forma_double_well(
        arr,
        dt,
        temperature_k=temperature_k,
        radius_um=radius_um,
        viscosity_pa_s=viscosity_pa_s,
        free_drag=free_drag,
    )
    if free_drag:
        gamma = kt / _increment_diffusion(arr, dt)
    length0, barrier0, c0 = (start[p].value for p in PARAMS)
    spread = float(np.ptp(arr))
    if not all(math.isfinite(v) for v in (length0, barrier0, c0)) or not (
        0.05 * spread < length0 < 2.0 * spread and barrier0 > 0
    ):
        length0, barrier0, c0 = 0.7 * spread, 2.0, float(np.median(arr))
    pad = 0.25 * spread + 3.0 * math.sqrt(2.0 * kt / gamma * dt)
    grid = np.linspace(arr.min() - pad, arr.max() + pad, int(n_grid))
    x0, x1 = arr[:-1], arr[1:]

    def nll(t: NDArray[np.float64]) -> float:
        g = kt / math.exp(t[3]) if free_drag else gamma
        return _fp_nll(t, x0, x1, grid, dt, kt, g)

    theta0 = np.array([math.log(length0), math.log(max(barrier0, 0.05) * kt), c0])
    if free_drag:
        theta0 = np.append(theta0, math.log(kt / gamma))
    res = minimize(
        nll, theta0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-3, "maxiter": 2000}
    )
    theta = np.asarray(res.x, dtype=float)
    hess = _numeric_hessian(nll, theta, h=1e-3)
    try:
        cov = np.linalg.inv(hess)
        diag = np.diag(cov)
        sd = np.sqrt(diag) if np.all(diag > 0) else np.full(theta.size, math.inf)
    except np.linalg.LinAlgError:
        sd = np.full(theta.size, math.inf)
    length, barrier = math.exp(theta[0]), math.exp(theta[1]) / kt
    values = {"L": length, "barrier": barrier, "center": float(theta[2])}
    sds = {"L": length * float(sd[0]), "barrier": barrier * float(sd[1]), "center": float(sd[2])}
    out = _estimates(values, sds, "exact_mle")
    if free_drag:
        d, rel = math.exp(theta[3]), float(sd[3])
        interval = (d * math.exp(-Z95 * rel), d * math.exp(Z95 * rel))
        out["D"] = Estimate(d, d * rel, "um^2/s", interval, "exact_mle")
    return out


__all__ = [
    "double_well_force",
    "exact_double_well",
    "forma_double_well",
    "generator_spectrum",
    "potential_kt",
    "simulate_double_well",
]
