"""Recorded frames read back from disk: a run's OME-Zarr recording and a microscope's
image files (TIFF stacks, PNG, JPEG).

Both the playback driver (a recorded run served through the driver protocol, so every
plan runs unchanged on it) and the agent's replay, report and offline detection read
frames here, so a file is understood the same way everywhere.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

FRAMES_NAME = "frames.ome.zarr"
SIDECAR_SUFFIX = ".metadata.jsonl"
_TIFF = frozenset({".tif", ".tiff"})
_PILLOW = frozenset({".png", ".jpg", ".jpeg"})
IMAGE_SUFFIXES = _TIFF | _PILLOW
# Pillow modes that are already single-channel numbers; everything else goes through "L".
_GRAY_MODES = frozenset({"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's own RGB -> L weights.


class ImageReadError(ValueError):
    """A file could not be turned into frames; the message is one line naming the file."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: {' '.join(why.split())}")


def list_paths(paths: Sequence[Path] | Path | str) -> list[Path]:
    """Accept a lone path too: iterating a str would silently yield its characters."""
    if isinstance(paths, str | Path):
        return [Path(paths)]
    return [Path(p) for p in paths]


def check_image_paths(paths: list[Path]) -> None:
    """Fail before any work on a typo or wrong file type anywhere in a long batch."""
    for path in paths:
        if path.suffix.lower() not in _TIFF | _PILLOW:
            raise ImageReadError(
                path, f"unsupported extension {path.suffix!r} (use .tif, .tiff, .png, .jpg)"
            )
        if not path.is_file():
            raise ImageReadError(path, "no such file" if not path.exists() else "not a file")


def _planes(path: Path, data: np.ndarray) -> list[np.ndarray]:
    """Split 2-D or 3-D image data into 2-D frames (planes along the first axis)."""
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)  # bilevel images are valid; the detector wants numbers
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ImageReadError(path, f"unsupported pixel type {data.dtype}")
    if data.size == 0 or data.ndim not in (2, 3):
        raise ImageReadError(path, f"expected 2-D or 3-D image data, got shape {data.shape}")
    return [data] if data.ndim == 2 else list(data)


def _to_gray(samples: np.ndarray) -> np.ndarray:
    """Collapse trailing colour samples (RGB, RGBA, gray+alpha) to one grayscale value."""
    if samples.shape[-1] >= 3:
        return (samples[..., :3] @ _LUMA).astype(np.float32)
    return samples[..., 0]


def _tiff_frames(path: Path) -> Iterator[np.ndarray]:
    """Page by page, so only one page of a large stack is in memory at a time."""
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # any decoder failure is a bad file, not a bug here
        raise ImageReadError(path, f"cannot read TIFF: {exc}") from exc
    with tif:
        try:
            n_pages = len(tif.pages)
        except Exception as exc:
            raise ImageReadError(path, f"cannot read TIFF pages: {exc}") from exc
        for i in range(n_pages):
            try:
                page = tif.pages[i]
                data = page.asarray()
                # Interleaved samples are colour channels of one frame; separate planes
                # (also what tifffile writes for a plain (3, H, W) stack) are frames.
                key = page.keyframe
                if key.planarconfig == tifffile.PLANARCONFIG.CONTIG and key.samplesperpixel > 1:
                    data = _to_gray(data)
            except Exception as exc:
                raise ImageReadError(path, f"cannot read TIFF page {i}: {exc}") from exc
            yield from _planes(path, data)


def _pillow_frames(path: Path) -> Iterator[np.ndarray]:
    """Every frame of the file (one, except animated PNG), converted to 2-D grayscale."""
    try:
        img = Image.open(path)
    except Exception as exc:
        raise ImageReadError(path, f"cannot read image: {exc}") from exc
    with img:
        for i in range(getattr(img, "n_frames", 1)):
            try:
                img.seek(i)
                # Keep 16-bit and float data as they are; "L" would cut them to 8 bits.
                frame = img if img.mode in _GRAY_MODES else img.convert("L")
                data = np.asarray(frame)
            except Exception as exc:
                raise ImageReadError(path, f"cannot read image frame {i}: {exc}") from exc
            yield from _planes(path, data)


def iter_frames(paths: Sequence[Path]) -> Iterator[tuple[int, Path, np.ndarray]]:
    """Yield (frame index across all files, file, 2-D frame) in file order.

    TIFF pages and the planes of 3-D TIFF data are frames each; PNG/JPEG are converted
    to grayscale. Raises ImageReadError for missing, unreadable, unsupported or
    non-2-D/3-D files; missing files and bad extensions are found before any frame.
    """
    files = list_paths(paths)
    check_image_paths(files)
    index = 0
    for path in files:
        reader = _tiff_frames if path.suffix.lower() in _TIFF else _pillow_frames
        for frame in reader(path):
            yield index, path, frame
            index += 1


def sidecar_path(path: Path) -> Path:
    """`frames.ome.zarr` -> `frames.metadata.jsonl` in the same folder."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".ome.zarr") + SIDECAR_SUFFIX)


def recording_exists(path: Path) -> bool:
    """A recording was started here (even one killed before its first frame)."""
    return Path(path).is_dir() or sidecar_path(path).is_file()


def checksum(frame: np.ndarray) -> int:
    return zlib.adler32(np.ascontiguousarray(frame).data)


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
            if checksum(self.frame(index)) != record.get("adler32"):
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
