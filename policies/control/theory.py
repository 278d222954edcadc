"""Exact stationary statistics of a sampled, delayed, blurred linear feedback trap.

Why: a feedback trap with loop delay and camera blur does not impose the stiffness
its gain asks for (Jun & Bechhoefer 2012). The bench compares what the twin measures
with this theory, so the theory must be exact for the discrete loop, not a small-delay
expansion.

Model, one axis (x in um, velocity commands u in um/s):
- frames every ``period_s`` (T); the camera integrates over the last ``exposure_s`` (E)
  of each period and reports the blur average y_n plus localisation noise (sigma_m);
- command u_n, computed from y_n, acts from nT + ``delay_s`` (L) for one period;
- dx = u dt + sqrt(2 D) dW.
A linear controller u_n = -g (y_n + sum_j c_j u_{n-j}) covers proportional control
(c = 0) and the Smith predictor (c_j = how long command u_{n-j} acts between the
blur centre and the moment u_n is applied). The loop is then a linear state-space
recursion s_n = A s_{n-1} + B eta_n; its stationary covariance solves a discrete
Lyapunov equation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_discrete_lyapunov


@dataclass(frozen=True)
class LoopTiming:
    """Timing of one feedback loop (s) and the particle's diffusion coefficient (um^2/s)."""

    period_s: float
    exposure_s: float
    delay_s: float
    diffusion_um2_s: float
    noise_um: float = 0.0

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and 0 < self.exposure_s <= self.period_s):
            raise ValueError("need period_s > 0 and 0 < exposure_s <= period_s")
        if self.delay_s < 0 or self.diffusion_um2_s <= 0 or self.noise_um < 0:
            raise ValueError("need delay_s >= 0, diffusion_um2_s > 0, noise_um >= 0")


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _weighted_overlap(a0: float, a1: float, e: float) -> float:
    """(1/E) * integral over [a0, a1] cap [-E, 0] of (s + E) ds: blur weight of a command."""
    lo, hi = max(a0, -e), min(a1, 0.0)
    if hi <= lo:
        return 0.0
    return ((hi + e) ** 2 - (lo + e) ** 2) / (2.0 * e)


def command_window(timing: LoopTiming, lag: int) -> tuple[float, float]:
    """When u_{n-lag} acts, relative to the end of exposure n."""
    t0 = -lag * timing.period_s + timing.delay_s
    return t0, t0 + timing.period_s


def predictor_coefficients(timing: LoopTiming, n_lags: int) -> np.ndarray:
    """c_j: time u_{n-j} acts between the blur centre (-E/2) and the application of u_n (L)."""
    out = np.zeros(n_lags + 1)
    for j in range(1, n_lags + 1):
        t0, t1 = command_window(timing, j)
        out[j] = _overlap(t0, t1, -timing.exposure_s / 2.0, timing.delay_s)
    return out


def n_lags_needed(timing: LoopTiming) -> int:
    return math.ceil(timing.delay_s / timing.period_s) + 2


def state_space(
    timing: LoopTiming, gain_per_s: float, coefficients: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, Q) for s_n = [x_n, u_n, u_{n-1}, ...] and eta_n = (w_n, b_n, nu_n)."""
    m = n_lags_needed(timing)
    c = np.zeros(m + 1) if coefficients is None else np.asarray(coefficients, float)
    if c.size < m + 1:
        c = np.pad(c, (0, m + 1 - c.size))
    t, e, d = timing.period_s, timing.exposure_s, timing.diffusion_um2_s
    g = gain_per_s
    dim = 1 + m
    a_mat = np.zeros((dim, dim))
    b_mat = np.zeros((dim, 3))
    a_mat[0, 0] = 1.0
    b_mat[0, 0] = 1.0
    beta = np.zeros(m + 1)
    for j in range(1, m + 1):
        t0, t1 = command_window(timing, j)
        a_mat[0, j] += _overlap(t0, t1, -t, 0.0)  # u_{n-j} is column j of s_{n-1}
        beta[j] = _weighted_overlap(t0, t1, e)
    # u_n = -g (x_n - sum beta_j u_{n-j} - b_n + nu_n + sum c_j u_{n-j})
    a_mat[1] = -g * a_mat[0]
    for j in range(1, m + 1):
        a_mat[1, j] += -g * (c[j] - beta[j])
    b_mat[1] = (-g, g, -g)
    for j in range(2, m + 1):
        a_mat[j, j - 1] = 1.0
    q = np.array(
        [
            [2 * d * t, d * e, 0.0],
            [d * e, 2 * d * e / 3.0, 0.0],
            [0.0, 0.0, timing.noise_um**2],
        ]
    )
    return a_mat, b_mat, q


def stationary_covariance(
    timing: LoopTiming, gain_per_s: float, coefficients: np.ndarray | None = None
) -> np.ndarray | None:
    """Covariance of s_n in the steady state; None when the loop is unstable."""
    a_mat, b_mat, q = state_space(timing, gain_per_s, coefficients)
    if np.max(np.abs(np.linalg.eigvals(a_mat))) >= 1.0 - 1e-12:
        return None
    return solve_discrete_lyapunov(a_mat, b_mat @ q @ b_mat.T)


def position_variance(timing: LoopTiming, gain_per_s: float, predictor: bool = False) -> float:
    """Var(x) at frame times (um^2, per axis) for P control or the Smith predictor; inf if
    the loop is unstable."""
    coeffs = predictor_coefficients(timing, n_lags_needed(timing)) if predictor else None
    cov = stationary_covariance(timing, gain_per_s, coeffs)
    return math.inf if cov is None else float(cov[0, 0])


def continuous_delay_variance(diffusion_um2_s: float, gain_per_s: float, delay_s: float) -> float:
    """Kuechler & Mensch: dx = -g x(t - tau) dt + sqrt(2D) dW has Var = D (1 + sin g tau) /
    (g cos g tau) for g tau < pi/2: the small-period limit, used as a cross-check."""
    a = gain_per_s * delay_s
    if a >= math.pi / 2:
        return math.inf
    return diffusion_um2_s * (1.0 + math.sin(a)) / (gain_per_s * math.cos(a))


def optimal_gain(
    timing: LoopTiming, predictor: bool, max_gain_per_s: float | None = None, n: int = 80
) -> tuple[float, float]:
    """(gain, variance) minimising Var(x) over a log grid up to `max_gain_per_s`
    (default: the dead-beat gain 1/T, beyond which a real actuator only saturates)."""
    top = max_gain_per_s or 1.0 / timing.period_s
    best = (math.nan, math.inf)
    for g in np.geomspace(top / 200.0, top, n):
        v = position_variance(timing, float(g), predictor)
        if v < best[1]:
            best = (float(g), v)
    return best


def information_bound_variance(timing: LoopTiming) -> float:
    """Var(x) no controller can beat at frame times: the last command acting before t_n was
    decided on frame n - (floor(L/T) + 1), so the diffusion since then is uncorrectable, plus
    what the blur average leaves unknown about x at the end of its exposure (0.5 D E when
    the exposure's start is known exactly, the most favourable case)."""
    lag = (math.floor(timing.delay_s / timing.period_s + 1e-12) + 1) * timing.period_s
    return 2.0 * timing.diffusion_um2_s * lag + 0.5 * timing.diffusion_um2_s * timing.exposure_s
