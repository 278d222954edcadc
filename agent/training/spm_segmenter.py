"""`scopeloop train` kind `spm-segmenter`: the forward workflow's U-Net ensemble.

Trained on full-sample scans of twins whose seeds are disjoint from experiment seeds,
labelled with the twin's true walls; a minute or two on one core. The checkpoint is
cached (``runs/spm-segmenter.pt`` by default) and reused by every forward run.

Each scan draws its nuisance settings (lock-in noise, height noise, phase offset,
drift rate) from `drivers.spm_truth.SCAN_JITTER` so the nets, and the OOD
calibration, cover a range of instrument conditions rather than one twin's defaults.
The OOD decision is then calibrated on scans of further held-out seeds
(`calib_seeds`) with the same jitter and stored in the checkpoint (see
`policies.active.segment.OodCalibration`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from agent.config import ConfigError, apply_overrides, format_validation_error
from policies.active.segment import (
    OodCalibration,
    SegmenterTraining,
    WallSegmenter,
    input_statistics,
    train_ensemble,
    uncertainty_score,
)

DEFAULT_TRAIN_SEEDS = tuple(range(10_001, 10_007))
DEFAULT_CALIB_SEEDS = tuple(range(10_101, 10_113))


def twin_training_scans(
    seeds: list[int], pixels: int, jitter: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full-sample twin scans (network input channels) and true wall masks, one per seed;
    the twin is built on the driver side (drivers.spm_truth), the channels here."""
    from drivers.spm_truth import labelled_scans
    from policies.active.grid import pfm_channels

    scans, masks = labelled_scans(seeds, pixels, jitter)
    images = [pfm_channels(s["Amplitude"], s["Phase"], s["Height"]) for s in scans]
    return images, masks


def calibrate_ood(segmenter: WallSegmenter, images: list[np.ndarray]) -> OodCalibration:
    """Fit the OOD decision on held-out scans the ensemble was not trained on."""
    scores, stats = [], []
    for img in images:
        prob, spread = segmenter.predict(img)
        scores.append(uncertainty_score(prob, spread))
        stats.append(input_statistics(img))
    return OodCalibration.fit(scores, stats)


class SegmenterTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["spm-segmenter"] = "spm-segmenter"
    checkpoint: Path = Path("runs/spm-segmenter.pt")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_TRAIN_SEEDS), min_length=1)
    calib_seeds: list[int] = Field(
        default_factory=lambda: list(DEFAULT_CALIB_SEEDS), min_length=2, max_length=1000
    )
    jitter: bool = True  # draw scan nuisances from SCAN_JITTER per scan
    pixels: int = Field(96, ge=32, le=512)
    members: int = Field(3, ge=2, le=16)
    steps: int = Field(300, ge=1, le=100_000)
    crop: int = Field(32, ge=8, le=256)
    width: int = Field(8, ge=2, le=64)


def train_segmenter(config: SegmenterTrainConfig) -> tuple[WallSegmenter, dict[str, Any]]:
    """Labelled twin scans -> trained, OOD-calibrated ensemble (not saved)."""
    import torch

    overlap = set(config.seeds) & set(config.calib_seeds)
    if overlap:
        raise ConfigError(
            f"config error: calib_seeds: must be disjoint from seeds (shared: {sorted(overlap)})"
        )
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    images, masks = twin_training_scans(list(config.seeds), config.pixels, config.jitter)
    settings = SegmenterTraining(
        members=config.members, steps=config.steps, crop=config.crop, width=config.width
    )
    segmenter = WallSegmenter(train_ensemble(images, masks, settings))
    held_out, _ = twin_training_scans(list(config.calib_seeds), config.pixels, config.jitter)
    segmenter.ood = calibrate_ood(segmenter, held_out)
    scores = segmenter.ood.held_out_scores
    return segmenter, {
        "train_s": time.perf_counter() - t0,
        "scans": len(images),
        "calib_scans": len(held_out),
        "ood_score_threshold": segmenter.ood.score_threshold,
        "held_out_score_median": float(np.median(scores)),
    }


def load_or_train_segmenter(path: Path, console: Console | None = None) -> WallSegmenter:
    """The cached ensemble at `path`, trained with defaults (and saved) if missing.

    A checkpoint without an OOD calibration (made before it existed) is retrained.
    """
    path = Path(path)
    if path.is_file():
        cached = WallSegmenter.load(path)
        if cached.ood is not None:
            return cached
    if console is not None:
        console.print(f"training the wall segmenter (no calibrated checkpoint at {path}) ...")
    segmenter, _ = train_segmenter(SegmenterTrainConfig(checkpoint=path))
    path.parent.mkdir(parents=True, exist_ok=True)
    segmenter.save(path)
    return segmenter


def train_spm_segmenter(
    config_path: Path, overrides: list[str], console: Console
) -> dict[str, Any]:
    """Entry point for TRAIN_KINDS['spm-segmenter']."""
    try:
        raw = yaml.safe_load(Path(config_path).read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError) as exc:
        raise ConfigError(f"config error: {config_path}: {exc}") from None
    raw = apply_overrides(raw if isinstance(raw, dict) else {}, overrides)
    try:
        config = SegmenterTrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    segmenter, info = train_segmenter(config)
    config.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    segmenter.save(config.checkpoint)
    console.print(f"wall segmenter saved to {config.checkpoint}")
    return {"checkpoint": str(config.checkpoint), **info}
