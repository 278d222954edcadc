"""Build the live detector a config asks for.

Classical detectors need nothing but their settings (``adapt: true`` estimates them
from the first frame). The deep (LodeSTAR-style) detector is self-supervised: without
a checkpoint it learns from unlabeled crops of the live stream (or of the files given
to ``scopeloop detect``), then saves its weights (in the run directory, or beside the
CSV) so later phases and replays use the very same model. Both paths choose their crops
with :mod:`agent.detection.training_crops` (classical hits and DoG blobs of the
estimated size, each significant against the frame's noise and particle-like); the
live one keeps reading the stream until the buffer holds enough, so a sparse field
trains on crops gathered over many frames.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field

from agent.detection.detect import DetectorConfig, ParticleDetector
from agent.detection.detect_auto import Estimate, check_frames, estimate_config
from agent.detection.training_crops import (
    SEED_SOURCES,
    CropBuffer,
    CropSelection,
    crop_px_for,
    select_crops,
)
from drivers.auth import ClientKeys
from drivers.transport import StreamSubscriber

Detector = Callable[[np.ndarray], np.ndarray]
Log = Callable[[str], None]
_MIN_TRAIN_CROPS = 8  # fewer crops than this cannot train or self-check a network


class LodeStarSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = None  # None: train on the live stream at the start of the run
    train_frames: int = Field(24, ge=1, le=10_000, description="frames read at least")
    crops: int = Field(256, ge=16, le=100_000, description="training-crop buffer size")
    min_crops: int = Field(
        64, ge=8, le=100_000, description="keep reading past train_frames until this many"
    )
    max_train_frames: int = Field(2000, ge=1, le=100_000)
    train_steps: int | None = Field(None, ge=10, le=100_000, description="None: the default")
    seed: int = Field(0, ge=0)
    frame_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)


class DetectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["classical", "lodestar"] = "classical"
    classical: DetectorConfig = DetectorConfig()
    lodestar: LodeStarSettings = LodeStarSettings()


def stream_frames(
    ctx: zmq.Context, endpoint: str, timeout_s: float, keys: ClientKeys | None = None
) -> Iterator[np.ndarray]:
    """Copies of a stream's newest frames until `timeout_s` has passed (then it ends)."""
    subscriber = StreamSubscriber(ctx, endpoint, keys=keys)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            frame = subscriber.recv_newest(timeout_ms=200)
            if frame is not None:
                yield np.array(frame.data)
    finally:
        subscriber.close()


def needs_training(settings: DetectorSettings) -> bool:
    return settings.kind == "lodestar" and settings.lodestar.checkpoint is None


def _lodestar() -> Any:
    """The deep detector module; it needs torch, which the base install leaves out."""
    try:
        import agent.detection.lodestar as lodestar
    except ImportError as exc:
        raise RuntimeError(
            "agent.detector.kind=lodestar needs torch: pip install torch==2.13.0 "
            f"(CPU build) ({exc})"
        ) from None
    return lodestar


def train_on_stream(
    settings: DetectorSettings,
    checkpoint: Path,
    ctx: zmq.Context,
    stream_endpoint: str,
    log: Log = lambda _m: None,
    on_loss: Callable[[int, float], None] | None = None,
    keys: ClientKeys | None = None,
) -> dict[str, float]:
    """Self-supervised training on unlabeled crops of the next frames of a live stream;
    `on_loss(step, loss)` sees every training step (for the report's learning curve)."""
    frames = stream_frames(ctx, stream_endpoint, settings.lodestar.frame_timeout_s, keys)
    model, stats = train_from_frames(settings, frames, log=log, on_loss=on_loss)
    model.save(checkpoint)
    return stats


