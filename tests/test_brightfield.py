"""The twin's transmitted-light image model against physics and the real frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.detection.detect import ParticleDetector
from agent.detection.detect_auto import _illumination, _radial_profile, estimate_config
from simulators.brightfield import contrast_profile
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
    radii, model = _profile(1.0)
    model = np.minimum(np.interp(where, radii, model, right=0.0), real[0])  # 8-bit clip
    assert np.corrcoef(model, real)[0, 1] > 0.93
    assert abs(where[np.argmin(model)] - where[np.argmin(real)]) <= 1.5


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
