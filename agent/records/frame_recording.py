"""Record received frames to OME-Zarr through ome-writers, and read them back.

Frames arrive in decision order, not on a fixed grid, so the store is one unbounded
acquisition axis ("t": frame number) of (y, x) images. Everything that says why a
frame exists (event id and index, the reason and the decision that asked for it,
stage position, exposure, dose) goes in ome-writers' per-frame metadata, stored in
the group's `zarr.json` under `attributes.ome_writers.frame_metadata`.

ome-writers writes that metadata only when the stream closes, so a killed run would
keep frames nobody can explain. Each frame's metadata therefore also goes, as it is
recorded, to an append-only JSONL sidecar beside the store (`frames.metadata.jsonl`),
one `write()` per frame, with a checksum of the frame's pixels (chunk writes are
asynchronous: a frame whose pixels never reached the disk must not be passed off as
data). Appending a line costs the same at frame 10 and frame 10^6, unlike rewriting
`zarr.json`, and never touches a file ome-writers owns. The reader takes the
metadata from `zarr.json` after a clean close and from the sidecar otherwise,
keeping the frames whose pixels match their checksum.

The x/y axes carry the pixel size in micrometres (OME-NGFF `scale` + `unit`), taken
from the recorder's argument or the first frame's `pixel_size_um`.

A loop that must not wait records through `agent.records.frame_writer` (a writer
process fed over a socket) instead of calling `FrameRecorder` itself.
"""

from __future__ import annotations

import json
import os
import threading
import time
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


class FrameRecorder:
    """Appends frames of one shape/dtype; the first frame fixes both."""

    def __init__(self, path: Path, pixel_size_um: float | None = None) -> None:
        import ome_writers  # noqa: F401  (seconds to import: now, not at the first frame)
        import tensorstore  # noqa: F401  (its backend)

        self.path = Path(path)
        self.pixel_size_um = pixel_size_um
        self._stream: Any = None
        self._shape: tuple[int, ...] = ()
        self.count = 0
        self._lock = threading.Lock()
        self._sidecar: int | None = os.open(
            sidecar_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644
        )
        append_line(self._sidecar, {"kind": "open", "wall_time": time.time()})

    def append(self, frame: np.ndarray, metadata: dict[str, Any]) -> None:
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
            "metadata": {**plain, "storage_index": [self.count]},
        }
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
    "FrameRecorder",
    "Recording",
    "read_recording",
    "recording_exists",
    "sidecar_path",
]
