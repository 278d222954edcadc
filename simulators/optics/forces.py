"""Exact optical force on a sphere in an aplanatic focused beam (generalised Lorenz-Mie).

Route (Richards-Wolf beam, Mie T-matrix, far-field momentum balance):

1. The focused beam is an angular spectrum of plane waves A(k_hat) over the aperture
   (Gaussian pupil with a filling factor, sine condition, sqrt(cos) apodisation, the
   input polarisation carried onto e_theta / e_phi by the lens). Seen from a sphere
   at r0 from the focus, A(k_hat) picks up exp(i k k_hat.r0).
2. Projected on the orthonormal VSH basis (`simulators.optics.vsh`), the sphere's
   scattering is diagonal: f_k = (4 pi i / k) t_k alpha_k, with t_k the Mie a_n (B
   modes) or b_n (C modes) from miepython (Bohren-Huffman convention).
3. The force is the momentum the sphere takes from the light, read in the far field:
   F = (eps/2) \\oint [(4 pi / k) Im(A*.f) - |f|^2] r_hat dOmega, i.e. extinction minus
   scattering recoil (for a plane wave this is n P/c (sigma_ext - g sigma_sca), the
   radiation-pressure cross-section; the tests check it against miepython). The
   integrals are exact quadratic forms in the VSH coefficients, with sparse coupling
   matrices built once by quadrature (r_hat only couples n to n, n +- 1).

Force is reported in fN for `power_mw` of beam power entering the sample; it is
linear in power. Positions are particle centre minus focus, um; z along propagation.
Vectorised over positions (matrix products), so ~1e4 evaluations take seconds.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
from numpy.typing import ArrayLike
from scipy import sparse

from simulators.optics import vsh
from simulators.optics.optics import TrapOptics

__all__ = ["ExactForceModel", "TrapOptics", "multipole_order"]

_CHUNK = 512


def multipole_order(size_parameter: float) -> int:
    """Wiscombe's truncation: enough multipoles for the Mie series to converge."""
    x = max(float(size_parameter), 0.05)
    return max(2, math.ceil(x + 4.05 * x ** (1.0 / 3.0) + 2.0))


