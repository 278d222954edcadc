"""Record received frames to OME-Zarr through ome-writers, and read them back.

Frames arrive in decision order, not on a fixed grid, so the store is one unbounded
acquisition axis ("t": frame number) of (y, x) images. Everything that says why a
frame exists (event id and index, the reason and the decision that asked for it,
stage position, exposure, dose) goes in ome-writers' per-frame metadata, stored in
the group's `zarr.json` under `attributes.ome_writers.frame_metadata`.

ome-writers writes that metadata only when the stream closes, so a killed run would
keep frames nobody can explain. Each frame's metadata therefore also goes to an
append-only JSONL sidecar beside the store (`frames.metadata.jsonl`), one `write()`
per frame, with a checksum of the frame's pixels. Appending a line costs the same at
frame 10 and frame 10^6, unlike rewriting `zarr.json`, and never touches a file
ome-writers owns. The reader takes the metadata from `zarr.json` after a clean close
and from the sidecar otherwise, keeping the frames whose pixels match their checksum.

Nothing recorded is lost: the sidecar lists a frame only once its chunk is written.
ome-writers' tensorstore backend writes chunks asynchronously (`append` returns before
the pixels reach the disk; measured on a loaded machine: up to 3 earlier frames still
in flight after an `append`), so a line written at `append` could name a frame a
SIGKILL then left without pixels. `FrameRecorder` holds each frame's line until
tensorstore reports its chunk committed (the file driver writes it to a temporary
file, syncs and renames it into place), writes the lines in frame order, and lets at
most `MAX_WRITES_IN_FLIGHT` frames wait for their commit (the next `append` waits
beyond that). So after a kill at any moment the sidecar names only frames that can be
read, and the frames missing are exactly those in flight: handed to `append` but not
yet committed (at most `MAX_WRITES_IN_FLIGHT` + 1, plus those still queued to a
writer process). A kill during a line's `write()` leaves a torn last line, skipped
on reading (that frame counts as in flight). This survives the process dying; the
sidecar itself is not synced, so a power cut can take its last lines.

The x/y axes carry the pixel size in micrometres (OME-NGFF `scale` + `unit`), taken
from the recorder's argument or the first frame's `pixel_size_um`.

Plans record through the run engine (`RunEngine.frame_writer`, a writer process fed
over a socket, `agent.records.frame_writer`), not by calling `FrameRecorder` itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from agent.records.recorder import append_line
from drivers.recorded_frames import (  # the read half lives with the playback driver
    FRAMES_NAME,
    Recording,
    checksum,
    read_recording,
    recording_exists,
    sidecar_path,
)

# Frames whose chunk may still be being written when `append` returns: enough to
# overlap one frame's write with the next frame's resize, few enough that a kill loses
# only a handful.
MAX_WRITES_IN_FLIGHT = 4


class FrameRecorder:
    """Appends frames of one shape/dtype; the first frame fixes both."""

    def __init__(self, path: Path, pixel_size_um: float | None = None) -> None:
        import ome_writers  # noqa: F401  (seconds to import: now, not at the first frame)
        import tensorstore  # noqa: F401  (its backend)

        self.path = Path(path)
        self.pixel_size_um = pixel_size_um
        self._stream: Any = None
        self._shape: tuple[int, ...] = ()
        self.count = 0  # frames committed and listed in the sidecar
        self.appended = 0  # frames handed to `append` (their storage index)
        self.failed = 0  # frames whose chunk write failed (not listed)
        self.error: str | None = None
        self._in_flight: deque[tuple[list[Any], dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._sidecar: int | None = os.open(
            sidecar_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
        )
        append_line(self._sidecar, {"kind": "open", "wall_time": time.time()})

    def append(self, frame: np.ndarray, metadata: dict[str, Any]) -> None:
        """Write one frame; its sidecar line follows once its chunk is committed."""
        if self._stream is None:
            self._open(frame, metadata.get("pixel_size_um"))
        if frame.shape != self._shape:
            raise ValueError(
                f"frame recording: frame shape {frame.shape} differs from the first {self._shape}"
            )
        frame = np.ascontiguousarray(frame)
        plain = _plain(metadata)
        self._stream.append(frame, frame_metadata=plain)
        record = {
            "kind": "frame",
            "wall_time": time.time(),
            "adler32": checksum(frame),
            "metadata": {**plain, "storage_index": [self.appended]},
        }
        self.appended += 1
        self._in_flight.append((_take_chunk_writes(self._stream), record))
        self._list_committed(keep=MAX_WRITES_IN_FLIGHT)

    def flush(self) -> None:
        """Wait for every frame in flight and list it (a writer with nothing queued
        calls this, so a quiet run's sidecar is never behind its pixels)."""
        self._list_committed(keep=0)

    def _list_committed(self, keep: int) -> None:
        """Sidecar lines for the oldest frames whose chunks are committed, in frame
        order; waits (oldest first) while more than `keep` frames are in flight."""
        while self._in_flight:
            writes, record = self._in_flight[0]
            if len(self._in_flight) <= keep and not all(w.done() for w in writes):
                return
            self._in_flight.popleft()
            try:
                for write in writes:
                    write.result()
            except Exception as exc:  # tensorstore raises its own errors (disk full, ...)
                self.failed, self.error = self.failed + 1, f"frame recording: {exc}"
                continue
            append_line(self._sidecar, record, self._lock)
            self.count += 1

    def _open(self, frame: np.ndarray, frame_pixel_um: float | None) -> None:
        import ome_writers as ow

        height, width = frame.shape
        pixel = self.pixel_size_um if self.pixel_size_um is not None else frame_pixel_um
        space: dict[str, Any] = (
            {} if pixel is None else {"scale": float(pixel), "unit": "micrometer"}
        )
        self.pixel_size_um = None if pixel is None else float(pixel)
        settings = ow.AcquisitionSettings(
            root_path=str(self.path),
            dimensions=[
                ow.Dimension(name="t", count=None, type="time", chunk_size=1),
                ow.Dimension(name="y", count=height, type="space", **space),
                ow.Dimension(name="x", count=width, type="space", **space),
            ],
            dtype=str(frame.dtype),
            format="ome-zarr",
            overwrite=True,
        )
        self._stream = ow.create_stream(settings)
        self._shape = frame.shape

    def close(self) -> None:
        """Wait for every chunk, list them, then let ome-writers write `zarr.json`."""
        if self._sidecar is not None:
            self.flush()
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        with self._lock:
            fd, self._sidecar = self._sidecar, None
        if fd is not None:
            append_line(fd, {"kind": "closed", "wall_time": time.time(), "frames": self.count})
            os.close(fd)

    def __enter__(self) -> FrameRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _take_chunk_writes(stream: Any) -> list[Any]:
    """The tensorstore write futures of the frame just appended.

    ome-writers (0.3) has no public way to wait for one frame's chunk: its tensorstore
    backend keeps every write's future in `_futures` and waits for them all only at
    close. Taking them here is what lets the sidecar follow the pixels (and keeps that
    list from growing by one future per frame for the whole run). A backend without
    the list is refused, so an ome-writers that moved it fails loudly, not silently.
    """
    futures = getattr(getattr(stream, "_backend", None), "_futures", None)
    if not isinstance(futures, list):
        raise RuntimeError(
            "frame recording: this ome-writers version does not expose its tensorstore "
            "chunk writes (backend._futures); the crash-safe sidecar needs them"
        )
    taken = list(futures)
    futures.clear()
    return taken


def _plain(metadata: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (numpy scalars and arrays become numbers and lists)."""
    return json.loads(json.dumps(metadata, default=json_default))


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON data: {type(value).__name__}")


__all__ = [
    "FRAMES_NAME",
    "MAX_WRITES_IN_FLIGHT",
    "FrameRecorder",
    "Recording",
    "read_recording",
    "recording_exists",
    "sidecar_path",
]
