"""Record received frames to OME-Zarr through ome-writers, and read them back.

Frames arrive in decision order, not on a fixed grid, so the store is one unbounded
acquisition axis ("t": frame number) of (y, x) images. Everything that says why a
frame exists (event id and index, the reason and the decision that asked for it,
stage position, exposure, dose) goes in ome-writers' per-frame metadata, stored in
the group's `zarr.json` under `attributes.ome_writers.frame_metadata`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FRAMES_NAME = "frames.ome.zarr"


class FrameRecorder:
    """Appends frames of one shape/dtype; the first frame fixes both."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stream: Any = None
        self._shape: tuple[int, ...] = ()
        self.count = 0

    def append(self, frame: np.ndarray, metadata: dict[str, Any]) -> None:
        if self._stream is None:
            self._open(frame)
        if frame.shape != self._shape:
            raise ValueError(
                f"frame recording: frame shape {frame.shape} differs from the first {self._shape}"
            )
        self._stream.append(np.ascontiguousarray(frame), frame_metadata=_plain(metadata))
        self.count += 1

    def _open(self, frame: np.ndarray) -> None:
        import ome_writers as ow

        height, width = frame.shape
        settings = ow.AcquisitionSettings(
            root_path=str(self.path),
            dimensions=[
                ow.Dimension(name="t", count=None, type="time", chunk_size=1),
                ow.Dimension(name="y", count=height, type="space"),
                ow.Dimension(name="x", count=width, type="space"),
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

    def __enter__(self) -> FrameRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _plain(metadata: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (numpy scalars and arrays become numbers and lists)."""
    return json.loads(json.dumps(metadata, default=_default))


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON data: {type(value).__name__}")


class Recording:
    """A recorded OME-Zarr: frames read lazily by index, metadata per frame."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        group = self.path / "zarr.json"
        if not group.is_file():
            raise ValueError(f"{self.path}: not an OME-Zarr recording (no zarr.json)")
        attributes = json.loads(group.read_text()).get("attributes", {})
        self.metadata: list[dict[str, Any]] = list(
            attributes.get("ome_writers", {}).get("frame_metadata", [])
        )
        self._by_index = {tuple(meta.get("storage_index", ())): meta for meta in self.metadata}
        import tensorstore as ts

        self._array = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / "0")}}
        ).result()

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def frame(self, index: int) -> np.ndarray:
        return np.asarray(self._array[index].read().result())

    def frame_metadata(self, index: int) -> dict[str, Any]:
        """Metadata of frame `index` (matched by its storage index, not list order)."""
        return self._by_index.get((index,), {})


def read_recording(path: Path) -> Recording:
    return Recording(path)
