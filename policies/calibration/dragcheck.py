"""Is a fixed drag consistent with the data? Rotational, double-well and switching models.

The harmonic check reads D off the noise- and blur-aware drag-free posterior
(``advice.drag_check``). The other models' likelihoods know neither localisation noise
nor blur, so their drag-free D is biased by the noise (a 30 %-of-sd noise triples it on
a soft trap). The check therefore uses statistics the noise cannot touch: the
short-lag increment covariances

    G_tau = < dx_n^2 / 2 + sum_{m=1..tau} dx_n dx_{n+m} > = C(tau) - C(tau + 1),  tau = 1, 2

(G_1 is Vestergaard's CVE, D dt for free diffusion; white localisation noise only
touches the position autocovariance C at lag 0, which cancels). Under a force,
G_tau depends on D through the model's relaxation rates: for a reversible model,
C(tau) = sum_k w_k B(mu_k t_e) exp(-mu_k tau dt), with weights w_k and rates
mu_k = D nu_k (+ i Omega for a rotation) of the model's own potential in kT units,
which the drag-free fit gives without D, and B the exposure average's factor. For
the switching trap the covariances follow from the exact AR(1) recursion of the
fitted square wave. Both statistics together pin D even where G_1 alone has two roots
(relaxation near the frame time).

Blur also biases the fits themselves: a blur-blind fit matches the frames' variance,
which the exposure average shrinks by B0(mu t_e) per mode, so each mode is widened back
by what that factor is at the D under test (``blur_scale2``); for the double well it is
the barrier that is corrected (its in-well mode is blurred, the well separation is not).

The test at the fixed D is Hotelling's T^2 of (G_1, G_2) against the model's
expectation, with their covariance from batch means. The potential's own uncertainty
(its 95 % interval, a floor for what noise does to a fit that ignores it, and for the
double well 30 % of its blur correction) is a nuisance the test minimises over, so the
bound combines the statistics' and the fitted force's. The data's D is the set of D
the test accepts; the check warns when the fixed D lies outside it, and says so when
the data accept every D (relaxation far faster than the frames).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.stats import f as f_dist

from .doublewell import exact_double_well, generator_spectrum, potential_kt
from .physics import thermal_energy
from .rotational import exact_rotational
from .switching import fit_switching

LEVEL = 0.95
Z95 = 1.959963984540054
N_BATCHES = 20
MIN_POINTS = 200  # below this, 20 batches are too short to estimate the covariances
SCALE_FLOOR = 0.05  # ln spatial scale always allowed: a noise-blind fit's broadening
D_SPAN = math.log(1e4)  # the D grid spans its centre times/over this
GRID_POINTS = 161
NUISANCE = [(t,) for t in np.linspace(-1.0, 1.0, 5)]  # one band, its edges at +-1
# the switching trap's two stiffnesses, each with its own band
PAIR = ("k_low", "k_high")
SWITCHING_NUISANCE = [(a, b) for a in (-1.0, 0.0, 1.0) for b in (-1.0, 0.0, 1.0)]
DW_GRID = 300
BLUR_TRUST = 0.3  # share of the double well's blur correction allowed to be off
DW_BARRIERS = 31  # barrier grid of the double well's spectra, fitted e^-2 .. e^1

# expectation of (G_1, G_2) at each D of a grid, for one value t in [-1, 1]^m of the
# potential's nuisance (t = 0: as fitted, +-1: the edges of its allowed bands)
Nuisance = tuple[float, ...]
Expectation = Callable[[NDArray[np.float64], Nuisance], NDArray[np.float64]]


@dataclass(frozen=True)
class DragCheck:
    """The fixed drag's D against the D the data accept."""

    d_fixed: float
    d_data: float  # best-fitting D with the potential as fitted (um^2/s)
    interval: tuple[float, float]  # hull of the accepted D; 0 / inf where unbounded
    consistent: bool
    checkable: bool  # False when the data accept D over the whole grid


