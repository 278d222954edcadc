"""Live calibration: drag-free k and D with intervals, and a stiffness step flagged once."""

from __future__ import annotations

import numpy as np
import pytest

from policies.calibration import simulate_ou
from policies.calibration.online import LiveCalibration

DT = 0.01


def _feed(live: LiveCalibration, xy: np.ndarray) -> list[int]:
    flagged = []
    for i, row in enumerate(xy):
        est = live.update(row, i * DT)
        if est is not None and est.changed:
            flagged.append(i)
    return flagged


def test_step_in_stiffness_is_flagged_once_and_tracked() -> None:
    xy = np.concatenate(
        [simulate_ou(10.0, 3000, DT, rng=1, dims=2), simulate_ou(40.0, 3000, DT, rng=2, dims=2)]
    )
    live = LiveCalibration(temperature_k=300.0, half_life_frames=200)
    flagged = _feed(live, xy)
    assert len(flagged) == 1 and 3000 < flagged[0] < 3000 + 6 * 200
    est = live.update(xy[-1], 6000 * DT)
    assert est is not None and est.changes == 1 and not est.changed
    for k in est.k:
        assert k.interval[0] < 40.0 < k.interval[1] and k.unit == "fN/um"
    for d in est.diffusion:  # drag free: D from the data (100 nm bead: 2.2 um^2/s)
        assert d.interval[0] < 2.197 < d.interval[1]
    m = est.as_metrics()
    assert m["trap_changes"] == 1.0 and m["trap_k_x_lo"] < m["trap_k_x"] < m["trap_k_x_hi"]


def test_no_false_alarm_on_a_steady_trap_and_bad_input() -> None:
    live = LiveCalibration()
    assert _feed(live, simulate_ou(20.0, 12000, DT, rng=3, dims=2)) == []
    assert LiveCalibration().update(np.zeros(2), 0.0) is None  # nothing to say yet
    with pytest.raises(ValueError, match="frames"):
        live.update(np.zeros((3, 2)), [0.0, 0.01])
    with pytest.raises(ValueError, match="half_life_frames"):
        LiveCalibration(half_life_frames=1)
