"""Adaptive detection: parameters estimated from the frames, touching particles,
polarity, confidence, bad input, and the real brightfield frames."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.detection.detect import DetectorConfig, ParticleDetector
from agent.detection.detect_auto import check_frames, estimate_config

REAL = Path("/work/shared/data/brightfield")
REAL_FILES = sorted(REAL.glob("bf_*.png")) if REAL.is_dir() else []
needs_real = pytest.mark.skipif(not REAL_FILES, reason="shared brightfield frames absent")


def _field(xy: list[tuple[float, float]], amp: float, sigma: float = 1.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:128]
    img = np.full((96, 128), 100.0)
    for x, y in xy:
        img += amp * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.clip(img + rng.normal(0, 3.0, img.shape), 0, 65535).astype(np.uint16)


def test_touching_particles_are_separated_only_with_separation() -> None:
    pair = [(60.0, 48.0), (64.0, 48.0)]  # 4 px apart, sigma 1.3: one blob above threshold
    frame = _field(pair, 80.0)
    base = DetectorConfig(smooth_sigma_px=1.0, window_px=2)
    assert len(ParticleDetector(base)(frame)) == 1
    found = ParticleDetector(base.model_copy(update={"separation_px": 2.5}))(frame)
    assert len(found) == 2
    d = np.hypot(found[:, None, 0] - np.array(pair)[None, :, 0], found[:, None, 1] - 48.0)
    assert d.min(axis=0).max() < 0.6


def test_estimate_finds_size_and_dark_polarity() -> None:
    spots = [(30.0, 30.0), (90.0, 25.0), (50.0, 70.0), (100.0, 70.0)]
    bright = _field(spots, 60.0, sigma=2.0)
    est = estimate_config([bright])
    assert est.contrast == "bright" and 1.4 < est.config.smooth_sigma_px < 2.6
    dark = (200 - bright.astype(np.int32)).astype(np.uint16)
    est = estimate_config([dark])
    assert est.contrast == "dark" and est.config.polarity == "dark"
    found = ParticleDetector(est.config)(dark)
    assert len(found) == 4
    for x, y in spots:
        assert np.hypot(found[:, 0] - x, found[:, 1] - y).min() < 0.3
    assert "dark spots" in est.summary


def test_given_settings_are_kept() -> None:
    frame = _field([(40.0, 40.0), (80.0, 50.0)], 60.0, sigma=2.0)
    est = estimate_config([frame], DetectorConfig(threshold_sigma=9.0), diameter_px=11)
    assert est.config.threshold_sigma == 9.0
    assert est.config.smooth_sigma_px == pytest.approx(11 / 4)


def test_confidence_is_lower_for_the_weaker_spot() -> None:
    frame = _field([(40.0, 40.0)], 200.0) + _field([(90.0, 50.0)], 9.0, seed=1) - 100
    det = ParticleDetector(estimate_config([frame]).config)
    xy, _, conf = det.detect_with_confidence(frame)
    assert np.all((conf >= 0) & (conf <= 1))
    strong = np.argmin(np.hypot(xy[:, 0] - 40, xy[:, 1] - 40))
    assert conf[strong] == 1.0
    if len(xy) > 1:
        assert conf[1 - strong] < conf[strong]


def test_bad_frames_get_one_line_reasons() -> None:
    a = np.zeros((32, 32), np.uint16)
    with pytest.raises(ValueError, match="mixed sizes"):
        check_frames([a, np.zeros((32, 40), np.uint16)])
    with pytest.raises(ValueError, match="mixed pixel types"):
        check_frames([a, np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError, match="empty: every pixel is 0"):
        estimate_config([a])
    with pytest.raises(ValueError, match="saturated"):
        estimate_config([np.full((32, 32), 255, np.uint8)])
    with pytest.raises(ValueError, match="does not fit"):
        estimate_config([_field([(40.0, 40.0)], 60.0)], diameter_px=90)
    noise = _field([], 0.0)
    est = estimate_config([noise])
    assert len(ParticleDetector(est.config)(noise)) <= 1


@needs_real
def test_real_brightfield_rings_match_trackpys_ring_fit() -> None:
    trackpy = pytest.importorskip("trackpy")
    trackpy.quiet()
    frames = [np.asarray(Image.open(f)) for f in REAL_FILES[:5]]
    est = estimate_config(frames)
    assert est.contrast == "ring" and 7.0 < est.ring_radius_px < 10.0
    det = ParticleDetector(est.config)
    hits = total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for frame in frames:
            seeds = trackpy.locate(frame, 9, minmass=500)
            seeds["particle"] = np.arange(len(seeds))
            ref = trackpy.locate_brightfield_ring(frame, 15, previous_coords=seeds, processes=1)
            found = det(frame)
            assert len(found) == len(ref) == 5
            d = np.hypot(
                ref.x.to_numpy()[:, None] - found[None, :, 0],
                ref.y.to_numpy()[:, None] - found[None, :, 1],
            )
            hits += int((d.min(axis=1) <= 1.0).sum())
            total += len(ref)
    assert hits / total >= 0.8


@needs_real
def test_cli_detect_with_no_parameters_says_what_it_chose(tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    files = [str(f) for f in REAL_FILES[:3]]
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "detect", *files, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "auto: brightfield rings" in proc.stdout and "15 detections" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 15 and all(0.0 <= float(r["confidence"]) <= 1.0 for r in rows)


def test_cli_detect_explains_an_empty_frame(tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(flat)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "detect", str(flat), "--out", str(tmp_path / "o.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "empty" in proc.stderr


def test_crowded_wide_spots_stay_resolved():
    """Wide, bright spots in touching pairs (darkfield-like): the estimated smoothing is
    cut below the spots' width so each pair stays two peaks; sparse spots keep it."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.full((256, 256), 10.0)
    truth = []
    for gx in range(6):
        for gy in range(6):
            c = np.array([24.0 + 40 * gx, 24.0 + 40 * gy]) + rng.uniform(-2, 2, 2)
            angle = rng.uniform(0, np.pi)
            mate = c + 10.0 * np.array([np.cos(angle), np.sin(angle)])
            truth += [c, mate]
    truth = np.array(truth)
    for x, y in truth:
        img += 1500.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 4.4**2))
    frame = rng.poisson(img).astype(np.uint16)
    est = estimate_config([frame])
    assert est.config.smooth_sigma_px < 3.0, est.summary
    found = ParticleDetector(est.config)(frame)
    d = np.hypot(*(truth[:, None, :] - found[None, :, :]).transpose(2, 0, 1))
    # Both of each pair found (overlap pulls them ~1.5 px together: within 3 px).
    assert np.mean(d.min(axis=1) <= 3.0) >= 0.9, est.summary
    assert len(found) <= 1.1 * len(truth), est.summary
    sparse = estimate_config([_field([(30.0, 30.0), (90.0, 60.0)], 200.0, sigma=2.5)])
    assert sparse.config.smooth_sigma_px > 2.0, sparse.summary


def test_donut_centres_are_found_where_the_centre_is_no_extreme() -> None:
    """Dark rings round a centre at the background level (a sphere in focus at low NA):
    the centre is no extreme, so seeds come from radial-symmetry votes."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:200, 0:200]
    truth = []
    while len(truth) < 40:
        c = rng.uniform(15, 185, 2)
        if all(np.hypot(*(c - t)) > 14 for t in truth):
            truth.append(c)
    truth = np.array(truth)
    img = np.full((200, 200), 1000.0)
    for x, y in truth:
        img -= 300.0 * np.exp(-0.5 * ((np.hypot(xx - x, yy - y) - 4.0) / 1.2) ** 2)
    frame = rng.poisson(img).astype(np.uint16)
    est = estimate_config([frame])
    found = ParticleDetector(est.config)(frame)
    d = np.hypot(*(truth[:, None, :] - found[None, :, :]).transpose(2, 0, 1))
    assert np.mean(d.min(axis=1) <= 1.5) >= 0.9, est.summary
    assert len(found) <= 1.1 * len(truth), est.summary
