"""The twin's transmitted-light image model against physics and the real frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.detection.detect import ParticleDetector
from agent.detection.detect_auto import _illumination, _radial_profile, estimate_config
from simulators.brightfield import contrast_profile, mie_amplitudes
from simulators.camera import CameraConfig, CameraModel

REAL = sorted(Path("/work/shared/data/brightfield").glob("bf_*.png"))


def _profile(defocus_um: float) -> tuple[np.ndarray, np.ndarray]:
    # A 3.2 um sphere (n 1.59 in water) at 0.152 um/px, NA 0.9, green light.
    return contrast_profile(1.6, 1.59, 1.33, 0.55, 0.9, defocus_um, 0.152)


def test_ring_profile_changes_with_defocus() -> None:
    radii, near = _profile(0.5)
    _, far = _profile(3.0)
    assert near.min() < -0.2  # the rim scatters light out of the pupil: a dark ring
    ring_near = radii[np.argmin(near)]
    ring_far = radii[np.argmin(far)]
    assert ring_far > ring_near or abs(far[0] - near[0]) > 0.2


def _thin_phase_object(radius_um: float, dn: float, defocus_um: float) -> np.ndarray:
    """Coherent image (contrast at 0..7 px, 0.1 um/px) of a weak sphere as a thin phase
    object: exp(i k0 dn thickness), angular-spectrum propagated, NA 0.9 pupil, green."""
    n, dx, lam = 512, 0.025, 0.55
    c = (np.arange(n) - n // 2) * dx
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    t = 2.0 * np.sqrt(np.maximum(radius_um**2 - r2, 0.0))
    f = np.fft.fftfreq(n, d=dx)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    kz = np.sqrt(np.maximum((1.33 / lam) ** 2 - f2, 0.0))
    h = (f2 <= (0.9 / lam) ** 2) * np.exp(2j * np.pi * defocus_um * (kz - 1.33 / lam))
    field = np.exp(1j * 2 * np.pi / lam * dn * t)
    img = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.fft2(np.fft.ifftshift(field)) * h))) ** 2
    return img[n // 2, n // 2 : n // 2 + 8 * 4 : 4] - 1.0


@pytest.mark.parametrize("defocus_um", [1.0, 2.0])
def test_weak_sphere_is_the_thin_phase_object(defocus_um: float) -> None:
    # Mie scattering of a weak sphere (dn 0.03, a 0.2 um) tends to the projection
    # approximation: a check of the amplitudes' scale, sign convention and propagation.
    radii, mie = contrast_profile(0.2, 1.36, 1.33, 0.55, 0.9, defocus_um, 0.1, condenser_na=1e-3)
    thin = _thin_phase_object(0.2, 0.03, defocus_um)
    at = np.interp(np.arange(8), radii, mie)
    assert thin[0] > 0.02  # lensing: brighter beyond the sphere
    assert np.max(np.abs(at - thin)) < 0.1 * np.max(np.abs(thin))


def test_mie_amplitudes_obey_the_extinction_theorem_and_sign() -> None:
    miepython = pytest.importorskip("miepython")
    s1, s2 = mie_amplitudes(0.5, 1.59, 1.33, 0.55, np.array([1.0]))
    x = 2 * np.pi * 1.33 * 0.5 / 0.55
    q_ext = miepython.efficiencies_mx(1.59 / 1.33, x)[0]
    assert s1[0].real == pytest.approx(x**2 * q_ext / 4, rel=1e-6) and s1[0] == s2[0]
    # Rayleigh limit in exp(-i omega t): S = -i x^3 (m^2 - 1) / (m^2 + 2).
    small = mie_amplitudes(0.005, 1.59, 1.33, 0.55, np.array([0.0]))[0][0]
    assert small.imag < 0 and abs(small.real) < 1e-3 * abs(small.imag)


def test_partial_coherence_blurs_with_defocus_not_in_focus() -> None:
    # Each condenser tilt displaces a defocused image by dz tan(theta_c): a wide condenser
    # changes the in-focus image little and the defocused one a lot.
    def change(dz: float) -> float:
        r, narrow = contrast_profile(0.5, 1.59, 1.33, 0.55, 0.9, dz, 0.1, condenser_na=0.05)
        r_w, wide = contrast_profile(0.5, 1.59, 1.33, 0.55, 0.9, dz, 0.1, condenser_na=0.6)
        grid = np.arange(0.0, 20.0, 0.5)
        a, b = np.interp(grid, r, narrow, right=0.0), np.interp(grid, r_w, wide, right=0.0)
        return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))

    assert change(3.0) > 2.0 * change(0.0)


@pytest.mark.skipif(not REAL, reason="shared brightfield frames absent")
def test_model_matches_the_real_brightfield_rings() -> None:
    frames = [np.asarray(Image.open(f)) for f in REAL[:5]]
    det = ParticleDetector(estimate_config(frames).config)
    profiles = []
    for frame in frames:
        flat = frame / _illumination(frame) - 1.0
        rc = np.rint(det(frame)[:, ::-1]).astype(int)
        where, prof = _radial_profile(flat, rc, 20)
        profiles.append(prof)
    real = np.median(profiles, axis=0)
    # ~2.4 um silica-like spheres (n 1.45) in water 1.5 um out of focus, NA 0.9, condenser
    # NA 0.5, 0.152 um/px (the pixel size is not given with the frames: assumed).
    radii, model = contrast_profile(1.2, 1.45, 1.33, 0.55, 0.9, 1.5, 0.152, condenser_na=0.5)
    model = np.interp(where, radii, model, right=0.0)
    clipped = np.minimum(model, real[0])  # the real centres clip at 255 in 8 bits
    assert np.corrcoef(clipped, real)[0, 1] > 0.97
    assert abs(_ring_radius(where, model) - _ring_radius(where, real)) < 0.5
    assert model.min() / real.min() == pytest.approx(1.0, abs=0.2)  # ring depth
    assert model[0] >= real[0]  # centre at least as bright as the (clipped) real one


def _ring_radius(where: np.ndarray, prof: np.ndarray) -> float:
    """Sub-pixel radius of the profile's minimum (parabola through it and its neighbours)."""
    k = int(np.argmin(prof))
    a, b, c = prof[k - 1], prof[k], prof[k + 1]
    return float(where[k] + 0.5 * (a - c) / (a - 2 * b + c) * (where[k + 1] - where[k]))


def test_camera_renders_brightfield_and_darkfield() -> None:
    common = dict(
        width_px=96,
        height_px=96,
        pixel_size_um=0.1,
        particle_radius_um=0.5,
        numerical_aperture=0.9,
        wavelength_um=0.55,
        defocus_um=1.5,
        background_photons_per_px_per_ms=500.0,
        gain_adu_per_e=0.1,
    )
    pos = np.array([[[4.8, 4.8]]])  # um: pixel (48, 48)
    bright = CameraModel(CameraConfig(contrast="brightfield", **common), 0).render(pos, 0.002)
    bg = np.median(bright)
    assert bright[48, 48] > bg + 5 and bright[40:57, 40:57].min() < bg - 5
    dark = CameraModel(CameraConfig(contrast="darkfield", **common), 0).render(pos, 0.002)
    assert dark[40:57, 40:57].max() > 5 * max(np.median(dark) - 100, 1.0) + 100
    with pytest.raises(ValueError, match="contrast"):
        CameraConfig(contrast="phase")
