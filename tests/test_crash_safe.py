"""Crash-safe records: a run killed with SIGKILL reads back through report and replay,
flagged as cut short, with every record written before the kill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.cli import app
from agent.records.frame_recording import (
    FRAMES_NAME,
    MAX_WRITES_IN_FLIGHT,
    FrameRecorder,
    read_recording,
    sidecar_path,
)
from agent.records.frame_writer import BackgroundFrameWriter
from agent.records.recorder import EventLog, read_log
from agent.records.replay import replay_run
from agent.records.report import load_run, write_report

ROOT = Path(__file__).resolve().parents[1]
SMART = ROOT / "configs" / "twin-smart-acquisition.yaml"
TRAP = ROOT / "configs" / "twin-feedback-trap.yaml"


def _frame_lines(path: Path) -> int:
    """Frames the sidecar claims (whole lines only: a torn last line claims nothing)."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return sum(1 for line in lines if '"kind":"frame"' in line and line.endswith("}"))


def test_event_log_keeps_every_record_written_before_a_sigkill(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from agent.records.recorder import EventLog
        events = EventLog(Path({str(log)!r}))
        for i in range(37):
            events.write("step", seq=i)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    contents = read_log(log)
    assert [e["seq"] for e in contents.events] == list(range(37))
    assert not contents.closed
    with log.open("a") as fh:
        fh.write('{"kind":"step","se')  # a record torn by the kill is skipped
    assert len(read_log(log).events) == 37
    with EventLog(tmp_path / "clean.jsonl") as events:
        events.write("step", seq=0)
    assert read_log(tmp_path / "clean.jsonl").closed


@pytest.mark.filterwarnings("ignore:OMEStream was not closed")  # never closed, on purpose
def test_a_frame_whose_pixels_never_reached_the_disk_is_not_passed_off(tmp_path: Path) -> None:
    path = tmp_path / FRAMES_NAME
    recorder = FrameRecorder(path)
    rng = np.random.default_rng(0)
    for i in range(5):
        recorder.append(rng.integers(1, 1000, (16, 16), dtype=np.uint16), {"i": i})
    recorder.flush()  # every chunk written and listed; not closed: as after a kill
    chunks = [path / "0" / "c" / str(i) / "0" / "0" for i in range(5)]
    assert all(c.is_file() for c in chunks) and _frame_lines(sidecar_path(path)) == 5
    chunks[3].unlink()  # then frame 3's pixels go missing (the disk, not the recorder)
    recording = read_recording(path)
    assert not recording.complete
    assert len(recording) == 3 and recording.frames_lost == 2
    assert [recording.frame_metadata(i)["i"] for i in range(3)] == [0, 1, 2]
    assert "cut short" in recording.describe()
    with sidecar_path(path).open("a") as fh:
        fh.write('{"kind":"frame","wall')
    assert len(read_recording(path)) == 3


def test_a_sigkill_mid_recording_leaves_no_frame_claimed_without_its_pixels(
    tmp_path: Path,
) -> None:
    """The chunk writes are asynchronous: a kill right after `append` finds some in flight.
    None of those may be in the sidecar, and no more than MAX_WRITES_IN_FLIGHT wait."""
    path = tmp_path / FRAMES_NAME
    appended = 40
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        import numpy as np
        from agent.records.frame_recording import FrameRecorder
        recorder = FrameRecorder(Path({str(path)!r}))
        rng = np.random.default_rng(0)
        for i in range({appended}):
            recorder.append(rng.integers(0, 4000, (256, 256), dtype=np.uint16), {{"i": i}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    claimed = _frame_lines(sidecar_path(path))
    recording = read_recording(path)
    assert not recording.complete and recording.frames_lost == 0
    assert len(recording) == claimed >= appended - MAX_WRITES_IN_FLIGHT
    assert [recording.frame_metadata(i)["i"] for i in range(claimed)] == list(range(claimed))


def test_killed_recording_run_reads_back_cut_short(tmp_path: Path) -> None:
    """SIGKILL a smart acquisition mid-screen, then report and replay what it left."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", str(SMART), "--set", f"runs_dir={runs}"]
        + [f"--set={item}" for item in ("grid.nx=20", "grid.ny=20", "revisit.timepoints=20")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # one process group: the run and the driver it started
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            sidecars = list(runs.glob(f"*/{sidecar_path(Path(FRAMES_NAME)).name}"))
            if sidecars and _frame_lines(sidecars[0]) >= 20:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)  # the agent alone, at a random moment
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its driver, left running by the kill
    (run_dir,) = runs.iterdir()
    written = _frame_lines(run_dir / sidecar_path(Path(FRAMES_NAME)).name)
    assert not (run_dir / "summary.json").exists()

    run = load_run(run_dir)
    note = run.end_note()
    assert note is not None and note.startswith("cut short")
    assert "no summary.json" in note and "events-smart.jsonl never closed" in note
    frames_logged = [e for e in run.events["smart"] if e["kind"] == "frame"]
    assert len(frames_logged) >= written  # the log line goes first, then the frame
    recording = read_recording(run_dir / FRAMES_NAME)
    # the sidecar names only frames whose pixels are on disk, whatever the kill's moment
    assert not recording.complete and len(recording) == written >= 20
    assert recording.frames_lost == 0
    assert recording.frame_metadata(len(recording) - 1)["reason"] == "screen"

    page = write_report(run_dir).read_text()
    assert "Cut short: no summary.json" in page
    result = replay_run(run_dir)  # a frames replay: detections re-run on what was kept
    assert result["frames"] == len(recording) and result["frames_changed"] == 0
    assert "cut short" in result["cut_short"] and "cut short" in result["message"]
    cli = CliRunner().invoke(app, ["report", str(run_dir)])
    assert cli.exit_code == 0 and "run cut short: no summary.json" in cli.output
    saved = json.loads((run_dir / "replay-frames-recorded.json").read_text())
    assert saved["recording_complete"] is False


def test_killed_feedback_run_replays_its_steps_cut_short(tmp_path: Path) -> None:
    """SIGKILL a feedback-trap run (agent and its driver), then replay its event log."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            str(ROOT / "configs" / "twin-feedback-trap.yaml"),
        ]
        + [f"--set={item}" for item in (f"runs_dir={runs}", "duration_s=600")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # one process group: the run and the driver it started
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(runs.glob("*/events-feedback.jsonl"))
            if logs and logs[0].read_text().count('"kind":"step"') >= 20:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    (run_dir,) = runs.iterdir()
    note = load_run(run_dir).end_note()
    assert note is not None and "events-feedback.jsonl never closed" in note
    result = replay_run(run_dir)
    assert result["steps"] >= 20 and result["steps_differing"] == 0
    assert result["cut_short"] == note
    cli = CliRunner().invoke(app, ["replay", str(run_dir)])
    assert cli.exit_code == 0 and "(run cut short: no summary.json" in cli.output


def test_a_run_killed_before_its_first_frame_still_replays(tmp_path: Path) -> None:
    FrameRecorder(tmp_path / FRAMES_NAME)  # opened, never written to, never closed
    recording = read_recording(tmp_path / FRAMES_NAME)
    assert len(recording) == 0 and not recording.complete
    (tmp_path / "events-smart.jsonl").write_text('{"kind":"frame","wall_time":1.0}\n')
    result = replay_run(tmp_path)
    assert result["frames"] == 0 and "cut short" in result["message"]
    assert "no summary.json" in (load_run(tmp_path).end_note() or "")


def test_background_writer_counts_what_it_cannot_keep_instead_of_waiting(
    tmp_path: Path,
) -> None:
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    writer = BackgroundFrameWriter(tmp_path / FRAMES_NAME, max_queued_bytes=10 * frame.nbytes)
    for seq in range(3):
        assert writer.offer(frame + seq, {"seq": seq, "pixel_size_um": 0.2})
    assert writer.offer(np.zeros((8, 8), np.uint16), {"seq": 3})  # queued; refused on write
    writer.close()
    stats = writer.stats()
    assert stats["frames_recorded"] == 3 and stats["frames_not_recorded"] == 1
    assert "differs from the first" in stats["frames_record_error"]
    recording = read_recording(tmp_path / FRAMES_NAME)
    assert recording.complete and [recording.frame_metadata(i)["seq"] for i in range(3)] == [
        0,
        1,
        2,
    ]
    assert recording.pixel_size_um == pytest.approx(0.2)
    assert np.array_equal(recording.frame(2), frame + 2)

    small = BackgroundFrameWriter(tmp_path / "small.ome.zarr", max_queued_bytes=frame.nbytes - 1)
    assert not small.offer(frame, {"seq": 0})  # not even one frame fits: counted, not waited
    small.close()
    assert small.stats()["frames_dropped_behind"] == 1
    assert small.stats()["frames_recorded"] == 0