def increment_statistics(positions: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """(G_1, G_2) in um^2 and the covariance of their estimate (batch means).

    ``positions`` (n,) or (n, axes); axes are averaged per time.
    """
    arr = positions.reshape(positions.shape[0], -1)
    d = np.diff(arr, axis=0)
    m = d.shape[0] - 2
    h1 = 0.5 * d[:m] ** 2 + d[:m] * d[1 : m + 1]
    h2 = h1 + d[:m] * d[2 : m + 2]
    terms = np.stack([h1.mean(axis=1), h2.mean(axis=1)], axis=1)
    size = m // N_BATCHES
    batches = terms[: size * N_BATCHES].reshape(N_BATCHES, size, 2).mean(axis=1)
    return terms.mean(axis=0), np.cov(batches, rowvar=False) / N_BATCHES


def _lagged_blur(mu: NDArray, tau: int, dt: float, exposure: float) -> NDArray:
    """B(mu t_e) exp(-mu tau dt), B(a) = 2 (cosh a - 1) / a^2, without overflow."""
    a = mu * exposure
    decay = np.exp(-mu * tau * dt)
    small = np.abs(a) < 1e-3
    safe = np.where(small, 1.0, a)
    big = np.exp(-mu * (tau * dt - exposure)) + np.exp(-mu * (tau * dt + exposure)) - 2 * decay
    return np.where(small, decay * (1.0 + a * a / 12.0), big / (safe * safe))


def _variance_blur(a: NDArray) -> NDArray:
    """B0(a) = 2 (a - 1 + e^{-a}) / a^2: the exposure average's variance over the point's."""
    small = np.abs(a) < 1e-3
    safe = np.where(small, 1.0, a)
    return np.where(small, 1.0 - a / 3.0, 2.0 * (a - 1.0 + np.exp(-a)) / (safe * safe))


def blur_scale2(rates: NDArray, offsets: NDArray, d: NDArray, exposure: float) -> NDArray:
    """(D, modes) s^2 undoing what blur did to a blur-blind fit of each mode's variance.

    Blur shrinks each mode's variance by B0(mu t_e), and a fit that ignores it matches
    the shrunk variance, so it reports the mode scaled by sqrt(B0): the true mode has
    s^2 B0(mu(D / s^2) t_e) = 1, solved by bisection in ln s (the left side grows with s).
    Per mode, so a double well's barrier-hopping mode (slow, unblurred) keeps its scale
    while its fast in-well modes (blurred) widen.
    """
    if exposure <= 0.0:
        return np.ones((d.size, rates.size))
    lo, hi = np.zeros((d.size, rates.size)), np.full((d.size, rates.size), 12.0)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        s2 = np.exp(2.0 * mid)
        mu = d[:, None] * rates[None, :] / s2 + offsets[None, :]
        grow = s2 * np.real(_variance_blur(mu * exposure)) < 1.0
        lo, hi = np.where(grow, mid, lo), np.where(grow, hi, mid)
    return np.exp(lo + hi)


def _band(ln_band: float) -> float:
    """The ln spatial scale a potential may be off by: its 95 % uncertainty plus the floor."""
    return SCALE_FLOOR + max(ln_band, 0.0) if math.isfinite(ln_band) else 1.0


def mode_expectation(
    weights: NDArray,
    rates: NDArray,
    offsets: NDArray,
    dt: float,
    exposure: float,
    ln_band: float,
) -> Expectation:
    """(G_1, G_2) of C(tau) = Re sum_k w_k B exp(-mu_k tau dt), mu_k = D rates_k + offsets_k.

    Each mode is first rescaled for what blur did to the fit (``blur_scale2``); a
    further spatial scale s multiplies the weights by s^2 and
    divides the rates by it (offsets, rotations, are scale-free).
    """

    band = _band(ln_band)

    def expect(d: NDArray[np.float64], t: Nuisance) -> NDArray[np.float64]:
        s2 = blur_scale2(rates, offsets, d, exposure) * math.exp(2.0 * t[0] * band)
        mu = d[:, None] * rates[None, :] / s2 + offsets[None, :]
        c = [np.real((_lagged_blur(mu, tau, dt, exposure) * s2) @ weights) for tau in (1, 2, 3)]
        return np.stack([c[0] - c[1], c[1] - c[2]], axis=1)

    return expect


def rotational_expectation(
    k_fn_um: float, omega_rad_s: float, kt: float, dt: float, exposure: float, ln_band: float
) -> Expectation:
    """Per axis C(tau) = v Re exp(-(D / v - i Omega) tau), v = kT / k."""
    v = kt / k_fn_um
    return mode_expectation(
        np.array([v]), np.array([1.0 / v]), np.array([-1j * omega_rad_s]), dt, exposure, ln_band
    )


def _modes_g(
    weights: NDArray, rates: NDArray, d: NDArray, dt: float, exposure: float
) -> NDArray[np.float64]:
    """(G_1, G_2) per D of real modes taken as they are (no blur rescaling)."""
    mu = d[:, None] * rates[None, :]
    c = [_lagged_blur(mu, tau, dt, exposure) @ weights for tau in (1, 2, 3)]
    return np.stack([c[0] - c[1], c[1] - c[2]], axis=1)


def double_well_expectation(
    x: NDArray[np.float64],
    length_um: float,
    barrier_kt: float,
    center_um: float,
    dt: float,
    exposure: float,
    ln_band: float,
) -> Expectation:
    """Modes of the double well's generator (D = 1) on a grid spanning the data.

    In a tight well most of G comes from barrier hopping, whose rate is exponential in
    the barrier, and a blur-blind fit overestimates the barrier by the factor blur
    narrows the wells, 1 / B0 of the in-well mode. So for each D the barrier is first
    corrected by that mode's ``blur_scale2`` (the separation L is unblurred), then
    multiplied by the scale allowed for its uncertainty; the expectation is interpolated
    between spectra precomputed on a barrier grid.
    """
    spread = float(np.ptp(x))
    grid = np.linspace(x.min() - 0.2 * spread, x.max() + 0.2 * spread, DW_GRID)
    h = float(grid[1] - grid[0])
    ln_factors = np.linspace(-2.0, 1.0, DW_BARRIERS)
    spectra = []
    for ln_f in ln_factors:
        u = np.minimum(potential_kt(grid, length_um, barrier_kt * math.exp(ln_f), center_um), 600.0)
        lam, vec, half = generator_spectrum(u, 1.0 / h**2)
        z = grid - float((half**2 / np.sum(half**2)) @ grid)
        weights = (vec.T @ (z * half)) ** 2 / np.sum(half**2)
        keep = lam < -1e-12 * np.max(np.abs(lam))  # the stationary mode adds nothing
        spectra.append((weights[keep], -lam[keep]))
    well_rate = np.array([32.0 * barrier_kt / length_um**2])  # k_well / kT, 1/um^2

    band = 2.0 * _band(0.5 * ln_band)  # a ln barrier: twice a ln spatial scale

    def expect(d: NDArray[np.float64], t: Nuisance) -> NDArray[np.float64]:
        ln_s2 = np.log(blur_scale2(well_rate, np.zeros(1), d, exposure)[:, 0])
        ln_f = -ln_s2 + t[0] * (band + BLUR_TRUST * ln_s2)
        ln_f = np.clip(ln_f, ln_factors[0], ln_factors[-1])
        table = np.stack([_modes_g(w, r, d, dt, exposure) for w, r in spectra])  # (F, D, 2)
        pos = np.interp(ln_f, ln_factors, np.arange(ln_factors.size))
        i0 = np.minimum(pos.astype(int), ln_factors.size - 2)
        frac = (pos - i0)[:, None]
        rows = np.arange(d.size)
        return (1.0 - frac) * table[i0, rows] + frac * table[i0 + 1, rows]

    return expect


def switching_expectation(
    stiffness_per_step: NDArray[np.float64],
    kt: float,
    dt: float,
    exposure: float,
    ln_bands: tuple[float, float],
    start_variance: float | None = None,
) -> Expectation:
    """(G_1, G_2) of the time-varying AR(1): x_{n+1} = phi_n x_n + e_n, exact variances.

    Blur: each lagged covariance takes its step's stationary exposure factor, each
    variance the blurred variance's factor (exact within a phase, approximate at a switch).
    The recursion starts at ``start_variance`` (default: the first phase's stationary one).
    """
    kappa = stiffness_per_step / kt  # 1/um^2
    classes = np.unique(kappa)

    bands = [_band(b) for b in ln_bands]

    def expect(d: NDArray[np.float64], t: Nuisance) -> NDArray[np.float64]:
        s2 = np.empty((d.size, kappa.size))
        for c, t_c, band in zip(classes, t, bands, strict=False):  # low, high
            # each phase's variance was fitted from blurred frames, with its own uncertainty
            scale2 = math.exp(2.0 * t_c * band)
            s2[:, kappa == c] = blur_scale2(np.array([c]), np.zeros(1), d, exposure) * scale2
        lam = d[:, None] * kappa[None, :] / s2  # (D, n-1)
        phi = np.exp(-lam * dt)
        q = s2 / kappa[None, :] * -np.expm1(-2.0 * lam * dt)
        s = np.empty((d.size, kappa.size + 1))
        s[:, 0] = s2[:, 0] / kappa[0] if start_variance is None else start_variance
        for i in range(kappa.size):
            s[:, i + 1] = phi[:, i] ** 2 * s[:, i] + q[:, i]
        a = lam * exposure
        lag1 = np.real(_lagged_blur(lam, 1, dt, exposure))  # B(a) phi per step
        b_var = _variance_blur(a)
        n = kappa.size - 2  # triples (x_n .. x_{n+3})

        def cov(i: int, j: int) -> NDArray:
            """Blurred K(n + i, n + j), j > i, for every triple's n."""
            k = s[:, i : i + n] * lag1[:, i : i + n]
            for t in range(1, j - i):
                k = k * phi[:, i + t : i + t + n]
            return k

        var = [s[:, i : i + n] * b_var[:, i : i + n] for i in (0, 1)]
        dd = var[1] - 2.0 * cov(0, 1) + var[0]
        d1 = cov(1, 2) - var[1] - cov(0, 2) + cov(0, 1)
        d2 = cov(1, 3) - cov(1, 2) - cov(0, 3) + cov(0, 2)
        g1 = 0.5 * dd + d1
        return np.stack([g1.mean(axis=1), (g1 + d2).mean(axis=1)], axis=1)

    return expect


class DataD:
    """The D the data accept under one model: T^2 over a D grid, ready to test any fixed D.

    The grid is centred on the mean squared increment / 2 dt (D for free diffusion, an
    upper bound with noise) and spans ``D_SPAN`` each way; a fixed D is tested exactly.
    """

    def __init__(
        self,
        positions: NDArray[np.float64],
        dt: float,
        expect: Expectation,
        nuisance: list[Nuisance] = NUISANCE,
    ) -> None:
        self.stats, cov = increment_statistics(positions)
        self.inv = np.linalg.inv(cov + 1e-12 * float(np.trace(cov)) * np.eye(2))
        self.expect = expect
        self.nuisance = nuisance
        p, b = 2, N_BATCHES
        self.crit = p * (b - 1) / (b - p) * float(f_dist.ppf(LEVEL, p, b - p))
        steps = np.diff(positions.reshape(positions.shape[0], -1), axis=0)
        centre = math.log(max(float(np.mean(steps**2)) / (2.0 * dt), 1e-300))
        self.d = np.exp(np.linspace(centre - D_SPAN, centre + D_SPAN, GRID_POINTS))
        per_value = np.stack([self._t2(self.d, t) for t in nuisance])
        self.t2 = per_value.min(axis=0)
        nominal = per_value[nuisance.index(tuple(0.0 for _ in nuisance[0]))]
        self.best = self._vertex(nominal)

    def _vertex(self, t2: NDArray[np.float64]) -> float:
        """The grid minimum of T^2, refined by a parabola in ln D."""
        i = int(np.clip(np.argmin(t2), 1, t2.size - 2))
        ln_d = np.log(self.d)
        a, b, c = t2[i - 1 : i + 2]
        curv = a - 2.0 * b + c
        shift = 0.5 * (a - c) / curv if curv > 0 else 0.0
        return float(math.exp(ln_d[i] + float(np.clip(shift, -1.0, 1.0)) * (ln_d[1] - ln_d[0])))

    def _crossing(self, inside: int, outside: int) -> float:
        """Where T^2 crosses the critical value between two grid points, linear in ln D."""
        t_in, t_out = self.t2[inside], self.t2[outside]
        frac = (self.crit - t_in) / (t_out - t_in) if t_out > t_in else 0.0
        ln_in, ln_out = math.log(self.d[inside]), math.log(self.d[outside])
        return math.exp(ln_in + frac * (ln_out - ln_in))

    def _t2(self, d: NDArray[np.float64], t: Nuisance) -> NDArray[np.float64]:
        r = self.stats[None, :] - self.expect(d, t)
        return np.einsum("ij,jk,ik->i", r, self.inv, r)

    def check(self, d_fixed: float) -> DragCheck:
        """Hotelling's T^2 at the fixed D, minimised over the potential's allowed scales."""
        at = np.array([d_fixed])
        t2_fixed = min(float(self._t2(at, t)[0]) for t in self.nuisance)
        ok = self.t2 <= self.crit
        if np.any(ok):
            idx = np.nonzero(ok)[0]
            lo = 0.0 if idx[0] == 0 else self._crossing(idx[0], idx[0] - 1)
            hi = math.inf if idx[-1] == self.d.size - 1 else self._crossing(idx[-1], idx[-1] + 1)
        else:
            lo = hi = self.best
        return DragCheck(
            d_fixed=d_fixed,
            d_data=self.best,
            interval=(lo, hi),
            consistent=t2_fixed <= self.crit,
            checkable=not (ok[0] and ok[-1]),
        )


def drag_check_line(check: DragCheck | None, what: str, model: str) -> str | None:
    """One line for the user: a disagreement, or why the data could not check the drag."""
    if check is None:
        return (
            f"drag: {what} not checked against the data: it needs >= {MIN_POINTS} points "
            f"and a {model} fit (drag free) that pins the force, and this record lacks one"
        )
    if check.consistent and check.checkable:
        return None
    if check.consistent:
        return (
            f"drag: {what} could not be checked: the {model} relaxes faster than the frames "
            "resolve, so the data accept any D; its stiffnesses rest on the fixed drag"
        )
    lo, hi = check.interval
    ratio = max(check.d_fixed / check.d_data, check.d_data / check.d_fixed)
    hi_text = "inf" if not math.isfinite(hi) else f"{hi:.3g}"
    return (
        f"drag: {what} gives D = {check.d_fixed:.3g} um^2/s but the data ({model} fit, "
        f"short-lag increments) give D = {check.d_data:.3g} [{lo:.3g}, {hi_text}] um^2/s "
        f"({LEVEL:.0%}), {ratio:.2g}x off: estimates that use this drag are biased; use "
        "--drag fit or check radius, viscosity, temperature and surface distance"
    )


def model_fit(
    model: str,
    cols: dict[str, NDArray[np.float64]],
    dt: float,
    exposure_s: float,
    temperature_k: float,
) -> DataD | None:
    """The D the data accept under ``model``'s drag-free fit; None if no check is possible.

    None when the record is too short for the batch covariances, or the fit failed or
    does not pin the force (an infinite stderr): a check against it would be a guess.
    """
    if cols["x"].size < MIN_POINTS:
        return None
    kt = thermal_energy(temperature_k)
    if model == "rotational":
        xy = np.stack([cols["x"], cols["y"]], axis=1)
        k, omega = exact_rotational(xy, dt, temperature_k=temperature_k, free_drag=True)
        band = 0.5 * Z95 * k.stderr / k.value
        if not math.isfinite(band):
            return None
        expect = rotational_expectation(k.value, omega.value, kt, dt, exposure_s, band)
        return DataD(xy, dt, expect)
    x = cols["x"]
    if model == "double-well":
        fit = exact_double_well(x, dt, temperature_k=temperature_k, free_drag=True)
        length, barrier = fit["L"], fit["barrier"]
        if not all(math.isfinite(e.value) and e.value > 0 for e in (length, barrier)):
            return None
        se = math.hypot(barrier.stderr / barrier.value, 2.0 * length.stderr / length.value)
        if not math.isfinite(se):
            return None
        expect = double_well_expectation(
            x, length.value, barrier.value, fit["center"].value, dt, exposure_s, Z95 * se
        )
        return DataD(x, dt, expect)
    if model == "switching":
        sw = fit_switching(x, dt, temperature_k=temperature_k, free_drag=True)
        # an unpinned stiffness (a soft phase shorter than its relaxation) gets a wide band:
        # it barely matters to G there, and where it does the check is lenient, not wrong
        low, high = (0.5 * Z95 * sw.estimates[p].stderr / sw.estimates[p].value for p in PAIR)
        start = float(np.var(x))  # the record's own spread, not a stationarity it may lack
        expect = switching_expectation(
            sw.stiffness_per_step, kt, dt, exposure_s, (low, high), start
        )
        return DataD(x, dt, expect, SWITCHING_NUISANCE)
    raise ValueError(f"no drag check for model {model!r}")


__all__ = [
    "DataD",
    "DragCheck",
    "double_well_expectation",
    "drag_check_line",
    "increment_statistics",
    "mode_expectation",
    "model_fit",
    "rotational_expectation",
    "switching_expectation",
]
