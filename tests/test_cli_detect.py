"""`scopeloop detect` on recorded files: CSV out, clear one-line errors for bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

TRUTH = [(20.3, 30.7), (60.8, 15.2), (45.5, 50.1)]


def _stack(path: Path, frames: int = 3) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80]
    planes = []
    for _ in range(frames):
        mean = np.full((64, 80), 10.0)
        for x, y in TRUTH:
            mean += 600.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
        planes.append((rng.poisson(mean) + 100).astype(np.uint16))
    tifffile.imwrite(path, np.stack(planes), photometric="minisblack")


def _scopeloop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_detect_writes_one_row_per_particle_and_frame(tmp_path: Path) -> None:
    stack, out = tmp_path / "stack.tif", tmp_path / "out" / "found.csv"
    _stack(stack)
    proc = _scopeloop("detect", str(stack), "--out", str(out), "--diameter", "9")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert {int(r["frame"]) for r in rows} == {0, 1, 2}
    assert len(rows) == 9
    for row in rows:
        x, y = float(row["x"]), float(row["y"])
        assert min(np.hypot(x - tx, y - ty) for tx, ty in TRUTH) < 0.2
        assert float(row["score"]) > 5


def test_detect_refuses_bad_files_and_options(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a tiff")
    proc = _scopeloop("detect", str(broken), "--out", str(tmp_path / "x.csv"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "broken.tif" in proc.stderr
    proc = _scopeloop("detect", str(broken), "--out", "x.csv", "--detector", "ouija")
    assert proc.returncode == 2 and "--detector" in proc.stderr and "ouija" in proc.stderr
    proc = _scopeloop("detect", str(broken), "--out", "x.csv", "--diameter", "0")
    assert proc.returncode == 2 and "--diameter" in proc.stderr


def test_deep_detector_learns_from_the_files_themselves(tmp_path: Path) -> None:
    stack, out = tmp_path / "stack.tif", tmp_path / "deep.csv"
    _stack(stack, frames=8)
    proc = _scopeloop("detect", str(stack), "--out", str(out), "--detector", "lodestar")
    assert proc.returncode == 0, proc.stderr
    assert "converged: True" in proc.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 8 * len(TRUTH)
    for row in rows:
        x, y = float(row["x"]), float(row["y"])
        assert min(np.hypot(x - tx, y - ty) for tx, ty in TRUTH) < 0.2
