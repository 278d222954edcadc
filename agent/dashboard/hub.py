"""The dashboard's side of a run: one thread drains the telemetry, browsers read snapshots.

The hub keeps only what a page can draw: the newest frame (rendered once per new
frame, to 8-bit <= 256 px, when a client asks), the newest map per name, bounded
metric histories and the last events. Each browser keeps cursors into these, so a
slow browser simply gets the newest state at its next tick and nothing queues up,
however fast the run publishes.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

import numpy as np
import zmq

from agent.engine.telemetry import (
    TelemetryInfo,
    TelemetryMessage,
    TelemetrySubscriber,
    send_control,
)
from drivers.auth import ClientKeys

DISPLAY_PX = 256
METRIC_POINTS = 4000  # per metric; ~40 s at 100 Hz, much longer at camera rates
HISTORY_POINTS = 600  # what a newly connected page gets per metric
EVENTS_KEPT = 300
RELOCATE_S = 1.0

Locator = Callable[[], TelemetryInfo | None]


def block_reduce(image: np.ndarray, max_px: int) -> np.ndarray:
    """Mean over k x k blocks so the longer side is <= max_px (small spots stay visible)."""
    k = max(1, math.ceil(max(image.shape) / max_px))
    if k == 1:
        return image.astype(np.float32)
    h, w = (image.shape[0] // k) * k, (image.shape[1] // k) * k
    if h == 0 or w == 0:
        return image[::k, ::k].astype(np.float32)
    return image[:h, :w].reshape(h // k, k, w // k, k).mean(axis=(1, 3), dtype=np.float32)


def to_u8(
    image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.8
) -> tuple[bytes, float, float]:
    """Robust contrast stretch to 8 bits; returns (pixels, low, high) of the stretch."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return bytes(image.size), 0.0, 0.0
    lo, hi = np.percentile(finite, [lo_pct, hi_pct])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    scaled = np.nan_to_num((image - lo) * scale, nan=0.0)
    return np.clip(scaled, 0, 255).astype(np.uint8).tobytes(), float(lo), float(hi)


