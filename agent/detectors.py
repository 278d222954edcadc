"""Build the live detector a config asks for.

Classical detectors need nothing but their settings. The deep (LodeSTAR-style)
detector is self-supervised: without a checkpoint it learns from unlabeled crops of
the first frames of the live stream, then saves its weights in the run directory so
later phases of the same run (and replays) use the very same model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field

from agent.detect import DetectorConfig, ParticleDetector
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
        import agent.lodestar as lodestar
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
