"""Brownian particle twin with a laser actuator (thermophoretic heating or optical tweezers).

Overdamped Langevin dynamics integrated by Euler–Maruyama in the camera field frame
(x along columns, y along rows; um, s, mW, K). Defaults follow the thermophoretic
trap of Franzl et al. (D ~ 0.33 um^2/s, D_T ~ 0.67 um^2/(K s), ~20 K per mW with
~0.38 K/um^2 curvature at the spot centre), see shared/ANCHORS.md.

The thermal noise comes from a dedicated generator whose draws depend only on the
number of particles and on the step length, so a laser-off run and a feedback run
with the same seed feel exactly the same kicks: the comparison isolates the control.

Every particle also carries an in-plane orientation that diffuses with D_r (Stokes–
Einstein for a sphere unless given). Janus particles ("janus") self-propel along it at
v0 = swim_speed * (laser power falling on them), as light-absorbing-cap swimmers do
(Muinos-Landin et al.); passive ones only rotate. Orientation kicks come from a third
stream, so switching propulsion on never changes the translational noise.

Tweezers come in two models (`trap_model`): `harmonic`, a Gaussian-cut spring, or
`surrogate`, the learned surrogate of the exact Mie force of a focused beam
(`simulators.optics.surrogate`): anharmonic away from the centre, with a finite escape
force, set by the particle's radius. The twin is 2-D, so a particle is taken to sit
at its trap's axial equilibrium (where the scattering and gradient forces balance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.contract import KB_FN_UM_PER_K, LaserSpot
from simulators.optics.surrogate import ForceSurrogate

#: Boltzmann constant in fN*um/K (1 fN*um = 1e-21 J), so kB*T(296 K) ~ 4.09 fN*um.
#: Viscosity of water in fN*s/um^2 (1 fN*s/um^2 = 1 mPa*s).
WATER_VISCOSITY_FN_S_PER_UM2 = 1.0


class ParticleTwinConfig(BaseModel):
    """Physical parameters of the particle twin; bounds make bad values fail loudly."""

    model_config = ConfigDict(extra="forbid")

    n_particles: int = Field(1, ge=1, le=5000)
    diffusion_um2_s: float = Field(0.33, gt=0.0, le=100.0)
    thermodiffusion_um2_per_k_s: float = Field(0.67, ge=0.0, le=1000.0)
    heating_k_per_mw: float = Field(20.0, ge=0.0, le=1000.0)
    heating_width_um: float = Field(7.25, gt=0.0, le=1000.0)
    actuator: Literal["heating", "tweezers"] = "heating"
    # 20 fN/um per mW = 20 pN/um per W, typical for a 1 um bead in a high-NA trap.
    trap_stiffness_fn_per_um_per_mw: float = Field(20.0, ge=0.0, le=1e6)
    trap_range_um: float = Field(1.0, gt=0.0, le=1e6)
    # harmonic: the two fields above; surrogate: the learned Mie force for
    # particle_radius_um (trap_surrogate: its .npz, None for the shipped one).
    trap_model: Literal["harmonic", "surrogate"] = "harmonic"
    trap_surrogate: str | None = None
    temperature_k: float = Field(296.0, gt=0.0, le=1000.0)
    max_internal_step_s: float = Field(0.002, gt=0.0, le=1.0)
    initial: Literal["center", "random"] = "center"
    drift_um_s: tuple[float, float] = (0.0, 0.0)
    particle_kind: Literal["passive", "janus"] = "passive"
    # Self-propulsion per mW of laser light on the particle; light at a particle is
    # sum_spots P exp(-r^2 / (2 illumination_radius^2)).
    swim_speed_um_s_per_mw: float = Field(2.0, ge=0.0, le=1e4)
    illumination_radius_um: float = Field(1.0, gt=0.0, le=1e4)
    # None: Stokes–Einstein kB T / (8 pi eta a^3) in water (~1.3 rad^2/s at a = 0.5 um).
    rotational_diffusion_rad2_s: float | None = Field(None, ge=0.0, le=1e6)
    particle_radius_um: float = Field(0.5, gt=0.0, le=100.0)

    @property
    def rotational_diffusion(self) -> float:
        """D_r in rad^2/s: the explicit value, else Stokes–Einstein for a sphere in water."""
        if self.rotational_diffusion_rad2_s is not None:
            return self.rotational_diffusion_rad2_s
        kt = KB_FN_UM_PER_K * self.temperature_k
        return kt / (8.0 * math.pi * WATER_VISCOSITY_FN_S_PER_UM2 * self.particle_radius_um**3)


def _reflect(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold coordinates back into [lo, hi] as mirror walls would, even for big overshoots."""
    span = hi - lo
    y = np.mod(v - lo, 2.0 * span)
    return lo + np.where(y > span, 2.0 * span - y, y)


