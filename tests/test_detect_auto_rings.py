"""Ring mode on crowded twin fields: the profile fitted through overlapping rings, the far
side of focus, a frame at another focus, and frames that cannot be used."""

from __future__ import annotations

import numpy as np
import pytest

from agent.detection.detect import ParticleDetector
from agent.detection.detect_auto import _radial_profile, estimate_config
from agent.detection.ring_match import fit_radial_profile, synthetic_ring_profile
from benchmarks.localization_brightfield import _camera, _match, hard_sphere_field
from simulators.brightfield import render_contrast

SIDE = 256
SPHERES = 75  # the bench's 300 per 512^2


def _twin_frame(defocus_um: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = hard_sphere_field(rng, SPHERES, SIDE, 10.0)
    cam = _camera(defocus_um, seed=seed, shape_px=(SIDE, SIDE))
    return cam.render(truth[None] * 0.1, 0.002), truth


def test_profile_fit_sees_through_overlapping_rings() -> None:
    # 200 rings of radius 6 px in 128^2, offset and vignetting: the median profile around
    # each holds its neighbours' rings; the joint fit recovers the single ring.
    true = np.asarray(synthetic_ring_profile(6.0))
    radii = np.arange(true.size, dtype=np.float64)
    rng = np.random.default_rng(3)
    xy = rng.uniform(4, 124, (200, 2))
    yy, xx = np.mgrid[0:128, 0:128]
    frame = 100.0 + 20.0 * render_contrast((128, 128), xy, (radii, true)) + 0.002 * xx * yy
    frame += rng.normal(0, 0.5, frame.shape)
    fit = fit_radial_profile(frame, xy, true.size - 1)[0] / 20.0
    flat = frame - np.median(frame)
    _, median = _radial_profile(flat / 20.0, np.rint(xy[:, ::-1]).astype(int), true.size - 1)
    err_fit = np.max(np.abs(fit - true))
    err_median = np.max(np.abs(median - true))
    assert err_fit < 0.05 and err_fit < 0.2 * err_median


def test_far_side_of_focus_crowded_rings_are_found() -> None:
    # 1.5 um on the far side: a dark centre inside a bright fringe, rings overlapping.
    frame, truth = _twin_frame(-1.5, 11)
    est = estimate_config([frame])
    assert est.contrast == "ring" and est.config.ring_profile[0] < 0
    found = ParticleDetector(est.config)(frame)
    ti, _ = _match(truth, found, 1.5)
    assert len(ti) >= 0.95 * len(truth) and len(ti) >= 0.9 * len(found)


@pytest.mark.parametrize("refit", [True, False])
def test_ring_filter_follows_a_change_of_focus(refit: bool) -> None:
    first, _ = _twin_frame(1.0, 21)
    later, truth = _twin_frame(2.5, 22)  # weaker centre, wider ring
    cfg = estimate_config([first]).config
    assert cfg.ring_refit
    det = ParticleDetector(cfg.model_copy(update={"ring_refit": refit}))
    det(first)
    ti, _ = _match(truth, det(later), 1.5)
    if refit:
        assert len(ti) >= 0.95 * len(truth)
        assert det.config.ring_radius_px > cfg.ring_radius_px + 1.0
    else:
        assert len(ti) < 0.9 * len(truth)  # the filter of the first frame alone misses


def test_unusable_frame_among_good_ones_is_named() -> None:
    frame, _ = _twin_frame(1.0, 31)
    saturated = np.full_like(frame, np.iinfo(frame.dtype).max)
    est = estimate_config([frame, saturated])
    assert "frame 1 is saturated" in est.summary and est.contrast == "ring"
