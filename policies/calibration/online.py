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

from .physics import WATER_VISCOSITY_PA_S, check_positive, physics


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


__all__ = ["OnlineStiffness"]