def gather_crops(
    deep: LodeStarSettings,
    base: DetectorConfig,
    frames: Iterator[np.ndarray],
    sources: Sequence[str] = SEED_SOURCES,
) -> tuple[Estimate, CropSelection]:
    """Read frames into a crop buffer until it holds enough (see LodeStarSettings).

    Parameters are estimated from the first frames (as `scopeloop detect` does); the
    buffer keeps a fair share per frame of `crops`, so the first frames cannot fill it.
    """
    head = list(islice(frames, min(5, deep.train_frames)))
    if not head:
        raise ValueError("no frame arrived from the stream")
    estimate = estimate_config(head, base)
    per_frame = max(1, math.ceil(deep.crops / deep.train_frames))
    rng = np.random.default_rng(deep.seed)
    buffer = CropBuffer(
        estimate,
        crop_px_for(estimate.diameter_px),
        deep.crops,
        rng,
        sources=sources,
        per_frame=per_frame,
    )
    for frame in chain(head, frames):
        buffer.add(frame)
        enough = len(buffer) >= min(deep.min_crops, deep.crops)
        if (enough and buffer.frames >= deep.train_frames) or (
            buffer.frames >= deep.max_train_frames
        ):
            break
    return estimate, buffer.selection()


def train_from_frames(
    settings: DetectorSettings,
    frames: Iterator[np.ndarray],
    log: Log = lambda _m: None,
    on_loss: Callable[[int, float], None] | None = None,
    sources: Sequence[str] = SEED_SOURCES,
) -> tuple[Any, dict[str, float]]:
    """The live loop's training: gather crops from a frame stream, fit, report what was
    used (crops per seed source) or, when there is nothing to train on, why."""
    lodestar = _lodestar()
    deep = settings.lodestar
    try:
        estimate, selection = gather_crops(deep, settings.classical, frames, sources)
    except ValueError as exc:  # no frame, or frames no detector can use
        log(f"lodestar: nothing to train on: {exc}")
        raise
    if len(selection.crops) < _MIN_TRAIN_CROPS:
        why = selection.why_empty() or (
            f"only {selection.summary()}; at least {_MIN_TRAIN_CROPS} are needed"
        )
        message = f"lodestar: nothing to train on: {why} ({estimate.summary})"
        log(message)
        raise ValueError(message)
    steps = {"train_steps": deep.train_steps} if deep.train_steps else {}
    config = lodestar.LodeStarConfig(crop_px=selection.crops.shape[1], seed=deep.seed, **steps)
    model = lodestar.LodeStarDetector(config)
    stats = model.fit(selection.crops, progress=on_loss)
    short = "" if len(selection.crops) >= deep.min_crops else f" (fewer than {deep.min_crops})"
    log(
        f"lodestar trained on {selection.summary()}{short} of the live stream in "
        f"{stats.get('seconds', float('nan')):.1f} s (converged: {stats.get('converged')})"
    )
    used = selection.used()
    stats |= {
        "crop_frames": float(selection.frames),
        "crops_classical": float(used["classical"]),
        "crops_blob": float(used["blob"]),
        "crop_threshold_sigma": float(selection.threshold_sigma),
    }
    return model, stats


def build_detector(settings: DetectorSettings, trained_checkpoint: Path | None = None) -> Detector:
    """The detector for a run: classical, or the deep one from its checkpoint."""
    if settings.kind == "classical":
        return ParticleDetector(settings.classical)

    path = (
        Path(settings.lodestar.checkpoint) if settings.lodestar.checkpoint else trained_checkpoint
    )
    if path is None or not path.exists():
        raise FileNotFoundError(f"agent.detector.lodestar.checkpoint: {path} does not exist")
    return _lodestar().LodeStarDetector.load(path)


class _SameFrames:
    """Wraps an offline detector so that every frame must match the first in size and type."""

    def __init__(self, find: Callable[[np.ndarray], tuple[np.ndarray, ...]], first: np.ndarray):
        self.find = find
        self.first = first
        self.index = 0

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, ...]:
        try:
            check_frames([self.first, frame])
        except ValueError as exc:
            raise ValueError(str(exc).replace("frame 1", f"frame {self.index}")) from None
        self.index += 1
        return self.find(frame)


