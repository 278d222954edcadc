"""`scopeloop train` kind `spm-segmenter`: the forward workflow's U-Net ensemble.

Trained on full-sample scans of twins whose seeds are disjoint from experiment seeds,
labelled with the twin's true walls; a minute or two on one core. The checkpoint is
cached (``runs/spm-segmenter.pt`` by default) and reused by every forward run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console

from agent.config import ConfigError, apply_overrides, format_validation_error
from policies.active.segment import SegmenterTraining, WallSegmenter, train_ensemble

DEFAULT_TRAIN_SEEDS = tuple(range(10_001, 10_007))


class SegmenterTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["spm-segmenter"] = "spm-segmenter"
    checkpoint: Path = Path("runs/spm-segmenter.pt")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_TRAIN_SEEDS), min_length=1)
    pixels: int = Field(96, ge=32, le=512)
    members: int = Field(3, ge=2, le=16)
    steps: int = Field(300, ge=1, le=100_000)
    crop: int = Field(32, ge=8, le=256)
    width: int = Field(8, ge=2, le=64)


def train_segmenter(config: SegmenterTrainConfig) -> tuple[WallSegmenter, dict[str, Any]]:
    """Labelled twin scans -> trained ensemble (not saved)."""
    import torch

    from agent.spm_truth import labelled_scans

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    images, masks = labelled_scans(list(config.seeds), config.pixels)
    settings = SegmenterTraining(
        members=config.members, steps=config.steps, crop=config.crop, width=config.width
    )
    segmenter = WallSegmenter(train_ensemble(images, masks, settings))
    return segmenter, {"train_s": time.perf_counter() - t0, "scans": len(images)}


def load_or_train_segmenter(path: Path, console: Console | None = None) -> WallSegmenter:
    """The cached ensemble at `path`, trained with defaults (and saved) if missing."""
    path = Path(path)
    if path.is_file():
        return WallSegmenter.load(path)
    if console is not None:
        console.print(f"training the wall segmenter (no checkpoint at {path}) ...")
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
