"""Proportional feedback trap: hold one particle at a target with a steerable laser spot.

Heating (thermophoretic) trap, as in Franzl & Cichos: a particle with positive
Soret coefficient drifts away from a hot spot, so the spot is placed *behind*
the particle, on the far side from the target, and its power sets the push.
The controller asks for a drift velocity -gain * error and converts it into a
power through its actuator model (drift per mW at the spot offset); saturation
at the power limit makes it bang-bang far from the target. Tweezers: the spot is
placed ahead of the particle so the harmonic force pulls it toward the target.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.contract import KB_FN_UM_PER_K, Action, LaserSpot, Observation


class HeatingModel(BaseModel):
    """What the controller believes about the heating spot (may differ from the sample)."""

    model_config = ConfigDict(extra="forbid")
    thermodiffusion_um2_per_k_s: float = Field(0.67, gt=0.0)
    heating_k_per_mw: float = Field(20.0, gt=0.0)
    heating_width_um: float = Field(7.25, gt=0.0)

    def best_offset_um(self) -> float:
        """Distance at which dT(r) = P k w / sqrt(r^2 + w^2) has its steepest slope."""
        return self.heating_width_um / math.sqrt(2.0)

    def drift_per_mw(self, offset_um: float) -> float:
        """Thermophoretic speed (um/s per mW) of a particle `offset_um` from the spot."""
        w = self.heating_width_um
        grad = self.heating_k_per_mw * w * offset_um / (offset_um**2 + w**2) ** 1.5
        return self.thermodiffusion_um2_per_k_s * grad


class TweezersModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    diffusion_um2_s: float = Field(0.33, gt=0.0)
    trap_stiffness_fn_per_um_per_mw: float = Field(20.0, gt=0.0)
    trap_range_um: float = Field(1.0, gt=0.0)
    temperature_k: float = Field(296.0, gt=0.0)


class ProportionalTrapConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["proportional"] = "proportional"
    actuator: Literal["heating", "tweezers"] = "heating"
    gain_per_s: float = Field(4.0, gt=0.0, le=1000.0)
    max_power_mw: float = Field(2.0, ge=0.0, le=10_000.0)
    spot_offset_um: float | None = Field(None, gt=0.0, le=1000.0)  # None: steepest slope
    deadband_um: float = Field(0.0, ge=0.0, le=100.0)
    track_radius_um: float = Field(3.0, gt=0.0, le=1000.0)
    heating: HeatingModel = HeatingModel()
    tweezers: TweezersModel = TweezersModel()


class ProportionalTrap:
    """P controller on the tracked particle's position error."""

    def __init__(self, config: ProportionalTrapConfig) -> None:
        self.config = config
        self._tracked: np.ndarray | None = None
        self._track_id: int | None = None

    def reset(self) -> None:
        self._tracked = None
        self._track_id = None

    def act(self, obs: Observation) -> Action:
        target = np.asarray(obs.target_um, dtype=float)
        if obs.track_ids is not None:
            particle = self._follow_id(obs.detections_um, obs.track_ids, target)
        else:
            particle = self._track(obs.detections_um, target)
        if particle is None:
            return Action(laser=(), info={"tracked": 0.0})
        error = particle - target
        distance = float(np.hypot(*error))
        info = {
            "tracked": 1.0,
            "x_um": float(particle[0]),
            "y_um": float(particle[1]),
            "error_um": distance,
        }
        if distance <= self.config.deadband_um or distance == 0.0:
            return Action(laser=(), info=info)
        away = error / distance  # unit vector from target to particle
        speed = self.config.gain_per_s * distance  # wanted drift toward the target
        if self.config.actuator == "heating":
            spot, power = self._heating_spot(particle, away, speed)
        else:
            spot, power = self._tweezers_spot(particle, away, speed)
        info["power_mw"] = power
        return Action(laser=(LaserSpot(float(spot[0]), float(spot[1]), power),), info=info)

    def _heating_spot(
        self, particle: np.ndarray, away: np.ndarray, speed: float
    ) -> tuple[np.ndarray, float]:
        model = self.config.heating
        offset = self.config.spot_offset_um or model.best_offset_um()
        power = min(speed / model.drift_per_mw(offset), self.config.max_power_mw)
        return particle + offset * away, power

    def _tweezers_spot(
        self, particle: np.ndarray, away: np.ndarray, speed: float
    ) -> tuple[np.ndarray, float]:
        model = self.config.tweezers
        power = self.config.max_power_mw
        k = model.trap_stiffness_fn_per_um_per_mw * power
        mobility = model.diffusion_um2_s / (KB_FN_UM_PER_K * model.temperature_k)
        # Linear range of the trap: v = mobility * k * d for d below the trap range.
        lead = min(speed / (mobility * k), model.trap_range_um) if k > 0 else 0.0
        return particle - lead * away, power

    def _follow_id(
        self, detections: np.ndarray, ids: np.ndarray, target: np.ndarray
    ) -> np.ndarray | None:
        """Hold the same particle by identity; pick the one nearest the target if it is lost."""
        if len(detections) == 0:
            return None
        same = np.flatnonzero(ids == self._track_id) if self._track_id is not None else []
        if len(same):
            best = int(same[0])
        else:
            best = int(np.argmin(np.hypot(*(detections - target).T)))
            self._track_id = int(ids[best])
        self._tracked = np.asarray(detections[best], dtype=float)
        return self._tracked

    def _track(self, detections: np.ndarray, target: np.ndarray) -> np.ndarray | None:
        """Follow one particle: nearest to the last fix, else nearest to the target."""
        if len(detections) == 0:
            return None
        reference = self._tracked if self._tracked is not None else target
        distances = np.hypot(*(detections - reference).T)
        best = int(np.argmin(distances))
        if self._tracked is not None and distances[best] > self.config.track_radius_um:
            distances = np.hypot(*(detections - target).T)
            best = int(np.argmin(distances))
        self._tracked = np.asarray(detections[best], dtype=float)
        return self._tracked


class LaserOffConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["off"] = "off"


class LaserOff:
    """The control experiment: same loop, laser never on (free diffusion)."""

    def __init__(self, config: LaserOffConfig | None = None) -> None:
        self.config = config or LaserOffConfig()

    def reset(self) -> None:
        """Stateless."""

    def act(self, obs: Observation) -> Action:
        return Action.off()
