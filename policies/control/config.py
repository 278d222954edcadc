"""Configs of the feedback-control policies (`policy: {kind: ...}` in an experiment YAML).

Every number has a validated range so a typo fails before the laser moves. The loop
delay and exposure are explicit fields because the delay-compensated controllers
need them; `exposure_s: null` takes the exposure from each frame's header.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.control.potentials import PotentialSpec
from policies.feedback import HeatingModel, TweezersModel

Point = tuple[float, float]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParticleModel(Strict):
    """The particle as the controller believes it is: mobility = D / kT turns force into drift."""

    diffusion_um2_s: float = Field(0.33, gt=0.0, le=100.0)
    temperature_k: float = Field(296.0, gt=0.0, le=1000.0)


class LoopModel(Strict):
    """Known loop timing: delay from the end of an exposure to the command acting on the
    sample, and the exposure (motion blur); localisation noise feeds the Kalman filter."""

    delay_s: float = Field(0.0, ge=0.0, le=10.0)
    exposure_s: float | None = Field(None, gt=0.0, le=10.0)
    localization_noise_um: float = Field(0.02, ge=0.0, le=10.0)


class ActuatorSettings(Strict):
    actuator: Literal["heating", "tweezers"] = "heating"
    max_power_mw: float = Field(2.0, ge=0.0, le=10_000.0)
    spot_offset_um: float | None = Field(None, gt=0.0, le=1000.0)  # heating; None: best
    heating: HeatingModel = HeatingModel()
    tweezers: TweezersModel = TweezersModel()


class PidGains(Strict):
    """v = -(gain e + integral_gain int e dt + derivative_gain de/dt), e = estimate - setpoint."""

    gain_per_s: float = Field(4.0, ge=0.0, le=1000.0)
    integral_gain_per_s2: float = Field(0.0, ge=0.0, le=1e5)
    derivative_gain: float = Field(0.0, ge=0.0, le=10.0)
    integral_limit_um_s: float = Field(5.0, gt=0.0, le=1000.0)  # anti-windup on ki * int e


Estimator = Literal["none", "predictor", "kalman"]


class _ControlBase(ActuatorSettings):
    particle: ParticleModel = ParticleModel()
    loop: LoopModel = LoopModel()
    track_radius_um: float = Field(3.0, gt=0.0, le=1000.0)


class PidTrapConfig(_ControlBase, PidGains):
    """PID hold at the target on the raw measurement (no delay compensation)."""

    kind: Literal["pid"] = "pid"


class PredictiveTrapConfig(_ControlBase, PidGains):
    """Smith predictor: measurement propagated over exposure/2 + delay with the commands sent."""

    kind: Literal["predictive"] = "predictive"


class KalmanTrapConfig(_ControlBase, PidGains):
    """Kalman filter that models blur and delay, then predicts to when the command acts."""

    kind: Literal["kalman"] = "kalman"


class VirtualPotentialConfig(_ControlBase):
    """Impose U(x, y, t) by feedback: drift = -(D / kT) grad U at the predicted position."""

    kind: Literal["virtual-potential"] = "virtual-potential"
    potential: PotentialSpec
    estimator: Estimator = "predictor"
    center_um: Point | None = None  # potential origin; None: the experiment's target


class CurveSpec(Strict):
    """A closed parametric curve around the target: circle or Lissajous figure."""

    shape: Literal["circle", "lissajous"] = "circle"
    radius_um: Point = (3.0, 3.0)  # x and y semi-axes
    frequency_ratio: Point = (1.0, 1.0)  # Lissajous: x and y frequencies (circle ignores)
    phase_rad: float = Field(0.0, ge=-10.0, le=10.0)


class PathConfig(_ControlBase, PidGains):
    """Steer one particle along waypoints (relative to the target) or a curve at a speed."""

    kind: Literal["path"] = "path"
    waypoints_um: list[Point] | None = Field(None, min_length=2, max_length=10_000)
    curve: CurveSpec | None = None
    speed_um_s: float = Field(1.0, gt=0.0, le=1000.0)
    repeat: bool = True  # waypoints: start over (closing the polygon) when the end is reached
    start_delay_s: float = Field(1.0, ge=0.0, le=3600.0)  # hold at the start before moving
    estimator: Estimator = "predictor"
    feedforward: bool = True  # add the path's own velocity to the feedback command

    @model_validator(mode="after")
    def _one_path(self) -> PathConfig:
        if (self.waypoints_um is None) == (self.curve is None):
            raise ValueError("give exactly one of waypoints_um or curve")
        return self


class MultiTrapConfig(_ControlBase, PidGains):
    """Hold several particles at once with one spot each (an SLM pattern)."""

    kind: Literal["multi-trap"] = "multi-trap"
    targets_um: list[Point] | None = Field(None, min_length=1, max_length=256)
    ring: tuple[int, float] | None = None  # (n, radius_um) around the target instead
    absolute: bool = False  # targets_um in field coordinates, else relative to the target
    estimator: Estimator = "predictor"
    max_power_per_spot_mw: float | None = Field(None, gt=0.0, le=10_000.0)

    @model_validator(mode="after")
    def _targets(self) -> MultiTrapConfig:
        if (self.targets_um is None) == (self.ring is None):
            raise ValueError("give exactly one of targets_um or ring")
        if self.ring is not None and not (1 <= self.ring[0] <= 256 and self.ring[1] > 0):
            raise ValueError("ring: (n, radius_um) needs 1 <= n <= 256 and radius_um > 0")
        return self


# Plain union: agent.config puts it inside its own discriminated PolicyConfig union.
ControlPolicyConfigs = (
    PidTrapConfig
    | PredictiveTrapConfig
    | KalmanTrapConfig
    | VirtualPotentialConfig
    | PathConfig
    | MultiTrapConfig
)
CONTROL_CONFIGS = (
    PidTrapConfig,
    PredictiveTrapConfig,
    KalmanTrapConfig,
    VirtualPotentialConfig,
    PathConfig,
    MultiTrapConfig,
)
