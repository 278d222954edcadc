"""`scopeloop train` kind `calibration-estimator`: fit the learned trap-stiffness
estimator (`policies.calibration.learned`) on simulated trajectories and save it.

The config reading lives here, in the agent, so the estimator's package imports
nothing of ours but the contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.config import load_model_config
from policies.calibration.learned import TrainCalibrationConfig, train_estimator


def train_calibration(config_path: Path, overrides: list[str], console: Any) -> dict[str, Any]:
    """TRAIN_KINDS entry "calibration-estimator" (`scopeloop train CONFIG`)."""
    cfg = load_model_config(config_path, overrides, TrainCalibrationConfig)
    points = f"{cfg.n_points_min}-{cfg.n_points}" if cfg.n_points_min else f"{cfg.n_points}"
    console.print(
        f"training {cfg.name}: {cfg.steps} steps x {cfg.batch_size} trajectories of "
        f"{points} points, k {cfg.k_min}-{cfg.k_max} fN/um",
        highlight=False,
    )
    summary = train_estimator(cfg, log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(
        f"checkpoint saved to {summary['checkpoint']} (val MAE ln k "
        f"{summary['val_mae_lnk']:.3f}, prior-midpoint baseline "
        f"{summary['prior_mid_mae_lnk']:.3f})",
        highlight=False,
        markup=False,
    )
    return summary
