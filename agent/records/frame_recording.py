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
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from agent.records.recorder import append_line

FRAMES_NAME = "frames.ome.zarr"
SIDECAR_SUFFIX = ".metadata.jsonl"


def sidecar_path(path: Path) -> Path:
    """`frames.ome.zarr` -> `frames.metadata.jsonl` in the same folder."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".ome.zarr") + SIDECAR_SUFFIX)


def recording_exists(path: Path) -> bool:
    """A recording was started here (even one killed before its first frame)."""
    return Path(path).is_dir() or sidecar_path(path).is_file()


def _checksum(frame: np.ndarray) -> int:
    return zlib.adler32(np.ascontiguousarray(frame).data)


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
            "adler32": _checksum(frame),
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


def _read_sidecar(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(frame records in order, closed cleanly); a torn last line is skipped."""
    frames: list[dict[str, Any]] = []
    closed = False
    if not path.is_file():
        return frames, False
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "frame":
                frames.append(record)
            closed = closed or record.get("kind") == "closed"
    return frames, closed


def _xy_scale(attributes: dict[str, Any]) -> tuple[float | None, str | None]:
    """The x pixel size and its unit from the OME-NGFF multiscales (None: not recorded)."""
    try:
        multiscale = attributes["ome"]["multiscales"][0]
        axes = [axis["name"] for axis in multiscale["axes"]]
        scale = next(
            t["scale"]
            for t in multiscale["datasets"][0]["coordinateTransformations"]
            if t["type"] == "scale"
        )
        unit = multiscale["axes"][axes.index("x")].get("unit")
        return (float(scale[axes.index("x")]) if unit else None), unit
    except (KeyError, IndexError, StopIteration, ValueError, TypeError):
        return None, None


class Recording:
    """A recorded OME-Zarr: frames read lazily by index, metadata per frame.

    `complete` is False for a recording that was cut short (never closed); it then
    holds the frames whose metadata and pixels both reached the disk, `frames_lost`
    counts frames whose metadata was written but whose pixels were not, and
    `last_wall_time` is when the last readable frame was recorded.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        sidecar = sidecar_path(self.path)
        group = self.path / "zarr.json"
        if not group.is_file() and not sidecar.is_file():
            raise ValueError(f"{self.path}: not an OME-Zarr recording (no zarr.json)")
        records, closed = _read_sidecar(sidecar)
        attributes = json.loads(group.read_text()).get("attributes", {}) if group.is_file() else {}
        closing_metadata = list(attributes.get("ome_writers", {}).get("frame_metadata", []))
        self.complete = closed or (bool(closing_metadata) and not sidecar.is_file())
        self._array: Any = self._open_array()
        stored = int(self._array.shape[0]) if self._array is not None else 0
        if self.complete:
            self.metadata = closing_metadata or [r["metadata"] for r in records]
            self._length = stored
            good = records
        else:
            good = self._verified_prefix(records, stored)
            self.metadata = [r["metadata"] for r in good]
            self._length = len(good)
        self.frames_lost = 0 if self.complete else len(records) - len(good)
        self.last_wall_time: float | None = good[-1]["wall_time"] if good else None
        self.pixel_size_um, self.unit = _xy_scale(attributes)
        self._by_index = {tuple(meta.get("storage_index", ())): meta for meta in self.metadata}

    def _open_array(self) -> Any:
        if not (self.path / "0" / "zarr.json").is_file():
            return None  # cut short before the first frame
        import tensorstore as ts

        return ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / "0")}}
        ).result()

    def _verified_prefix(self, records: list[dict[str, Any]], stored: int) -> list[dict[str, Any]]:
        """Frames from the first on whose pixels match the checksum written with them."""
        good: list[dict[str, Any]] = []
        for index, record in enumerate(records[:stored]):
            if _checksum(self.frame(index)) != record.get("adler32"):
                break
            good.append(record)
        return good

    def __len__(self) -> int:
        return self._length

    def frame(self, index: int) -> np.ndarray:
        return np.asarray(self._array[index].read().result())

    def frame_metadata(self, index: int) -> dict[str, Any]:
        """Metadata of frame `index` (matched by its storage index, not list order)."""
        return self._by_index.get((index,), {})

    def describe(self) -> str:
        """One line: how many frames, and whether the recording was cut short."""
        if self.complete:
            return f"{self.path.name}: {len(self)} frames, closed cleanly"
        lost = f", {self.frames_lost} more lost (pixels not on disk)" if self.frames_lost else ""
        return f"{self.path.name}: cut short (never closed), {len(self)} frames readable{lost}"


def read_recording(path: Path) -> Recording:
    return Recording(path)
