"""Exact Ornstein-Uhlenbeck trajectories for testing the estimators.

Exact discretisation (AR(1), stationary start) so that estimator errors are never
confused with integrator errors, even when the relaxation time is shorter than dt.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy.signal import lfilter

from .physics import WATER_VISCOSITY_PA_S, check_positive, physics


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_count(n: int, name: str = "n", minimum: int = 2) -> int:
    if isinstance(n, bool) or int(n) != n or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {n!r}")
    return int(n)


def simulate_ou(
    k_fn_per_um: float,
    n: int,
    dt: float,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    rng: np.random.Generator | int | None = None,
    dims: int = 1,
    noise_um: float = 0.0,
    blur: bool = False,
    *,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    substeps: int = 10,
) -> NDArray[np.float64]:
    """Positions (um) in an isotropic harmonic trap centred at 0.

    Returns shape (n,) for ``dims == 1`` else (n, dims). ``blur`` averages the exact
    path over each exposure (``substeps`` points), as a camera would; ``noise_um`` adds
    white Gaussian localisation noise after blurring.
    """
    k = check_positive(k_fn_per_um, "k_fn_per_um")
    n = _check_count(n)
    dt = check_positive(dt, "dt")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    if not math.isfinite(noise_um) or noise_um < 0.0:
        raise ValueError(f"noise_um must be >= 0, got {noise_um!r}")
    m = _check_count(substeps, "substeps", 1) if blur else 1
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    gen = _rng(rng)
    var = kt / k
    phi = math.exp(-k * (dt / m) / gamma)
    q = var * -math.expm1(-2.0 * k * (dt / m) / gamma)  # var * (1 - phi^2), accurate
    x0 = gen.normal(0.0, math.sqrt(var), size=(1, dims))
    e = gen.normal(0.0, math.sqrt(q), size=(n * m, dims))
    path = lfilter([1.0], [1.0, -phi], e, axis=0, zi=phi * x0)[0]
    if blur:
        path = path.reshape(n, m, dims).mean(axis=1)
    if noise_um > 0.0:
        path = path + gen.normal(0.0, noise_um, size=path.shape)
    return path[:, 0] if dims == 1 else path
