"""`scopeloop train` kind optical-force: a tiny run end to end, and one-line config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from agent.cli import app
from agent.training.optics import TrainOpticalForceConfig, train_surrogate
from simulators.optics.surrogate import ForceSurrogate

CONFIG = "configs/train-optical-force.yaml"


def test_tiny_training_exports_a_surrogate_the_twin_can_load(tmp_path: Path) -> None:
    path = tmp_path / "sur.npz"
    cfg = TrainOpticalForceConfig(
        checkpoint=str(path),
        domain={
            "radius_min_um": 0.3,
            "radius_max_um": 0.4,
            "rho_max_um": 1.0,
            "z_min_um": -0.5,
            "z_max_um": 0.8,
        },
        n_train=300,
        n_val=100,
        steps=300,
        lbfgs_iterations=20,
        hidden=16,
        fourier_features=4,
        log_every=1000,
    )
    summary = train_surrogate(cfg, log=lambda _m: None)
    for key in ("val_force_error_max", "val_force_error_rms", "speedup", "checkpoint_bytes"):
        assert np.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["val_force_error_rms"] <= summary["val_force_error_max"] < 1.0
    sur = ForceSurrogate(path)
    q = sur.efficiency([[0.0, 0.0, 0.1], [0.2, 0.0, 0.1]], 0.35)
    assert q[0, 0] == 0.0 and q[0, 1] == 0.0  # odd in rho by construction
    assert sur.domain.radius_max_um == 0.4


def test_bad_optics_is_a_one_line_error() -> None:
    res = CliRunner().invoke(app, ["train", CONFIG, "--set", "optics.numerical_aperture=1.5"])
    assert res.exit_code == 2
    assert "numerical_aperture" in res.output and "Traceback" not in res.output
