"""Every shipped config runs from the base install, shortened by `--set` overrides
(durations, steps, grids), through the same CLI a user types."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from typer.testing import CliRunner

from agent.cli import app
from agent.config import read_config_mapping
from agent.engine.experiments import TRAIN_KINDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FEEDBACK = ["duration_s=0.5", "compare_free_diffusion=false"]
SPM = ["grid=8", "policy.budget=6", "policy.initial=2", "policy.batch=2"]
RL = [
    "training.total_steps=32",
    "training.episodes=2",
    "training.n_envs=1",
    "training.vec=dummy",
    "training.n_steps=16",
    "training.batch_size=16",
    "env.max_steps=16",
    "eval_episodes=1",
]
SHORT: dict[str, list[str]] = {
    "twin-feedback-trap.yaml": FEEDBACK,
    "twin-kalman-trap.yaml": FEEDBACK,
    "twin-path-circle.yaml": FEEDBACK,
    "twin-rl-microswimmer.yaml": FEEDBACK,
    "twin-rl-steering.yaml": FEEDBACK,
    "twin-slm-multitrap.yaml": FEEDBACK,
    "twin-virtual-double-well.yaml": FEEDBACK,
    "twin-smart-acquisition.yaml": ["grid.nx=3", "grid.ny=3", "revisit.timepoints=1"],
    "twin-spm-dkl.yaml": SPM,
    "twin-spm-sparse.yaml": SPM,
    "replay-spm-dkl.yaml": [*SPM, "policy.patch=3"],  # + driver.replay (a grid made here)
    "twin-spm-forward.yaml": ["policy.budget=3", "forward.scan_pixels=32"],  # + checkpoint
    "rl-microswimmer.yaml": RL,
    "rl-steering.yaml": RL,
    "rl-gathering.yaml": RL,
    "train-calibration.yaml": ["steps=2", "batch_size=2", "n_points=200", "n_points_min=100"],
    "train-optical-force.yaml": [
        "n_train=200",
        "n_val=100",
        "steps=3",
        "batch_size=64",
        "lbfgs_iterations=0",
    ],
    "twin-spm-driver.yaml": [],  # a driver node's config: served, probed, stopped
}


def test_every_shipped_config_has_a_short_run() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SHORT)


def _extra(name: str, tmp_path: Path) -> list[str]:
    """Inputs a config needs from the user: a recorded grid, a trained segmenter."""
    if name == "replay-spm-dkl.yaml":
        from simulators.spm import FerroelectricSample, export_twin_grid

        grid = export_twin_grid(FerroelectricSample(seed=4), tmp_path / "grid.npz", grid=8)
        return [f"driver.replay={grid}"]
    if name == "twin-spm-forward.yaml":
        from agent.training.spm_segmenter import SegmenterTrainConfig, train_segmenter

        tiny = SegmenterTrainConfig(
            seeds=[10_001], calib_seeds=[10_101, 10_102], pixels=32, steps=3, members=2
        )
        segmenter, _ = train_segmenter(tiny)
        segmenter.save(tmp_path / "seg.pt")
        return [f"forward.checkpoint={tmp_path / 'seg.pt'}"]
    if name.startswith("rl-") or name == "train-calibration.yaml":
        return [f"checkpoint={tmp_path / 'ckpt'}"]
    if name == "train-optical-force.yaml":  # never over the shipped surrogate
        return [f"checkpoint={tmp_path / 'surrogate.npz'}"]
    return []


def _serve_spm_driver(path: Path, tmp_path: Path) -> None:
    """`scopeloop driver serve-spm` in front of the twin's Nanonis server, then probed."""
    from agent.engine.link import attach
    from drivers.spm_twin_backend import serve_spm

    server = serve_spm(port=0)
    command = f"ipc://{tmp_path}/spm-command"
    args = [f"nanonis_port={server.address[1]}", f"command_endpoint={command}"]
    sets = [item for a in args for item in ("--set", a)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "driver", "serve-spm", str(path), *sets]
    )
    try:
        link = attach(zmq.Context.instance(), command, timeout_s=30.0)
        assert {"scan", "spectrum"} <= link.commands
    finally:
        proc.terminate()
        proc.wait(10)
        server.stop()
    assert proc.returncode == 0


@pytest.mark.parametrize("name", sorted(SHORT))
def test_shipped_config_runs_shortened(name: str, tmp_path: Path) -> None:
    path = CONFIGS / name
    if name == "twin-spm-driver.yaml":
        _serve_spm_driver(path, tmp_path)
        return
    kind = read_config_mapping(path).get("kind", "feedback-trap")
    command = "train" if kind in TRAIN_KINDS else "run"
    overrides = [f"runs_dir={tmp_path}", *SHORT[name], *_extra(name, tmp_path)]
    if command == "train":
        overrides = [o for o in overrides if not o.startswith("runs_dir=")]
    sets = [item for o in overrides for item in ("--set", o)]
    t0 = time.monotonic()
    result = CliRunner().invoke(app, [command, str(path), *sets])
    assert result.exit_code == 0, f"{name} ({time.monotonic() - t0:.0f} s): {result.output}"
    if command == "train":  # a checkpoint was written where the override asked
        assert any(tmp_path.glob("ckpt*")) or any(tmp_path.glob("surrogate*")), result.output
    else:
        assert any(tmp_path.glob("*/summary.json")), result.output
