"""Feedback control of particles: PID and delay-compensated traps, virtual potentials,
path steering and SLM multi-spot holding, plus the exact theory of the sampled loop."""

from policies.control.config import (
    CONTROL_CONFIGS,
    ControlPolicyConfigs,
    KalmanTrapConfig,
    MultiTrapConfig,
    PathConfig,
    PidTrapConfig,
    PredictiveTrapConfig,
    VirtualPotentialConfig,
)
from policies.control.policies import (
    MultiTrap,
    PathSteering,
    PidTrap,
    VirtualPotentialTrap,
    make_control_policy,
)

__all__ = [
    "CONTROL_CONFIGS",
    "ControlPolicyConfigs",
    "KalmanTrapConfig",
    "MultiTrap",
    "MultiTrapConfig",
    "PathConfig",
    "PathSteering",
    "PidTrap",
    "PidTrapConfig",
    "PredictiveTrapConfig",
    "VirtualPotentialConfig",
    "VirtualPotentialTrap",
    "make_control_policy",
]
