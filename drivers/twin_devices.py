"""The particle twin as pure-Python Micro-Manager devices in pymmcore-plus `UniMMCore`.

The driver node then talks to the twin exactly as it talks to hardware: through
core calls (`setProperty`, `setXYPosition`, sequence acquisition). Pacing lives
here, not in the simulator: each exposure is integrated sub-step by sub-step on
the wall clock, and a laser command takes effect at the first sub-step after it
arrives (plus an optional actuation delay), so loop delay is real. Light comes from
a galvo-like spot (`Laser` properties) and/or an `SLM` pattern of spots.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    SimpleCameraDevice,
    SLMDevice,
    UniMMCore,
    XYStageDevice,
    pymm_property,
)

from drivers.config import DeviceNames, TwinSettings
from drivers.light import SlmCalibration, slm_image_spots
from simulators.particles import LaserSpot  # the twin's input: where light falls
from simulators.scene import ParticleScene

# The twin laser's own physical ceiling; the driver's configured limit is stricter.
TWIN_LASER_MAX_MW = 1000.0
TRUTH_RING = 256
LIGHT_LOG_MAX = 100_000  # light changes kept until the node publishes them


def _sleep_until(deadline_s: float) -> None:
    """Sleep to a monotonic deadline; the last fraction of a ms is spun for accuracy."""
    while True:
        remaining = deadline_s - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(remaining - 0.0003 if remaining > 0.0008 else 0)


class TwinRig:
    """Shared state between the twin devices: the scene, the stage and the light."""

    def __init__(
        self, settings: TwinSettings, seed: int, exposure_ms: float, names: DeviceNames
    ) -> None:
        self.settings = settings
        self.names = names
        self.scene = ParticleScene(
            settings.particles,
            settings.camera,
            seed=seed,
            substeps=settings.substeps,
            stage_drift_um_s=settings.stage_drift_um_s,
        )
        self.exposure_ms = exposure_ms
        self.stage_um = (0.0, 0.0)
        # The galvo spot is set property by property (camera-field coordinates).
        self.laser_x_um = 0.0
        self.laser_y_um = 0.0
        self.laser_power_mw = 0.0
        self.slm_image = np.zeros((settings.slm_px, settings.slm_px), dtype=np.uint8)
        phase = names.slm_phase
        if phase is not None and phase.calibration.slm_px != settings.slm_px:
            raise ValueError(
                f"devices.slm_phase.calibration.slm_px must equal twin.slm_px ({settings.slm_px})"
            )
        self.slm_spots: tuple[LaserSpot, ...] = ()
        # What was commanded when: light reaches the sample actuation_delay_ms later.
        self._commands: deque[tuple[float, tuple[LaserSpot, ...]]] = deque(maxlen=4096)
        self._commands.append((0.0, ()))
        # Commands are recorded on the node thread (and the watchdog's), read on the
        # camera's sequence thread: a deque must not change while it is iterated.
        self._commands_lock = threading.Lock()
        # Every change of the light on the sample, for the truth/light topic: what the
        # sample really got and when, whatever the driver believes it applied.
        self._light_log: deque[dict[str, Any]] = deque(maxlen=LIGHT_LOG_MAX)
        self.frame_index = 0
        self._truth: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._next_start_s = 0.0
        self._jitter_rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7177]))

    def commanded_spots(self) -> tuple[LaserSpot, ...]:
        """Every lit spot as commanded now, in camera-field coordinates."""
        galvo = (
            (LaserSpot(self.laser_x_um, self.laser_y_um, self.laser_power_mw),)
            if self.laser_power_mw > 0
            else ()
        )
        return galvo + self.slm_spots

    def record_command(self) -> None:
        t = time.monotonic()
        spots = self.commanded_spots()
        with self._commands_lock:
            self._commands.append((t, spots))
        delay_s = self.settings.actuation_delay_ms / 1000.0 if self.settings.realtime else 0.0
        self._light_log.append(
            {
                "t_ns": int((t + delay_s) * 1e9),  # on the sample (CLOCK_MONOTONIC)
                "spots": [[s.x_um, s.y_um, s.power_mw] for s in spots],  # camera field
                "stage_um": list(self.stage_um),
            }
        )

    def take_light_log(self) -> list[dict[str, Any]]:
        """Light changes since the last call (any thread may record; one takes)."""
        out = []
        while self._light_log:
            out.append(self._light_log.popleft())
        return out

    def display_slm(self, image: np.ndarray) -> None:
        """Lit SLM pixels become spots at their calibrated sample positions; on a phase
        SLM the image is a hologram and the spots are its Fourier-plane traps."""
        self.slm_image = image.copy()
        calibration = SlmCalibration.from_devices(self.names)
        self.slm_spots = tuple(
            LaserSpot(s.x_um, s.y_um, s.power_mw) for s in slm_image_spots(image, calibration)
        )
        self.record_command()

    def spots_on_sample(self, now_s: float) -> tuple[LaserSpot, ...]:
        """The light on the sample at `now_s`: the command in force actuation_delay ago."""
        if self.settings.realtime:
            cutoff = now_s - self.settings.actuation_delay_ms / 1000.0
            spots: tuple[LaserSpot, ...] = ()
            with self._commands_lock:
                for t, commanded in reversed(self._commands):
                    if t <= cutoff:
                        spots = commanded
                        break
        else:
            spots = self.commanded_spots()
        sx, sy = self.stage_um  # field -> sample coordinates
        return tuple(LaserSpot(s.x_um + sx, s.y_um + sy, s.power_mw) for s in spots)

    def acquire(self, buffer: np.ndarray) -> dict[str, Any]:
        """Integrate one exposure (paced in real time) into `buffer`; return metadata."""
        settings = self.settings
        exposure_s = self.exposure_ms / 1000.0
        substeps = settings.substeps
        realtime = settings.realtime
        jitter_s = self._jitter_rng.uniform(0.0, settings.frame_jitter_ms / 1000.0)
        t0 = max(time.monotonic(), self._next_start_s) + jitter_s
        if realtime:
            _sleep_until(t0)
        laser_log: list[list[list[float]]] = []

        def before_substep(k: int, _t_s: float) -> None:
            if realtime:
                _sleep_until(t0 + k * exposure_s / substeps)
            spots = self.spots_on_sample(time.monotonic())
            self.scene.twin.set_laser(spots)
            laser_log.append([[s.x_um, s.y_um, s.power_mw] for s in spots])

        stage = np.asarray(self.stage_um)
        _, positions = self.scene.expose(
            exposure_s, before_substep=before_substep, out=buffer, view_offset_um=self.stage_um
        )
        t_end = t0 + exposure_s
        if realtime:
            _sleep_until(t_end)
        self._next_start_s = t_end + settings.readout_ms / 1000.0
        # Truth in the camera-field frame: what the frame shows, minus nothing.
        view = stage + np.asarray(self.scene.drift_offset_um())
        state = self.scene.ground_truth()
        with self._lock:
            index = self.frame_index
            self.frame_index += 1
            self._truth[index] = {
                "positions_um": (positions.mean(axis=0) - view).tolist(),
                "end_positions_um": (positions[-1] - view).tolist(),
                "orientations_rad": state["orientations_rad"],
                "temperatures_k": state["temperatures_k"],
                "laser_substeps": laser_log,
                "t_s": state["t_s"],
            }
            while len(self._truth) > TRUTH_RING:
                self._truth.popitem(last=False)
        return {
            "twin_frame": index,
            "t_exp_start_ns": int(t0 * 1e9),
            "t_exp_end_ns": int(t_end * 1e9),
        }

    def truth(self, index: int) -> dict[str, Any] | None:
        with self._lock:
            return self._truth.get(index)


class RigCamera(SimpleCameraDevice):
    """A 16-bit camera whose exposure lives on its rig (the state its devices share);
    subclasses say what the sensor is and where the photons come from."""

    def __init__(self, rig: Any) -> None:
        super().__init__()
        self._rig = rig

    def dtype(self) -> Any:
        return np.uint16

    def get_exposure(self) -> float:
        return float(self._rig.exposure_ms)

    def set_exposure(self, exposure: float) -> None:
        self._rig.exposure_ms = float(exposure)


class TwinCamera(RigCamera):
    """Camera whose photons come from the particle scene."""

    def sensor_shape(self) -> tuple[int, int]:
        cam = self._rig.settings.camera
        return (cam.height_px, cam.width_px)

    def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
        return self._rig.acquire(buffer)


class TwinLaser(GenericDevice):
    """A steerable heating/trapping laser (galvo- or AOD-like): position and power."""

    def __init__(self, rig: TwinRig) -> None:
        super().__init__()
        self._rig = rig

    @pymm_property(limits=(-1e6, 1e6), name="X_um")
    def x_um(self) -> float:
        return self._rig.laser_x_um

    @x_um.setter
    def x_um(self, value: float) -> None:
        self._rig.laser_x_um = float(value)
        self._rig.record_command()

    @pymm_property(limits=(-1e6, 1e6), name="Y_um")
    def y_um(self) -> float:
        return self._rig.laser_y_um

    @y_um.setter
    def y_um(self, value: float) -> None:
        self._rig.laser_y_um = float(value)
        self._rig.record_command()

    @pymm_property(limits=(0.0, TWIN_LASER_MAX_MW), name="Power_mW")
    def power_mw(self) -> float:
        return self._rig.laser_power_mw

    @power_mw.setter
    def power_mw(self, value: float) -> None:
        self._rig.laser_power_mw = float(value)
        self._rig.record_command()


class TwinSLM(SLMDevice):
    """A spatial light modulator projecting a pattern of heating/trapping spots."""

    def __init__(self, rig: TwinRig) -> None:
        super().__init__()
        self._rig = rig
        self._loaded = rig.slm_image.copy()
        self._exposure_ms = 0.0

    def shape(self) -> tuple[int, int]:
        return self._rig.slm_image.shape  # square, so (width, height) == (rows, cols)

    def dtype(self) -> Any:
        return np.uint8

    def set_image(self, pixels: np.ndarray) -> None:
        self._loaded = np.array(pixels, dtype=np.uint8)

    def get_image(self) -> np.ndarray:
        return self._rig.slm_image.copy()

    def display_image(self) -> None:
        self._rig.display_slm(self._loaded)

    def set_exposure(self, interval_ms: float) -> None:
        self._exposure_ms = float(interval_ms)

    def get_exposure(self) -> float:
        return self._exposure_ms


class StageRig(Protocol):
    stage_um: tuple[float, float]


class TwinXYStage(XYStageDevice):
    """A motorised XY stage that shifts the camera's view over the sample (any twin rig
    that keeps a `stage_um`)."""

    def __init__(self, rig: StageRig) -> None:
        super().__init__()
        self._rig = rig

    def set_position_um(self, x: float, y: float) -> None:
        self._rig.stage_um = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self._rig.stage_um

    def set_origin_x(self) -> None:
        raise NotImplementedError("the twin stage has a fixed origin")

    def set_origin_y(self) -> None:
        raise NotImplementedError("the twin stage has a fixed origin")

    def home(self) -> None:
        self._rig.stage_um = (0.0, 0.0)

    def stop(self) -> None:
        """Moves are instantaneous on the twin: nothing to stop."""


def build_twin_core(
    settings: TwinSettings, seed: int, exposure_ms: float, names: DeviceNames
) -> tuple[UniMMCore, TwinRig]:
    """A `UniMMCore` with the twin's camera, XY stage and laser loaded and initialised."""
    if (names.laser_x_property, names.laser_y_property, names.laser_power_property) != (
        "X_um",
        "Y_um",
        "Power_mW",
    ):
        raise ValueError("devices: the twin laser exposes properties X_um, Y_um and Power_mW")
    rig = TwinRig(settings, seed, exposure_ms, names)
    core = UniMMCore()
    core.loadPyDevice("Camera", TwinCamera(rig))
    core.loadPyDevice("XY", TwinXYStage(rig))
    core.loadPyDevice(names.laser, TwinLaser(rig))
    core.loadPyDevice(names.slm, TwinSLM(rig))
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    core.setXYStageDevice("XY")
    core.setSLMDevice(names.slm)
    core.setExposure(exposure_ms)
    return core, rig
