"""The sparse-field twin (`simulators.sparse_field`) as pymmcore-plus UniMMCore devices:
camera, lamp (its intensity x exposure is the light dose) and the twin's XY stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    UniMMCore,
    pymm_property,
)

from drivers.twin_devices import RigCamera, TwinXYStage
from simulators.sparse_field import SparseField, SparseFieldConfig


class FieldRig:
    """Shared state of the devices: stage position, exposure, illumination."""

    def __init__(self, field: SparseField, exposure_ms: float) -> None:
        self.field = field
        self.stage_um = (0.0, 0.0)
        self.exposure_ms = exposure_ms
        self.intensity = 1.0


class FieldCamera(RigCamera):
    """Camera over the sparse field, at the rig's stage position and illumination."""

    def sensor_shape(self) -> tuple[int, int]:
        cfg = self._rig.field.config
        return (cfg.height_px, cfg.width_px)

    def snap(self, buffer: np.ndarray) -> Mapping[str, Any]:
        rig = self._rig
        buffer[:] = rig.field.render(rig.stage_um, rig.exposure_ms, rig.intensity)
        return {"stage_um": list(rig.stage_um), "intensity": rig.intensity}


class FieldLamp(GenericDevice):
    """Excitation lamp: relative intensity 0-1 (dose = exposure x intensity)."""

    def __init__(self, rig: FieldRig) -> None:
        super().__init__()
        self._rig = rig

    @pymm_property(limits=(0.0, 1.0))
    def intensity(self) -> float:
        return self._rig.intensity

    @intensity.setter
    def intensity(self, value: float) -> None:
        self._rig.intensity = float(value)


def build_field_core(
    config: SparseFieldConfig, seed: int, exposure_ms: float
) -> tuple[UniMMCore, FieldRig]:
    """UniMMCore with the sparse-field camera, XY stage and lamp ("Lamp", "intensity")."""
    rig = FieldRig(SparseField(config, seed), exposure_ms)
    core = UniMMCore()
    core.loadPyDevice("Camera", FieldCamera(rig))
    core.loadPyDevice("XY", TwinXYStage(rig))
    core.loadPyDevice("Lamp", FieldLamp(rig))
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    core.setXYStageDevice("XY")
    core.setExposure(exposure_ms)
    core.setAutoShutter(False)
    return core, rig
