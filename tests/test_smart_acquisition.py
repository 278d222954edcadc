"""Smart acquisition on the sparse-field twin: screen, detect, revisit within a dose budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from agent.cli import app
from agent.config import ConfigError
from agent.engine.experiments import RUN_KINDS, resolve
from agent.plans.smart_acquisition import run_smart_acquisition
from agent.records.frame_recording import FRAMES_NAME, read_recording, recording_exists
from agent.records.replay import replay_frames
from simulators.sparse_field import SparseField, SparseFieldConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "twin-smart-acquisition.yaml"
SMALL = ["grid.nx=5", "grid.ny=5", "revisit.timepoints=2", "revisit.interval_ms=50"]


def _run(tmp_path: Path, extra: list[str]) -> dict[str, Any]:
    fn = resolve("smart-acquisition", RUN_KINDS)
    return fn(CONFIG, [f"runs_dir={tmp_path}", *SMALL, *extra], Console(quiet=True))


def test_sparse_field_dose_sets_the_signal() -> None:
    """Photons in an object's blob are brightness x exposure x intensity (plus noise)."""
    config = SparseFieldConfig(n_objects=1, area_um=(10.0, 10.0))
    field = SparseField(config, seed=1)
    where = (float(field.objects_um[0][0]), float(field.objects_um[0][1]))

    def blob_counts(exposure_ms: float, intensity: float) -> float:
        frame = field.render(where, exposure_ms, intensity).astype(float)
        c = config.width_px // 2
        window = frame[c - 8 : c + 8, c - 8 : c + 8]
        return float(window.sum() - window.size * np.median(frame))

    expected = field.brightness[0]
    assert blob_counts(20.0, 1.0) == pytest.approx(20 * expected, rel=0.1)
    assert blob_counts(5.0, 0.2) == pytest.approx(expected, abs=0.5 * expected + 60)
    assert len(field.in_view(where)) == 1 and len(field.in_view((5000.0, 5000.0))) == 0


def test_screen_then_revisit_saves_dose_and_finds_the_objects(tmp_path: Path) -> None:
    summary = _run(
        tmp_path, ["seed=3", "driver.field.n_objects=10", "driver.field.area_um=[640, 640]"]
    )
    assert summary["positions"] == 25 and summary["frames_screen"] == 25
    # only positions where the screen found objects are revisited, as a time-lapse
    assert 0 < summary["positions_revisited"] < 25
    assert summary["frames_revisit"] == 2 * summary["positions_revisited"]
    assert summary["dose_used"] < summary["dose_all_high"]
    assert summary["dose_saved_fraction"] > 0.5
    assert summary["object_recall"] >= 0.8 and summary["detection_precision"] >= 0.7
    assert summary["positions_with_objects_missed"] <= 1
    # every frame recorded with the decision that triggered it
    recording = read_recording(Path(summary["run_dir"]) / FRAMES_NAME)
    assert len(recording) == summary["frames_total"] == summary["frames_recorded"]
    last = recording.frame_metadata(len(recording) - 1)
    assert last["reason"] == "revisit" and "screen found" in last["decision"]
    assert recording.frame_metadata(0)["reason"] == "screen"

    # replay re-runs detection over the recorded frames
    same = replay_frames(Path(summary["run_dir"]))
    assert same["frames"] == summary["frames_total"] and same["frames_changed"] == 0
    stricter = replay_frames(Path(summary["run_dir"]), {"threshold_sigma": 40.0})
    assert stricter["detections_replayed"] < stricter["detections_recorded"]
    result = CliRunner().invoke(app, ["replay", summary["run_dir"]])
    assert result.exit_code == 0, result.output
    assert "re-ran detection on" in result.output


def test_dose_budget_limits_the_revisits(tmp_path: Path) -> None:
    base = [
        "seed=3",
        "driver.field.n_objects=10",
        "driver.field.area_um=[640, 640]",
        "record_frames=false",
    ]
    screen_dose = 25 * 2.0 * 0.25
    budget = screen_dose + 2 * 20.0 * 2  # room for exactly two revisited positions
    summary = _run(tmp_path, [*base, f"dose_budget={budget}"])
    assert summary["positions_revisited"] == 2
    assert summary["dose_used"] <= budget
    assert "frames_recorded" not in summary  # the engine opened no recording
    assert not recording_exists(Path(summary["run_dir"]) / FRAMES_NAME)


def test_bad_smart_acquisition_config_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_smart_acquisition(CONFIG, ["screen.intensity=3"], Console(quiet=True))
    assert "screen.intensity" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="screen: dose"):
        run_smart_acquisition(CONFIG, ["screen.exposure_ms=100"], Console(quiet=True))
