"""Learned surrogate of the exact optical force, evaluated in plain numpy.

With circular polarisation the trap is symmetric about the beam axis, so the force
on a sphere of radius a at (rho, phi, z) from the focus is a function of (rho, z, a)
only, rotated by phi: F = F_rho e_rho + F_phi e_phi + F_z e_z. A small MLP (trained by
`scopeloop train configs/train-optical-force.yaml`) maps (rho, z, a) to those three
efficiencies; the weights ship as an .npz next to this module so the twin needs
neither torch nor training at run time. The in-plane parts are rho times a function
of rho^2 (F_rho, F_phi are odd in rho), so the force vanishes on the axis exactly and
the centre stiffness is the net's own value there, not a difference of errors.

Beyond `rho_max_um` the beam's light has fallen to noise and the force is taken as
zero; z and a must stay inside the trained domain (a clear error otherwise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, model_validator

from simulators.optics.optics import TrapOptics

if TYPE_CHECKING:
    from simulators.optics.forces import ExactForceModel

SHIPPED_SURROGATE = Path(__file__).with_name("optical_force_surrogate.npz")


class SurrogateDomain(BaseModel):
    """Where the surrogate is trained and trusted (particle centre minus focus, um)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rho_max_um: float = Field(2.5, gt=0.0, le=10.0)
    z_min_um: float = Field(-1.0, ge=-10.0, le=0.0)
    z_max_um: float = Field(1.5, gt=0.0, le=10.0)
    radius_min_um: float = Field(0.25, gt=0.0, le=5.0)
    radius_max_um: float = Field(1.0, gt=0.0, le=5.0)

    @model_validator(mode="after")
    def _ordered(self) -> SurrogateDomain:
        if self.radius_max_um <= self.radius_min_um:
            raise ValueError(f"radius_max_um must exceed radius_min_um ({self.radius_min_um})")
        return self

    @property
    def reach_um(self) -> float:
        """Farthest point from the focus the exact model must resolve."""
        return math.hypot(self.rho_max_um, max(-self.z_min_um, self.z_max_um))

    def lower(self) -> np.ndarray:
        return np.array([0.0, self.z_min_um, self.radius_min_um])

    def upper(self) -> np.ndarray:
        return np.array([self.rho_max_um, self.z_max_um, self.radius_max_um])


