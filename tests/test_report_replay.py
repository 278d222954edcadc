"""Run reports and offline replay on one short real twin run (made once per module)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.plans.feedback_trap import run_experiment
from agent.records.frame_recording import FRAMES_NAME, read_recording
from agent.records.replay import replay_frames, replay_run
from agent.records.report import load_run, write_report

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "twin-feedback-trap.yaml"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    runs = tmp_path_factory.mktemp("runs")
    config = load_config(CONFIG, [f"runs_dir={runs}", "duration_s=3"])
    return run_experiment(config)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def _images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _headline(page: str) -> str:
    return page.split('<p class="headline">')[1].split("</p>")[0]


def test_report_for_real_run(short_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(short_run[0], tmp_path)
    summary = short_run[1]
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    images = _images(page)
    assert len(images) == 6, images
    for name in images:
        assert not Path(name).is_absolute()
        assert (run_dir / name).stat().st_size > 2048, name
    assert "Not available" not in page and 'class="left-out"' not in page
    # headline first: the true RMS from the target, against free diffusion
    assert page.index('class="headline"') < page.index("<h2>")
    rms_nm = f"{1000 * summary['rms_feedback_um']:.0f} nm RMS from the target (true positions)"
    assert rms_nm in _headline(page) and f"ratio {summary['rms_ratio']:.2f}" in _headline(page)
    assert "Positions in µm" in page
    assert "http://" not in page and "https://" not in page
    for key in ("rms_feedback_um", "latency_p99_ms", "detection_rmse_um", "rms_ratio"):
        assert key in page
        assert f"{summary[key]:.6g}" in page
    assert f"<td>{summary['steps']}</td>" in page
    assert "<details>" in page and "gain_per_s" in page
    # The trap the feedback made, calibrated from the true track: stiffer than nothing,
    # and consistent with the measured RMS (equipartition: k = kT / Var).
    assert "Trap calibration" in page and "ground truth" in page
    ks = [float(v) for v in re.findall(r"<td>([0-9.e+-]+) &plusmn;", page)]
    assert len(ks) == 2 and all(0.01 < k < 1e4 for k in ks)


def test_report_without_truth_or_free_phase(
    short_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir = _copy(short_run[0], tmp_path)
    for path in {*run_dir.glob("truth-*.jsonl"), *run_dir.glob("*-free.*")}:
        path.unlink()
    page = write_report(run_dir).read_text()
    assert "Not available" not in page
    for title in ("True trajectories", "Distance to target", "Detection error vs truth"):
        assert f"<h2>{title}" not in page  # left out, named once in the footnote
        assert title in page.split('class="left-out"')[1]
    assert "RMS from the target (detections)" in _headline(page)
    assert "from detections" in page  # the trap calibrated from what the loop saw
    images = _images(page)
    assert len(images) == 3  # latency, detections, laser
    for name in images:
        assert (run_dir / name).stat().st_size > 2048, name
    assert "laser off" not in page


def test_report_without_summary(short_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(short_run[0], tmp_path)
    (run_dir / "summary.json").unlink()
    page = write_report(run_dir).read_text()
    assert "no summary.json" in page
    assert len(_images(page)) == 6


def test_not_a_run_dir(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        write_report(tmp_path)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        replay_run(tmp_path)
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        write_report(missing)


def test_replay_recorded_policy_reproduces_decisions(
    short_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir = _copy(short_run[0], tmp_path)
    result = replay_run(run_dir)
    assert result["steps"] == short_run[1]["steps"]
    assert result["steps_differing"] == 0
    assert result["fraction_differing"] == 0.0
    assert result["examples"] == []
    assert result["detection_error"]["matched"] > 0
    out = run_dir / "replay-recorded.json"
    assert out.is_file()
    assert json.loads(out.read_text())["steps_differing"] == 0


def test_replay_higher_gain_differs(short_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir = _copy(short_run[0], tmp_path)
    config = load_config(run_dir / "config.yaml")
    policy = config.policy.model_copy(update={"gain_per_s": config.policy.gain_per_s * 3})
    result = replay_run(run_dir, policy=policy, name="gain-x3", max_examples=3)
    assert result["steps_differing"] > 0
    assert 0 < result["fraction_differing"] <= 1
    assert result["mean_power_change_mw"] > 0  # more gain, more power
    assert 0 < len(result["examples"]) <= 3
    first = result["examples"][0]
    assert first["recorded"] != first["replayed"]
    saved = json.loads((run_dir / "replay-gain-x3.json").read_text())
    assert saved["policy"]["gain_per_s"] == pytest.approx(config.policy.gain_per_s * 3)


def test_replay_bad_phase(short_run: tuple[Path, dict[str, Any]]) -> None:
    with pytest.raises(ValueError, match="events-training"):
        replay_run(short_run[0], phase="training")


def test_cli_report_and_replay_refuse_bad_input(tmp_path: Path) -> None:
    import subprocess
    import sys

    def scopeloop(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
        )

    not_a_run = scopeloop("report", str(tmp_path))
    assert not_a_run.returncode == 2 and str(tmp_path) in not_a_run.stderr
    assert len(not_a_run.stderr.strip().splitlines()) == 1
    replay = scopeloop("replay", str(tmp_path))
    assert replay.returncode == 2 and str(tmp_path) in replay.stderr


def test_replay_reruns_any_registered_policy(
    short_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Replay shares run's policy registry: a PID controller re-runs on a P-trap run."""
    run_dir = _copy(short_run[0], tmp_path)
    pid = {"kind": "pid", "gain_per_s": 20.0, "max_power_mw": 3.0}
    result = replay_run(run_dir, policy=pid, name="pid")
    assert result["steps"] == short_run[1]["steps"] and result["policy"]["kind"] == "pid"
    with pytest.raises(ValueError, match=r"policy\.kind"):
        replay_run(run_dir, policy={"kind": "magic"}, name="bad")


def test_feedback_run_records_its_frames_and_replay_redetects_them(
    short_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, summary = short_run
    run_dir = _copy(run_dir, tmp_path)
    recording = read_recording(run_dir / FRAMES_NAME)
    assert recording.complete
    assert recording.pixel_size_um == pytest.approx(0.1) and recording.unit == "micrometer"
    run = load_run(run_dir)
    steps = {phase: run.steps(phase) for phase in ("feedback", "free")}
    metadata = [recording.frame_metadata(i) for i in range(len(recording))]
    for phase, phase_steps in steps.items():  # every frame the loop acted on, in order
        recorded = [m for m in metadata if m["phase"] == phase]
        assert [m["seq"] for m in recorded] == [s["seq"] for s in phase_steps]
        assert [m["detections_um"][:16] for m in recorded] == [
            s["detections_um"] for s in phase_steps
        ]
    assert summary["frames_recorded"] == len(recording) and summary["frames_not_recorded"] == 0

    result = replay_run(run_dir)
    frames = result["frames_replay"]
    assert frames["phase"] == "feedback" and frames["frames"] == len(steps["feedback"])
    assert frames["frames_changed"] == 0 and frames["detections_replayed"] > 0
    assert frames["detections_replayed"] == frames["detections_recorded"]
    assert frames["pixel_size_um"] == pytest.approx(0.1)
    # another detector on the very same photons: blobs no particle is large enough for
    blind = replay_frames(run_dir, {"min_area_px": 10_000}, phase="feedback")
    assert blind["detections_replayed"] == 0 and blind["frames_changed"] == blind["frames"]
