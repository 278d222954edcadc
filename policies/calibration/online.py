"""Online stiffness tracking for the live loop: O(1) work and no allocation per frame.

Exponentially forgotten sufficient statistics of the AR(1) regression
x_{t+1} = c (1 - phi) + phi x_t + e give two stiffness estimates each frame:
k_phi = -gamma ln(phi) / dt (relaxation) and k_var = kT / Var(x) (equipartition, D
known). They are combined on the ln k scale with inverse-variance weights from the
effective sample count n_eff = 1 / (1 - lambda), lambda = 2^(-1/half_life). After a
step change the estimate has moved most of the way within ~2 half-lives (weight of
old data 2^-2 = 25 %) and settled within ~4 (6 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .physics import WATER_VISCOSITY_PA_S, check_positive, physics
from .types import Estimate


class OnlineStiffness:
    """Running k estimate (fN/um) from positions arriving one frame at a time."""

    __slots__ = (
        "_dt",
        "_gamma",
        "_kt",
        "_lam",
        "_last",
        "_n",
        "_s0",
        "_s00",
        "_s01",
        "_s1",
        "_s11",
        "_w",
        "k",
        "stderr_ln_k",
    )

    def __init__(
        self,
        dt: float,
        *,
        half_life_frames: float = 200.0,
        temperature_k: float = 300.0,
        radius_um: float = 0.1,
        viscosity_pa_s: float = WATER_VISCOSITY_PA_S,
    ) -> None:
        self._dt = check_positive(dt, "dt")
        hl = check_positive(half_life_frames, "half_life_frames")
        if hl < 5.0:
            raise ValueError(f"half_life_frames must be >= 5, got {half_life_frames!r}")
        self._kt, self._gamma = physics(temperature_k, radius_um, viscosity_pa_s)
        self._lam = 2.0 ** (-1.0 / hl)
        self.reset()

    def reset(self) -> None:
        """Forget everything (e.g. after the trap was moved on purpose)."""
        self._last = math.nan
        self._n = 0
        self._w = self._s0 = self._s1 = self._s00 = self._s11 = self._s01 = 0.0
        self.k = math.nan
        self.stderr_ln_k = math.inf

    @property
    def n_eff(self) -> float:
        """Effective number of transitions behind the current estimate."""
        return self._w

    def update(self, x: float) -> float:
        """Add one position (um); returns the current k estimate (NaN until 10 frames)."""
        x = float(x)
        if not math.isfinite(x):
            return self.k  # a lost frame: keep the estimate, break the pair chain
        prev, self._last = self._last, x
        if math.isnan(prev):
            return self.k
        lam = self._lam
        self._w = lam * self._w + 1.0
        self._s0 = lam * self._s0 + prev
        self._s1 = lam * self._s1 + x
        self._s00 = lam * self._s00 + prev * prev
        self._s11 = lam * self._s11 + x * x
        self._s01 = lam * self._s01 + prev * x
        self._n += 1
        if self._n >= 10:
            self._estimate()
        return self.k

    def _estimate(self) -> None:
        w = self._w
        m0, m1 = self._s0 / w, self._s1 / w
        c00 = self._s00 / w - m0 * m0
        c11 = self._s11 / w - m1 * m1
        c01 = self._s01 / w - m0 * m1
        if c00 <= 0.0 or c11 <= 0.0:
            return
        var = 0.5 * (c00 + c11)
        n_eff = max(w - 2.0, 1.0)
        ln_var = math.log(self._kt / var)
        phi = min(max(c01 / c00, 1e-3), 1.0 - 1e-9)
        sd_var2 = 2.0 * (1.0 + phi * phi) / ((1.0 - phi * phi) * n_eff)
        ln_phi = -math.log(phi)
        sd_phi2 = (1.0 - phi * phi) / (n_eff * phi * phi * ln_phi * ln_phi)
        ln_k_phi = math.log(self._gamma * ln_phi / self._dt)
        w_var, w_phi = 1.0 / sd_var2, 1.0 / sd_phi2
        ln_k = (w_var * ln_var + w_phi * ln_k_phi) / (w_var + w_phi)
        self.k = math.exp(ln_k)
        self.stderr_ln_k = math.sqrt(1.0 / (w_var + w_phi))


Z95 = 1.959963984540054
CHECK_EVERY = 10  # frames between change-detector checks


@dataclass(frozen=True)
class LiveEstimate:
    """The live calibration after the latest frame: per axis k and D, and a change flag.

    ``changed`` is True on the update where the recent stiffness left the reference
    one by more than the detector's threshold (the reference then restarts from the
    recent data, so each change is flagged once); ``changes`` counts them so far.
    """

    k: tuple[Estimate, ...]
    diffusion: tuple[Estimate, ...]
    changed: bool
    changes: int
    t_s: float

    def as_metrics(self) -> dict[str, float | None]:
        """Flat numbers for telemetry and the run summary (axes x, y, z in order); None
        where a bound is unknown, so the dict stays strict JSON."""
        out: dict[str, float | None] = {"trap_changes": float(self.changes)}
        for axis, k, d in zip("xyz", self.k, self.diffusion, strict=False):
            lo, hi = k.interval or (0.0, math.inf)
            for key, v in (("", k.value), ("_lo", lo), ("_hi", hi)):
                out[f"trap_k_{axis}{key}"] = v if math.isfinite(v) else None
            out[f"trap_d_{axis}"] = d.value if math.isfinite(d.value) else None
        return out


class _ForgottenAR1:
    """Exponentially forgotten AR(1) moments of each axis (arrays over axes)."""

    def __init__(self, axes: int, half_life_frames: float) -> None:
        self.lam = 2.0 ** (-1.0 / half_life_frames)
        self.s = np.zeros((6, axes))  # w, s0, s1, s00, s11, s01

    def add(self, prev: NDArray[np.float64], x: NDArray[np.float64]) -> None:
        s = self.s
        s *= self.lam
        s[0] += 1.0
        s[1] += prev
        s[2] += x
        s[3] += prev * prev
        s[4] += x * x
        s[5] += prev * x

    def copy_from(self, other: _ForgottenAR1) -> None:
        self.s = other.s * (1.0 - self.lam) / (1.0 - other.lam)  # same data, rescaled weight

    def estimate(
        self, dt: float, kt: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray]:
        """(ln k, sd ln k, ln D, sd ln D) per axis, drag free (k = kT / Var, D = Var lambda)."""
        w, s0, s1, s00, s11, s01 = self.s
        m0, m1 = s0 / w, s1 / w
        c00, c11 = s00 / w - m0 * m0, s11 / w - m1 * m1
        c01 = s01 / w - m0 * m1
        var = np.maximum(0.5 * (c00 + c11), 1e-300)
        phi = np.clip(c01 / np.maximum(c00, 1e-300), 1e-3, 1.0 - 1e-9)
        n_eff = np.maximum(w - 2.0, 1.0)
        sd_var = np.sqrt(2.0 * (1.0 + phi * phi) / ((1.0 - phi * phi) * n_eff))
        rate = -np.log(phi) / dt
        sd_rate = np.sqrt((1.0 - phi * phi) / n_eff) / (phi * -np.log(phi))
        return np.log(kt / var), sd_var, np.log(var * rate), np.hypot(sd_var, sd_rate)


class LiveCalibration:
    """Stiffness and D (drag free) of a trapped particle, live, with a change detector.

    Feed ``update(positions, t)`` one frame (positions shape (axes,)) or a batch ((n, axes),
    t shape (n,)); O(axes) work per frame. Two forgotten AR(1) moment sets run side by
    side: a recent one (``half_life_frames``) and a reference one (4x longer). A change
    of stiffness is flagged when the recent ln k leaves the reference by more than
    ``change_sigma`` combined standard errors on any axis for ``persist`` frames in a
    row (checked every ``CHECK_EVERY`` frames). dt is the median frame interval seen so
    far, from ``t``. Intervals are log-normal (asymptotic); the offline ``dragfree``
    posterior is the exact one. ~0.1 ms per frame on a loaded core.
    """

    def __init__(
        self,
        *,
        temperature_k: float = 300.0,
        half_life_frames: float = 200.0,
        change_sigma: float = 3.0,
        persist: int = 20,
        min_frames: int = 50,
    ) -> None:
        self.temperature_k = temperature_k
        hl = check_positive(half_life_frames, "half_life_frames")
        if hl < 5.0:
            raise ValueError(f"half_life_frames must be >= 5, got {half_life_frames!r}")
        self._hl = hl
        self._sigma = check_positive(change_sigma, "change_sigma")
        self._persist = max(round(persist / CHECK_EVERY), 1)  # in checks
        self._min = max(int(min_frames), 10)
        self._recent: _ForgottenAR1 | None = None
        self._ref: _ForgottenAR1 | None = None
        self._prev: NDArray[np.float64] | None = None
        self._t_prev = math.nan
        self._steps: list[float] = []
        self._dt = math.nan
        self._cached: LiveEstimate | None = None
        self._cached_n = 0
        self._n = 0
        self._since_reset = 0
        self._streak = 0
        self._changes = 0

    @property
    def temperature_k(self) -> float:
        """The sample temperature kT is taken at (the driver reports it; default 300 K)."""
        return self._temperature_k

    @temperature_k.setter
    def temperature_k(self, value: float) -> None:
        self._kt = physics(value, 1.0, WATER_VISCOSITY_PA_S)[0]  # checks it is > 0
        self._temperature_k = float(value)
        self._cached = None

    def update(self, positions: ArrayLike, t: ArrayLike) -> LiveEstimate | None:
        """Add frame(s); the estimate after the last one (None until ``min_frames``)."""
        pos = np.atleast_2d(np.asarray(positions, dtype=float))
        times = np.atleast_1d(np.asarray(t, dtype=float))
        if pos.shape[0] != times.size:
            raise ValueError(f"positions has {pos.shape[0]} frames but t has {times.size}")
        changed = False
        for x, ti in zip(pos, times, strict=True):
            changed |= self._add(x, float(ti))
        return self._current(changed, float(times[-1]))

    def _add(self, x: NDArray[np.float64], t: float) -> bool:
        if not np.all(np.isfinite(x)) or not math.isfinite(t):
            self._prev = None  # a lost frame breaks the pair chain
            return False
        if self._recent is None:
            self._recent = _ForgottenAR1(x.size, self._hl)
            self._ref = _ForgottenAR1(x.size, 4.0 * self._hl)
        prev, t_prev = self._prev, self._t_prev
        self._prev, self._t_prev = x, t
        if prev is None or not t > t_prev:
            return False
        if len(self._steps) < 1000:
            self._steps.append(t - t_prev)
            if len(self._steps) % 16 == 1:
                self._dt = float(np.median(self._steps))
        assert self._ref is not None
        self._recent.add(prev, x)
        self._ref.add(prev, x)
        self._n += 1
        self._since_reset += 1
        if self._since_reset < max(self._min, int(self._hl)) or self._n % CHECK_EVERY:
            return False
        ln_k, sd, _, _ = self._recent.estimate(self._dt, self._kt)
        ln_ref, sd_ref, _, _ = self._ref.estimate(self._dt, self._kt)
        far = np.abs(ln_k - ln_ref) > self._sigma * np.hypot(sd, sd_ref)
        self._streak = self._streak + 1 if bool(np.any(far)) else 0
        if self._streak < self._persist:
            return False
        self._changes += 1
        self._streak = 0
        self._since_reset = 0
        self._ref.copy_from(self._recent)
        return True

    def _current(self, changed: bool, t: float) -> LiveEstimate | None:
        """The estimate, recomputed every CHECK_EVERY frames (it moves on the half-life)."""
        if self._n < self._min or self._recent is None:
            return None
        cached = self._cached
        if cached is not None and not changed and self._n - self._cached_n < CHECK_EVERY:
            return LiveEstimate(cached.k, cached.diffusion, False, self._changes, t)
        self._cached_n = self._n
        ln_k, sd_k, ln_d, sd_d = self._recent.estimate(self._dt, self._kt)

        def est(v: float, sd: float, unit: str) -> Estimate:
            value = math.exp(min(v, 700.0))
            if not sd < 50.0:  # nothing learnt (e.g. lag-1 correlation at 0 or 1)
                return Estimate(value, math.inf, unit, (0.0, math.inf), "live_ar1")
            iv = (value * math.exp(-Z95 * sd), value * math.exp(Z95 * sd))
            return Estimate(value, value * sd, unit, iv, "live_ar1")

        ks = tuple(est(float(a), float(b), "fN/um") for a, b in zip(ln_k, sd_k, strict=True))
        ds = tuple(est(float(a), float(b), "um^2/s") for a, b in zip(ln_d, sd_d, strict=True))
        self._cached = LiveEstimate(ks, ds, changed, self._changes, t)
        return self._cached


__all__ = ["LiveCalibration", "LiveEstimate", "OnlineStiffness"]
