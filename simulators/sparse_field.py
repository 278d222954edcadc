"""A sparse field of fluorescent objects over a large stage area, as UniMMCore devices.

Smart acquisition needs a sample where most of the stage is empty: a few cells or
beads scattered over millimetres, each a Gaussian blob. Photons scale with exposure x
illumination intensity (the light dose), so a low-dose screen frame is noisy and a
high-dose frame is clean; shot noise (Poisson) and read noise make that honest.
Only objects inside the current view are rendered, so a frame costs the same
whatever the stage area.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pymmcore_plus.experimental.unicore import (
    GenericDevice,
    SimpleCameraDevice,
    UniMMCore,
    XYStageDevice,
    pymm_property,
)


class SparseFieldConfig(BaseModel):
    """The sample and camera; every value has a physical range."""

    model_config = ConfigDict(extra="forbid")

    area_um: tuple[float, float] = (1000.0, 1000.0)  # stage area holding objects
    n_objects: int = Field(12, ge=0, le=100_000)
    object_sigma_um: float = Field(1.0, gt=0.0, le=50.0)  # blob size (PSF or cell)
    photons_per_ms: float = Field(60.0, gt=0.0, le=1e7)  # per object at full intensity
    brightness_spread: float = Field(0.3, ge=0.0, le=2.0)  # log-normal sigma
    background_per_px_ms: float = Field(0.05, ge=0.0, le=1e5)
    read_noise_e: float = Field(1.5, ge=0.0, le=100.0)
    width_px: int = Field(256, ge=16, le=4096)
    height_px: int = Field(256, ge=16, le=4096)
    pixel_um: float = Field(0.5, gt=0.0, le=100.0)
    offset_adu: float = Field(100.0, ge=0.0, le=10_000.0)

    @property
    def view_um(self) -> tuple[float, float]:
        return (self.width_px * self.pixel_um, self.height_px * self.pixel_um)


class SparseField:
    """Object positions (um, stage coordinates) and the frames a camera would see."""

    def __init__(self, config: SparseFieldConfig, seed: int) -> None:
        self.config = config
        rng = np.random.default_rng(seed)
        self.objects_um = rng.uniform((0.0, 0.0), config.area_um, size=(config.n_objects, 2))
        self.brightness = config.photons_per_ms * rng.lognormal(
            0.0, config.brightness_spread, size=config.n_objects
        )
        self._rng = np.random.default_rng(seed + 1)

    def in_view(self, stage_um: tuple[float, float], margin_um: float = 0.0) -> np.ndarray:
        """Indices of objects inside the view centred on the stage position."""
        half = np.asarray(self.config.view_um) / 2 - margin_um
        offset = np.abs(self.objects_um - np.asarray(stage_um))
        return np.flatnonzero(np.all(offset < half, axis=1))

    def render(
        self, stage_um: tuple[float, float], exposure_ms: float, intensity: float
    ) -> np.ndarray:
        """One uint16 frame: expected photons, then Poisson shot noise and read noise."""
        cfg = self.config
        dose = exposure_ms * intensity
        expected = np.full((cfg.height_px, cfg.width_px), cfg.background_per_px_ms * dose)
        sigma_px = cfg.object_sigma_um / cfg.pixel_um
        reach = int(np.ceil(4 * sigma_px))
        centre = np.array([cfg.width_px, cfg.height_px]) / 2
        for i in self.in_view(stage_um, margin_um=-reach * cfg.pixel_um):
            x, y = (self.objects_um[i] - np.asarray(stage_um)) / cfg.pixel_um + centre - 0.5
            cols = np.arange(max(int(x) - reach, 0), min(int(x) + reach + 1, cfg.width_px))
            rows = np.arange(max(int(y) - reach, 0), min(int(y) + reach + 1, cfg.height_px))
            if not len(cols) or not len(rows):
                continue
            gx = np.exp(-0.5 * ((cols - x) / sigma_px) ** 2)
            gy = np.exp(-0.5 * ((rows - y) / sigma_px) ** 2)
            amp = self.brightness[i] * dose / (2 * np.pi * sigma_px**2)
            expected[rows[:, None], cols[None, :]] += amp * gy[:, None] * gx[None, :]
        electrons = self._rng.poisson(expected).astype(np.float64)
        electrons += self._rng.normal(cfg.offset_adu, cfg.read_noise_e, size=electrons.shape)
        return np.clip(np.rint(electrons), 0, 65535).astype(np.uint16)


class FieldRig:
    """Shared state of the devices: stage position, exposure, illumination."""

    def __init__(self, field: SparseField, exposure_ms: float) -> None:
        self.field = field
        self.stage_um = (0.0, 0.0)
        self.exposure_ms = exposure_ms
        self.intensity = 1.0


class FieldCamera(SimpleCameraDevice):
    def __init__(self, rig: FieldRig) -> None:
        super().__init__()
        self._rig = rig

    def sensor_shape(self) -> tuple[int, int]:
        cfg = self._rig.field.config
        return (cfg.height_px, cfg.width_px)

    def dtype(self) -> Any:
        return np.uint16

    def get_exposure(self) -> float:
        return self._rig.exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._rig.exposure_ms = float(exposure)

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


class FieldStage(XYStageDevice):
    def __init__(self, rig: FieldRig) -> None:
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
        """Moves are instantaneous: nothing to stop."""


def build_field_core(
    config: SparseFieldConfig, seed: int, exposure_ms: float
) -> tuple[UniMMCore, FieldRig]:
    """UniMMCore with the sparse-field camera, XY stage and lamp ("Lamp", "intensity")."""
    rig = FieldRig(SparseField(config, seed), exposure_ms)
    core = UniMMCore()
    core.loadPyDevice("Camera", FieldCamera(rig))
    core.loadPyDevice("XY", FieldStage(rig))
    core.loadPyDevice("Lamp", FieldLamp(rig))
    core.initializeAllDevices()
    core.setCameraDevice("Camera")
    core.setXYStageDevice("XY")
    core.setExposure(exposure_ms)
    core.setAutoShutter(False)
    return core, rig
