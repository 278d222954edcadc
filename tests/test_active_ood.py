"""The forward workflow's out-of-distribution flag: calibrated on held-out twin scans.

A tiny ensemble (3 training scans, 64 px, 80 steps) is trained once in a temporary
folder; held-out twins with other seeds and nuisance settings must pass, noise,
constant and rescaled/shifted frames must be flagged, and a flagged live frame must
queue no spectra.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from agent.plans.spm_active import run_spm_active
from agent.training.spm_segmenter import SegmenterTrainConfig, train_segmenter, twin_training_scans
from policies.active.grid import pfm_channels
from policies.active.segment import OodCalibration, WallSegmenter
from simulators.spm import FerroelectricSample, PFMScanner, ScanConfig

PX = 64
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pfm-pto"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SegmenterTrainConfig(
        seeds=[10_001, 10_002, 10_003],
        calib_seeds=list(range(10_101, 10_109)),
        pixels=PX,
        steps=80,
    )
    segmenter, _ = train_segmenter(config)
    path = tmp_path_factory.mktemp("seg") / "spm-segmenter.pt"
    segmenter.save(path)
    return path


@pytest.fixture(scope="module")
def segmenter(checkpoint: Path) -> WallSegmenter:
    return WallSegmenter.load(checkpoint)


def _flagged(seg: WallSegmenter, x: np.ndarray) -> tuple[bool, list[str]]:
    prob, spread = seg.predict(x)
    d = seg.check(x, prob, spread)
    assert d.flagged == bool(d.reasons)
    return d.flagged, d.reasons


def _scan(seed: int, update: dict) -> np.ndarray:
    sample = FerroelectricSample(seed=seed)
    cfg = ScanConfig().model_copy(update=update)
    r = PFMScanner(sample, cfg, seed=seed).scan((0.0, 0.0, *sample.extent_um), (PX, PX))
    return pfm_channels(r["amplitude_pm"], r["phase_deg"], r["height_nm"])


def test_checkpoint_keeps_the_calibration(segmenter: WallSegmenter) -> None:
    ood = segmenter.ood
    assert isinstance(ood, OodCalibration)
    assert len(ood.held_out_scores) == 8
    assert ood.score_threshold >= max(ood.held_out_scores) - 1e-9
    assert all(lo < hi for lo, hi in ood.ranges.values())


def test_held_out_twins_are_not_flagged(segmenter: WallSegmenter) -> None:
    jittered, _ = twin_training_scans(list(range(10)), PX)  # experiment seeds, jittered
    settings = [
        {"amplitude_noise_pm": 7.0, "height_noise_nm": 0.05},
        {"amplitude_noise_pm": 22.0, "height_noise_nm": 0.15},
        {"drift": False},
        {"phase_offset_deg": 25.0},
        {"drift_um_s": (3e-4, 1e-4)},
    ]
    varied = [_scan(40 + i, u) for i in range(2) for u in settings]
    frames = jittered + varied
    flags = [_flagged(segmenter, x) for x in frames]
    rate = float(np.mean([f for f, _ in flags]))
    assert rate <= 0.05, [r for f, r in flags if f]


def test_noise_constant_and_rescaled_frames_are_flagged(segmenter: WallSegmenter) -> None:
    rng = np.random.default_rng(7)
    twin = twin_training_scans([50], PX)[0][0]
    raw_noise = pfm_channels(
        rng.rayleigh(50.0, (PX, PX)), rng.uniform(-90, 270, (PX, PX)), rng.normal(0, 1, (PX, PX))
    )
    nan_frame = twin.copy()
    nan_frame[:, 10:12, :] = np.nan
    bad = {
        "noise": rng.standard_normal(twin.shape),
        "raw noise scan": raw_noise,
        "constant": np.zeros_like(twin),
        "rescaled x10": twin * 10.0,
        "rescaled x0.1": twin * 0.1,
        "shifted +3": twin + 3.0,
        "nan lines": nan_frame,
    }
    for name, x in bad.items():
        flagged, reasons = _flagged(segmenter, x)
        assert flagged, name
        assert reasons
    assert not _flagged(segmenter, twin)[0]  # the same frame unmodified passes


def test_real_pfm_scans_are_scored(segmenter: WallSegmenter) -> None:
    """Real PTO scans: behaviour recorded, not forced (they differ from the twin)."""
    files = sorted(REAL.glob("pto_scan_*.npz"))
    if not files:
        pytest.skip("no real PFM scans in ../shared/data/pfm-pto")
    for f in files:
        d = np.load(f)
        x = pfm_channels(d["AmplitudeRetrace"], d["PhaseRetrace"], d["HeightRetrace"])
        prob, spread = segmenter.predict(x)
        decision = segmenter.check(x, prob, spread)
        assert np.isfinite(decision.score)
        assert decision.flagged == bool(decision.reasons)
        print(f.name, decision.flagged, round(decision.score, 3), decision.reasons)


def _quiet() -> Console:
    return Console(quiet=True)


def test_flagged_live_frame_queues_no_spectra(checkpoint: Path, tmp_path: Path) -> None:
    # Default checkpoint location is <runs_dir>/spm-segmenter.pt: put the tiny one there
    # so nothing is trained and nothing is written into the repository's runs/.
    shutil.copy(checkpoint, tmp_path / "spm-segmenter.pt")
    common = [f"runs_dir={tmp_path}", f"forward.scan_pixels={PX}", "policy.budget=3", "seed=2"]
    summary = run_spm_active(
        CONFIGS / "twin-spm-forward.yaml", [*common, "forward.ood_threshold=0.000001"], _quiet()
    )
    assert summary["ood_flagged"] is True
    assert summary["measured"] == 0
    assert any("disagreement" in r for r in summary["ood_reasons"])
    events_files = list(tmp_path.rglob("events*.jsonl"))  # run dirs live under tmp_path
    assert len(events_files) == 1
    events = [json.loads(line) for line in events_files[0].read_text().splitlines()]
    seg = [e for e in events if e["kind"] == "segment"]
    assert seg and seg[0]["ood"] is True and seg[0]["points"] == 0
    assert not [e for e in events if e["kind"] == "spectrum"]
    # Same run with the calibrated threshold: the frame passes and spectra are queued.
    passed = run_spm_active(CONFIGS / "twin-spm-forward.yaml", common, _quiet())
    assert passed["ood_flagged"] is False, passed["ood_reasons"]
    assert passed["measured"] == 3
    # scored against the twin's truth topic: walls as scanned, the tip's true place
    assert 0.0 <= passed["walls_measured_fraction"] <= 1.0
    assert 0.0 <= passed["tip_on_wall_fraction"] <= 1.0
    assert 0.0 <= passed["tip_on_wall_fraction_uncorrected"] <= 1.0
