"""Feedback policy and agent-side clipping: geometry and limits, no sockets."""

from __future__ import annotations

import numpy as np
import pytest

from agent.engine.safety import LaserLimits
from policies.contract import Action, LaserSpot, Observation
from policies.feedback import HeatingModel, ProportionalTrap, ProportionalTrapConfig


def _obs(*points: tuple[float, float], target: tuple[float, float] = (10.0, 10.0)) -> Observation:
    return Observation(
        seq=0,
        t_s=0.0,
        detections_um=np.array(points, dtype=float).reshape(-1, 2),
        target_um=target,
        exposure_s=0.03,
        field_um=(25.6, 25.6),
    )


def test_heating_spot_goes_behind_the_particle_with_power_growing_with_error() -> None:
    policy = ProportionalTrap(ProportionalTrapConfig(gain_per_s=1.0, max_power_mw=2.0))
    near = policy.act(_obs((10.2, 10.0))).laser[0]
    policy.reset()
    far = policy.act(_obs((11.0, 10.0))).laser[0]
    policy.reset()
    very_far = policy.act(_obs((16.0, 10.0))).laser[0]
    offset = HeatingModel().best_offset_um()
    # The particle is at +x of the target, so the spot sits further along +x (pushes it back).
    assert far.x_um == pytest.approx(11.0 + offset) and far.y_um == pytest.approx(10.0)
    assert near.power_mw < far.power_mw
    assert very_far.power_mw == pytest.approx(2.0)  # saturated at the policy's ceiling
    # Power asked for matches the wanted drift through the actuator model.
    wanted = 1.0 * 1.0  # gain * distance
    assert far.power_mw * HeatingModel().drift_per_mw(offset) == pytest.approx(wanted)


def test_heating_model_slope_is_steepest_at_the_best_offset() -> None:
    model = HeatingModel()
    best = model.best_offset_um()
    assert model.drift_per_mw(best) > model.drift_per_mw(best * 0.8)
    assert model.drift_per_mw(best) > model.drift_per_mw(best * 1.2)


def test_tweezers_spot_leads_the_particle_toward_the_target() -> None:
    config = ProportionalTrapConfig(actuator="tweezers", max_power_mw=50.0)
    spot = ProportionalTrap(config).act(_obs((10.0, 11.0))).laser[0]
    assert spot.y_um < 11.0 and spot.x_um == pytest.approx(10.0)
    assert 11.0 - spot.y_um <= config.tweezers.trap_range_um + 1e-9


def test_no_detection_means_laser_off_and_tracking_follows_the_same_particle() -> None:
    policy = ProportionalTrap(ProportionalTrapConfig())
    assert policy.act(_obs()).laser == ()
    policy.act(_obs((12.0, 10.0), (5.0, 5.0)))  # locks onto the particle nearest the target
    action = policy.act(_obs((5.0, 5.2), (12.3, 10.1)))
    assert action.info["x_um"] == pytest.approx(12.3)


def test_agent_side_clipping_to_driver_limits() -> None:
    limits = LaserLimits(x_um=(0.0, 25.6), y_um=(0.0, 25.6), max_power_mw=3.0, max_spots=1)
    action = Action(laser=(LaserSpot(30.0, -1.0, 9.0), LaserSpot(1.0, 1.0, 1.0)))
    clipped, changed = limits.clip(action)
    assert changed
    assert clipped.laser == (LaserSpot(25.6, 0.0, 3.0),)
    inside = Action(laser=(LaserSpot(1.0, 2.0, 0.5),))
    assert limits.clip(inside) == (inside, False)


@pytest.mark.parametrize("nan", [float("nan"), np.float64("nan")])
def test_agent_side_clipping_drops_a_spot_no_number_places(nan: float) -> None:
    # A policy's NaN (a plain float or numpy's) puts no light anywhere, and is counted.
    limits = LaserLimits(x_um=(0.0, 25.6), y_um=(0.0, 25.6), max_power_mw=3.0, max_spots=2)
    for spot in (LaserSpot(nan, 1.0, 1.0), LaserSpot(1.0, nan, 1.0), LaserSpot(1.0, 1.0, nan)):
        clipped, changed = limits.clip(Action(laser=(spot, LaserSpot(2.0, 2.0, 0.5))))
        assert changed and clipped.laser == (LaserSpot(2.0, 2.0, 0.5),)


def test_track_ids_keep_the_trap_on_the_same_particle() -> None:
    policy = ProportionalTrap(ProportionalTrapConfig())

    def obs(points: list[tuple[float, float]], ids: list[int]) -> Observation:
        return Observation(
            seq=0,
            t_s=0.0,
            detections_um=np.array(points),
            target_um=(10.0, 10.0),
            exposure_s=0.03,
            track_ids=np.array(ids),
        )

    policy.act(obs([(11.0, 10.0), (14.0, 10.0)], [7, 8]))  # locks onto id 7 (nearest target)
    # Another particle (id 8) now sits nearer the target: the trap still follows id 7.
    action = policy.act(obs([(12.5, 10.0), (10.2, 10.0)], [7, 8]))
    assert action.info["x_um"] == pytest.approx(12.5)
    action = policy.act(obs([(10.2, 10.0)], [8]))  # id 7 lost: re-acquire nearest the target
    assert action.info["x_um"] == pytest.approx(10.2)
