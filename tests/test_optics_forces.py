"""Exact optical forces (generalised Lorenz-Mie) against the published limits."""

from __future__ import annotations

import math

import miepython
import numpy as np
import pytest
from pydantic import ValidationError

from simulators.optics.forces import ExactForceModel, TrapOptics
from simulators.optics.rayoptics import ray_optics_efficiency


def test_plane_wave_limit_is_mie_radiation_pressure() -> None:
    """A beam far wider than the sphere pushes with sigma_pr = pi a^2 (Q_ext - g Q_sca)."""
    opt = TrapOptics(numerical_aperture=0.02, filling_factor=0.5)
    a = 0.3
    model = ExactForceModel(opt, radius_max_um=a, reach_um=0.5)
    q = model.efficiency([[0.0, 0.0, 0.0]], a)[0]
    i0 = model.intensity_per_mw([[0.0, 0.0, 0.0]])[0]
    qext, qsca, _, g = miepython.efficiencies(
        opt.n_particle / opt.n_medium, 2 * a, opt.wavelength_um / opt.n_medium
    )
    expected = math.pi * a * a * (qext - g * qsca) * i0
    assert q[2] == pytest.approx(expected, rel=1e-3)
    assert abs(q[0]) < 1e-6 * q[2] and abs(q[1]) < 1e-6 * q[2]


@pytest.mark.parametrize("polarization", ["circular", "x"])
def test_small_sphere_feels_the_rayleigh_gradient_force(polarization: str) -> None:
    """a << lambda: F = (alpha / 4) grad |E|^2 with alpha = 4 pi eps a^3 (m^2-1)/(m^2+2)."""
    opt = TrapOptics(polarization=polarization)
    a = 0.02
    model = ExactForceModel(opt, radius_max_um=a, reach_um=1.0)
    points = np.array([[0.1, 0.0, 0.0], [0.0, 0.15, 0.0], [0.0, 0.0, 0.3], [0.2, 0.1, -0.3]])
    q = model.efficiency(points, a)
    m = opt.n_particle / opt.n_medium
    contrast = (m * m - 1) / (m * m + 2)
    h = 1e-4

    def intensity(p: np.ndarray) -> float:
        return float(np.sum(abs(model.incident_field([p])[0]) ** 2))

    grad = np.array(
        [
            [(intensity(p + h * e) - intensity(p - h * e)) / (2 * h) for e in np.eye(3)]
            for p in points
        ]
    )
    rayleigh = 2 * math.pi * a**3 * contrast * grad / model.power_units
    scale = np.abs(rayleigh).max()
    assert np.abs(q - rayleigh).max() < 0.01 * scale
    # x polarisation makes the focus narrower across it than along it: stiffer in y.
    if polarization == "x":
        assert abs(q[1, 1]) / 0.15 > 1.2 * abs(q[0, 0]) / 0.1


def test_large_sphere_approaches_ray_optics() -> None:
    """a = 2 um (ka ~ 16): lateral and far-axial forces within 10 % of Ashkin's rays."""
    opt = TrapOptics()
    a = 2.0
    model = ExactForceModel(opt, radius_max_um=a, reach_um=1.5)
    lateral = np.array([[x, 0.0, 0.0] for x in (0.5, 1.0, 1.4)])
    # Axially only away from the focus (|z| >~ a/2): rays focus to a point, light does not.
    axial = np.array([[0.0, 0.0, z] for z in (-1.4, -1.0, 1.4)])
    pts = np.concatenate((lateral, axial))
    wave = model.efficiency(pts, a)
    rays = ray_optics_efficiency(model, pts, a)
    assert np.allclose(wave[:3, 0], rays[:3, 0], rtol=0.05)
    assert np.allclose(wave[3:, 2], rays[3:, 2], rtol=0.10)


def test_axial_equilibrium_lies_beyond_the_focus() -> None:
    """The scattering force pushes the trapped sphere downstream of the focus (z > 0)."""
    opt = TrapOptics()
    a = 0.5
    model = ExactForceModel(opt, radius_max_um=a, reach_um=1.5)
    z = np.linspace(-1.0, 1.0, 41)
    fz = model.force_fn(np.column_stack((0 * z, 0 * z, z)), a)[:, 2]
    assert fz[20] > 0  # at the focus: pushed forward
    crossing = np.flatnonzero((fz[:-1] > 0) & (fz[1:] <= 0))
    assert len(crossing) == 1
    z_eq = z[crossing[0]]
    assert 0.05 < z_eq < 0.6
    assert fz.min() < 0  # a backward (restoring) force exists: the trap holds
    # Lateral forces restore, and the power scales the force linearly.
    f1 = model.force_fn([[0.3, 0.0, z_eq]], a, power_mw=1.0)
    f5 = model.force_fn([[0.3, 0.0, z_eq]], a, power_mw=5.0)
    assert f1[0, 0] < 0
    assert np.allclose(f5, 5 * f1)


def test_quadrature_is_converged() -> None:
    """Doubling the beam's angular resolution leaves the force unchanged."""
    opt = TrapOptics(polarization="x")
    a = 0.6
    pts = np.array([[0.4, -0.2, 0.3], [0.0, 0.5, -0.4], [0.8, 0.1, 0.0]])
    coarse = ExactForceModel(opt, radius_max_um=a, reach_um=1.0).efficiency(pts, a)
    fine = ExactForceModel(opt, radius_max_um=a, reach_um=2.0).efficiency(pts, a)
    assert np.abs(coarse - fine).max() < 1e-4 * np.abs(fine).max()


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValidationError, match="numerical_aperture"):
        TrapOptics(numerical_aperture=1.4, n_medium=1.33)
    model = ExactForceModel(TrapOptics(), radius_max_um=0.3, reach_um=1.0)
    with pytest.raises(ValueError, match="radius_um"):
        model.efficiency([[0.0, 0.0, 0.0]], 0.5)
    with pytest.raises(ValueError, match="reach_um"):
        model.efficiency([[2.0, 0.0, 0.0]], 0.2)
