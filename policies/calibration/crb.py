"""Cramer-Rao bound on ln k for a sampled harmonic OU trajectory.

Gives the floor that the empirical spread of any unbiased estimator must sit on or
above, so estimator benchmarks can be read as "x times the bound".
"""

from __future__ import annotations

import math

import numpy as np

from .likelihood import ar1_params, ou_loglik
from .physics import WATER_VISCOSITY_PA_S, check_positive, physics


def fisher_ln_k(
    k_fn_per_um: float,
    n: int,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
) -> float:
    """Fisher information on ln k: stationary start + (n-1) AR(1) transitions, D and centre known.

    With theta = ln k: phi = exp(-k dt/gamma), sigma^2 = kT/k, q = sigma^2 (1 - phi^2);
    one transition contributes phi'^2 sigma^2 / q + (q'/q)^2 / 2, the start (s'/s)^2 / 2.
    """
    k = check_positive(k_fn_per_um, "k_fn_per_um")
    dt = check_positive(dt, "dt")
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    phi_a, var_a, q_a = ar1_params(k, dt, kt, gamma)
    phi, var, q = float(phi_a), float(var_a), float(q_a)
    a = k * dt / gamma
    dphi = -a * phi
    dlogq = -1.0 + 2.0 * a * phi * phi / -math.expm1(-2.0 * a)
    per_step = dphi**2 * var / q + 0.5 * dlogq**2
    return 0.5 + (int(n) - 1) * per_step


def crb_ln_k(
    k_fn_per_um: float,
    n: int,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
) -> float:
    """Lower bound on the sd of any unbiased ln k estimate (noise-free, known D)."""
    info = fisher_ln_k(
        k_fn_per_um,
        n,
        dt,
        temperature_k=temperature_k,
        radius_um=radius_um,
        viscosity_pa_s=viscosity_pa_s,
    )
    return 1.0 / math.sqrt(info)


def observed_information_ln_k(
    x: np.ndarray,
    k_fn_per_um: float,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    h: float = 1e-3,
) -> float:
    """-d^2 log L / d(ln k)^2 at the given k (centre known at 0): checks the analytic Fisher."""
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    ln_k = math.log(check_positive(k_fn_per_um, "k_fn_per_um"))
    ks = np.exp(ln_k + np.array([-h, 0.0, h]))
    ll = ou_loglik(np.asarray(x, dtype=float), ks, dt, kt, gamma, 0.0, 0.0)
    return float(-(ll[0] - 2.0 * ll[1] + ll[2]) / h**2)
