"""The run's one frame writer, owned by the engine: a plan that must never wait has its
frames dropped and counted when the writer falls behind; a lossless plan waits instead."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from agent.engine.run import RunEngine
from agent.records.frame_recording import FRAMES_NAME, read_recording
from agent.records.frame_writer import BackgroundFrameWriter
from agent.records.recorder import read_events


class PlanConfig(BaseModel):
    name: str = "plan"
    runs_dir: str


def test_lossless_writer_waits_for_room_instead_of_dropping(tmp_path: Path) -> None:
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    # room for one frame (less than one, even): a dropping writer would refuse all
    writer = BackgroundFrameWriter(tmp_path / FRAMES_NAME, frame.nbytes - 1, lossless=True)
    assert all(writer.offer(frame + i, {"seq": i, "pixel_size_um": 0.1}) for i in range(40))
    writer.close()
    stats = writer.stats()
    assert stats["frames_recorded"] == 40 and stats["frames_not_recorded"] == 0
    assert stats["frames_dropped_behind"] == 0 and stats["frames_lossless"] is True
    recording = read_recording(tmp_path / FRAMES_NAME)
    assert recording.complete and len(recording) == 40
    assert [recording.frame_metadata(i)["seq"] for i in range(40)] == list(range(40))
    assert np.array_equal(recording.frame(39), frame + 39)


def test_lossless_writer_that_died_is_named_not_waited_on_forever(tmp_path: Path) -> None:
    frame = np.zeros((64, 64), np.uint16)
    # the writer cannot open its sidecar there: it exits at once
    writer = BackgroundFrameWriter(tmp_path / "no-such-dir" / FRAMES_NAME, 1, lossless=True)
    deadline = time.monotonic() + 60
    accepted = 0
    while writer.offer(frame, {}) and time.monotonic() < deadline:
        accepted += 1  # the socket's own queue takes a few before it is full
    assert accepted < 10
    writer.close()
    stats = writer.stats()
    assert stats["frames_recorded"] == 0 and stats["frames_not_recorded"] == accepted + 1
    assert "frame writer exited with code" in stats["frames_record_error"]


def test_the_engine_owns_one_recording_per_run_and_reports_it(tmp_path: Path) -> None:
    frame = np.ones((32, 32), np.uint16)
    with RunEngine(PlanConfig(runs_dir=str(tmp_path)), "events-plan.jsonl") as run:
        frames = run.frame_writer(8.0, lossless=True)
        assert run.frame_writer(8.0, lossless=True) is frames  # every phase shares it
        with pytest.raises(ValueError, match="lossless=True"):
            run.frame_writer(8.0)  # one recording per run, one mode
        for seq in range(5):
            frames.offer(frame * seq, {"seq": seq, "pixel_size_um": 0.25})
    summary = run.finish({}, report=False)
    assert summary["frames_recorded"] == 5 and summary["frames_not_recorded"] == 0
    assert summary["frames_pixel_size_um"] == pytest.approx(0.25)
    logged = [e for e in read_events(run.run_dir / "events-plan.jsonl") if e["kind"] == "frames"]
    assert logged and logged[0]["frames_recorded"] == 5
    assert read_recording(run.run_dir / FRAMES_NAME).complete
