"""Evaluation against twin ground truth. Only this module subscribes to the truth topic,
so no policy or detector can read ground truth by accident: plans hand it what they
did and get scores back (the feedback trap's tracks, the SPM twin's walls and loops).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent.records.recorder import EventLog, read_events
from drivers.auth import ClientKeys
from drivers.protocol import HEARTBEAT_TOPIC, TRUTH_PREFIX, unpack_map
from drivers.transport import raw_subscriber

DRAIN_S = 0.25


class TruthRecorder(threading.Thread):
    """Background subscriber that logs every ground-truth message to a JSONL file."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, path: Path, keys: ClientKeys | None = None
    ) -> None:
        super().__init__(daemon=True, name="truth-recorder")
        # Evaluation must not lose records: a deep queue. Heartbeats only tell that the
        # subscription is live (`connected`), so a twin's first record is not missed.
        topics = [TRUTH_PREFIX, HEARTBEAT_TOPIC]
        self._socket = raw_subscriber(ctx, endpoint, topics, 100_000, keys)
        self._log = EventLog(path)
        self._stop_event = threading.Event()
        self.received = threading.Event()  # set once the first record is logged
        self.connected = threading.Event()  # set at the first message of any kind
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
            self.connected.set()
            if not parts[0].startswith(TRUTH_PREFIX):
                continue  # a heartbeat: the subscription is live
            record = unpack_map(parts[1], "truth")
            record.pop("v", None)
            self._log.write("truth", **record)
            self.received.set()

    def drain(self) -> None:
        """Log what has arrived, on the caller's thread, for a caller that never starts
        this thread: a frame loop calls it between steps, so the recorder never holds
        the GIL between a frame and its command."""
        self._drain()

    def stop(self) -> list[dict[str, Any]]:
        """Stop and return every record, read back from the file (memory stays flat)."""
        self._stop_event.set()
        if self.ident is None and not self._socket.closed:  # never started: finish here
            self.run()
        elif self.ident is not None:
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


def _spm_records(records: list[dict[str, Any]], kind: str, seq: int | None = None) -> list:
    return [r for r in records if r.get("record") == kind and (seq is None or r["seq"] == seq)]


def spm_scan_truth(
    records: list[dict[str, Any]], seq: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]] | None:
    """(walls (H, W) bool, drift (H, 2) um, window (x0, y0, w, h) node um) of the scan
    whose first frame is `seq`, as the SPM twin published it; None without truth."""
    rows = _spm_records(records, "scan", seq)
    if not rows:
        return None
    lines, pixels = rows[0]["shape"]
    walls = np.zeros((lines, pixels), bool)
    drift = np.zeros((lines, 2))
    for r in rows:
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(r["walls"]), np.uint8))
        walls[r["row"]] = bits[:pixels].astype(bool)
        drift[r["row"]] = r["drift_um"]
    return walls, drift, tuple(float(v) for v in rows[0]["window_um"])


def spm_true_loops(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(waveform (L,), loops (H, W, L) pm) of the twin's unperturbed sample at the pixel
    centres of its last whole-sample scan; None when the twin published none."""
    blocks = _spm_records(records, "loops")
    if not blocks:
        return None
    seq = blocks[-1]["seq"]
    blocks = [b for b in blocks if b["seq"] == seq]
    head = next((b for b in blocks if "waveform_v" in b), None)
    if head is None:
        return None
    waveform = np.asarray(head["waveform_v"], float)
    rows, cols = head["shape"]
    loops = np.full((rows, cols, waveform.size), np.nan)
    for b in blocks:
        block = np.asarray(b["loops_pm"], float).reshape(-1, waveform.size)
        loops[b["row"], b["col0"] : b["col0"] + len(block)] = block
    return waveform, loops


def spm_tip_on_wall(
    records: list[dict[str, Any]],
    scan_seq: int,
    aims: list[tuple[int, tuple[float, float]]],
    tol_px: int = 0,
) -> list[bool] | None:
    """Whether the tip, aimed at node position (x, y) um for the spectrum `seq`, sat on
    a true wall (the twin's mask: within 0.75 px, plus tol_px pixels) of the scan
    `scan_seq`, shifted by how far the sample drifted between that scan line and the
    sweep. None without truth."""
    from scipy import ndimage

    scan = spm_scan_truth(records, scan_seq)
    if scan is None:
        return None
    walls, drift, (x0, y0, w, h) = scan
    near = ndimage.binary_dilation(walls, iterations=tol_px) if tol_px else walls
    lines, pixels = walls.shape
    px, py = w / pixels, h / lines
    by_seq = {r["seq"]: np.asarray(r["drift_um"], float) for r in _spm_records(records, "spectrum")}
    out = []
    for seq, (x, y) in aims:
        moved = by_seq.get(seq)
        if moved is None:
            return None
        r = int(np.clip((y - y0) / py, 0, lines - 1))
        shift = moved - drift[r]  # the sample under the tip now vs. when that line was scanned
        c = int(np.clip((x + shift[0] - x0) / px, 0, pixels - 1))
        r = int(np.clip((y + shift[1] - y0) / py, 0, lines - 1))
        out.append(bool(near[r, c]))
    return out
