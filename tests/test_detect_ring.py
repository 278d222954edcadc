"""Brightfield ring mode: matched filter on the measured profile, across defocus."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from agent.detection.detect import DetectorConfig, ParticleDetector, _refine_batch
from agent.detection.detect_auto import estimate_config
from agent.detection.ring_match import RingMatcher, explain_away, synthetic_ring_profile
from simulators.camera import CameraConfig, CameraModel

SIZE = 160
DIAMETER_PX = 10.0  # 1 um spheres at 0.1 um/px


def _field(seed: int) -> np.ndarray:
    """40 hard-sphere centres, four touching pairs among them."""
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []

    def free(c: np.ndarray) -> bool:
        inside = bool(np.all((c >= 12) & (c <= SIZE - 13)))
        return inside and (not pts or np.min(np.hypot(*(np.array(pts) - c).T)) >= DIAMETER_PX)

    while len(pts) < 8:
        c = rng.uniform(12, SIZE - 13, 2)
        mate = c + DIAMETER_PX * 1.02 * np.array([1.0, 0.0])
        if free(c) and free(mate):
            pts += [c, mate]
    while len(pts) < 40:
        c = rng.uniform(12, SIZE - 13, 2)
        if free(c):
            pts.append(c)
    return np.array(pts)


def _frame(defocus_um: float, truth: np.ndarray, seed: int) -> np.ndarray:
    cfg = CameraConfig(
        width_px=SIZE,
        height_px=SIZE,
        pixel_size_um=0.1,
        contrast="brightfield",
        particle_radius_um=0.5,
        wavelength_um=0.55,
        numerical_aperture=0.9,
        defocus_um=defocus_um,
        background_photons_per_px_per_ms=500.0,
        gain_adu_per_e=0.1,
        read_noise_e=2.0,
        illumination_falloff=0.2,
    )
    return CameraModel(cfg, seed=seed).render(truth[None] * 0.1, 0.002)


def _recall(truth: np.ndarray, found: np.ndarray, radius: float) -> float:
    d = np.hypot(truth[:, None, 0] - found[None, :, 0], truth[:, None, 1] - found[None, :, 1])
    return float(np.mean(d.min(axis=1) <= radius)) if len(found) else 0.0


def test_rings_found_across_defocus_with_parameters_from_another_frame() -> None:
    truth0 = _field(1)
    est = estimate_config([_frame(1.0, truth0, 1)])
    assert est.contrast == "ring" and est.config.ring_profile
    det = ParticleDetector(est.config)
    for k, dz in enumerate((0.5, 1.5, 2.5)):
        truth = _field(10 + k)
        found = det(_frame(dz, truth, 10 + k))
        assert _recall(truth, found, 1.5) >= 0.95, dz
        assert len(found) <= 1.15 * len(truth), dz  # side lobes are explained away


def test_polarity_follows_symmetry_not_strength() -> None:
    # Far out of focus the dark ring outweighs the bright centre; the centre is still
    # where the particle is, and the estimate must say ring, not dark spots.
    truth = _field(3)
    est = estimate_config([_frame(3.0, truth, 3)])
    assert est.contrast == "ring"
    assert _recall(truth, ParticleDetector(est.config)(_frame(3.0, truth, 4)), 1.5) >= 0.9


def test_side_lobe_candidates_get_no_amplitude() -> None:
    matcher = RingMatcher(synthetic_ring_profile(6.0), (1.0,))
    table_r = np.arange(matcher.ac.size) * matcher.ac_step
    lobe_r = float(table_r[np.argmax(np.where(table_r > 6.0, matcher.ac, -1.0))])
    xy = np.array([[0.0, 0.0], [lobe_r, 0.0]])
    vals = np.array([1.0, np.interp(lobe_r, table_r, matcher.ac)])  # all of it side lobe
    amp = explain_away(matcher, xy, vals)
    assert amp[0] == pytest.approx(1.0, abs=1e-6) and amp[1] == pytest.approx(0.0, abs=1e-6)


def test_edge_windows_match_windows_cut_to_the_frame() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40]
    frame = 100 + 50 * np.exp(-((xx - 1.3) ** 2 + (yy - 20.4) ** 2) / 8.0)
    frame = frame + rng.normal(0, 1, frame.shape)
    det = ParticleDetector(DetectorConfig(window_px=4))
    xy, _ = det._refine(frame, np.array([20]), np.array([1]), 100.0)
    cut = frame[16:25, 0:6][None] - 100.0
    x, y = _refine_batch(cut, "radial_symmetry")
    assert xy[0] == pytest.approx([x[0], y[0] + 16], abs=1e-6)  # float32 arithmetic


def test_ring_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="ring_scales"):
        DetectorConfig(ring_scales=(0.1,))
    with pytest.raises(ValidationError, match="relative_threshold"):
        DetectorConfig(relative_threshold=1.5)
    with pytest.raises(ValueError, match="ring_profile"):
        RingMatcher((1.0, -0.5))


def test_dark_centre_in_a_bright_ring_is_a_ring_of_the_other_sign() -> None:
    # A sphere on the far side of focus: dark centre, bright ring around it.
    grid = np.array([(x, y) for x in (25.0, 62.0, 99.0, 136.0) for y in (30.0, 80.0, 130.0)])
    truth = grid + np.random.default_rng(5).uniform(-2, 2, grid.shape)
    est = estimate_config([_frame(-1.5, truth, 5)])
    assert est.contrast == "ring" and est.config.ring_profile[0] < 0
    assert "dark centre, bright ring" in est.summary
    found = ParticleDetector(est.config)(_frame(-1.5, truth, 6))
    assert _recall(truth, found, 1.0) == 1.0 and len(found) == len(truth)
