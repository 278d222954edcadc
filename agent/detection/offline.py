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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from drivers.recorded_frames import ImageReadError, check_image_paths, iter_frames, list_paths

__all__ = ["ImageReadError", "detect_files", "iter_frames"]

CSV_HEADER = ("frame", "file", "x", "y", "score", "confidence")

# (N, 2) positions, (N,) scores and optionally (N,) confidences in [0, 1].
Detector = Callable[[np.ndarray], tuple[np.ndarray, ...]]


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
    files = list_paths(paths)
    check_image_paths(files)  # before touching out_csv, so a typo leaves no empty output
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
