"""Frames recorded to OME-Zarr through ome-writers read back with their metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.records.frame_recording import FrameRecorder, read_recording


def test_frames_and_per_frame_decisions_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 4000, size=(48, 64), dtype=np.uint16) for _ in range(5)]
    path = tmp_path / "frames.ome.zarr"
    with FrameRecorder(path) as recorder:
        for i, frame in enumerate(frames):
            recorder.append(
                frame,
                {
                    "event_id": i,
                    "event_index": {"p": i % 2, "t": i // 2},
                    "reason": "revisit" if i else "screen",
                    "decision": f"frame {i} because of {np.int64(i)} objects",
                    "stage_um": np.array([1.5 * i, -2.0]),
                },
            )
        assert recorder.appended == 5 and recorder.count <= 5  # listed once written
    assert recorder.count == 5  # the close waited for every chunk
    # a real OME-Zarr (v0.5 multiscales), not a private format
    group = json.loads((path / "zarr.json").read_text())
    assert group["attributes"]["ome"]["multiscales"][0]["axes"][0]["name"] == "t"
    recording = read_recording(path)
    assert len(recording) == 5
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(recording.frame(i), frame)
        meta = recording.frame_metadata(i)
        assert meta["event_id"] == i and meta["event_index"] == {"p": i % 2, "t": i // 2}
        assert meta["stage_um"] == [1.5 * i, -2.0]
        assert meta["decision"] == f"frame {i} because of {i} objects"
    assert recording.frame_metadata(0)["reason"] == "screen"


def test_recording_refuses_a_frame_of_another_shape(tmp_path: Path) -> None:
    with FrameRecorder(tmp_path / "f.ome.zarr") as recorder:
        recorder.append(np.zeros((8, 8), np.uint16), {})
        with pytest.raises(ValueError, match="frame shape"):
            recorder.append(np.zeros((8, 9), np.uint16), {})


def test_reading_something_that_is_not_a_recording_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an OME-Zarr recording"):
        read_recording(tmp_path)
