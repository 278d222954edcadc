"""Turn the drift velocities a controller wants into laser spots, and report what they give.

Why a separate module: every controller (PID, predictor, virtual potential, path,
multi-trap) asks for velocities; only this module knows the actuator physics. It
returns the velocity each particle will actually get (after power limits), which is
what a delay-compensating estimator must integrate.

Heating (thermophoresis): a spot at distance d behind a particle pushes it away at
drift_per_mw(d) * P; one spot per particle, and with several spots every spot pushes
every particle, so powers are solved jointly (bounded least squares). Tweezers: a
spot at lead d pulls with mobility * k(P) * d * exp(-d^2 / 2 R^2), inverted for d in
[0, R] (beyond R the pull weakens again, so R is the ceiling).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import lsq_linear

from policies.contract import KB_FN_UM_PER_K, LaserSpot
from policies.control.config import ActuatorSettings

_ANGLES = (0.0, 2.0 * math.pi / 3.0, -2.0 * math.pi / 3.0)


def _rotate(velocities: np.ndarray, angle: float, speed: np.ndarray) -> np.ndarray:
    """Unit vectors along the velocities rotated by `angle` (+x for particles at rest)."""
    unit = np.where(
        speed[:, None] > 0, velocities / np.maximum(speed, 1e-300)[:, None], [[1.0, 0.0]]
    )
    c, s = math.cos(angle), math.sin(angle)
    return np.column_stack((c * unit[:, 0] - s * unit[:, 1], s * unit[:, 0] + c * unit[:, 1]))


class Actuator:
    def __init__(self, settings: ActuatorSettings, max_power_per_spot_mw: float | None = None):
        self.settings = settings
        self.max_power = settings.max_power_mw
        if max_power_per_spot_mw is not None:
            self.max_power = min(self.max_power, max_power_per_spot_mw)
        heating = settings.heating
        self.offset = settings.spot_offset_um or heating.best_offset_um()

    # ----------------------------------------------------------------- heating
    def _heating_unit_drift(self, particles: np.ndarray, spots: np.ndarray) -> np.ndarray:
        """(N, 2, M): drift of particle n per mW at spot m."""
        h = self.settings.heating
        d = particles[:, None, :] - spots[None, :, :]  # (N, M, 2)
        r2 = np.einsum("nmk,nmk->nm", d, d)
        w = h.heating_width_um
        scale = h.thermodiffusion_um2_per_k_s * h.heating_k_per_mw * w / (r2 + w * w) ** 1.5
        return np.transpose(scale[:, :, None] * d, (0, 2, 1))

    def _heating(self, particles: np.ndarray, velocities: np.ndarray) -> tuple:
        speed = np.hypot(velocities[:, 0], velocities[:, 1])
        active = np.flatnonzero(speed > 0.0)
        realised = np.zeros_like(velocities)
        if active.size == 0 or self.max_power <= 0.0:
            return (), realised
        direction = velocities[active] / speed[active, None]
        spots = particles[active] - self.offset * direction
        if len(particles) == 1:
            per_mw = self.settings.heating.drift_per_mw(self.offset)
            powers = np.minimum(speed[active] / per_mw, self.max_power)
        else:
            # Candidates behind and at +-120 deg around every particle, so the bounded
            # least squares can cancel the push each spot gives the other particles.
            cands = [particles - self.offset * _rotate(velocities, a, speed) for a in _ANGLES]
            spots = np.concatenate(cands)
            gain = self._heating_unit_drift(particles, spots).reshape(-1, len(spots))
            sol = lsq_linear(gain, velocities.reshape(-1), bounds=(0.0, self.max_power))
            keep = sol.x > 1e-6 * max(self.max_power, 1e-12)
            spots, powers = spots[keep], np.clip(sol.x[keep], 0.0, self.max_power)
        realised = np.einsum("nkm,m->nk", self._heating_unit_drift(particles, spots), powers)
        out = tuple(
            LaserSpot(float(s[0]), float(s[1]), float(p))
            for s, p in zip(spots, powers, strict=True)
        )
        return out, realised

    # ---------------------------------------------------------------- tweezers
    def tweezers_mobility_k(self, power_mw: float) -> float:
        """mobility * k (1/s) of a tweezers spot at `power_mw`."""
        tw = self.settings.tweezers
        mobility = tw.diffusion_um2_s / (KB_FN_UM_PER_K * tw.temperature_k)
        return mobility * tw.trap_stiffness_fn_per_um_per_mw * power_mw

    def _tweezers(self, particles: np.ndarray, velocities: np.ndarray) -> tuple:
        speed = np.hypot(velocities[:, 0], velocities[:, 1])
        big_r = self.settings.tweezers.trap_range_um
        mk = self.tweezers_mobility_k(self.max_power)
        realised = np.zeros_like(velocities)
        if mk <= 0.0:
            return (), realised
        # f(d) = d exp(-d^2 / 2R^2) rises monotonically on [0, R] to R e^-1/2: bisection.
        want = np.minimum(speed / mk, big_r * math.exp(-0.5))
        lo, hi = np.zeros_like(want), np.full_like(want, big_r)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            below = mid * np.exp(-(mid**2) / (2 * big_r**2)) < want
            lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
        lead = 0.5 * (lo + hi)
        direction = np.divide(
            velocities, speed[:, None], out=np.zeros_like(velocities), where=speed[:, None] > 0
        )
        spots = particles + lead[:, None] * direction
        realised = mk * (lead * np.exp(-(lead**2) / (2 * big_r**2)))[:, None] * direction
        out = tuple(LaserSpot(float(s[0]), float(s[1]), float(self.max_power)) for s in spots)
        return out, realised

    def spots_for(
        self, particles: np.ndarray, velocities: np.ndarray
    ) -> tuple[tuple[LaserSpot, ...], np.ndarray]:
        """Spots that give each particle (N, 2) its wanted drift (N, 2) um/s, and the drift
        they will really give (what a predictor must integrate)."""
        particles = np.asarray(particles, float).reshape(-1, 2)
        velocities = np.asarray(velocities, float).reshape(-1, 2)
        if self.settings.actuator == "heating":
            return self._heating(particles, velocities)
        return self._tweezers(particles, velocities)
