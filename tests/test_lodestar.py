"""Tests for agent.detection.lodestar: self-supervised training on unlabeled twin crops.

Frames come from the camera twin with known positions, so accuracy is checked against
truth the detector never saw. Training is the slow part, so trained detectors are
shared per seed through a module-scoped cache.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.special import erf

from agent.detection.lodestar import LodeStarConfig, LodeStarDetector, crops_from_frames
from simulators.camera import CameraConfig, CameraModel

PIXEL_UM = 0.1
PSF_SIGMA_PX = 2.0
EXPOSURE_S = 0.01
SNR = 12.0
RMSE_BOUND_PX = 0.25


def _photons_per_ms(snr: float) -> float:
    """Photon rate for a peak SNR = peak signal / sqrt(peak signal + background + read^2)."""
    cam = CameraConfig()
    frac = erf(0.5 / (math.sqrt(2.0) * PSF_SIGMA_PX)) ** 2  # centre-pixel share of the PSF
    ms = EXPOSURE_S * 1e3
    var0 = cam.background_photons_per_px_per_ms * ms * cam.quantum_efficiency + cam.read_noise_e**2
    peak = (snr**2 + math.sqrt(snr**4 + 4.0 * snr**2 * var0)) / 2.0
    return peak / frac / cam.quantum_efficiency / ms


def _background_snr(snr: float) -> float:
    """The benchmark's SNR (peak / background noise only) of a spot at this peak SNR."""
    cam = CameraConfig()
    ms = EXPOSURE_S * 1e3
    var0 = cam.background_photons_per_px_per_ms * ms * cam.quantum_efficiency + cam.read_noise_e**2
    peak = (snr**2 + math.sqrt(snr**4 + 4.0 * snr**2 * var0)) / 2.0
    return peak / math.sqrt(var0)


def _camera(size: int, seed: int, snr: float = SNR, bg_snr: float | None = None) -> CameraModel:
    """Twin camera; bg_snr sets the brightness by the benchmark's SNR instead of snr."""
    rate = _photons_per_ms(snr)
    if bg_snr is not None:
        rate *= bg_snr / _background_snr(snr)
    cfg = CameraConfig(
        width_px=size,
        height_px=size,
        pixel_size_um=PIXEL_UM,
        psf_sigma_um=PSF_SIGMA_PX * PIXEL_UM,
        photons_per_particle_per_ms=rate,
    )
    return CameraModel(cfg, seed)


def _separated(
    rng: np.random.Generator, n: int, size: int, margin: float, gap: float
) -> np.ndarray:
    """n random positions (px) at least gap apart and margin from the edges."""
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(margin, size - 1 - margin, 2)
        if all(np.hypot(*(p - q)) > gap for q in pts):
            pts.append(p)
    return np.array(pts)


