"""Stiffness of a harmonic trap from a 1-D trajectory: the classical estimators.

All take positions in um, ``dt`` in s and return an :class:`Estimate` of k in fN/um.
They are kept side by side because their failure modes differ (variance: drift and
short data; FORMA: relaxation time near dt; spectrum: aliasing, handled exactly here).
The likelihood-based ones are :func:`ou_mle` and, in ``bayes``, :func:`bayes_ou`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import curve_fit, minimize

from .likelihood import ou_loglik
from .physics import WATER_VISCOSITY_PA_S, check_positive, check_series, physics
from .types import Estimate

UNIT = "fN/um"
Z95 = 1.959963984540054
K_FLOOR = 1e-6  # fN/um: returned instead of a non-positive stiffness, so ln k exists


def _prepare(
    x: ArrayLike, dt: float, temperature_k: float, radius_um: float, viscosity_pa_s: float
) -> tuple[NDArray[np.float64], float, float, float]:
    arr = check_series(x, "x")
    dt = check_positive(dt, "dt")
    kt, gamma = physics(temperature_k, radius_um, viscosity_pa_s)
    return arr, dt, kt, gamma


def _check_noise(noise_um: float | None, allow_none: bool) -> float | None:
    if noise_um is None:
        if not allow_none:
            raise ValueError("noise_um must be a known value (>= 0) for this estimator")
        return None
    v = float(noise_um)
    if not math.isfinite(v) or v < 0.0:
        raise ValueError(f"noise_um must be >= 0, got {noise_um!r}")
    return v


def _log_interval(k: float, rel_sd: float) -> tuple[float, float]:
    """95 % interval assuming ln k is normal with sd ``rel_sd`` (stiffness errors are relative)."""
    if not math.isfinite(rel_sd) or rel_sd > 100.0:
        return (0.0, math.inf)
    return (k * math.exp(-Z95 * rel_sd), k * math.exp(Z95 * rel_sd))


def _make(k: float, rel_sd: float, method: str) -> Estimate:
    k = max(float(k), K_FLOOR)
    return Estimate(k, float(k * rel_sd), UNIT, _log_interval(k, float(rel_sd)), method)


def _lag1(x: NDArray[np.float64]) -> float:
    z = x - x.mean()
    return float(np.clip((z[:-1] @ z[1:]) / (z @ z), 0.0, 0.9999))


def _ar1_corr_sums(phi: float, n: int) -> tuple[float, float]:
    """(n*Var(mean)/sigma^2, n*Var(sample var)/(2 sigma^4)) for an AR(1) of length n."""
    j = np.arange(1, n)
    w = 1.0 - j / n
    rho = phi**j
    return float(1.0 + 2.0 * (w @ rho)), float(1.0 + 2.0 * (w @ rho**2))


def equipartition(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    noise_um: float = 0.0,
    finite_length_correction: bool = True,
) -> Estimate:
    """k = kT / Var(x).

    Successive samples are correlated, so the variance carries the information of only
    n_eff = n / (1 + 2 sum (1 - j/n) rho_j^2) samples; that sets the stderr. With
    ``finite_length_correction`` the variance is also de-biased for the subtracted mean
    (E s^2 = sigma^2 (1 - Var(mean)/sigma^2)), capped at a factor 2 where the data are
    too short for the correction to be trusted.
    """
    arr, dt, kt, _ = _prepare(x, dt, temperature_k, radius_um, viscosity_pa_s)
    noise = _check_noise(noise_um, allow_none=False) or 0.0
    n = arr.size
    var = float(arr.var()) - noise**2
    phi = _lag1(arr) if finite_length_correction else 0.0
    mean_factor, var_factor = _ar1_corr_sums(phi, n)
    if finite_length_correction:
        var /= 1.0 - min(mean_factor / n, 0.5)
    if var <= 0.0:
        return Estimate(math.inf, math.inf, UNIT, (0.0, math.inf), "equipartition")
    n_eff = n / var_factor
    return _make(kt / var, math.sqrt(2.0 / n_eff), "equipartition")


def _acf(x: NDArray[np.float64], max_lag: int) -> NDArray[np.float64]:
    z = x - x.mean()
    n = z.size
    f = np.fft.rfft(z, 2 * n)
    full = np.fft.irfft(f * np.conj(f))[: max_lag + 1]
    return full / (n - np.arange(max_lag + 1))


def autocorrelation_fit(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    max_lag: int | None = None,
    free_drag: bool = False,
) -> Estimate:
    """Fit C(j dt) = A exp(-k j dt / gamma) to the autocorrelation, lags >= 1.

    With ``free_drag`` the drag is not assumed: k = kT / A (the amplitude is the
    stationary variance, freed of the noise at lag 0), and the decay rate gives D.

    Lag 0 is left out so that white localisation noise does not bias the decay; the
    fit runs to where C falls below e^-2 of C(1) (at least 3 lags, at most n/10 unless
    ``max_lag`` says otherwise). The least-squares stderr ignores the correlation between
    lags (far too small), so the stderr is never below the asymptotic one of the lag-1
    AR(1) coefficient, var(phi) = (1 - phi^2) / n, carried to ln k: conservative (on
    the DeepCalib protocol at n = 1000 about twice the observed spread of ln k).
    """
    arr, dt, kt, gamma = _prepare(x, dt, temperature_k, radius_um, viscosity_pa_s)
    n = arr.size
    cap = max(4, n // 10) if max_lag is None else int(max_lag)
    if cap < 3 or cap >= n:
        raise ValueError(f"max_lag must be in [3, {n - 1}], got {max_lag!r}")
    c = _acf(arr, cap)
    below = np.nonzero(c[1:] < c[1] * math.exp(-2.0))[0]
    last = int(np.clip(below[0] + 1 if below.size else cap, 3, cap))
    lags = np.arange(1, last + 1) * dt
    vals = c[1 : last + 1]
    rate0 = max(-math.log(max(c[2] / c[1], 1e-3)) / dt if c[1] > 0 else 1.0 / dt, 1e-3 / dt)

    def model(t: NDArray[np.float64], amp: float, log_rate: float) -> NDArray[np.float64]:
        return amp * np.exp(-np.exp(log_rate) * t)

    try:
        popt, pcov = curve_fit(model, lags, vals, p0=(max(c[1], 1e-12), math.log(rate0)))
        log_rate, sd = float(popt[1]), float(math.sqrt(max(pcov[1, 1], 0.0)))
        amp, sd_amp = float(popt[0]), float(math.sqrt(max(pcov[0, 0], 0.0)))
    except (RuntimeError, ValueError):
        log_rate, sd = math.log(rate0), math.inf
        amp, sd_amp = float(c[1]), math.inf
    if free_drag:
        if amp <= 0.0:
            return Estimate(math.inf, math.inf, UNIT, (0.0, math.inf), "autocorrelation")
        _, var_factor = _ar1_corr_sums(_lag1(arr), n)
        rel = max(sd_amp / amp, math.sqrt(2.0 * var_factor / n))  # never below equipartition's
        return _make(kt / amp, rel, "autocorrelation")
    if not math.isfinite(sd):
        sd = math.inf
    phi = math.exp(-math.exp(log_rate) * dt)
    if 0.0 < phi < 1.0:
        sd = max(sd, math.sqrt((1.0 - phi * phi) / n) / (phi * -math.log(phi)))
    return _make(gamma * math.exp(log_rate), sd, "autocorrelation")


def _numeric_hessian(
    fun: Callable[[NDArray[np.float64]], float], theta: NDArray[np.float64], h: float = 1e-3
) -> NDArray[np.float64]:
    m = theta.size
    hess = np.empty((m, m))
    eye = np.eye(m) * h
    for i in range(m):
        for j in range(i, m):
            f = (
                fun(theta + eye[i] + eye[j])
                - fun(theta + eye[i] - eye[j])
                - fun(theta - eye[i] + eye[j])
                + fun(theta - eye[i] - eye[j])
            )
            hess[i, j] = hess[j, i] = f / (4.0 * h * h)
    return hess


def _log_sd_from_hessian(hess: NDArray[np.float64]) -> float:
    try:
        cov = np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        return math.inf
    v = float(cov[0, 0])
    return math.sqrt(v) if v > 0 and math.isfinite(v) else math.inf


def power_spectrum_fit(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    known_diffusion: bool = False,
    noise_um: float | None = 0.0,
    free_drag: bool = False,
) -> Estimate:
    """Maximum-likelihood (Whittle) fit of the aliased Lorentzian to the periodogram.

    The spectrum of the *sampled* OU process is exactly
    S(f) = sigma^2 (1 - phi^2) dt / (1 + phi^2 - 2 phi cos(2 pi f dt)), which is the
    continuous Lorentzian with aliasing folded in (Berg-Sorensen & Flyvbjerg 2004); using
    it removes the bias of a plain Lorentzian when f_c nears the Nyquist frequency.
    Periodogram ordinates are exponential around S, hence the Whittle likelihood rather
    than least squares. D is free unless ``known_diffusion``; ``noise_um=None`` fits a
    white localisation-noise floor sigma_n^2 dt. With ``free_drag`` the fitted pair is
    (corner, plateau) without any drag: k = kT / (fitted stationary variance).
    """
    arr, dt, kt, gamma = _prepare(x, dt, temperature_k, radius_um, viscosity_pa_s)
    noise = _check_noise(noise_um, allow_none=True)
    n = arr.size
    per = np.abs(np.fft.rfft(arr - arr.mean())[1:]) ** 2 * dt / n
    cosw = np.cos(2.0 * np.pi * np.arange(1, per.size + 1) / n)
    d0 = kt / gamma

    def unpack(theta: NDArray[np.float64]) -> tuple[float, float, float]:
        k = math.exp(theta[0])
        d = d0 if known_diffusion else math.exp(theta[1])
        nv = (noise or 0.0) ** 2 if noise is not None else math.exp(theta[-1])
        return k, d, nv

    def nll(theta: NDArray[np.float64]) -> float:
        k, d, nv = unpack(theta)
        a = k * dt / gamma
        phi = math.exp(-a)
        var = d * gamma / k
        if free_drag:  # theta = (ln lambda dt, ln var[, ln noise var])
            a, var = min(math.exp(theta[0]), 50.0), math.exp(theta[1])
            phi = math.exp(-a)
        s = var * -math.expm1(-2.0 * a) * dt / (1.0 + phi * phi - 2.0 * phi * cosw) + nv * dt
        return float(np.sum(np.log(s) + per / s))

    k0 = float(np.clip(-gamma * math.log(max(_lag1(arr), 1e-3)) / dt, 1e-3, 1e5))
    theta0 = [math.log(k0)]
    if free_drag:
        theta0 = [math.log(-math.log(max(_lag1(arr), 1e-3))), math.log(float(arr.var()))]
    elif not known_diffusion:
        theta0.append(math.log(d0))
    if noise is None:
        theta0.append(math.log(max(1e-4 * float(arr.var()), 1e-12)))
    res = minimize(
        nll, np.array(theta0), method="Nelder-Mead", options={"xatol": 1e-5, "fatol": 1e-6}
    )
    theta = np.asarray(res.x, dtype=float)
    hess = _numeric_hessian(nll, theta)
    first = 1 if free_drag else 0  # free drag: ln k = ln kT - ln var, the second parameter
    perm = [first, *(i for i in range(theta.size) if i != first)]
    hess = hess[np.ix_(perm, perm)]
    sd = _log_sd_from_hessian(hess)
    if not math.isfinite(sd) and noise is None:
        # a noise floor fitted to ~0 leaves its direction flat: condition on it instead
        sd = _log_sd_from_hessian(hess[:-1, :-1])
    k = kt * math.exp(-float(theta[1])) if free_drag else math.exp(min(float(theta[0]), 30.0))
    return _make(k, sd, "power_spectrum")


def forma(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    noise_um: float = 0.0,
    free_drag: bool = False,
) -> Estimate:
    """FORMA: least squares of the drift (x_{t+1} - x_t)/dt on x_t (with intercept).

    It linearises exp(-k dt / gamma), so it underestimates k once the relaxation time
    nears dt (DeepCalib protocol MAE ~0.36 mostly from there). A known localisation
    noise is corrected for (errors-in-variables: n sigma_n^2 in both moments). With
    ``free_drag`` the drag comes from the residual variance of the drift, 2 D / dt (as
    in FORMA's own D estimate), so gamma = kT / D.
    """
    arr, dt, kt, gamma = _prepare(x, dt, temperature_k, radius_um, viscosity_pa_s)
    noise = _check_noise(noise_um, allow_none=False) or 0.0
    pos = arr[:-1] - arr[:-1].mean()
    drift = np.diff(arr) / dt
    m = pos.size
    sxx = float(pos @ pos) - m * noise**2
    sxy = float(pos @ (drift - drift.mean())) + m * noise**2 / dt
    if sxx <= 0.0:
        return Estimate(K_FLOOR, math.inf, UNIT, (0.0, math.inf), "forma")
    slope = sxy / sxx
    resid = drift - drift.mean() - slope * pos
    resid_var = float(np.einsum("i,i->", resid, resid)) / max(m - 2, 1)
    se = math.sqrt(resid_var / sxx)
    rel_d = 0.0
    if free_drag:
        d_hat = 0.5 * dt * resid_var - noise**2 / dt
        if d_hat <= 0.0:
            return Estimate(K_FLOOR, math.inf, UNIT, (0.0, math.inf), "forma")
        gamma, rel_d = kt / d_hat, math.sqrt(2.0 / max(m - 2, 1))
    k = -gamma * slope
    rel = math.hypot(gamma * se / k, rel_d) if k > 0 else math.inf
    return _make(k, rel, "forma")


def _refine_peak(grid: NDArray[np.float64], ll: NDArray[np.float64]) -> tuple[float, float]:
    """Parabolic refinement of a grid maximum: (argmax, sd from the curvature)."""
    i = int(np.argmax(ll))
    if i == 0 or i == grid.size - 1:
        return float(grid[i]), math.inf
    h = float(grid[1] - grid[0])
    l0, l1, l2 = (float(v) for v in ll[i - 1 : i + 2])
    curv = (l0 - 2.0 * l1 + l2) / h**2
    if curv >= 0.0:
        return float(grid[i]), math.inf
    shift = 0.5 * h * (l0 - l2) / (l0 - 2.0 * l1 + l2)
    return float(grid[i]) + shift, 1.0 / math.sqrt(-curv)


DEFAULT_NOISE_GRID_UM = np.geomspace(1e-3, 0.3, 13)


def ou_mle(
    x: ArrayLike,
    dt: float,
    *,
    temperature_k: float = 300.0,
    radius_um: float = 0.1,
    viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    known_diffusion: bool = True,
    noise_um: float | None = 0.0,
    center_um: float | None = None,
    exposure_s: float = 0.0,
) -> Estimate:
    """Exact OU maximum likelihood, k = -gamma ln(phi) / dt.

    With ``known_diffusion`` (D = kT/gamma, i.e. temperature and radius trusted) the
    stationary variance kT/k and the relaxation both inform k; the exact likelihood is
    maximised on a fine ln k grid and refined, stderr from its curvature. Otherwise
    phi and the innovation variance are both free (AR(1) least squares). Localisation
    noise (``noise_um`` known, or ``None`` = profiled over a grid) and camera blur
    (``exposure_s``, the exposure per frame) need known D here.
    """
    arr, dt, kt, gamma = _prepare(x, dt, temperature_k, radius_um, viscosity_pa_s)
    noise = _check_noise(noise_um, allow_none=True)
    if not known_diffusion:
        if noise != 0.0:
            raise NotImplementedError("free diffusion with localisation noise is not supported")
        prev, nxt = arr[:-1] - arr[:-1].mean(), arr[1:] - arr[1:].mean()
        phi = float(prev @ nxt) / float(prev @ prev)
        resid = nxt - phi * prev
        se = math.sqrt(float(resid @ resid) / max(prev.size - 2, 1) / float(prev @ prev))
        if phi <= 0.0:
            return Estimate(1e5, math.inf, UNIT, (0.0, math.inf), "ou_mle_free_d")
        if phi >= 1.0:
            return Estimate(K_FLOOR, math.inf, UNIT, (0.0, math.inf), "ou_mle_free_d")
        k = -gamma * math.log(phi) / dt
        return _make(k, se / (phi * -math.log(phi)), "ou_mle_free_d")
    tau_e = float(exposure_s)
    if not math.isfinite(tau_e) or not 0.0 <= tau_e <= dt:
        raise ValueError(f"exposure_s must be in [0, dt={dt}], got {exposure_s!r}")
    slow = bool(noise) or noise is None or tau_e > 0.0  # Kalman path: keep the grid small
    coarse = np.linspace(math.log(1e-3), math.log(1e5), 72 if slow else 700)
    noise_grid = DEFAULT_NOISE_GRID_UM if noise is None else np.array([noise])

    def profile(ln_grid: NDArray[np.float64], levels: NDArray[np.float64]) -> NDArray[np.float64]:
        ll2 = ou_loglik(
            arr,
            np.exp(ln_grid)[:, None],
            dt,
            kt,
            gamma,
            levels[None, :],
            center_um,
            False,
            tau_e,
        )
        return ll2

    ll2 = profile(coarse, noise_grid)
    ll = ll2.max(axis=1)
    ln_k, sd = _refine_peak(coarse, ll)
    if noise is None:
        best = float(noise_grid[int(np.argmax(ll2[int(np.argmax(ll))]))])
        noise_grid = np.geomspace(best / 2.0, best * 2.0, 9)
    if slow or math.isfinite(sd):
        half = 1.2 * float(coarse[1] - coarse[0]) if slow else 0.1
        fine = np.linspace(ln_k - half, ln_k + half, 41)
        ll_f = profile(fine, noise_grid).max(axis=1)
        ln_k, sd_f = _refine_peak(fine, ll_f)
        sd = sd_f if math.isfinite(sd_f) else sd
    return _make(math.exp(ln_k), sd, "ou_mle")


__all__ = [
    "UNIT",
    "autocorrelation_fit",
    "equipartition",
    "forma",
    "ou_mle",
    "power_spectrum_fit",
]
