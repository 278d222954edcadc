"""Driver-node configuration: endpoints, safety limits, watchdog, and the twin it may host.

The driver validates its own config because it must run, and stay safe, with no
agent attached. Every field has a range so a typo or an unsafe value fails
before any hardware moves.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.slm_optics import PhaseSlmSettings
from simulators.camera import CameraConfig
from simulators.particles import ParticleTwinConfig
from simulators.sparse_field import SparseFieldConfig

Range = tuple[float, float]
# A writable device property: a numeric range, or the values it may take.
PropertyRule = Range | list[str]


class StrictModel(BaseModel):
    """Unknown fields are errors: a misspelt limit must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


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
    # None: max_laser_power_mw x the spots the laser kind allows.
    max_total_power_mw: float | None = Field(None, ge=0.0, le=10_000.0)
    # The only device properties set_property and MDA events may write ("Device.Property":
    # rule); the device's own limits and allowed values apply as well. Empty: none.
    properties: dict[str, PropertyRule] = {}
    # Config groups whose presets set_config and MDA channels may apply.
    config_groups: list[str] = []

    @model_validator(mode="after")
    def _check_order(self) -> Limits:
        for name in ("laser_x_um", "laser_y_um", "stage_x_um", "stage_y_um", "z_um", "exposure_ms"):
            _ordered(f"limits.{name}", getattr(self, name))
        for key, rule in self.properties.items():
            device, _, prop = key.partition(".")
            if not device or not prop:
                raise ValueError(f"limits.properties: key {key!r} must be 'Device.Property'")
            if isinstance(rule, tuple):
                if not all(math.isfinite(b) for b in rule):
                    raise ValueError(f"limits.properties.{key}: bounds must be finite")
                _ordered(f"limits.properties.{key}", rule)
        return self


class DeviceNames(StrictModel):
    """Micro-Manager devices the driver talks to, and how the laser is steered.

    `galvo`: one spot set through position/power properties (scanning mirrors, AOD).
    `slm`: a pattern of spots drawn into an SLM image (Micro-Manager SLM API); the SLM
    is calibrated by its pixel pitch on the sample, the sample position of its pixel
    (0, 0) and the power a pixel value of 255 delivers; or, with `slm_phase`, it is a
    phase SLM in a Fourier plane and its image is a hologram.
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
    # Set: a Fourier-plane phase SLM (holographic tweezers). Its images are holograms, and
    # the traps they make are computed from them (drivers/slm_optics.py) by the gate, the
    # frame headers and the twin alike; the three fields above are then unused.
    slm_phase: PhaseSlmSettings | None = None


class PlaybackSettings(StrictModel):
    """A recorded run served as a live camera (kind `playback`): a scopeloop run
    directory or its frames.ome.zarr, a TIFF stack, an image file or a folder of them."""

    path: str | None = None
    # µm per pixel; None: the recording's own (a run's frame metadata, OME-TIFF PhysicalSizeX).
    pixel_size_um: float | None = Field(None, gt=0.0, le=1000.0)
    # Time between served frames; None: the exposure (the rig's frame rate when recorded).
    frame_interval_ms: float | None = Field(None, gt=0.0, le=600_000.0)
    slm_px: int = Field(64, ge=8, le=4096)  # the stand-in SLM that takes pattern commands


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
    realtime: bool = True  # pace exposures on the wall clock, as real hardware does


class ServerAuth(StrictModel):
    """CURVE keys of this node's tcp:// endpoints (`scopeloop keys`; docs/protocol.md).

    Without them a node binds only ipc:// (in a 0700 directory) or loopback tcp://."""

    secret_key: str | None = None  # this node's NAME.key_secret (mode 0600)
    allowed_clients_dir: str | None = None  # public NAME.key files of the clients let in


class ClientAuth(StrictModel):
    """CURVE keys an agent uses to attach to a driver on tcp:// (see ServerAuth)."""

    secret_key: str | None = None  # this agent's NAME.key_secret (mode 0600)
    server_public_key: str | None = None  # the driver node's public NAME.key


ENDPOINT_PATTERN = r"^(tcp://[^:/\s]+:[0-9]{1,5}|ipc://\S+)$"