def exact_samples(
    model: ExactForceModel, domain: SurrogateDomain, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n uniform points (rho, z, a) of the domain and their exact efficiencies
    (Q_rho, Q_phi, Q_z) in the beam of `model`."""
    u = rng.uniform(domain.lower(), domain.upper(), (n, 3))
    q = model.efficiency(np.column_stack((u[:, 0], np.zeros(n), u[:, 1])), u[:, 2])
    return u, q


class ForceSurrogate:
    """The exported MLP: (rho, z, a) -> (Q_rho, Q_phi, Q_z), F = Q n_m P / c."""

    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else SHIPPED_SURROGATE
        if not path.is_file():
            raise ValueError(
                f"trap_surrogate: no surrogate weights at {path} "
                "(train them with `scopeloop train configs/train-optical-force.yaml`)"
            )
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            n_layers = int(meta["n_layers"])
            self.weights = [np.ascontiguousarray(data[f"w{i}"]) for i in range(n_layers)]
            self.biases = [np.ascontiguousarray(data[f"b{i}"]) for i in range(n_layers)]
            self._freqs = np.ascontiguousarray(data["freqs"]) if "freqs" in data else None
        self.path = path
        self.meta = meta
        self.optics = TrapOptics.model_validate(meta["optics"])
        self.domain = SurrogateDomain.model_validate(meta["domain"])
        # The trunk sees (rho^2, z, a) scaled on the (padded) domain it was trained on.
        self._lo = np.asarray(meta["input_lower"], dtype=np.float32)
        self._span = np.asarray(meta["input_upper"], dtype=np.float32) - self._lo
        self._scale = float(meta["output_scale"])
        self._fold_input_scaling()
        self._fn_per_mw = self.optics.fn_per_mw

    def check_radius(self, radius_um: float, field: str = "radius_um") -> None:
        d = self.domain
        if not (d.radius_min_um <= radius_um <= d.radius_max_um):
            raise ValueError(
                f"{field}: {radius_um:g} um is outside the surrogate's trained radii "
                f"[{d.radius_min_um:g}, {d.radius_max_um:g}] um"
            )

    def _fold_input_scaling(self) -> None:
        """Fold the [-1, 1] input scaling into the Fourier frequencies and the first layer,
        so an evaluation is matmuls and activations only (the twin calls this per step)."""
        sc = (2.0 / self._span).astype(np.float32)
        off = (-2.0 * self._lo / self._span - 1.0).astype(np.float32)
        w0, b0 = self.weights[0], self.biases[0]
        if self._freqs is None:
            self._freq_u = None
            self.weights[0] = sc[:, None] * w0
            self.biases[0] = b0 + off @ w0
            return
        tau = np.float32(2.0 * math.pi)
        self._freq_u = tau * sc[:, None] * self._freqs
        self._freq_b = tau * (off @ self._freqs)
        w_u = w0[:3]
        self.weights[0] = np.concatenate((sc[:, None] * w_u, w0[3:]), axis=0)
        self.biases[0] = b0 + off @ w_u

    def cylindrical(self, rho_z_a: np.ndarray) -> np.ndarray:
        """(P, 3) inputs (rho, z, a) -> (P, 3) efficiencies (Q_rho, Q_phi, Q_z)."""
        u = np.array(rho_z_a, dtype=np.float32)
        rho = u[:, 0:1].copy()
        u[:, 0:1] *= rho  # the trunk sees rho^2
        if self._freq_u is not None:
            p = u @ self._freq_u
            p += self._freq_b
            h = np.concatenate((u, np.sin(p), np.cos(p)), axis=1)
        else:
            h = u
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w
            h += b
            if i < last:  # SiLU in place: h / (1 + exp(-h))
                t = np.negative(h)
                np.exp(t, out=t)
                t += 1.0
                h /= t
        h[:, :2] *= rho
        return h.astype(float) * self._scale

    def efficiency(self, positions_um: ArrayLike, radius_um: float) -> np.ndarray:
        """(P, 3) Cartesian Q at particle-minus-focus positions; zero beyond rho_max."""
        r = np.asarray(positions_um, dtype=float).reshape(-1, 3)
        self.check_radius(radius_um)
        d = self.domain
        if np.any(r[:, 2] < d.z_min_um) or np.any(r[:, 2] > d.z_max_um):
            raise ValueError(
                f"z_um must lie in the surrogate's trained [{d.z_min_um:g}, {d.z_max_um:g}] um"
            )
        rho = np.hypot(r[:, 0], r[:, 1])
        out = np.zeros_like(r)
        near = np.flatnonzero(rho <= d.rho_max_um)
        if near.size == 0:
            return out
        inputs = np.column_stack((rho[near], r[near, 2], np.full(near.size, radius_um)))
        q = self.cylindrical(inputs)
        safe = np.maximum(rho[near], 1e-12)
        c, s = r[near, 0] / safe, r[near, 1] / safe
        c = np.where(rho[near] > 0, c, 1.0)
        out[near, 0] = q[:, 0] * c - q[:, 1] * s
        out[near, 1] = q[:, 0] * s + q[:, 1] * c
        out[near, 2] = q[:, 2]
        return out

    def force_fn(
        self, positions_um: ArrayLike, radius_um: float, power_mw: float = 1.0
    ) -> np.ndarray:
        """(P, 3) force in fN (linear in beam power)."""
        return self.efficiency(positions_um, radius_um) * (self._fn_per_mw * power_mw)

    def axial_equilibrium_um(self, radius_um: float) -> float:
        """z where the on-axis force vanishes (stable: F_z falls through zero), by bisection."""
        self.check_radius(radius_um)
        d = self.domain
        z = np.linspace(d.z_min_um, d.z_max_um, 401)
        fz = self.cylindrical(np.column_stack((np.zeros_like(z), z, np.full_like(z, radius_um))))
        down = np.flatnonzero((fz[:-1, 2] > 0) & (fz[1:, 2] <= 0))
        if down.size == 0:
            raise ValueError(
                f"particle_radius_um: {radius_um:g} um has no stable axial equilibrium in the "
                f"trained z range [{d.z_min_um:g}, {d.z_max_um:g}] um (the beam pushes it out)"
            )
        lo, hi = float(z[down[0]]), float(z[down[0] + 1])
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            q = self.cylindrical(np.array([[0.0, mid, radius_um]]))[0, 2]
            lo, hi = (mid, hi) if q > 0 else (lo, mid)
        return 0.5 * (lo + hi)

    def lateral_stiffness_fn_per_um_per_mw(
        self, radius_um: float, z_um: float, h_um: float = 0.02
    ) -> float:
        """-dF_rho/drho at the axis (fN/um per mW), by a central difference."""
        q = self.cylindrical(np.array([[h_um, z_um, radius_um], [-h_um, z_um, radius_um]]))
        return float(-(q[0, 0] - q[1, 0]) / (2 * h_um) * self._fn_per_mw)
