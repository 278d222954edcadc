"""Driver-node configuration: endpoints, safety limits, watchdog, and the twin it may host.

The driver validates its own config because it must run, and stay safe, with no
agent attached. Every field has a range so a typo or an unsafe value fails
before any hardware moves.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.slm_optics import PhaseSlmSettings
from simulators.camera import CameraConfig
from simulators.particles import ParticleTwinConfig

Range = tuple[float, float]


class StrictModel(BaseModel):
    """Unknown fields are errors: a misspelt limit must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _ordered(name: str, rng: Range | None) -> None:
    if rng is not None and rng[0] > rng[1]:
        raise ValueError(f"{name}: lower bound {rng[0]} is above upper bound {rng[1]}")


class Limits(StrictModel):
    """Hard limits enforced by the driver on every command, whoever sends it."""

    max_laser_power_mw: float = Field(3.0, ge=0.0, le=10_000.0)
    max_laser_spots: int = Field(1, ge=1, le=256)
    laser_x_um: Range | None = None  # None: the camera field
    laser_y_um: Range | None = None
    stage_x_um: Range = (-10_000.0, 10_000.0)
    stage_y_um: Range = (-10_000.0, 10_000.0)
    z_um: Range = (-1_000.0, 1_000.0)
    exposure_ms: Range = (0.1, 10_000.0)

    @model_validator(mode="after")
    def _check_order(self) -> Limits:
        for name in ("laser_x_um", "laser_y_um", "stage_x_um", "stage_y_um", "z_um", "exposure_ms"):
            _ordered(f"limits.{name}", getattr(self, name))
        return self


class DeviceNames(StrictModel):
    """Micro-Manager devices the driver talks to, and how the laser is steered.

    `galvo`: one spot set through position/power properties (scanning mirrors, AOD).
    `slm`: a pattern of spots drawn into an SLM image (Micro-Manager SLM API); the SLM
    is calibrated by its pixel pitch on the sample, the sample position of its pixel
    (0, 0) and the power a pixel value of 255 delivers.
    """

    laser_kind: Literal["galvo", "slm"] = "galvo"
    laser: str = "Laser"
    laser_x_property: str = "X_um"
    laser_y_property: str = "Y_um"
    laser_power_property: str = "Power_mW"
    slm: str = "SLM"
    slm_pixel_um: float = Field(0.2, gt=0.0, le=1000.0)
    slm_origin_um: tuple[float, float] = (0.0, 0.0)
    slm_max_power_mw: float = Field(5.0, gt=0.0, le=10_000.0)


class TwinSettings(StrictModel):
    """The particle digital twin hosted as pure-Python Micro-Manager devices."""

    particles: ParticleTwinConfig = ParticleTwinConfig()
    camera: CameraConfig = CameraConfig()
    substeps: int = Field(5, ge=1, le=100)
    readout_ms: float = Field(1.0, ge=0.0, le=1000.0)
    frame_jitter_ms: float = Field(0.0, ge=0.0, le=1000.0)  # random extra delay per frame
    stage_drift_um_s: tuple[float, float] = (0.0, 0.0)  # slow thermal drift of the view
    actuation_delay_ms: float = Field(0.0, ge=0.0, le=10_000.0)  # command -> light on sample
    slm_px: int = Field(128, ge=8, le=4096)  # the twin SLM is slm_px x slm_px
    slm_phase: PhaseSlmSettings | None = None  # set: a phase SLM showing holograms
    realtime: bool = True  # pace exposures on the wall clock, as real hardware does


class DriverConfig(StrictModel):
    # twin: the particle twin as pure-Python devices; mmcore: a Micro-Manager hardware
    # configuration file, or "demo" for the C++ demo adapters (mm-test-adapters wheel);
    # pycromanager: the same through pycromanager (its Python backend, in-process).
    kind: Literal["twin", "mmcore", "pycromanager"] = "twin"
    mm_config: str = "demo"
    stream_endpoint: str = "auto"  # "auto": a private ipc:// path chosen at start
    command_endpoint: str = "auto"
    watchdog_ms: int = Field(500, ge=20, le=600_000)
    heartbeat_ms: int = Field(100, ge=5, le=60_000)
    exposure_ms: float = Field(30.0, gt=0.0, le=10_000.0)
    # Frames queued per subscriber before the oldest are dropped. ZeroMQ acknowledges reads
    # lazily, so a very small mark drops frames even when the reader keeps up.
    stream_hwm: int = Field(32, ge=4, le=10_000)
    seed: int = Field(0, ge=0)
    limits: Limits = Limits()
    devices: DeviceNames = DeviceNames()
    twin: TwinSettings = TwinSettings()
    # Agent logic run on the node's own thread for each event frame (drivers/event_hooks.py):
    # "package.module:factory", called once with event_hook_args.
    event_hook: str | None = None
    event_hook_args: dict[str, Any] = {}
    # One hook call running longer than this makes the actuators safe.
    hook_timeout_ms: int = Field(1000, ge=1, le=600_000)

    @model_validator(mode="after")
    def _hook_needs_our_engine(self) -> DriverConfig:
        if self.event_hook is not None and self.kind == "pycromanager":
            raise ValueError(
                "event_hook: runs in our event engine; kind 'pycromanager' has its own "
                "(use kind 'mmcore' with the same mm_config)"
            )
        return self

    @model_validator(mode="after")
    def _exposure_within_limits(self) -> DriverConfig:
        lo, hi = self.limits.exposure_ms
        if not lo <= self.exposure_ms <= hi:
            raise ValueError(
                f"exposure_ms: {self.exposure_ms} is outside limits.exposure_ms [{lo}, {hi}]"
            )
        return self