def binary_message(header: dict[str, Any], payload: bytes) -> bytes:
    """`[u32 little-endian header length][JSON header][payload]`: one websocket frame."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + payload


@dataclass
class ClientCursor:
    """What one browser has already been sent."""

    frame_version: int = -1
    metric_index: int = -1  # global index of the last metric sample sent
    event_index: int = -1
    state_version: int = -1
    map_versions: dict[str, int] = field(default_factory=dict)
    attach_version: int = -1

    def reset(self, attach_version: int) -> None:
        self.__dict__.update(ClientCursor(attach_version=attach_version).__dict__)


class TelemetryHub:
    """Subscribes to the run found by `locate` (re-locating when it ends) in its own thread."""

    def __init__(
        self, locate: Locator, ctx: zmq.Context | None = None, keys: ClientKeys | None = None
    ) -> None:
        """`keys`: CURVE client keys for a run whose telemetry is on tcp://."""
        self.locate = locate
        self.ctx = ctx or zmq.Context.instance()
        self.keys = keys
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: TelemetryInfo | None = None
        self.attach_version = 0
        self.received = 0
        self._reset()

    def _reset(self) -> None:
        self._frame: TelemetryMessage | None = None
        self._frame_version = 0
        self._frame_cache: tuple[int, bytes] | None = None
        self._maps: dict[str, tuple[int, TelemetryMessage]] = {}
        self._map_cache: dict[str, tuple[int, bytes]] = {}
        self._metrics: dict[str, deque[tuple[int, float, float]]] = {}
        self._metric_index = -1
        self._events: deque[tuple[int, dict[str, Any]]] = deque(maxlen=EVENTS_KEPT)
        self._event_index = -1
        self._state: dict[str, Any] = {"state": "waiting", "run": "", "phase": ""}
        self._state_version = 0
        self._replayed: set[tuple[Any, Any]] = set()  # events got twice: status + stream

    # --- thread -----------------------------------------------------------------

    def start(self) -> TelemetryHub:
        self._thread = threading.Thread(target=self._run, name="dashboard-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        subscriber: TelemetrySubscriber | None = None
        next_check = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + RELOCATE_S
                    subscriber = self._relocate(subscriber)
                if subscriber is None:
                    self._stop.wait(0.2)
                    continue
                messages = subscriber.poll(100)
                if messages:
                    self._ingest(messages)
        finally:
            if subscriber is not None:
                subscriber.close()

    def _relocate(self, subscriber: TelemetrySubscriber | None) -> TelemetrySubscriber | None:
        """Attach to the run the locator names; keep the current one while it is the answer."""
        info = self.locate()
        current = self.info
        if info is None or (current is not None and info.run_dir == current.run_dir):
            if current is not None and subscriber is not None and not current.is_live():
                with self._lock:  # the run ended: show it as stopped, keep its history
                    if self._state.get("state") != "stopped":
                        self._state = {**self._state, "state": "stopped"}
                        self._state_version += 1
            return subscriber
        if subscriber is not None:
            subscriber.close()
        subscriber = TelemetrySubscriber(
            info.publish, self.ctx, keys=self.keys, max_bytes=info.max_part_bytes
        )
        with self._lock:
            self._reset()
            self.info = info
            self.attach_version += 1
            self._state = {"state": "starting", "run": info.run, "phase": ""}
            self._state_version += 1
        # The state now rather than at the next repeat; short, since a run busy elsewhere
        # (driver start-up, a long scan) answers late and the repeat will come anyway.
        status = self.command("status", timeout_ms=300)
        if status.get("ok"):
            with self._lock:
                if self._state["state"] == "starting":
                    phase = str(status.get("phase", ""))
                    self._state = {**self._state, "state": status["state"], "phase": phase}
                    self._state_version += 1
                for event in status.get("events", []):  # what happened before we attached
                    self._event_index += 1
                    self._events.append((self._event_index, dict(event)))
                    self._replayed.add((event.get("t_s"), event.get("message")))
        return subscriber

    def _ingest(self, messages: list[TelemetryMessage]) -> None:
        with self._lock:
            self.received += len(messages)
            for msg in messages:
                if msg.kind == "frame":
                    self._frame = msg  # newest wins: older frames are simply dropped
                    self._frame_version += 1
                elif msg.kind == "map":
                    version = self._maps.get(msg.header["name"], (0, msg))[0] + 1
                    self._maps[str(msg.header["name"])] = (version, msg)
                elif msg.kind == "metric":
                    t = float(msg.header.get("t_s", 0.0))
                    for name, value in msg.header.get("values", {}).items():
                        self._metric_index += 1
                        series = self._metrics.setdefault(name, deque(maxlen=METRIC_POINTS))
                        series.append((self._metric_index, t, float(value)))
                elif msg.kind == "event":
                    if (msg.header.get("t_s"), msg.header.get("message")) in self._replayed:
                        continue
                    self._event_index += 1
                    self._events.append((self._event_index, dict(msg.header)))
                elif msg.kind == "state":
                    self._state = {
                        k: msg.header.get(k, "") for k in ("state", "run", "phase", "reason")
                    }
                    self._state_version += 1

    # --- snapshots for browsers ------------------------------------------------------

    def command(self, cmd: str, timeout_ms: int = 2000) -> dict[str, Any]:
        """Forward pause/resume/stop/status to the run's control channel."""
        info = self.info
        if info is None:
            return {"ok": False, "error": "no run attached"}
        try:
            return send_control(info.control, cmd, timeout_ms, self.ctx, self.keys)
        except TimeoutError as exc:
            return {"ok": False, "error": str(exc)}

    def update_for(self, cursor: ClientCursor) -> tuple[list[bytes], dict[str, Any] | None]:
        """Binary frames/maps and one JSON update with whatever is new for this client."""
        binaries: list[bytes] = []
        update: dict[str, Any] = {"type": "update"}
        with self._lock:
            if cursor.attach_version != self.attach_version:
                cursor.reset(self.attach_version)  # a new run: start this client afresh
                update["reset"] = True
            if self._state_version != cursor.state_version:
                cursor.state_version = self._state_version
                update["state"] = dict(self._state)
            frame_bin = self._frame_binary(cursor)
            map_bins = self._map_binaries(cursor)
            metrics = self._metrics_since(cursor)
            events = [e for i, e in self._events if i > cursor.event_index]
            if self._events:
                cursor.event_index = self._events[-1][0]
        if frame_bin is not None:
            binaries.append(frame_bin)
        binaries.extend(map_bins)
        if metrics:
            update["metrics"] = metrics
        if events:
            update["events"] = events
        return binaries, (update if len(update) > 1 else None)

    def _frame_binary(self, cursor: ClientCursor) -> bytes | None:
        if self._frame is None or cursor.frame_version == self._frame_version:
            return None
        cursor.frame_version = self._frame_version
        if self._frame_cache is None or self._frame_cache[0] != self._frame_version:
            self._frame_cache = (self._frame_version, self._render_frame(self._frame))
        return self._frame_cache[1]

    @staticmethod
    def _render_frame(msg: TelemetryMessage) -> bytes:
        image = block_reduce(msg.arrays[0], DISPLAY_PX)
        pixels, lo, hi = to_u8(image)
        header = {k: v for k, v in msg.header.items() if k not in ("v", "shape", "dtype", "stride")}
        header.update(type="frame", width=image.shape[1], height=image.shape[0], lo=lo, hi=hi)
        return binary_message(header, pixels)

    def _map_binaries(self, cursor: ClientCursor) -> list[bytes]:
        out = []
        for name, (version, msg) in self._maps.items():
            if cursor.map_versions.get(name) == version:
                continue
            cursor.map_versions[name] = version
            cached = self._map_cache.get(name)
            if cached is None or cached[0] != version:
                cached = (version, self._render_map(msg))
                self._map_cache[name] = cached
            out.append(cached[1])
        return out

    @staticmethod
    def _render_map(msg: TelemetryMessage) -> bytes:
        layers, payload = [], b""
        for spec, array in zip(msg.header["layers"], msg.arrays, strict=True):
            image = block_reduce(array, DISPLAY_PX)
            pixels, lo, hi = to_u8(image, 0.0, 100.0)
            layers.append(
                {
                    "name": spec["name"],
                    "width": image.shape[1],
                    "height": image.shape[0],
                    "min": lo,
                    "max": hi,
                }
            )
            payload += pixels
        header = {k: v for k, v in msg.header.items() if k not in ("v", "layers")}
        header.update(type="map", layers=layers)
        return binary_message(header, payload)

    def _metrics_since(self, cursor: ClientCursor) -> dict[str, list[list[float]]]:
        out: dict[str, list[list[float]]] = {}
        fresh = cursor.metric_index < 0
        for name, series in self._metrics.items():
            if not series or series[-1][0] <= cursor.metric_index:
                continue
            # newest first, stop at what this client has: cost ~ new points, not history
            new = takewhile(lambda p: p[0] > cursor.metric_index, reversed(series))
            points = [[t, v] for _i, t, v in new][::-1]
            if fresh and len(points) > HISTORY_POINTS:
                step = math.ceil(len(points) / HISTORY_POINTS)
                points = points[::-step][::-1]  # keep the newest point
            out[name] = points
        cursor.metric_index = self._metric_index
        return out

    def status(self) -> dict[str, Any]:
        with self._lock:
            info = self.info
            return {
                "attached": info is not None,
                "run": info.run if info else None,
                "run_dir": str(info.run_dir) if info else None,
                "state": dict(self._state),
                "received": self.received,
                "frame_version": self._frame_version,
            }
