"""Run particle detection over recorded image files (TIFF stacks, PNG, JPEG) into a CSV.

Offline re-analysis must behave like the live loop and survive bad inputs in long
batches, so every file problem becomes one ``ImageReadError`` naming the file, paths
are checked before any work starts, TIFFs are read page by page (stacks larger than
memory are fine), and the CSV is flushed after every frame so an interrupted run keeps
everything done so far.

Frame indices run on across files in the order given. Coordinates are pixels with
``x`` = column, ``y`` = row, as from :mod:`agent.detection.detect`.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["ImageReadError", "detect_files", "iter_frames"]

_TIFF = frozenset({".tif", ".tiff"})
_PILLOW = frozenset({".png", ".jpg", ".jpeg"})
# Pillow modes that are already single-channel numbers; everything else goes through "L".
_GRAY_MODES = frozenset({"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's own RGB -> L weights.
CSV_HEADER = ("frame", "file", "x", "y", "score", "confidence")

# (N, 2) positions, (N,) scores and optionally (N,) confidences in [0, 1].
Detector = Callable[[np.ndarray], tuple[np.ndarray, ...]]


class ImageReadError(ValueError):
    """A file could not be turned into frames; the message is one line naming the file."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: {' '.join(why.split())}")


def _as_paths(paths: Sequence[Path] | Path | str) -> list[Path]:
    """Accept a lone path too: iterating a str would silently yield its characters."""
    if isinstance(paths, str | Path):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _check_paths(paths: list[Path]) -> None:
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
    files = _as_paths(paths)
    _check_paths(files)
    index = 0
    for path in files:
        reader = _tiff_frames if path.suffix.lower() in _TIFF else _pillow_frames
        for frame in reader(path):
            yield index, path, frame
            index += 1


def detect_files(
    paths: Sequence[Path],
    detector: Detector,
    out_csv: Path,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Detect in every frame of paths and write ``frame,file,x,y,score,confidence`` rows.

    detector maps a frame to ((N, 2) x/y positions in pixels, (N,) scores), e.g.
    ``ParticleDetector().detect_with_scores``. Rows are flushed after each frame, so an
    interrupted run keeps all finished frames. progress, if given, is called with the
    number of frames done. Returns the number of detections written.
    """
    files = _as_paths(paths)
    _check_paths(files)  # before touching out_csv, so a typo leaves no empty output
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    with out_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_HEADER)
        fh.flush()
        for index, path, frame in iter_frames(files):
            found = detector(frame)
            xy, score = np.asarray(found[0], dtype=np.float64), np.asarray(found[1], np.float64)
            conf = np.asarray(found[2] if len(found) > 2 else np.full(len(score), np.nan))
            if xy.ndim != 2 or xy.shape[1] != 2 or score.shape != (xy.shape[0],):
                raise ValueError(
                    f"detector must return (N, 2) positions and (N,) scores, "
                    f"got {xy.shape} and {score.shape}"
                )
            name = str(path)
            writer.writerows(
                (index, name, f"{x:.4f}", f"{y:.4f}", f"{s:.6g}", f"{c:.3f}")
                for (x, y), s, c in zip(xy.tolist(), score.tolist(), conf.tolist(), strict=True)
            )
            fh.flush()
            total += xy.shape[0]
            if progress is not None:
                progress(index + 1)
    return total
