"""A sparse field of fluorescent objects over a large stage area (devices:
`drivers.field_devices`).

Smart acquisition needs a sample where most of the stage is empty: a few cells or
beads scattered over millimetres, each a Gaussian blob. Photons scale with exposure x
illumination intensity (the light dose), so a low-dose screen frame is noisy and a
high-dose frame is clean; shot noise (Poisson) and read noise make that honest.
Only objects inside the current view are rendered, so a frame costs the same
whatever the stage area.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


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
