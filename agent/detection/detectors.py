"""Build the live detector a config asks for.

Classical detectors need nothing but their settings (``adapt: true`` estimates them
from the first frame). The deep (LodeSTAR-style) detector is self-supervised: without
a checkpoint it learns from unlabeled crops of the first frames of the live stream (or
of the files given to ``scopeloop detect``), cut around the adaptive detector's hits
and around fainter blobs of the estimated size, then saves its weights (in the run
directory, or beside the CSV) so later phases and replays use the very same model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field

from agent.detection.detect import DetectorConfig, ParticleDetector
from agent.detection.detect_auto import Estimate, blob_candidates, check_frames, estimate_config
from drivers.auth import ClientKeys
from drivers.transport import StreamSubscriber

Detector = Callable[[np.ndarray], np.ndarray]
Log = Callable[[str], None]


class LodeStarSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = None  # None: train on the live stream at the start of the run
    train_frames: int = Field(24, ge=1, le=10_000)
    crops: int = Field(256, ge=16, le=100_000)
    seed: int = Field(0, ge=0)
    frame_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)


class DetectorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["classical", "lodestar"] = "classical"
    classical: DetectorConfig = DetectorConfig()
    lodestar: LodeStarSettings = LodeStarSettings()


def collect_frames(
    ctx: zmq.Context, endpoint: str, count: int, timeout_s: float, keys: ClientKeys | None = None
) -> list[np.ndarray]:
    """The next `count` frames of a stream (copies), or an error after `timeout_s`."""
    subscriber = StreamSubscriber(ctx, endpoint, keys=keys)
    frames: list[np.ndarray] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(frames) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"detector training: got {len(frames)} of {count} frames in {timeout_s:g} s"
                )
            frame = subscriber.recv_newest(timeout_ms=200)
            if frame is not None:
                frames.append(np.array(frame.data))
    finally:
        subscriber.close()
    return frames


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
    lodestar = _lodestar()
    deep = settings.lodestar
    frames = collect_frames(ctx, stream_endpoint, deep.train_frames, deep.frame_timeout_s, keys)
    config = lodestar.LodeStarConfig(seed=deep.seed)
    rng = np.random.default_rng(deep.seed)
    # Live: crops around the classical detector's hits. Adding every DoG blob it did not
    # accept (as `scopeloop detect` does on a user's files) fed the sparse twin stream
    # mostly noise crops, and training stopped converging (tests/test_end_to_end.py).
    crops = lodestar.crops_from_frames(frames, config.crop_px, deep.crops, rng)
    model = lodestar.LodeStarDetector(config)
    stats = model.fit(crops, progress=on_loss)
    model.save(checkpoint)
    log(
        f"lodestar trained on {len(crops)} unlabeled crops from {len(frames)} live frames "
        f"in {stats.get('seconds', float('nan')):.1f} s (converged: {stats.get('converged')})"
    )
    return stats


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


def training_seeds(estimate: Estimate) -> Callable[[np.ndarray], np.ndarray]:
    """Where to cut self-supervised training crops: the adaptive detector's hits plus
    every blob of the estimated size above 3 sigma that it did not accept."""
    classical = ParticleDetector(estimate.config)
    merge = max(3.0, 0.5 * estimate.diameter_px)

    def seeds(frame: np.ndarray) -> np.ndarray:
        hits, blobs = classical(frame), blob_candidates(frame, estimate)
        if len(hits) and len(blobs):
            d = np.hypot(*(blobs[:, None, :] - hits[None, :, :]).transpose(2, 0, 1))
            blobs = blobs[d.min(axis=1) > merge]
        return np.vstack([hits, blobs])

    return seeds


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
    from itertools import islice

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

    Training crops are centred on the adaptive detector's hits and on every blob of the
    estimated size above 3 sigma (not only what the classical detector accepts); the
    checkpoint is saved beside the CSV and the model used is the one reloaded from it,
    so a later `--checkpoint` run gives exactly the same detections.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    lodestar = _lodestar()
    if checkpoint is not None:
        return lodestar.LodeStarDetector.load(checkpoint)
    seeds = training_seeds(estimate)
    crop = int(min(128, max(32, 2 * round(1.25 * estimate.diameter_px))))
    config = lodestar.LodeStarConfig(crop_px=crop)
    rng = np.random.default_rng(config.seed)
    try:
        crops = lodestar.crops_from_frames(frames, config.crop_px, 256, rng, seeds=seeds)
    except ValueError as exc:
        raise ValueError(
            f"lodestar: nothing to train on ({exc}; {crop} px crops around candidates "
            f"of diameter {estimate.diameter_px:.0f} px)"
        ) from None
    model = lodestar.LodeStarDetector(config)
    console.print(
        f"lodestar: no checkpoint, training self-supervised on {len(crops)} unlabeled "
        f"{crop} px crops from {len(frames)} of these frames",
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
