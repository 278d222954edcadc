"""Scene-level checks: stage drift moves the view, ground truth is complete and JSON-ready."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policies.contract import LaserSpot
from simulators.camera import CameraConfig
from simulators.particles import ParticleTwinConfig
from simulators.scene import ParticleScene

# Bright, background-free, unit-gain camera: the frame's centroid is the particle's image.
CAM = CameraConfig(
    width_px=128,
    height_px=128,
    read_noise_e=0.0,
    gain_adu_per_e=1.0,
    offset_adu=0.0,
    background_photons_per_px_per_ms=0.0,
    photons_per_particle_per_ms=5000.0,
)
# Almost frozen particle, so only the view moves.
STILL = ParticleTwinConfig(diffusion_um2_s=1e-6)


def _centroid_um(frame: np.ndarray) -> np.ndarray:
    img = frame.astype(float)
    rows, cols = np.indices(img.shape)
    return np.array([(img * cols).sum(), (img * rows).sum()]) / img.sum() * CAM.pixel_size_um


def test_stage_drift_shifts_the_rendered_particle() -> None:
    """After t seconds the image sits at position - view_offset - drift * t."""
    drift = (1.0, -0.5)
    scene = ParticleScene(STILL, CAM, seed=3, stage_drift_um_s=drift)
    still = ParticleScene(STILL, CAM, seed=3)
    for sc in (scene, still):
        sc.twin.step(2.0)
    offset = (0.3, 0.2)
    frame, traj = scene.expose(0.01, view_offset_um=offset)
    ref, traj_ref = still.expose(0.01, view_offset_um=offset)
    np.testing.assert_array_equal(traj, traj_ref)  # drift moves the view, not the sample
    t = scene.twin.t_s
    assert scene.drift_offset_um() == pytest.approx((1.0 * t, -0.5 * t))
    true = traj.mean(axis=(0, 1))
    np.testing.assert_allclose(_centroid_um(ref), true - offset, atol=0.01)
    np.testing.assert_allclose(
        _centroid_um(frame), true - np.asarray(offset) - np.asarray(drift) * t, atol=0.01
    )


def test_no_drift_default_is_unchanged() -> None:
    """The default (0, 0) drift renders exactly what an explicit zero drift does."""
    a = ParticleScene(ParticleTwinConfig(n_particles=4), CameraConfig(), seed=9)
    b = ParticleScene(
        ParticleTwinConfig(n_particles=4), CameraConfig(), seed=9, stage_drift_um_s=(0, 0)
    )
    for _ in range(3):
        fa, ta = a.expose(0.03)
        fb, tb = b.expose(0.03)
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(ta, tb)


def test_bad_stage_drift_rejected() -> None:
    with pytest.raises(ValueError, match="stage_drift_um_s"):
        ParticleScene(STILL, CAM, seed=0, stage_drift_um_s=(float("nan"), 0.0))


def test_ground_truth_keys_shapes_and_json() -> None:
    """Positions (N, 2), orientations (N,), temperatures (N,) now, as plain lists."""
    scene = ParticleScene(ParticleTwinConfig(n_particles=5, particle_kind="janus"), CAM, seed=1)
    scene.expose(0.03)
    xy = scene.twin.positions_um
    scene.twin.set_laser([LaserSpot(float(xy[2, 0]), float(xy[2, 1]), 1.0)])
    gt = json.loads(json.dumps(scene.ground_truth()))
    assert {"t_s", "positions_um", "orientations_rad", "temperatures_k"} <= set(gt)
    assert np.shape(gt["positions_um"]) == (5, 2)
    assert np.shape(gt["orientations_rad"]) == (5,)
    assert np.shape(gt["temperatures_k"]) == (5,)
    assert gt["t_s"] == pytest.approx(0.03)
    np.testing.assert_allclose(gt["positions_um"], xy)
    np.testing.assert_allclose(gt["orientations_rad"], scene.twin.orientations_rad)
    temps = np.asarray(gt["temperatures_k"])
    assert np.argmax(temps) == 2 and temps[2] == pytest.approx(296.0 + 20.0, rel=1e-3)
    assert np.all(temps >= 296.0)