def run_detect(
    images: list[Path],
    out: Path,
    detector: str,
    diameter: float | None,
    polarity: str | None,
    checkpoint: Path | None,
    console: Any,
) -> int:
    """`scopeloop detect`: estimate what was not given, say so, detect, say why if empty."""
    from agent.detection.offline import detect_files, iter_frames

    frames = [frame for _, _, frame in islice(iter_frames(images), 64)]
    check_frames(frames)
    base = DetectorConfig(
        **({"method": detector} if detector != "lodestar" else {}),
        **({"polarity": polarity} if polarity else {}),
    )
    estimate = estimate_config(frames, base, diameter)
    why = estimate.why_empty
    if detector == "lodestar":
        model = _offline_lodestar(frames, estimate, checkpoint, out, console)
        find: Callable[[np.ndarray], tuple[np.ndarray, ...]] = model.predict_with_scores
        if not why:
            why = "the trained network found no spot as bright as its training crops"
    else:
        console.print(estimate.summary, markup=False, highlight=False, soft_wrap=True)
        find = ParticleDetector(estimate.config).detect_with_confidence
        if not why:
            why = (
                f"no particle cleared the threshold ({estimate.config.threshold_sigma:.1f} "
                f"sigma); the strongest feature was {estimate.peak_snr:.1f} sigma "
                "(try --polarity or --diameter)"
            )
    count = detect_files(images, _SameFrames(find, frames[0]), out)
    if count == 0:
        console.print(
            f"0 detections written to {out}: {why}", markup=False, highlight=False, soft_wrap=True
        )
    else:
        console.print(f"{count} detections written to {out}", markup=False, highlight=False)
    return count


def _offline_lodestar(
    frames: list[np.ndarray], estimate: Any, checkpoint: Path | None, out: Path, console: Any
) -> Any:
    """LodeSTAR for `scopeloop detect`: load the checkpoint, or train on these frames.

    Training crops are chosen as on the live stream (agent.detection.training_crops:
    the adaptive detector's hits and the significant, particle-like DoG blobs it did not
    accept); the checkpoint is saved beside the CSV and the model used is the one
    reloaded from it, so a later `--checkpoint` run gives exactly the same detections.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    lodestar = _lodestar()
    if checkpoint is not None:
        return lodestar.LodeStarDetector.load(checkpoint)
    crop = crop_px_for(estimate.diameter_px)
    config = lodestar.LodeStarConfig(crop_px=crop)
    selection = select_crops(frames, estimate, crop, 256, np.random.default_rng(config.seed))
    if len(selection.crops) == 0:
        raise ValueError(
            f"lodestar: nothing to train on ({selection.why_empty()}; {crop} px crops around "
            f"candidates of diameter {estimate.diameter_px:.0f} px)"
        )
    crops = selection.crops
    model = lodestar.LodeStarDetector(config)
    console.print(
        f"lodestar: no checkpoint, training self-supervised on {selection.summary()}, "
        f"unlabeled {crop} px crops",
        markup=False,
        highlight=False,
    )
    columns = (TextColumn("training"), BarColumn(), TextColumn("{task.fields[loss]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("train", total=config.train_steps, loss="")
        stats = model.fit(
            crops,
            progress=lambda step, loss: bar.update(
                task, completed=step % config.train_steps + 1, loss=f"loss {loss:.3g}"
            ),
        )
    saved = out.with_suffix(".lodestar.pt")
    saved.parent.mkdir(parents=True, exist_ok=True)
    model.save(saved)
    console.print(
        f"lodestar trained in {stats.get('seconds', float('nan')):.1f} s "
        f"(converged: {bool(stats.get('converged'))}); checkpoint saved to {saved}",
        markup=False,
        highlight=False,
    )
    return lodestar.LodeStarDetector.load(saved)
