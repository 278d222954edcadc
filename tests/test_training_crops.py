"""Tests for agent.detection.training_crops: where LodeSTAR's training crops come from.

No network is trained here: these check the crop selection both `scopeloop detect` and
the live loop use, against twin frames with known particle positions.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from scipy import ndimage

from agent.detection.detect import DetectorConfig
from agent.detection.detect_auto import estimate_config
from agent.detection.detectors import DetectorSettings, gather_crops, train_from_frames
from agent.detection.training_crops import (
    CropBuffer,
    crop_px_for,
    noise_peak_threshold,
    select_crops,
    significance,
)
from simulators.camera import CameraConfig, CameraModel

PIXEL_UM = 0.1
EXPOSURE_S = 0.03  # the twin feedback trap's exposure
LIVE = DetectorConfig(method="radial_symmetry", threshold_sigma=5.0)


def _sparse(n: int, seed: int, per_frame: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """256^2 twin frames with `per_frame` particles each, as the feedback-trap stream."""
    cam = CameraModel(CameraConfig(width_px=256, height_px=256, pixel_size_um=PIXEL_UM), seed)
    rng = np.random.default_rng(seed)
    truths = [rng.uniform(40.0, 216.0, (per_frame, 2)) for _ in range(n)]
    return [cam.render(t[None] * PIXEL_UM, EXPOSURE_S) for t in truths], truths


def _noise(n: int, seed: int) -> list[np.ndarray]:
    cam = CameraModel(CameraConfig(width_px=256, height_px=256, pixel_size_um=PIXEL_UM), seed)
    return [cam.render(np.zeros((1, 0, 2)), EXPOSURE_S) for _ in range(n)]


@pytest.fixture(scope="module")
def sparse() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return _sparse(40, seed=3)


def _centres(crops: np.ndarray) -> np.ndarray:
    """Brightest smoothed pixel of each crop, relative to its centre (px)."""
    out = []
    for c in crops:
        sm = ndimage.gaussian_filter(c.astype(np.float64), 1.5)
        r, k = np.unravel_index(np.argmax(sm), sm.shape)
        out.append((k - c.shape[1] // 2, r - c.shape[0] // 2))
    return np.array(out, dtype=np.float64)


def test_noise_threshold_admits_few_noise_peaks() -> None:
    """The old fixed 3 sigma gave ~25 noise blobs per 256^2 frame; this gives ~none."""
    frames = _noise(12, seed=1)
    est = estimate_config(_sparse(3, seed=2)[0], LIVE)
    counts_3, counts_u = [], []
    for f in frames:
        z = significance(f, est)
        u = noise_peak_threshold(z)
        assert 4.0 < u < 7.0
        inner = z[20:-20, 20:-20]  # edges of a reflect-padded filter are noisier
        peaks = inner == ndimage.maximum_filter(inner, size=5)
        counts_3.append(int((peaks & (inner > 3.0)).sum()))
        counts_u.append(int((peaks & (inner > u)).sum()))
    assert np.mean(counts_3) > 10
    assert np.mean(counts_u) <= 0.25


def test_sparse_frames_give_only_particle_crops(sparse: tuple) -> None:
    frames, _ = sparse
    est = estimate_config(frames[:5], LIVE)
    sel = select_crops(frames, est, crop_px_for(est.diameter_px), 256, rng=0)
    assert len(sel.crops) >= 30  # one particle per frame, a few near the edge
    assert sel.crops.shape[1:] == (32, 32)
    assert np.all(np.hypot(*_centres(sel.crops).T) <= 3.0)  # no noise crop
    assert sel.origins.shape == (len(sel.crops), 3)
    assert sel.used()["classical"] + sel.used()["blob"] == len(sel.crops)
    assert f"{len(sel.crops)} crops from 40 frames" in sel.summary()
    assert sel.why_empty() == ""


def test_blobs_add_rings_the_classical_detector_misses() -> None:
    """Twin brightfield, defocused rings, with a classical detector that stops at 20 of
    the 60 spheres per frame (as one with a too-strict threshold would): crops of both
    sources are centred on real spheres, and the DoG blobs add spheres no hit is near."""
    import dataclasses

    from benchmarks.localization_brightfield import _camera, hard_sphere_field

    cam = _camera(2.5, seed=10)
    truths = [hard_sphere_field(np.random.default_rng(i), 60, 512, 10.0) for i in range(3)]
    frames = [cam.render(t[None] * PIXEL_UM, 0.002) for t in truths]
    est = estimate_config(frames)
    est = dataclasses.replace(est, config=est.config.model_copy(update={"max_objects": 20}))
    sel = select_crops(frames, est, crop_px_for(est.diameter_px), 256, rng=0)
    assert sel.used()["blob"] >= 1 and sel.used()["classical"] >= 20
    errors = [np.hypot(*(truths[int(f)] - (x, y)).T).min() for f, x, y in sel.origins]
    assert np.mean(np.array(errors) <= 1.5) >= 0.95
    classical_only = select_crops(frames, est, sel.crops.shape[1], 256, 0, ("classical",))
    assert len(classical_only.crops) < len(sel.crops)


def test_noise_frames_give_no_crops_and_say_why() -> None:
    est = estimate_config(_sparse(3, seed=2)[0], LIVE)
    sel = select_crops(_noise(10, seed=4), est, 32, 256, rng=0)
    assert len(sel.crops) <= 1
    if len(sel.crops) == 0:
        assert "10 frames" in sel.why_empty()


def test_buffer_is_bounded_and_shares_frames() -> None:
    frames, _ = _sparse(6, seed=5, per_frame=6)
    est = estimate_config(frames[:5], LIVE)
    buf = CropBuffer(est, 32, capacity=10, rng=0, per_frame=2)
    added = [buf.add(f) for f in frames]
    assert len(buf) == 10 and added[0] <= 2
    sel = buf.selection()
    assert sel.frames == 6 and sel.dropped["surplus"] > 0
    with pytest.raises(ValueError, match="seed sources"):
        CropBuffer(est, 32, 10, sources=("psychic",))
    with pytest.raises(ValueError, match="crop_px"):
        CropBuffer(est, 33, 10)


def _stream(frames: list[np.ndarray], seen: list[int]) -> Iterator[np.ndarray]:
    for f in frames:
        seen[0] += 1
        yield f


def test_live_gathering_reads_on_until_enough_crops(sparse: tuple) -> None:
    """A sparse stream (one particle a frame) is read past train_frames until min_crops."""
    frames, _ = sparse
    settings = DetectorSettings.model_validate(
        {
            "kind": "lodestar",
            "classical": LIVE.model_dump(),
            "lodestar": {"train_frames": 4, "min_crops": 20},
        }
    )
    seen = [0]
    _, sel = gather_crops(settings.lodestar, settings.classical, _stream(frames, seen))
    assert len(sel.crops) >= 20 and sel.frames == seen[0]
    assert 20 <= seen[0] < len(frames)


def test_live_training_on_nothing_logs_why() -> None:
    settings = DetectorSettings.model_validate(
        {"kind": "lodestar", "lodestar": {"train_frames": 6}}
    )
    messages: list[str] = []
    with pytest.raises(ValueError, match="nothing to train on"):
        train_from_frames(settings, iter(_noise(6, seed=6)), log=messages.append)
    assert messages and "nothing to train on" in messages[0] and "frames" in messages[0]
    with pytest.raises(ValueError, match="no frame"):
        train_from_frames(settings, iter([]), log=messages.append)
    assert "no frame" in messages[-1]