class ExactForceModel:
    """Generalised Lorenz-Mie force for spheres up to `radius_max_um`, anywhere within
    `reach_um` of the focus (which sets the angular resolution of the beam's spectrum)."""

    def __init__(self, optics: TrapOptics, radius_max_um: float, reach_um: float = 3.0) -> None:
        if not (0.0 < radius_max_um <= 5.0):
            raise ValueError(f"radius_max_um must be in (0, 5] um, got {radius_max_um}")
        if not (0.0 < reach_um <= 20.0):
            raise ValueError(f"reach_um must be in (0, 20] um, got {reach_um}")
        self.optics = optics
        self.radius_max_um = float(radius_max_um)
        self.reach_um = float(reach_um)
        k = optics.wavenumber_per_um
        self.k = k
        self.n_max = multipole_order(k * radius_max_um)
        # The beam is projected one degree further: r_hat couples n to n + 1.
        self.n_beam = self.n_max + 1
        self._setup_aperture()

    # ------------------------------------------------------------------ beam
    def _setup_aperture(self) -> None:
        opt = self.optics
        sin_max = opt.numerical_aperture / opt.n_medium
        cos_max = math.sqrt(1.0 - sin_max**2)
        phase_span = self.k * self.reach_um
        n_theta = math.ceil((self.n_beam + phase_span) / 2.0) + 12
        n_phi = 2 * self.n_beam + 2 * math.ceil(phase_span * sin_max) + 8
        x, w = np.polynomial.legendre.leggauss(n_theta)
        mu = 0.5 * (1.0 - cos_max) * x + 0.5 * (1.0 + cos_max)
        w_mu = 0.5 * (1.0 - cos_max) * w
        phi = (np.arange(n_phi) + 0.5) * (2.0 * math.pi / n_phi)
        mu_g, phi_g = (a.ravel() for a in np.meshgrid(mu, phi, indexing="ij"))
        weights = np.repeat(w_mu, n_phi) * (2.0 * math.pi / n_phi)
        theta_g = np.arccos(mu_g)
        st, ct = np.sin(theta_g), mu_g
        cp, sp = np.cos(phi_g), np.sin(phi_g)
        self.directions = np.stack((st * cp, st * sp, ct), axis=-1)  # (J, 3)
        # Aplanatic lens: a pupil ray at height f sin(theta) keeps its radial part on
        # e_theta and its azimuthal part on e_phi; sqrt(cos) conserves energy.
        pupil = np.exp(-((st / sin_max / opt.filling_factor) ** 2)) * np.sqrt(ct)
        pol = (
            np.array([1.0, 1.0j]) / math.sqrt(2.0)
            if opt.polarization == "circular"
            else np.array([1.0, 0.0], dtype=complex)
        )
        radial = pol[0] * cp + pol[1] * sp
        azimuthal = -pol[0] * sp + pol[1] * cp
        e_theta = np.stack((ct * cp, ct * sp, -st), axis=-1)
        e_phi = np.stack((-sp, cp, np.zeros_like(sp)), axis=-1)
        spectrum = pupil[:, None] * (radial[:, None] * e_theta + azimuthal[:, None] * e_phi)
        self.spectrum = spectrum  # A(k_hat_j), (J, 3)
        self.weights = weights
        power = np.einsum("jk,jk->j", spectrum, spectrum.conj()).real
        self.spectrum_norm = float(np.sum(weights * power))
        # alpha_k = sum_j w_j X_k*(k_j) . A_j exp(i k k_j . r0); modes built in blocks
        # of directions, since (J, K, 3) would not fit for large spheres.
        blocks = []
        for start in range(0, len(weights), _CHUNK):
            sl = slice(start, start + _CHUNK)
            modes = vsh.cartesian(self.n_beam, theta_g[sl], phi_g[sl])
            blocks.append(np.einsum("jkc,jc->jk", modes.conj(), spectrum[sl]) * weights[sl, None])
        self._project = np.concatenate(blocks)

    def incident_field(self, points_um: ArrayLike) -> np.ndarray:
        """(P, 3) complex focal field E(r) = sum_j w_j A_j exp(i k k_j . r) (beam units)."""
        r = np.asarray(points_um, dtype=float).reshape(-1, 3)
        phase = np.exp(1j * self.k * (r @ self.directions.T))
        return phase @ (self.spectrum * self.weights[:, None])

    def intensity_per_mw(self, points_um: ArrayLike) -> np.ndarray:
        """(P,) intensity at r for 1 mW of beam power, mW/um^2 (Poynting flux of the spectrum)."""
        e = self.incident_field(points_um)
        return np.einsum("pc,pc->p", e, e.conj()).real / self.power_units

    @property
    def power_units(self) -> float:
        """Beam power in units of |E|^2 um^2: (2 pi / k)^2 int |A|^2 dOmega."""
        return (2.0 * math.pi / self.k) ** 2 * self.spectrum_norm

    # ------------------------------------------------------------- couplings
    @cached_property
    def _couplings(self) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
        """(Qz, Q+): <X_k'| cos(theta) |X_k> and <X_k'| sin(theta) e^{i phi} |X_k> on the sphere."""
        n = self.n_beam
        x, w = np.polynomial.legendre.leggauss(2 * n + 8)
        theta = np.arccos(x)
        parts = vsh.theta_parts(n, theta)  # (T, K, 2)
        _, _, ms = vsh.mode_indices(n)
        gram_z = np.einsum("t,tac,tbc->ab", w * x, parts.conj(), parts) * 2.0 * math.pi
        gram_p = np.einsum("t,tac,tbc->ab", w * np.sqrt(1.0 - x * x), parts.conj(), parts)
        gram_p *= 2.0 * math.pi
        gram_z[ms[:, None] != ms[None, :]] = 0.0
        gram_p[ms[:, None] != ms[None, :] + 1] = 0.0
        tol = 1e-12
        gram_z[abs(gram_z) < tol] = 0.0
        gram_p[abs(gram_p) < tol] = 0.0
        return sparse.csr_matrix(gram_z), sparse.csr_matrix(gram_p)

    # ------------------------------------------------------------------ Mie
    def mie_t(self, radius_um: ArrayLike) -> np.ndarray:
        """(R, K) diagonal of the sphere's scattering operator per radius (zero at n_beam)."""
        import miepython  # numba-compiled; imported only when exact forces are needed

        radius = np.atleast_1d(np.asarray(radius_um, dtype=float))
        if radius.min() <= 0.0 or radius.max() > self.radius_max_um * (1 + 1e-9):
            raise ValueError(
                f"radius_um must be in (0, {self.radius_max_um:g}] um for this model, "
                f"got {radius.min():g}..{radius.max():g}"
            )
        opt = self.optics
        m = np.full(radius.shape, opt.n_particle / opt.n_medium, dtype=complex)
        a, b = miepython.coefficients(m, self.k * radius, n_pole=self.n_max)
        a = np.asarray(a).reshape(len(radius), self.n_max)
        b = np.asarray(b).reshape(len(radius), self.n_max)
        kinds, ns, _ = vsh.mode_indices(self.n_beam)
        t = np.zeros((len(radius), len(ns)), dtype=complex)
        inside = ns <= self.n_max
        idx = ns[inside] - 1
        t[:, inside] = np.where(kinds[inside] == 0, a[:, idx], b[:, idx])
        return t

    # ---------------------------------------------------------------- force
    def efficiency(self, positions_um: ArrayLike, radius_um: ArrayLike) -> np.ndarray:
        """(P, 3) dimensionless force Q (F = Q n_m P / c) at particle-minus-focus positions.

        `radius_um` is one radius or one per position.
        """
        r = np.asarray(positions_um, dtype=float).reshape(-1, 3)
        radius = np.asarray(radius_um, dtype=float)
        per_point = radius.ndim > 0 and radius.size > 1
        if per_point and radius.shape != (len(r),):
            raise ValueError(f"radius_um must be a scalar or shape ({len(r)},), got {radius.shape}")
        if np.any(np.linalg.norm(r, axis=1) > self.reach_um * (1 + 1e-9)):
            raise ValueError(
                f"positions must lie within reach_um = {self.reach_um:g} um of the focus"
            )
        t_all = self.mie_t(radius.reshape(-1))
        qz, qp = self._couplings
        out = np.empty((len(r), 3))
        ext = 4.0 * math.pi / self.k
        for start in range(0, len(r), _CHUNK):
            sl = slice(start, start + _CHUNK)
            phase = np.exp(1j * self.k * (r[sl] @ self.directions.T))
            c = phase @ self._project  # (P, K) incident coefficients
            t = t_all[sl] if per_point else t_all
            d = (1j * ext) * t * c  # far-field scattering coefficients
            qz_d = (qz @ d.T).T
            qp_d = (qp @ d.T).T
            qp_c = (qp @ c.T).T
            i1z = np.einsum("pk,pk->p", c.conj(), qz_d)
            i2z = np.einsum("pk,pk->p", d.conj(), qz_d).real
            j1 = np.einsum("pk,pk->p", c.conj(), qp_d)
            j1b = np.einsum("pk,pk->p", d.conj(), qp_c)
            i2p = np.einsum("pk,pk->p", d.conj(), qp_d)
            fz = ext * i1z.imag - i2z
            fxy = ext * (j1 - j1b) / 2j - i2p
            out[sl, 0], out[sl, 1], out[sl, 2] = fxy.real, fxy.imag, fz
        return out / self.power_units

    def force_fn(
        self, positions_um: ArrayLike, radius_um: ArrayLike, power_mw: float = 1.0
    ) -> np.ndarray:
        """(P, 3) force in fN on spheres at particle-minus-focus positions, beam power in mW."""
        return self.efficiency(positions_um, radius_um) * (self.optics.fn_per_mw * power_mw)
