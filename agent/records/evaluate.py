"""Evaluation against twin ground truth. Only this module subscribes to the truth topic,
so no policy or detector can read ground truth by accident.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent.records.recorder import EventLog, read_events
from drivers.auth import ClientKeys
from drivers.protocol import TRUTH_PREFIX, unpack_map
from drivers.transport import raw_subscriber

DRAIN_S = 0.25


class TruthRecorder(threading.Thread):
    """Background subscriber that logs every ground-truth message to a JSONL file."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, path: Path, keys: ClientKeys | None = None
    ) -> None:
        super().__init__(daemon=True, name="truth-recorder")
        # Evaluation must not lose records: a deep queue.
        self._socket = raw_subscriber(ctx, endpoint, [TRUTH_PREFIX], 100_000, keys)
        self._log = EventLog(path)
        self._stop_event = threading.Event()
        self.received = threading.Event()  # set once the first record is logged
        self.path = path

    def run(self) -> None:
        try:
            while True:
                # drain in batches: one wake-up per DRAIN_S, not one per frame, so this
                # thread seldom holds the GIL when the loop's next frame arrives
                stopping = self._stop_event.wait(DRAIN_S)
                self._drain()
                if stopping:
                    break
        finally:
            self._log.close()
            self._socket.close()

    def _drain(self) -> None:
        while True:
            try:
                parts = self._socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            record = unpack_map(parts[1], "truth")
            record.pop("v", None)
            self._log.write("truth", **record)
            self.received.set()

    def stop(self) -> list[dict[str, Any]]:
        """Stop and return every record, read back from the file (memory stays flat)."""
        self._stop_event.set()
        self.join(timeout=5)
        return read_events(self.path)


def controlled_track(records: list[dict[str, Any]], target: tuple[float, float]) -> np.ndarray:
    """(T, 2) true positions of the particle the trap is about: nearest the target at start."""
    if not records:
        return np.zeros((0, 2))
    positions = [np.asarray(r["positions_um"], dtype=float).reshape(-1, 2) for r in records]
    first = positions[0]
    index = int(np.argmin(np.hypot(*(first - np.asarray(target)).T)))
    return np.array([p[index] for p in positions])


def rms_distance(track: np.ndarray, target: tuple[float, float]) -> float:
    if len(track) == 0:
        return float("nan")
    return float(np.sqrt(np.mean(np.sum((track - np.asarray(target)) ** 2, axis=1))))


MATCH_RADIUS_UM = 1.0  # a detection farther than this from every true particle is a miss


def detection_errors_um(
    steps: list[dict[str, Any]],
    truth: list[dict[str, Any]],
    match_radius_um: float = MATCH_RADIUS_UM,
    first_only: bool = False,
) -> tuple[np.ndarray, int]:
    """Distance of each recorded detection (or only each step's first) to its nearest true
    particle in the same frame: (errors within `match_radius_um`, count beyond it)."""
    by_seq = {r["seq"]: np.asarray(r["positions_um"], dtype=float).reshape(-1, 2) for r in truth}
    errors: list[float] = []
    unmatched = 0
    for step in steps:
        true = by_seq.get(step.get("seq"))
        found = np.asarray(step.get("detections_um") or [], dtype=float).reshape(-1, 2)
        if first_only:
            found = found[:1]
        if true is None or len(true) == 0 or len(found) == 0:
            continue
        distances = np.min(np.hypot(*(found[:, None, :] - true[None, :, :]).transpose(2, 0, 1)), 1)
        errors.extend(float(d) for d in distances if d <= match_radius_um)
        unmatched += int(np.sum(distances > match_radius_um))
    return np.asarray(errors, dtype=float), unmatched


def detection_rmse_um(
    steps: list[dict[str, Any]],
    truth: list[dict[str, Any]],
    match_radius_um: float = MATCH_RADIUS_UM,
) -> float:
    """RMS distance between each step's first detection and the nearest true particle."""
    errors, _ = detection_errors_um(steps, truth, match_radius_um, first_only=True)
    return float(np.sqrt(np.mean(np.square(errors)))) if len(errors) else float("nan")
