"""Exact Gaussian log-likelihood of a sampled OU trajectory, vectorised over parameters.

Noise-free data are an AR(1): closed form from five sufficient statistics, so a whole
grid of stiffnesses costs O(grid). With localisation noise the data are AR(1) + white
noise = ARMA(1,1); a Kalman filter gives the exact likelihood. The unknown trap centre
is either profiled out or integrated out under a flat prior (``marginal_center``), which
is what keeps short, slow trajectories from looking stiffer than they are.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

_LOG_2PI = float(np.log(2.0 * np.pi))


def ar1_params(
    k: ArrayLike, dt: float, kt: float, gamma: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(phi, stationary variance, innovation variance) of the sampled OU process."""
    k = np.asarray(k, dtype=float)
    a = k * dt / gamma
    phi = np.exp(-a)
    var = kt / k
    q = var * -np.expm1(-2.0 * a)
    return phi, var, q


def ar1_loglik(
    x: NDArray[np.float64],
    phi: ArrayLike,
    var: ArrayLike,
    q: ArrayLike,
    center_um: float | None = None,
    marginal_center: bool = True,
) -> NDArray[np.float64]:
    """Exact stationary AR(1) log-likelihood; parameters broadcast against each other."""
    phi, var, q = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (phi, var, q)))
    z = x - (0.0 if center_um is None else center_um)
    n = z.size
    prev, nxt = z[:-1], z[1:]
    s00, s11, s01 = prev @ prev, nxt @ nxt, prev @ nxt
    resid2 = s11 - 2.0 * phi * s01 + phi**2 * s00
    const = -0.5 * (n * _LOG_2PI + np.log(var) + (n - 1) * np.log(q))
    quad = z[0] ** 2 / var + resid2 / q
    if center_um is not None:
        return const - 0.5 * quad
    b_sum = nxt.sum() - phi * prev.sum()
    a = 1.0 / var + (n - 1) * (1.0 - phi) ** 2 / q
    b = z[0] / var + (1.0 - phi) * b_sum / q
    ll = const - 0.5 * (quad - b**2 / a)
    return ll - 0.5 * np.log(a) if marginal_center else ll


def kalman_loglik(
    y: NDArray[np.float64],
    phi: ArrayLike,
    var: ArrayLike,
    q: ArrayLike,
    noise_var: ArrayLike,
    center_um: float | None = None,
    marginal_center: bool = True,
) -> NDArray[np.float64]:
    """Exact ARMA(1,1) (OU + white noise) log-likelihood by a vectorised Kalman filter.

    The gains do not depend on the data, so the centre is handled by also filtering a
    column of ones: innovations of y - mu are e_y - mu * e_1.
    """
    phi, var, q, r = np.broadcast_arrays(
        *(np.asarray(v, dtype=float) for v in (phi, var, q, noise_var))
    )
    z = y - (0.0 if center_um is None else center_um)
    p = var.copy()
    m_y = np.zeros_like(p)
    m_1 = np.zeros_like(p)
    log_s = np.zeros_like(p)
    syy = np.zeros_like(p)
    sy1 = np.zeros_like(p)
    s11 = np.zeros_like(p)
    phi2 = phi * phi
    for obs in z:
        s = p + r
        inv_s = 1.0 / s
        e_y = obs - m_y
        e_1 = 1.0 - m_1
        log_s += np.log(s)
        syy += e_y * e_y * inv_s
        sy1 += e_y * e_1 * inv_s
        s11 += e_1 * e_1 * inv_s
        gain = p * inv_s
        m_y = phi * (m_y + gain * e_y)
        m_1 = phi * (m_1 + gain * e_1)
        p = phi2 * p * (1.0 - gain) + q
    ll = -0.5 * (z.size * _LOG_2PI + log_s + syy)
    if center_um is not None:
        return ll
    ll = ll + 0.5 * sy1**2 / s11
    return ll - 0.5 * np.log(s11) if marginal_center else ll


def ou_loglik(
    x: NDArray[np.float64],
    k: ArrayLike,
    dt: float,
    kt: float,
    gamma: float,
    noise_um: ArrayLike = 0.0,
    center_um: float | None = None,
    marginal_center: bool = True,
) -> NDArray[np.float64]:
    """Log-likelihood of stiffness(es) ``k`` (known D = kT/gamma), any noise level."""
    phi, var, q = ar1_params(k, dt, kt, gamma)
    noise = np.asarray(noise_um, dtype=float)
    if not np.any(noise > 0.0):
        return ar1_loglik(x, phi, var, q, center_um, marginal_center)
    return kalman_loglik(x, phi, var, q, noise**2, center_um, marginal_center)
