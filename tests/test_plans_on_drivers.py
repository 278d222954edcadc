"""Plans on drivers that are not the twin: a user's own Micro-Manager config file (its
labels, not the demo's) and a recorded run, through the same plan code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from rich.console import Console

from agent.config import ConfigError, load_config
from agent.plans.feedback_trap import run_experiment
from agent.plans.smart_acquisition import run_smart_acquisition

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMART = CONFIGS / "twin-smart-acquisition.yaml"
SMALL = ["grid.nx=3", "grid.ny=3", "revisit.timepoints=1"]
FULL_LIGHT = ["lamp=null", "screen.intensity=1", "revisit.intensity=1"]

# A lab's own hardware file: its own labels, its own pixel size, no "Camera"/"XY" names.
USER_CFG = """\
Property,Core,Initialize,0
Device,Hub,DemoCamera,DHub
Device,Andor Zyla,DemoCamera,DCam
Device,Prior XY,DemoCamera,DXYStage
Device,Piezo Z,DemoCamera,DStage
Device,Lamp Shutter,DemoCamera,DShutter
Parent,Andor Zyla,Hub
Parent,Prior XY,Hub
Parent,Piezo Z,Hub
Parent,Lamp Shutter,Hub
Property,Core,Initialize,1
Property,Core,Camera,Andor Zyla
Property,Core,XYStage,Prior XY
Property,Core,Focus,Piezo Z
Property,Core,Shutter,Lamp Shutter
ConfigGroup,System,Startup,Andor Zyla,Binning,1
ConfigPixelSize,Res40x,Andor Zyla,Binning,1
PixelSize_um,Res40x,0.1625
"""


def test_smart_acquisition_runs_on_a_users_micro_manager_config(tmp_path: Path) -> None:
    cfg = tmp_path / "lab-scope.cfg"
    cfg.write_text(USER_CFG)
    summary = run_smart_acquisition(
        SMART,
        [
            f"runs_dir={tmp_path}",
            "driver.kind=mmcore",
            f"driver.mm_config={cfg}",
            *FULL_LIGHT,
            "screen.exposure_ms=1",
            "revisit.exposure_ms=5",
            "grid.origin_um=[0, 0]",
            *SMALL,
        ],
        Console(quiet=True),
    )
    assert summary["frames_screen"] == 9
    assert summary["object_recall"] is None  # a real rig publishes no truth
    from agent.records.frame_recording import FRAMES_NAME, read_recording

    recording = read_recording(Path(summary["run_dir"]) / FRAMES_NAME)
    assert len(recording) >= 9
    assert recording.frame_metadata(0)["pixel_size_um"] == 0.1625  # the lab's calibration


def test_smart_acquisition_runs_on_a_recorded_stack(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    frames = rng.poisson(100, (4, 128, 128)).astype(np.uint16)
    frames[:, 60:68, 60:68] += 3000  # one bright object in every field
    stack = tmp_path / "screen.ome.tif"
    tifffile.imwrite(stack, frames, ome=True, metadata={"axes": "TYX", "PhysicalSizeX": 0.5})
    summary = run_smart_acquisition(
        SMART,
        [
            f"runs_dir={tmp_path}",
            "driver.kind=playback",
            f"driver.playback.path={stack}",
            *FULL_LIGHT,
            "screen.exposure_ms=2",
            "revisit.exposure_ms=5",
            "grid.origin_um=[0, 0]",
            *SMALL,
        ],
        Console(quiet=True),
    )
    assert summary["frames_screen"] == 9
    assert summary["object_recall"] is None


def test_the_feedback_trap_refuses_a_rig_without_a_laser_in_one_line(tmp_path: Path) -> None:
    """The demo rig parses `set_laser` but has nothing to drive: refused before the lease."""
    experiment = load_config(
        CONFIGS / "twin-feedback-trap.yaml",
        [
            f"runs_dir={tmp_path}",
            "duration_s=1.0",
            "compare_free_diffusion=false",
            "driver.kind=mmcore",
            "driver.mm_config=demo",
        ],
    )
    with pytest.raises(ConfigError) as info:
        run_experiment(experiment)
    message = str(info.value)
    assert "no laser" in message and "feedback-trap" in message and "\n" not in message
    assert "xy_stage" in message  # what the rig does have
