"""Ray-optics force on a large sphere (Ashkin 1992), the cross-check for radius >> wavelength.

Each pupil ray converges on the focus carrying the power of the same angular spectrum
the wave model uses; the sphere takes Ashkin's scattering (along the ray) and
gradient (towards the ray) forces with Fresnel coefficients, averaged over s and p
(circular polarisation). Valid only when the sphere is many wavelengths across.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from simulators.optics.forces import ExactForceModel


def _fresnel_r(n1: float, n2: float, ti: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Power reflectances (s, p) at incidence angles ti, and the refraction angles."""
    tr = np.arcsin(np.clip(n1 / n2 * np.sin(ti), -1.0, 1.0))
    ci, ct = np.cos(ti), np.cos(tr)
    rs = ((n1 * ci - n2 * ct) / (n1 * ci + n2 * ct)) ** 2
    rp = ((n1 * ct - n2 * ci) / (n1 * ct + n2 * ci)) ** 2
    return np.stack((rs, rp)), tr


def ray_optics_efficiency(
    model: ExactForceModel, positions_um: ArrayLike, radius_um: float
) -> np.ndarray:
    """(P, 3) force efficiency Q of a sphere (centre minus focus) in the model's beam."""
    opt = model.optics
    d = model.directions  # rays through the focus, weighted like the wave spectrum
    power = model.weights * np.einsum("jc,jc->j", model.spectrum, model.spectrum.conj()).real
    power = power / power.sum()
    out = []
    for c in np.asarray(positions_um, dtype=float).reshape(-1, 3):
        along = d @ c
        perp = c[None, :] - along[:, None] * d  # closest approach -> centre
        b = np.linalg.norm(perp, axis=1)
        hit = b < radius_um
        ti = np.arcsin(np.clip(b / radius_um, 0.0, 1.0))
        r, tr = _fresnel_r(opt.n_medium, opt.n_particle, ti)
        t = 1.0 - r
        den = 1.0 + r * r + 2.0 * r * np.cos(2.0 * tr)
        c2, s2 = np.cos(2 * ti), np.sin(2 * ti)
        q_s = 1.0 + r * c2 - t * t * (np.cos(2 * ti - 2 * tr) + r * c2) / den
        q_g = r * s2 - t * t * (np.sin(2 * ti - 2 * tr) + r * s2) / den
        q_s, q_g = q_s.mean(axis=0), q_g.mean(axis=0)  # circular: average of s and p
        unit = np.divide(perp, b[:, None], out=np.zeros_like(perp), where=b[:, None] > 0)
        f = (q_s[:, None] * d + q_g[:, None] * unit) * (power * hit)[:, None]
        out.append(f.sum(axis=0))
    return np.array(out)
