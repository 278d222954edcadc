"""Exact Ornstein-Uhlenbeck trajectories for testing the estimators.

Exact discretisation (AR(1), stationary start) so that estimator errors are never
confused with integrator errors, even when the relaxation time is shorter than dt.
Camera blur is exact too: the exposure average is drawn jointly with the end position
from the same Gaussian transition the likelihood uses (``likelihood.blurred_ou``).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy.signal import lfilter

from .likelihood import blurred_ou
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
    exposure_s: float | None = None,
) -> NDArray[np.float64]:
    """Positions (um) in an isotropic harmonic trap centred at 0, stationary start.

    Returns shape (n,) for ``dims == 1`` else (n, dims). ``blur`` averages the path
    over the last ``exposure_s`` of each frame (default the whole frame, dt), as a camera
    would; ``noise_um`` adds white Gaussian localisation noise after blurring.
    """
    k = check_positive(k_fn_per_um, "k_fn_per_um")
    n = _check_count(n)
    dt = check_positive(dt, "dt")
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    if not math.isfinite(noise_um) or noise_um < 0.0:
        raise ValueError(f"noise_um must be >= 0, got {noise_um!r}")
    tau_e = (dt if exposure_s is None else float(exposure_s)) if blur else 0.0
    if not 0.0 <= tau_e <= dt:
        raise ValueError(f"exposure_s must be in [0, dt={dt}], got {exposure_s!r}")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    gen = _rng(rng)
    m = blurred_ou(k, dt, kt, gamma, tau_e)
    a_x, a_b = float(m.a_x), float(m.a_b)
    q_xx, q_xb, q_bb = float(m.q_xx), float(m.q_xb), float(m.q_bb)
    x_prev0 = gen.normal(0.0, math.sqrt(float(m.var)), size=(1, dims))
    w_x = gen.normal(0.0, math.sqrt(q_xx), size=(n, dims))
    # end positions x_0..x_{n-1}, each from its predecessor (x_{-1} = x_prev0)
    ends = lfilter([1.0], [1.0, -a_x], w_x, axis=0, zi=a_x * x_prev0)[0]
    if tau_e > 0.0:
        prev = np.concatenate([x_prev0, ends[:-1]])
        slope = q_xb / q_xx
        cond_sd = math.sqrt(max(q_bb - slope * q_xb, 0.0))
        path = a_b * prev + slope * w_x + gen.normal(0.0, cond_sd, size=(n, dims))
    else:
        path = ends
    if noise_um > 0.0:
        path = path + gen.normal(0.0, noise_um, size=path.shape)
    return path[:, 0] if dims == 1 else path
