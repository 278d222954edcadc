"""Orthonormal tangential vector spherical harmonics (VSH) on the unit sphere.

B_nm = r grad Y_nm / sqrt(n(n+1)) and C_nm = r_hat x B_nm, with Y_nm scipy's orthonormal
spherical harmonics, so {B_nm, C_nm} is an orthonormal basis of tangential fields:
the far field of anything, and the angular spectrum of any beam, is a vector of
coefficients on it. A sphere's scattering is diagonal there (Mie), which is why the
force model lives in this basis. Index k runs over (type, n, m): type 0 = B (electric,
TM, Mie a_n), type 1 = C (magnetic, TE, Mie b_n); n = 1..N, m = -n..n.
"""

from __future__ import annotations

import numpy as np
from scipy.special import sph_legendre_p_all


def mode_indices(n_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(type, n, m) of every mode k up to degree n_max, in the order used everywhere."""
    ns = np.concatenate([np.full(2 * n + 1, n) for n in range(1, n_max + 1)])
    ms = np.concatenate([np.arange(-n, n + 1) for n in range(1, n_max + 1)])
    kinds = np.repeat([0, 1], len(ns))
    return kinds, np.tile(ns, 2), np.tile(ms, 2)


def theta_parts(n_max: int, theta: np.ndarray) -> np.ndarray:
    """(T, K, 2) complex: the (e_theta, e_phi) components of every mode without e^{i m phi}.

    theta must avoid the poles (quadrature nodes do), where m Y / sin(theta) is 0/0.
    """
    theta = np.asarray(theta, dtype=float)
    p = sph_legendre_p_all(n_max, n_max, theta, diff_n=1)  # (2, N+1, 2N+1, T)
    _, ns, ms = mode_indices(n_max)
    half = len(ns) // 2
    ns, ms = ns[:half], ms[:half]
    val = p[0, ns, ms]  # negative m wrap around, as scipy lays them out
    dval = p[1, ns, ms]
    norm = 1.0 / np.sqrt(ns * (ns + 1.0))
    b_theta = (dval * norm[:, None]).T  # (T, K/2)
    b_phi = (1j * ms[:, None] * val / np.sin(theta)[None, :] * norm[:, None]).T
    b = np.stack((b_theta, b_phi), axis=-1)
    c = np.stack((-b_phi, b_theta), axis=-1)  # r_hat x (e_t, e_p) = (-p, t)
    return np.concatenate((b, c), axis=1)


def cartesian(n_max: int, theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """(J, K, 3) complex Cartesian VSH at directions (theta_j, phi_j)."""
    theta = np.asarray(theta, dtype=float)
    phi = np.asarray(phi, dtype=float)
    parts = theta_parts(n_max, theta)
    _, _, ms = mode_indices(n_max)
    parts = parts * np.exp(1j * ms[None, :] * phi[:, None])[..., None]
    ct, st, cp, sp = np.cos(theta), np.sin(theta), np.cos(phi), np.sin(phi)
    e_theta = np.stack((ct * cp, ct * sp, -st), axis=-1)  # (J, 3)
    e_phi = np.stack((-sp, cp, np.zeros_like(sp)), axis=-1)
    return parts[..., 0:1] * e_theta[:, None, :] + parts[..., 1:2] * e_phi[:, None, :]