@lru_cache(maxsize=8)
def _load_surrogate(path: str | None) -> ForceSurrogate:
    """One loaded surrogate per file, shared by every twin that uses it (read-only)."""
    return ForceSurrogate(path)


class SurrogateTrap:
    """A tweezers spot's in-plane force from the surrogate, at the axial equilibrium.

    The particle's radius and axial plane are fixed for a run, so the surrogate is
    evaluated once on a fine grid of rho (TABLE_POINTS, linear interpolation error
    ~1e-6 of the peak) and each step interpolates: the force per spot is
    P (-k(rho) d + k_phi(rho) z_hat x d), k = -F_rho / rho (the secant stiffness).
    """

    TABLE_POINTS = 4097

    def __init__(self, config: ParticleTwinConfig) -> None:
        self.surrogate = _load_surrogate(config.trap_surrogate)
        radius = config.particle_radius_um
        self.surrogate.check_radius(radius, "particles.particle_radius_um")
        self.radius_um = radius
        self.z_um = self.surrogate.axial_equilibrium_um(radius)
        self.rho_max_um = self.surrogate.domain.rho_max_um
        self.fn_per_mw = self.surrogate.optics.fn_per_mw
        rho = np.linspace(0.0, self.rho_max_um, self.TABLE_POINTS)
        rho[0] = 1e-6  # the net is odd in rho: Q / rho has a finite limit on the axis
        n = rho.size
        q = self.surrogate.cylindrical(
            np.column_stack((rho, np.full(n, self.z_um), np.full(n, radius)))
        )
        rho[0] = 0.0
        self._rho = rho
        safe = np.maximum(rho, 1e-6)
        self._k = -q[:, 0] / safe * self.fn_per_mw  # fN/um per mW
        self._k_phi = q[:, 1] / safe * self.fn_per_mw
        self._k[-1] = self._k_phi[-1] = 0.0  # beyond rho_max the light is gone
        # Lateral stiffness at the trap centre per mW of spot power.
        self.stiffness_fn_per_um_per_mw = float(self._k[0])

    def _lookup(self, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(k, k_phi) per mW at rho (< rho_max) by linear interpolation on the uniform grid."""
        pos = rho * ((self.TABLE_POINTS - 1) / self.rho_max_um)
        i = np.minimum(pos.astype(np.intp), self.TABLE_POINTS - 2)
        w = pos - i
        k = self._k[i] * (1.0 - w) + self._k[i + 1] * w
        k_phi = self._k_phi[i] * (1.0 - w) + self._k_phi[i + 1] * w
        return k, k_phi

    def secant_stiffness_fn_per_um_per_mw(self, rho_um: np.ndarray) -> np.ndarray:
        """-F_rho(rho) / rho per mW (fN/um): the centre stiffness, falling to 0 outside."""
        rho = np.asarray(rho_um, dtype=float)
        out = np.zeros_like(rho)
        near = rho < self.rho_max_um
        out[near] = self._lookup(rho[near])[0]
        return out

    def force_fn(self, d: np.ndarray, r2: np.ndarray, power_mw: np.ndarray) -> np.ndarray:
        """(N, 2) summed force, fN, from spots at offsets d (N, M, 2) = particle - spot."""
        out = np.zeros((d.shape[0], 2))
        n_idx, m_idx = np.nonzero(r2 < self.rho_max_um**2)
        if n_idx.size == 0:
            return out
        k, k_phi = self._lookup(np.sqrt(r2[n_idx, m_idx]))
        k *= power_mw[m_idx]
        k_phi *= power_mw[m_idx]
        dd = d[n_idx, m_idx]
        n = d.shape[0]
        out[:, 0] = np.bincount(n_idx, -k * dd[:, 0] - k_phi * dd[:, 1], minlength=n)
        out[:, 1] = np.bincount(n_idx, -k * dd[:, 1] + k_phi * dd[:, 0], minlength=n)
        return out


class ParticleTwin:
    """N independent Brownian particles in a box with reflecting walls, pushed by laser spots."""

    def __init__(
        self, config: ParticleTwinConfig, box_um: tuple[float, float, float, float], seed: int
    ) -> None:
        xmin, xmax, ymin, ymax = (float(b) for b in box_um)
        if not (xmax > xmin and ymax > ymin):
            raise ValueError(f"box_um must satisfy xmin < xmax and ymin < ymax, got {box_um}")
        self.config = config
        self.box_um = (xmin, xmax, ymin, ymax)
        self.trap: SurrogateTrap | None = None
        if config.actuator == "tweezers" and config.trap_model == "surrogate":
            self.trap = SurrogateTrap(config)
        self._spots = np.zeros((0, 3))
        self._laser: tuple[LaserSpot, ...] = ()
        self.reset(seed)

    # ------------------------------------------------------------------ state
    def reset(self, seed: int | None = None) -> None:
        """Back to t = 0, initial positions and laser off; same seed gives the same run."""
        if seed is not None:
            self._seed = int(seed)
        # spawn(3) keeps children 0 and 1 identical to the former spawn(2), so existing
        # seeds replay the same translational runs; child 2 drives rotation only.
        noise_ss, init_ss, rot_ss = np.random.SeedSequence(self._seed).spawn(3)
        # Separate streams: the initial layout never shifts the thermal-noise sequence.
        self._noise_rng = np.random.default_rng(noise_ss)
        self._rot_rng = np.random.default_rng(rot_ss)
        init_rng = np.random.default_rng(init_ss)
        xmin, xmax, ymin, ymax = self.box_um
        n = self.config.n_particles
        self._xy = np.column_stack(
            (init_rng.uniform(xmin, xmax, n), init_rng.uniform(ymin, ymax, n))
        )
        if self.config.initial == "center":
            # One particle starts at the centre (the one a trap holds); any others are
            # scattered, since particles stacked on one spot would image as one.
            self._xy[0] = ((xmin + xmax) / 2.0, (ymin + ymax) / 2.0)
        # Drawn after the positions so the initial layout is unchanged by this feature.
        self._theta = init_rng.uniform(0.0, 2.0 * math.pi, n)
        self._t = 0.0
        self.set_laser(())

    @property
    def positions_um(self) -> np.ndarray:
        """Copy of the (N, 2) positions, so callers cannot corrupt the twin."""
        return self._xy.copy()

    @property
    def orientations_rad(self) -> np.ndarray:
        """Copy of the (N,) orientations; unwrapped (not folded into 0..2 pi) so rotational
        diffusion can be read off directly."""
        return self._theta.copy()

    @property
    def t_s(self) -> float:
        """Simulated time since the last reset."""
        return self._t

    @property
    def laser(self) -> tuple[LaserSpot, ...]:
        """Spots currently on (empty when off)."""
        return self._laser

    def set_laser(self, spots: Sequence[LaserSpot]) -> None:
        """Replace the active spots; takes effect from the next internal step."""
        self._laser = tuple(spots)
        self._spots = np.array(
            [(s.x_um, s.y_um, s.power_mw) for s in self._laser], dtype=float
        ).reshape(-1, 3)

    # ---------------------------------------------------------------- physics
    def temperature_rise_k(self, xy: np.ndarray) -> np.ndarray:
        """(N,) temperature rise summed over heating spots; zero for tweezers (no absorber)."""
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        if self.config.actuator != "heating" or len(self._spots) == 0:
            return np.zeros(len(xy))
        w = self.config.heating_width_um
        d = xy[:, None, :] - self._spots[None, :, :2]
        r2 = np.einsum("nmk,nmk->nm", d, d)
        amp = self._spots[:, 2] * self.config.heating_k_per_mw * w
        return (amp / np.sqrt(r2 + w * w)).sum(axis=1)

    def temperature_at_particles_k(self) -> np.ndarray:
        """(N,) absolute temperature at each particle now: ambient plus laser heating."""
        return self.config.temperature_k + self.temperature_rise_k(self._xy)

    def illumination_mw(self, xy: np.ndarray) -> np.ndarray:
        """(N,) laser power falling on particles at xy, summed over Gaussian spots."""
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        if len(self._spots) == 0:
            return np.zeros(len(xy))
        d = xy[:, None, :] - self._spots[None, :, :2]
        r2 = np.einsum("nmk,nmk->nm", d, d)
        w = np.exp(r2 * (-0.5 / self.config.illumination_radius_um**2))
        return w @ self._spots[:, 2]

    def swim_velocity_um_s(self, xy: np.ndarray, theta_rad: np.ndarray) -> np.ndarray:
        """(N, 2) self-propulsion v0 (cos th, sin th); zero for passive particles or laser off."""
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        cfg = self.config
        if cfg.particle_kind != "janus" or len(self._spots) == 0:
            return np.zeros_like(xy)
        v0 = cfg.swim_speed_um_s_per_mw * self.illumination_mw(xy)
        th = np.asarray(theta_rad, dtype=float)
        return np.column_stack((v0 * np.cos(th), v0 * np.sin(th)))

    def _offsets(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(particle minus spot (N, M, 2), its squared length (N, M))."""
        d = xy[:, None, :] - self._spots[None, :, :2]
        return d, np.einsum("nmk,nmk->nm", d, d)

    def drift_velocity_um_s(
        self, xy: np.ndarray, offsets: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """(N, 2) deterministic velocity: laser-induced drift plus the constant nuisance drift.

        `offsets` are `_offsets(xy)` when the caller has them already."""
        cfg = self.config
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        v = np.empty_like(xy)
        v[:] = cfg.drift_um_s
        if len(self._spots) == 0:
            return v
        d, r2 = offsets if offsets is not None else self._offsets(xy)
        power = self._spots[:, 2]
        if cfg.actuator == "heating":
            # T = P h w / sqrt(r^2 + w^2)  =>  -grad T = P h w d / (r^2 + w^2)^1.5 (outward).
            w = cfg.heating_width_um
            coef = cfg.thermodiffusion_um2_per_k_s * power * cfg.heating_k_per_mw * w
            scale = coef / (r2 + w * w) ** 1.5
        elif self.trap is not None:
            mobility = cfg.diffusion_um2_s / (KB_FN_UM_PER_K * cfg.temperature_k)
            return v + mobility * self.trap.force_fn(d, r2, power)
        else:
            # Stokes–Einstein mobility D / kB T times a Gaussian-cut harmonic force.
            k = cfg.trap_stiffness_fn_per_um_per_mw * power
            cut = np.exp(-r2 / (2.0 * cfg.trap_range_um**2))
            mobility = cfg.diffusion_um2_s / (KB_FN_UM_PER_K * cfg.temperature_k)
            scale = -mobility * k * cut
        v += np.einsum("nm,nmk->nk", scale, d)
        return v

    def _is_stiff(self, h: float) -> bool:
        """Whether the strongest tweezers spot relaxes a particle in under ~4 steps h."""
        cfg = self.config
        if cfg.actuator != "tweezers" or len(self._spots) == 0:
            return False
        k_per_mw = (
            self.trap.stiffness_fn_per_um_per_mw
            if self.trap is not None
            else cfg.trap_stiffness_fn_per_um_per_mw
        )
        mobility = cfg.diffusion_um2_s / (KB_FN_UM_PER_K * cfg.temperature_k)
        return mobility * k_per_mw * float(self._spots[:, 2].max()) * h > 0.25

    def _exponential_step(
        self,
        xy: np.ndarray,
        v: np.ndarray,
        kick: np.ndarray,
        h: float,
        offsets: tuple[np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """One step where the nearest spot's radial pull -r d (r from the secant stiffness
        at the particle) is exact OU: d -> d e^{-rh}, noise scaled to the OU variance;
        everything else in v (other spots, flow, swimming) is explicit. Particles out of
        every spot's reach take a plain Euler step."""
        cfg = self.config
        out = xy + v * h + kick
        d_all, r2_all = offsets
        nearest = np.argmin(r2_all, axis=1)
        rows = np.arange(len(xy))
        r2 = r2_all[rows, nearest]
        reach = self.trap.rho_max_um if self.trap is not None else 4.0 * cfg.trap_range_um
        held = np.flatnonzero(r2 < reach * reach)
        if held.size == 0:
            return out
        d = d_all[held, nearest[held]]
        rho = np.sqrt(r2[held])
        if self.trap is not None:
            k_secant = self.trap.secant_stiffness_fn_per_um_per_mw(rho)
        else:
            k_secant = cfg.trap_stiffness_fn_per_um_per_mw * np.exp(
                -(rho**2) / (2.0 * cfg.trap_range_um**2)
            )
        mobility = cfg.diffusion_um2_s / (KB_FN_UM_PER_K * cfg.temperature_k)
        z = np.maximum(mobility * k_secant * self._spots[nearest[held], 2], 0.0) * h
        safe = np.maximum(z, 1e-12)
        phi = np.where(z > 1e-9, -np.expm1(-z) / safe, 1.0)
        noise = np.where(z > 1e-9, np.sqrt(-np.expm1(-2.0 * z) / (2.0 * safe)), 1.0)
        rest = v[held] + (z / h)[:, None] * d  # v minus the linear pull integrated exactly
        out[held] = (
            (xy[held] - d)
            + np.exp(-z)[:, None] * d
            + (phi * h)[:, None] * rest
            + noise[:, None] * kick[held]
        )
        return out

    def n_internal_steps(self, dt_s: float) -> int:
        """Pieces a step(dt) is split into; depends on dt only so noise draws never vary."""
        if dt_s <= 0.0:
            return 0
        return max(1, math.ceil(dt_s / self.config.max_internal_step_s * (1.0 - 1e-12)))

    def step(self, dt_s: float) -> np.ndarray:
        """Advance by dt_s with Euler–Maruyama and reflecting walls; returns new positions.

        Orientations diffuse with D_r from their own stream; Janus propulsion uses the
        orientation at the start of each internal step (Euler, like the drift).
        """
        if dt_s < 0.0 or not math.isfinite(dt_s):
            raise ValueError(f"dt_s must be finite and >= 0, got {dt_s}")
        n = self.n_internal_steps(dt_s)
        if n == 0:
            return self.positions_um
        h = dt_s / n
        # One block of draws, identical whatever the laser does (same as n sequential draws).
        kicks = self._noise_rng.standard_normal((n, *self._xy.shape))
        kicks *= math.sqrt(2.0 * self.config.diffusion_um2_s * h)
        turns = self._rot_rng.standard_normal((n, len(self._theta)))
        turns *= math.sqrt(2.0 * self.config.rotational_diffusion * h)
        swims = self.config.particle_kind == "janus" and len(self._spots) > 0
        xmin, xmax, ymin, ymax = self.box_um
        xy = self._xy
        theta = self._theta
        # A stiff trap (relaxation time ~ h) would make explicit Euler overshoot: then
        # each particle's pull towards its nearest spot is integrated exactly as a local
        # OU process (exponential Euler with the secant stiffness), the rest explicitly.
        stiff = self._is_stiff(h)
        for i in range(n):
            offsets = self._offsets(xy) if stiff else None
            v = self.drift_velocity_um_s(xy, offsets)
            if swims:
                v += self.swim_velocity_um_s(xy, theta)
            if offsets is not None:
                xy = self._exponential_step(xy, v, kicks[i], h, offsets)
            else:
                xy = xy + v * h + kicks[i]
            theta = theta + turns[i]
            x, y = xy[:, 0], xy[:, 1]
            if x.min() < xmin or x.max() > xmax:
                xy[:, 0] = _reflect(x, xmin, xmax)
            if y.min() < ymin or y.max() > ymax:
                xy[:, 1] = _reflect(y, ymin, ymax)
        self._xy = xy
        self._theta = theta
        self._t += dt_s
        return self.positions_um
