"""The particle twin as pure-Python Micro-Manager devices in pymmcore-plus `UniMMCore`.

The driver node then talks to the twin exactly as it talks to hardware: through
core calls (`setProperty`, `setXYPosition`, sequence acquisition). Pacing lives
here, not in the simulator: each exposure is integrated sub-step by sub-step on
the wall clock, and a laser command takes effect at the next sub-step after it
arrives, so loop delay is real.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    SimpleCameraDevice,
    UniMMCore,
    XYStageDevice,
    pymm_property,
)

from drivers.config import DeviceNames, TwinSettings
from policies.contract import LaserSpot
from simulators.scene import ParticleScene

# The twin laser's own physical ceiling; the driver's configured limit is stricter.
TWIN_LASER_MAX_MW = 1000.0
TRUTH_RING = 256


def _sleep_until(deadline_s: float) -> None:
    """Sleep to a monotonic deadline; the last fraction of a ms is spun for accuracy."""
    while True:
        remaining = deadline_s - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(remaining - 0.0003 if remaining > 0.0008 else 0)


class TwinRig:
    """Shared state between the twin devices: the scene, the stage and the laser."""

    def __init__(self, settings: TwinSettings, seed: int, exposure_ms: float) -> None:
        self.settings = settings
        self.scene = ParticleScene(
            settings.particles, settings.camera, seed=seed, substeps=settings.substeps
        )
        self.exposure_ms = exposure_ms
        self.stage_um = (0.0, 0.0)
        # The laser is set property by property; the twin reads one consistent snapshot.
        self.laser_x_um = 0.0
        self.laser_y_um = 0.0
        self.laser_power_mw = 0.0
        self.frame_index = 0
        self._truth: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._next_start_s = 0.0

    def laser_spots(self) -> tuple[LaserSpot, ...]:
        if self.laser_power_mw <= 0:
            return ()
        # Laser coordinates are in the camera field; the twin works in sample coordinates.
        sx, sy = self.stage_um
        return (LaserSpot(self.laser_x_um + sx, self.laser_y_um + sy, self.laser_power_mw),)

    def acquire(self, buffer: np.ndarray) -> dict[str, Any]:
        """Integrate one exposure (paced in real time) into `buffer`; return metadata."""
        exposure_s = self.exposure_ms / 1000.0
        substeps = self.settings.substeps
        realtime = self.settings.realtime
        t0 = max(time.monotonic(), self._next_start_s) if realtime else time.monotonic()
        if realtime:
            _sleep_until(t0)
        laser_log: list[tuple[float, float, float]] = []

        def before_substep(k: int, _t_s: float) -> None:
            if realtime:
                _sleep_until(t0 + k * exposure_s / substeps)
            spots = self.laser_spots()
            self.scene.twin.set_laser(spots)
            laser_log.append(
                (spots[0].x_um, spots[0].y_um, spots[0].power_mw) if spots else (0.0, 0.0, 0.0)
            )

        stage = self.stage_um
        _, positions = self.scene.expose(
            exposure_s, before_substep=before_substep, out=buffer, view_offset_um=stage
        )
        t_end = t0 + exposure_s
        if realtime:
            _sleep_until(t_end)
        self._next_start_s = t_end + self.settings.readout_ms / 1000.0
        with self._lock:
            index = self.frame_index
            self.frame_index += 1
            self._truth[index] = {
                "positions_um": (positions.mean(axis=0) - np.asarray(stage)).tolist(),
                "end_positions_um": (positions[-1] - np.asarray(stage)).tolist(),
                "laser_substeps": laser_log,
                "t_s": self.scene.twin.t_s,
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


class TwinCamera(SimpleCameraDevice):
    """Camera whose photons come from the particle scene."""

    def __init__(self, rig: TwinRig) -> None:
        super().__init__()
        self._rig = rig

    def sensor_shape(self) -> tuple[int, int]:
        cam = self._rig.settings.camera
        return (cam.height_px, cam.width_px)

    def dtype(self) -> Any:
        return np.uint16

    def get_exposure(self) -> float:
        return self._rig.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._rig.exposure_ms = float(exposure)

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

    @pymm_property(limits=(-1e6, 1e6), name="Y_um")
    def y_um(self) -> float:
        return self._rig.laser_y_um

    @y_um.setter
    def y_um(self, value: float) -> None:
        self._rig.laser_y_um = float(value)

    @pymm_property(limits=(0.0, TWIN_LASER_MAX_MW), name="Power_mW")
    def power_mw(self) -> float:
        return self._rig.laser_power_mw

    @power_mw.setter
    def power_mw(self, value: float) -> None:
        self._rig.laser_power_mw = float(value)


class TwinXYStage(XYStageDevice):
    """A motorised XY stage that shifts the camera's view over the sample."""

    def __init__(self, rig: TwinRig) -> None:
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
    rig = TwinRig(settings, seed, exposure_ms)
    core = UniMMCore()
    core.loadPyDevice("Camera", TwinCamera(rig))
    core.loadPyDevice("XY", TwinXYStage(rig))
    core.loadPyDevice(names.laser, TwinLaser(rig))
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    core.setXYStageDevice("XY")
    core.setExposure(exposure_ms)
    return core, rig