class PycromanagerSettings(StrictModel):
    """kind pycromanager: attach to a Micro-Manager already running (the GUI's ZMQ server,
    Options > "Run server on port", or a headless backend in this process) instead of
    starting a headless backend on mm_config."""

    attach: bool = False
    port: int = Field(4827, ge=1024, le=65_535)  # pycromanager's default bridge port


class DriverConfig(StrictModel):
    # twin: the particle twin as pure-Python devices; sparse-field: the sparse-field twin
    # (camera, XY stage, lamp) for smart acquisition; mmcore: a Micro-Manager hardware
    # configuration file, or "demo" for the C++ demo adapters (mm-test-adapters wheel);
    # pycromanager: the same through pycromanager (its Python backend, in-process);
    # playback: a recorded run or a microscope's image files served as a live camera.
    kind: Literal["twin", "sparse-field", "mmcore", "pycromanager", "playback"] = "twin"
    mm_config: str = "demo"
    # Attach to a driver node already running at this command endpoint instead of
    # starting one (its stream endpoint is asked from the node); None: start one here.
    connect: str | None = Field(None, pattern=ENDPOINT_PATTERN)
    # The agent's CURVE keys for this node's tcp:// endpoints (`connect`, or tcp endpoints
    # of a node it starts): its own key pair and the node's public key.
    client_auth: ClientAuth = ClientAuth()
    stream_endpoint: str = "auto"  # "auto": a private ipc:// path chosen at start
    command_endpoint: str = "auto"
    watchdog_ms: int = Field(500, ge=20, le=600_000)
    heartbeat_ms: int = Field(100, ge=5, le=60_000)
    exposure_ms: float = Field(30.0, gt=0.0, le=10_000.0)
    # Frames queued per subscriber before the oldest are dropped. ZeroMQ acknowledges reads
    # lazily, so a very small mark drops frames even when the reader keeps up.
    stream_hwm: int = Field(32, ge=4, le=10_000)
    seed: int = Field(0, ge=0)
    # The sample temperature frame headers report (calibration needs kT): read from this
    # "Device.Property" (in temperature_unit) when the rig has a sensor, else temperature_k.
    # The twin reports its own. Headers say which (state temperature_source).
    temperature_k: float = Field(300.0, gt=0.0, le=1000.0)
    temperature_property: str | None = Field(None, pattern=r"^[^.\s]+\.\S+$")
    temperature_unit: Literal["K", "C"] = "C"
    auth: ServerAuth = ServerAuth()
    # Largest frame buffer a subscriber accepts (None: the twin camera's frame, else a
    # 4096 x 4096 32-bit frame); larger messages disconnect their sender unread.
    max_frame_bytes: int | None = Field(None, ge=1024, le=2**31)
    limits: Limits = Limits()
    pycromanager: PycromanagerSettings = PycromanagerSettings()  # kind pycromanager
    devices: DeviceNames = DeviceNames()
    twin: TwinSettings = TwinSettings()
    field: SparseFieldConfig = SparseFieldConfig()  # kind sparse-field
    playback: PlaybackSettings = PlaybackSettings()  # kind playback
    # Agent logic run on the node's own thread for each event frame (drivers/event_hooks.py):
    # "package.module:factory", called once with event_hook_args.
    event_hook: str | None = None
    event_hook_args: dict[str, Any] = {}
    # One hook call running longer than this makes the actuators safe.
    hook_timeout_ms: int = Field(1000, ge=1, le=600_000)

    def largest_frame_bytes(self) -> int:
        """The biggest legitimate frame buffer on this node's stream."""
        if self.max_frame_bytes is not None:
            return self.max_frame_bytes
        if self.kind == "twin":
            camera = self.twin.camera
            return camera.width_px * camera.height_px * 4  # uint16 frames, 2x margin
        return 4096 * 4096 * 4

    @model_validator(mode="after")
    def _playback_needs_a_recording(self) -> DriverConfig:
        if self.kind == "playback" and self.playback.path is None:
            raise ValueError("playback.path: kind 'playback' needs a recording to play")
        return self

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
