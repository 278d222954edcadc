"""Tests for agent.detection.offline on synthetic TIFF/PNG/JPEG recordings with known spots."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from agent.detection.detect import ParticleDetector
from agent.detection.offline import ImageReadError, detect_files, iter_frames
from drivers.recorded_frames import _planes

SHAPE = (64, 80)


def _spot_frame(
    rng: np.random.Generator, xy: list[tuple[float, float]], peak: float, offset: float
) -> np.ndarray:
    """Gaussian spots (sigma 1.5 px) on a flat offset with mild Gaussian noise, as float."""
    rows, cols = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float64)
    img = np.full(SHAPE, offset)
    for x, y in xy:
        img += peak * np.exp(-((cols - x) ** 2 + (rows - y) ** 2) / (2 * 1.5**2))
    return img + rng.normal(0.0, 1.0, SHAPE)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_detect_files_across_tiff_stack_and_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = [[(20.3, 30.6)], [(50.7, 15.2), (12.4, 44.9)], [(60.1, 50.5)], [(33.3, 22.8)]]
    stack = np.stack([_spot_frame(rng, t, 2000.0, 200.0) for t in truth[:3]])
    tif = tmp_path / "stack.tif"
    tifffile.imwrite(tif, np.round(stack).astype(np.uint16), photometric="minisblack")
    png = tmp_path / "single.png"
    Image.fromarray(
        np.clip(np.round(_spot_frame(rng, truth[3], 180.0, 30.0)), 0, 255).astype(np.uint8)
    ).save(png)
    out = tmp_path / "deep" / "nested" / "dets.csv"
    seen: list[int] = []

    n = detect_files([tif, png], ParticleDetector().detect_with_scores, out, seen.append)

    header, rows = _read_rows(out)
    assert header == ["frame", "file", "x", "y", "score", "confidence"]
    assert n == len(rows) == 5
    assert seen == [1, 2, 3, 4]
    for frame, spots in enumerate(truth):
        got = [r for r in rows if int(r[0]) == frame]
        assert len(got) == len(spots)
        assert {r[1] for r in got} == {str(tif if frame < 3 else png)}
        found = np.array([[float(r[2]), float(r[3])] for r in got])
        for x, y in spots:
            assert np.min(np.hypot(found[:, 0] - x, found[:, 1] - y)) < 0.2
        assert all(float(r[4]) > 10.0 for r in got)  # SNR-like score of a bright spot


def test_detect_with_scores_matches_call() -> None:
    rng = np.random.default_rng(1)
    frame = _spot_frame(rng, [(20.0, 20.0), (50.0, 40.0)], 500.0, 100.0)
    det = ParticleDetector()
    xy, score = det.detect_with_scores(frame)
    np.testing.assert_array_equal(xy, det(frame))
    assert score.shape == (2,)
    assert np.all(score > 0)
    assert score[0] >= score[1]  # brightest first
    # A brighter copy of the same scene scores higher; the ranking follows brightness.
    _, score2 = det.detect_with_scores(_spot_frame(rng, [(20.0, 20.0)], 2000.0, 100.0))
    assert score2[0] > score.max()


def test_iter_frames_tiff_layouts(tmp_path: Path) -> None:
    planes = np.arange(4 * 8 * 9, dtype=np.uint16).reshape(4, 8, 9)
    paged = tmp_path / "paged.tiff"
    tifffile.imwrite(paged, planes, photometric="minisblack")  # 4 pages
    three = tmp_path / "three.tif"
    # One page holding (3, H, W) separate planes: each plane is a frame.
    tifffile.imwrite(three, planes[:3], photometric="minisblack", planarconfig="separate")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 9, 3), dtype=np.uint8), photometric="rgb")
    with tifffile.TiffFile(paged) as a, tifffile.TiffFile(three) as b:
        assert (len(a.pages), len(b.pages)) == (4, 1)  # the layouts really differ
    got = list(iter_frames([paged, three, rgb]))
    assert [i for i, _, _ in got] == list(range(8))
    assert [p.name for _, p, _ in got] == ["paged.tiff"] * 4 + ["three.tif"] * 3 + ["rgb.tif"]
    for i in range(4):
        np.testing.assert_array_equal(got[i][2], planes[i])
    for i in range(3):
        np.testing.assert_array_equal(got[4 + i][2], planes[i])
    assert got[7][2].shape == (8, 9)  # colour converted to one grayscale frame


def test_iter_frames_png_and_jpeg_become_2d_gray(tmp_path: Path) -> None:
    deep = tmp_path / "deep16.png"
    Image.fromarray(np.full((6, 7), 40000, dtype=np.uint16)).save(deep)
    colour = tmp_path / "colour.jpg"
    Image.fromarray(np.full((6, 7, 3), 128, dtype=np.uint8)).save(colour)
    frames = [f for _, _, f in iter_frames([deep, colour])]
    assert frames[0].dtype == np.uint16  # 16-bit data is not cut to 8 bits
    assert int(frames[0].max()) == 40000
    assert frames[1].shape == (6, 7)
    assert frames[1].ndim == 2


def test_empty_frame_gives_header_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.round(_spot_frame(rng, [], 0.0, 100.0)).astype(np.uint16))
    out = tmp_path / "blank.csv"
    assert detect_files([path], ParticleDetector().detect_with_scores, out) == 0
    header, rows = _read_rows(out)
    assert header == ["frame", "file", "x", "y", "score", "confidence"]
    assert rows == []


def test_unreadable_tiff(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.tif"
    bad.write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(ImageReadError, match=re.escape(str(bad))) as err:
        list(iter_frames([bad]))
    assert str(bad) in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_png(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"\x89PNG junk" * 10)
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        list(iter_frames([bad]))


def test_missing_file_fails_before_output(tmp_path: Path) -> None:
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((8, 8), dtype=np.uint16))
    missing = tmp_path / "nope.tif"
    out = tmp_path / "out.csv"
    with pytest.raises(ImageReadError, match="no such file") as err:
        detect_files([good, missing], ParticleDetector().detect_with_scores, out)
    assert str(missing) in str(err.value)
    assert not out.exists()


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "frame.bmp"
    path.write_bytes(b"BM")
    with pytest.raises(ImageReadError, match="unsupported extension") as err:
        list(iter_frames([path]))
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "data", [np.zeros(9), np.zeros((2, 3, 4, 5)), np.zeros((0, 4)), np.zeros((4, 4), complex)]
)
def test_non_image_data_rejected(data: np.ndarray) -> None:
    path = Path("odd.tif")
    with pytest.raises(ImageReadError, match=r"odd\.tif"):
        _planes(path, data)


def test_volumetric_rgb_tiff_gives_2d_frames(tmp_path: Path) -> None:
    path = tmp_path / "vol.tif"
    tifffile.imwrite(
        path,
        np.zeros((2, 16, 16, 3), dtype=np.uint8),
        photometric="rgb",
        volumetric=True,
        tile=(16, 16),
    )
    frames = [f for _, _, f in iter_frames([path])]
    assert len(frames) == 2
    assert all(f.shape == (16, 16) for f in frames)


def test_interrupted_run_keeps_finished_frames(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    good = tmp_path / "a.tif"
    tifffile.imwrite(
        good, np.round(_spot_frame(rng, [(30.0, 30.0)], 1000.0, 100.0)).astype(np.uint16)
    )
    bad = tmp_path / "b.tif"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "out.csv"
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        detect_files([good, bad], ParticleDetector().detect_with_scores, out)
    _, rows = _read_rows(out)
    assert len(rows) == 1
    assert rows[0][0] == "0"
