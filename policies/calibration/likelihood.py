"""Exact Gaussian log-likelihood of a sampled OU trajectory, vectorised over parameters.

Noise-free data are an AR(1): closed form from five sufficient statistics, so a whole
grid of stiffnesses costs O(grid). With localisation noise and/or camera exposure blur
the observations are an ARMA(1,1): the position at the end of each exposure is the
state, the exposure average is jointly Gaussian with it, and a scalar Kalman filter
gives the exact likelihood. The unknown trap centre is either profiled out or
integrated out under a flat prior (``marginal_center``), which is what keeps short,
slow trajectories from looking stiffer than they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

_LOG_2PI = float(np.log(2.0 * np.pi))
_SERIES_N = np.arange(2, 22)
_SERIES_C = (2.0**_SERIES_N - 2.0) / np.array([math.factorial(int(n) + 1) for n in _SERIES_N])


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


def _blur_g(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """g(a) = 1 - 2(1 - e^-a)/a + (1 - e^-2a)/(2a), by its series where it cancels."""
    a = np.asarray(a, dtype=float)
    small = a < 0.5
    safe = np.where(small, 1.0, a)
    closed = 1.0 + 2.0 * np.expm1(-safe) / safe - np.expm1(-2.0 * safe) / (2.0 * safe)
    s = np.where(small, a, 0.0)[..., None]
    series = np.sum(_SERIES_C * (-s) ** _SERIES_N, axis=-1)
    return np.where(small, series, closed)


@dataclass(frozen=True)
class BlurredOU:
    """One step of the exposure-blurred OU state-space model (arrays broadcast).

    State x_i: position at the end of exposure i. Given x_{i-1}, the pair
    (x_i, b_i), b_i the average over the exposure [t_i - tau_e, t_i], is Gaussian with
    mean (a_x, a_b) x_{i-1} and covariance [[q_xx, q_xb], [q_xb, q_bb]].
    Without blur b_i = x_i and this is the AR(1).
    """

    a_x: NDArray[np.float64]
    a_b: NDArray[np.float64]
    q_xx: NDArray[np.float64]
    q_xb: NDArray[np.float64]
    q_bb: NDArray[np.float64]
    var: NDArray[np.float64]


def blurred_ou(k: ArrayLike, dt: float, kt: float, gamma: float, exposure_s: float) -> BlurredOU:
    """Exact transition of the blurred OU (``0 <= exposure_s <= dt``), any stiffness."""
    k = np.asarray(k, dtype=float)
    return blurred_ou_rate(k / gamma, kt / k, dt, exposure_s)


def blurred_ou_rate(lam: ArrayLike, var: ArrayLike, dt: float, exposure_s: float) -> BlurredOU:
    """The same transition in the drag-free parameters: relaxation rate k/gamma (1/s) and
    stationary variance kT/k (um^2). D = var * lam; only these two enter the data."""
    if not 0.0 <= exposure_s <= dt * (1.0 + 1e-9):
        raise ValueError(f"exposure_s must be in [0, dt={dt}], got {exposure_s!r}")
    exposure_s = min(exposure_s, dt)
    lam = np.asarray(lam, dtype=float)
    var = np.asarray(var, dtype=float)
    a_x = np.exp(-lam * dt)
    q_xx = var * -np.expm1(-2.0 * lam * dt)
    if exposure_s <= 0.0:
        return BlurredOU(a_x, a_x, q_xx, q_xx, q_xx, var)
    a = lam * exposure_s
    c1 = -np.expm1(-a) / a  # mean of the exposure average per unit start position
    gap = dt - exposure_s
    q0 = var * -np.expm1(-2.0 * lam * gap)  # variance built up before the exposure opens
    var_b = 2.0 * var * _blur_g(a) / a
    cov_xb = var * np.expm1(-a) ** 2 / a
    a_b = c1 * np.exp(-lam * gap)
    q_bb = c1 * c1 * q0 + var_b
    q_xb = np.exp(-a) * c1 * q0 + cov_xb
    return BlurredOU(a_x, a_b, q_xx, q_xb, q_bb, var)


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


@dataclass(frozen=True)
class KalmanSums:
    """What the Gaussian likelihood needs from one filter pass (arrays over parameters).

    ``log_s`` sum of log innovation variances, ``syy``/``sy1``/``s11`` the weighted sums
    of innovations of the data, of the data with a column of ones (the centre), of ones.
    """

    log_s: NDArray[np.float64]
    syy: NDArray[np.float64]
    sy1: NDArray[np.float64]
    s11: NDArray[np.float64]


_STEADY_RTOL = 1e-12  # relative change of the state variance below which the gain is fixed


def _steady_tail(
    rest: NDArray[np.float64],
    a_x: float,
    a_b: float,
    c: float,
    m_y: float,
    m_1: float,
    s: float,
) -> tuple[float, float, float, float]:
    """Sums over the rest of the record once the gain g is fixed.

    With m_{i+1} = c m_i + g y_i (c = a_x - g a_b) the innovations e_i = y_i - a_b m_i
    are the ARMA filter (1 - a_x z^-1) / (1 - c z^-1) of y, started from -a_b m.
    (einsum, not BLAS dot: the dot of one long vector is slow on a loaded machine.)
    """
    from scipy.signal import lfilter

    e_y = lfilter([1.0, -a_x], [1.0, -c], rest, zi=[-a_b * m_y])[0]
    e_1 = lfilter([1.0, -a_x], [1.0, -c], np.ones_like(rest), zi=[-a_b * m_1])[0]
    return (
        rest.size * math.log(s),
        float(np.einsum("i,i->", e_y, e_y)) / s,
        float(np.einsum("i,i->", e_y, e_1)) / s,
        float(np.einsum("i,i->", e_1, e_1)) / s,
    )


def kalman_sums(y: NDArray[np.float64], model: BlurredOU, noise_var: ArrayLike) -> KalmanSums:
    """Scalar Kalman filter of blurred OU + white noise, vectorised over parameter arrays.

    The gains do not depend on the data, so the centre is handled by also filtering a
    column of ones: innovations of y - mu are e_y - mu * e_1. Once a parameter's gain
    has converged the rest of its record is a fixed first-order recursion, run by
    ``scipy.signal.lfilter``, and it leaves the vectorised loop (long records cost
    little more than short ones).
    """
    arrays = np.broadcast_arrays(
        *(
            np.asarray(v, dtype=float)
            for v in (
                model.a_x,
                model.a_b,
                model.q_xx,
                model.q_xb,
                model.q_bb,
                model.var,
                noise_var,
            )
        )
    )
    shape = arrays[0].shape
    a_x, a_b, q_xx, q_xb, q_bb, p, r = (np.ravel(v).copy() for v in arrays)
    size = a_x.size
    sums = np.zeros((4, size))  # log_s, syy, sy1, s11
    idx = np.arange(size)
    m_y = np.zeros(size)
    m_1 = np.zeros(size)
    acc = np.zeros((4, size))
    ab2, ax2, axab = a_b * a_b, a_x * a_x, a_x * a_b
    q_obs = q_bb + r
    n = y.size
    t = 0
    while t < n and idx.size:
        obs = y[t]
        s = ab2 * p + q_obs
        inv_s = 1.0 / s
        e_y = obs - a_b * m_y
        e_1 = 1.0 - a_b * m_1
        acc[0] += np.log(s)
        acc[1] += e_y * e_y * inv_s
        acc[2] += e_y * e_1 * inv_s
        acc[3] += e_1 * e_1 * inv_s
        gain = (axab * p + q_xb) * inv_s
        m_y = a_x * m_y + gain * e_y
        m_1 = a_x * m_1 + gain * e_1
        p_new = ax2 * p + q_xx - gain * gain * s
        t += 1
        done = None
        if t % 32 == 0 and n - t > 128:
            done = np.abs(p_new - p) <= _STEADY_RTOL * p
        p = p_new
        if done is not None and done.any():
            rest = y[t:]
            for j in np.nonzero(done)[0]:
                s_j = float(ab2[j] * p[j] + q_obs[j])
                g_j = float((axab[j] * p[j] + q_xb[j]) / s_j)
                c_j = float(a_x[j] - g_j * a_b[j])
                tail = _steady_tail(
                    rest, float(a_x[j]), float(a_b[j]), c_j, float(m_y[j]), float(m_1[j]), s_j
                )
                sums[:, idx[j]] = acc[:, j] + np.array(tail)
            keep = ~done
            idx = idx[keep]
            a_x, a_b, q_xx, q_xb, p = a_x[keep], a_b[keep], q_xx[keep], q_xb[keep], p[keep]
            ab2, ax2, axab, q_obs = ab2[keep], ax2[keep], axab[keep], q_obs[keep]
            m_y, m_1, acc = m_y[keep], m_1[keep], acc[:, keep]
    sums[:, idx] = acc
    log_s, syy, sy1, s11 = (v.reshape(shape) for v in sums)
    return KalmanSums(log_s, syy, sy1, s11)


def state_space_loglik(
    y: NDArray[np.float64],
    model: BlurredOU,
    noise_var: ArrayLike,
    center_um: float | None = None,
    marginal_center: bool = True,
) -> NDArray[np.float64]:
    """Exact log-likelihood of blurred OU + white noise (:func:`kalman_sums`)."""
    z = y - (0.0 if center_um is None else center_um)
    k = kalman_sums(z, model, noise_var)
    ll = -0.5 * (z.size * _LOG_2PI + k.log_s + k.syy)
    if center_um is not None:
        return ll
    ll = ll + 0.5 * k.sy1**2 / k.s11
    return ll - 0.5 * np.log(k.s11) if marginal_center else ll


def kalman_loglik(
    y: NDArray[np.float64],
    phi: ArrayLike,
    var: ArrayLike,
    q: ArrayLike,
    noise_var: ArrayLike,
    center_um: float | None = None,
    marginal_center: bool = True,
) -> NDArray[np.float64]:
    """Exact AR(1) + white noise (ARMA(1,1)) log-likelihood: the unblurred state space."""
    phi, var, q = (np.asarray(v, dtype=float) for v in (phi, var, q))
    model = BlurredOU(phi, phi, q, q, q, var)
    return state_space_loglik(y, model, noise_var, center_um, marginal_center)


def ou_loglik(
    x: NDArray[np.float64],
    k: ArrayLike,
    dt: float,
    kt: float,
    gamma: float,
    noise_um: ArrayLike = 0.0,
    center_um: float | None = None,
    marginal_center: bool = True,
    exposure_s: float = 0.0,
) -> NDArray[np.float64]:
    """Log-likelihood of stiffness(es) ``k`` (known D = kT/gamma), any noise level and blur."""
    noise = np.asarray(noise_um, dtype=float)
    if exposure_s <= 0.0 and not np.any(noise > 0.0):
        phi, var, q = ar1_params(k, dt, kt, gamma)
        return ar1_loglik(x, phi, var, q, center_um, marginal_center)
    model = blurred_ou(k, dt, kt, gamma, exposure_s)
    return state_space_loglik(x, model, noise**2, center_um, marginal_center)