def _frames(
    n: int, size: int, per_frame: int, seed: int, bg_snr: float | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Twin frames with well separated particles and their true (x, y) px positions."""
    rng = np.random.default_rng(seed)
    cam = _camera(size, seed, bg_snr=bg_snr)
    frames, truths = [], []
    for _ in range(n):
        xy = _separated(rng, per_frame, size, 8.0, 24.0)
        frames.append(cam.render(xy[None] * PIXEL_UM, EXPOSURE_S))
        truths.append(xy)
    return frames, truths


def _match(
    found: np.ndarray, truth: np.ndarray, radius: float = 2.0
) -> tuple[np.ndarray, int, int]:
    """(errors (M, 2) of matched truths, misses, false positives) by nearest neighbour."""
    if len(found) == 0:
        return np.zeros((0, 2)), len(truth), 0
    d = np.hypot(found[None, :, 0] - truth[:, None, 0], found[None, :, 1] - truth[:, None, 1])
    nearest = d.argmin(axis=1)
    hit = d[np.arange(len(truth)), nearest] < radius
    errors = found[nearest[hit]] - truth[hit]
    false_pos = int((d.min(axis=0) >= radius).sum())
    return errors, int((~hit).sum()), false_pos


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    frames, _ = _frames(30, 128, 8, seed=123)
    return crops_from_frames(frames, 32, 200, np.random.default_rng(0))


@pytest.fixture(scope="module")
def test_frames() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return _frames(6, 128, 10, seed=999)


@pytest.fixture(scope="module")
def trained(crops: np.ndarray) -> dict[int, tuple[LodeStarDetector, dict[str, float]]]:
    """Detectors trained on the same crops with three seeds (filled lazily)."""
    cache: dict[int, tuple[LodeStarDetector, dict[str, float]]] = {}
    return cache


@pytest.fixture(scope="module")
def det_snr10() -> LodeStarDetector:
    """Trained on crops at the benchmark's SNR 10 (peak / background noise)."""
    frames, _ = _frames(30, 128, 8, seed=321, bg_snr=10.0)
    crops = crops_from_frames(frames, 32, 200, np.random.default_rng(1))
    det = LodeStarDetector(LodeStarConfig(seed=0))
    assert det.fit(crops)["converged"] is True
    return det


def _get(cache: dict, crops: np.ndarray, seed: int) -> tuple[LodeStarDetector, dict[str, float]]:
    if seed not in cache:
        det = LodeStarDetector(LodeStarConfig(seed=seed))
        cache[seed] = (det, det.fit(crops))
    return cache[seed]


def _single_particle_rmse(det: LodeStarDetector, n: int = 60) -> float:
    """RMSE on frames with one particle at a random sub-pixel position."""
    rng = np.random.default_rng(7)
    cam = _camera(64, seed=77)
    errs = []
    for _ in range(n):
        truth = rng.uniform(24.0, 40.0, (1, 2))
        found = det(cam.render(truth[None] * PIXEL_UM, EXPOSURE_S))
        e, miss, fp = _match(found, truth)
        assert miss == 0 and fp == 0
        errs.append(e)
    return float(np.sqrt(np.mean(np.sum(np.concatenate(errs) ** 2, axis=1))))


def test_crops_are_centred_single_particles(crops: np.ndarray) -> None:
    assert crops.shape[1:] == (32, 32)
    assert len(crops) >= 100
    # Brightest pixel near the centre: each crop holds its seed particle.
    peak = np.array([np.unravel_index(np.argmax(c), c.shape) for c in crops])
    assert np.all(np.abs(peak - 16) <= 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_and_localises(
    seed: int,
    crops: np.ndarray,
    trained: dict,
    test_frames: tuple[list[np.ndarray], list[np.ndarray]],
) -> None:
    det, stats = _get(trained, crops, seed)
    assert stats["converged"] is True
    assert stats["eq_rms_px"] < 0.2
    assert stats["seconds"] > 0.0

    rmse = _single_particle_rmse(det)
    assert rmse <= RMSE_BOUND_PX, f"single-particle RMSE {rmse:.3f} px"

    errors = []
    for frame, truth in zip(*test_frames, strict=True):
        found, scores = det.predict_with_scores(frame)
        e, miss, fp = _match(found, truth)
        assert miss == 0, f"missed {miss} of {len(truth)}"
        assert fp == 0, f"{fp} false positives"
        assert found.dtype == np.float64 and found.shape == (10, 2)
        assert np.all(np.diff(scores) <= 0)  # most confident first
        errors.append(e)
    frame_rmse = float(np.sqrt(np.mean(np.sum(np.concatenate(errors) ** 2, axis=1))))
    assert frame_rmse <= RMSE_BOUND_PX


def _single_spots(
    det: LodeStarDetector, bg_snr: float, n: int, seed: int
) -> tuple[np.ndarray, int, int]:
    """(errors, misses, false positives) on 64x64 single-particle frames at a bench SNR."""
    rng = np.random.default_rng(seed)
    cam = _camera(64, seed=seed, bg_snr=bg_snr)
    errs, misses, fps = [], 0, 0
    for _ in range(n):
        truth = rng.uniform(24.0, 40.0, (1, 2))
        e, miss, fp = _match(det(cam.render(truth[None] * PIXEL_UM, EXPOSURE_S)), truth)
        errs.append(e)
        misses += miss
        fps += fp
    return np.concatenate(errs), misses, fps


def test_faint_particles_are_found_without_false_alarms(det_snr10: LodeStarDetector) -> None:
    """Trained at SNR 10, it must find SNR 5 spots (default threshold) and no noise."""
    det = det_snr10
    errs, misses, fps = _single_spots(det, 5.0, 60, seed=21)
    assert misses <= 3, f"missed {misses} of 60 SNR-5 particles"  # >= 95 % found
    assert fps == 0
    rmse = float(np.sqrt(np.mean(np.sum(errs**2, axis=1))))
    assert rmse <= 0.45, f"SNR-5 RMSE {rmse:.3f} px"  # CRB ~0.22 px per axis
    cam = _camera(128, seed=4, bg_snr=10.0)
    for _ in range(5):
        found, scores = det.predict_with_scores(cam.render(np.zeros((1, 0, 2)), EXPOSURE_S))
        assert found.shape == (0, 2) and scores.shape == (0,)


def test_bright_spots_are_not_biased(det_snr10: LodeStarDetector) -> None:
    """Spots 5x brighter than the training crops: no systematic offset, small error."""
    errs, misses, fps = _single_spots(det_snr10, 50.0, 60, seed=22)
    assert misses == 0 and fps == 0
    bias = float(np.hypot(*errs.mean(axis=0)))
    rmse = float(np.sqrt(np.mean(np.sum(errs**2, axis=1))))
    assert bias <= 0.05, f"bias {bias:.3f} px"
    assert rmse <= 0.1, f"RMSE {rmse:.3f} px"


def test_scores_scale_with_brightness(det_snr10: LodeStarDetector) -> None:
    """Score ~1 for a training-like spot and proportional to brightness around it."""
    for snr in (5.0, 10.0, 30.0):
        cam = _camera(64, seed=8, bg_snr=snr)
        _, scores = det_snr10.predict_with_scores(cam.render(np.full((1, 1, 2), 3.2), EXPOSURE_S))
        assert len(scores) == 1
        assert scores[0] == pytest.approx(snr / 10.0, rel=0.3)


def test_offset_and_gain_do_not_move_predictions(crops: np.ndarray, trained: dict) -> None:
    det, _ = _get(trained, crops, 0)
    frames, _ = _frames(1, 128, 10, seed=5)
    frame = frames[0].astype(np.float64)
    a = det(frame)
    b = det(frame * 3.0 + 250.0)
    assert a.shape == b.shape
    order = np.argsort(a[:, 0])
    assert np.allclose(a[order], b[np.argsort(b[:, 0])], atol=0.02)


def test_empty_frame_gives_no_detections(crops: np.ndarray, trained: dict) -> None:
    det, _ = _get(trained, crops, 0)
    cam = _camera(128, seed=3)
    found = det(cam.render(np.zeros((1, 0, 2)), EXPOSURE_S))
    assert found.shape == (0, 2)


def test_save_load_round_trip_is_exact(crops: np.ndarray, trained: dict, tmp_path: Path) -> None:
    det, _ = _get(trained, crops, 0)
    frames, _ = _frames(1, 96, 6, seed=11)  # not a multiple of the training size
    frame = frames[0][:95, :]  # odd height exercises the padding path
    path = tmp_path / "lodestar.pt"
    det.save(path)
    torch.load(path, weights_only=True)  # plain tensors and builtins only
    loaded = LodeStarDetector.load(path)
    a, sa = det.predict_with_scores(frame)
    b, sb = loaded.predict_with_scores(frame)
    assert len(a) > 0
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    assert loaded.config == det.config


def test_v1_checkpoint_still_loads(crops: np.ndarray, trained: dict, tmp_path: Path) -> None:
    """A checkpoint without the spot-fit constants loads and detects (legacy scores)."""
    det, _ = _get(trained, crops, 0)
    path = tmp_path / "v2.pt"
    det.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "scopeloop-lodestar-v2"
    for key in ("psf_sigma", "shot_kappa", "amp_scale", "noise_floor"):
        del payload[key]
    payload["format"] = "scopeloop-lodestar-v1"
    old = tmp_path / "v1.pt"
    torch.save(payload, old)
    frames, truths = _frames(1, 128, 10, seed=12)
    found = LodeStarDetector.load(old)(frames[0])
    _, miss, fp = _match(found, truths[0])
    assert miss == 0 and fp == 0


def test_bad_frame_raises_naming_frame(crops: np.ndarray, trained: dict) -> None:
    det, _ = _get(trained, crops, 0)
    with pytest.raises(ValueError, match="frame"):
        det(np.zeros((2, 64, 64)))
    with pytest.raises(ValueError, match="frame"):
        det(np.full((64, 64), np.nan))


def test_untrained_detector_refuses() -> None:
    with pytest.raises(RuntimeError, match="not trained"):
        LodeStarDetector()(np.zeros((32, 32)))


@pytest.mark.parametrize(
    ("field", "value"),
    [("crop_px", 33), ("crop_px", 8), ("lr", 0.0), ("channels", 1), ("detection_threshold", -1)],
)
def test_bad_config_names_field(field: str, value: float) -> None:
    with pytest.raises(ValidationError, match=field):
        LodeStarConfig(**{field: value})
    with pytest.raises(ValidationError, match="bogus"):
        LodeStarConfig(bogus=1)  # type: ignore[call-arg]


def test_fit_rejects_wrong_crop_shape() -> None:
    with pytest.raises(ValueError, match="crops"):
        LodeStarDetector().fit(np.zeros((4, 16, 16)))


def test_load_missing_or_corrupt_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        LodeStarDetector.load(missing)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"corrupt\.pt"):
        LodeStarDetector.load(corrupt)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something else"}, wrong)
    with pytest.raises(ValueError, match=r"wrong\.pt"):
        LodeStarDetector.load(wrong)
