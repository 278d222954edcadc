"""Replay grids: pre-acquired image + spectra on a regular grid (DTMicroscope-style).

A replay file lets policies be evaluated on recorded (or twin-exported) data: the
"measurement" at a position is the nearest stored spectrum. Validation errors are one
line and name the offending key so a bad file is fixed without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulators.spm.sample import FerroelectricSample
from simulators.spm.spectroscopy import SwitchingSpectroscopy, triangular_waveform


@dataclass(frozen=True)
class ReplayGrid:
    """image (C, H, W), spectra (H, W, L) over waveform (L,), spanning extent_um (w, h)."""

    image: np.ndarray
    spectra: np.ndarray
    waveform: np.ndarray
    extent_um: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the spectral grid."""
        return (int(self.spectra.shape[0]), int(self.spectra.shape[1]))

    def index_of(self, x_um: float, y_um: float) -> tuple[int, int]:
        """Nearest grid cell (row, col) of a position; positions outside are clipped."""
        h, w = self.shape
        j = min(max(int(x_um / self.extent_um[0] * w), 0), w - 1)
        i = min(max(int(y_um / self.extent_um[1] * h), 0), h - 1)
        return i, j

    def spectrum_at(self, x_um: float, y_um: float) -> np.ndarray:
        """The stored spectrum (L,) of the nearest grid cell."""
        i, j = self.index_of(x_um, y_um)
        return self.spectra[i, j]


def load_replay_grid(path: str | Path) -> ReplayGrid:
    """Load and validate a replay NPZ; raises a one-line ValueError naming the bad key."""
    with np.load(path, allow_pickle=False) as data:
        for key in ("image", "spectra", "waveform"):
            if key not in data.files:
                raise ValueError(f"{key}: missing from {Path(path).name}")
        image = np.asarray(data["image"], dtype=np.float64)
        spectra = np.asarray(data["spectra"], dtype=np.float64)
        waveform = np.asarray(data["waveform"], dtype=np.float64)
        extent = (
            np.asarray(data["extent_um"], dtype=np.float64) if "extent_um" in data.files else None
        )
    if image.ndim != 3:
        raise ValueError(f"image: expected 3-D (C, H, W), got shape {image.shape}")
    if spectra.ndim != 3:
        raise ValueError(f"spectra: expected 3-D (H, W, L), got shape {spectra.shape}")
    if spectra.shape[:2] != image.shape[1:]:
        raise ValueError(f"spectra: shape {spectra.shape} does not match image {image.shape}")
    if waveform.ndim != 1 or waveform.shape[0] != spectra.shape[2]:
        raise ValueError(f"waveform: shape {waveform.shape} does not match spectra {spectra.shape}")
    if extent is None:
        ext = (float(image.shape[2]), float(image.shape[1]))
    elif extent.shape != (2,) or not np.all(np.isfinite(extent)) or np.any(extent <= 0):
        raise ValueError(f"extent_um: expected 2 positive numbers, got {extent.tolist()}")
    else:
        ext = (float(extent[0]), float(extent[1]))
    for key, arr in (("image", image), ("spectra", spectra), ("waveform", waveform)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{key}: contains non-finite values")
    return ReplayGrid(image=image, spectra=spectra, waveform=waveform, extent_um=ext)


def export_twin_grid(
    sample: FerroelectricSample,
    path: str | Path,
    grid: int = 50,
    waveform: np.ndarray | None = None,
    seed: int = 0,
) -> Path:
    """Write a replay NPZ from the twin: grid x grid spectra over the whole sample.

    Image channels: height_nm, polarization, wall_distance_um, loop_area (ground truth at
    the cell centres). Spectra are measured on a copy-free spectroscope with switching
    off, so the exported grid is a snapshot of the unperturbed sample.
    """
    from simulators.spm.spectroscopy import SpectroscopyConfig

    v = triangular_waveform() if waveform is None else np.asarray(waveform, dtype=float)
    spec = SwitchingSpectroscopy(
        sample, SpectroscopyConfig(switching=False, tip_wear_per_spectrum=0.0), seed=seed
    )
    ex, ey = sample.extent_um
    xs = (np.arange(grid) + 0.5) * ex / grid
    ys = (np.arange(grid) + 0.5) * ey / grid
    spectra = np.empty((grid, grid, v.size), dtype=np.float32)
    maps = sample.property_maps()
    names = ("height_nm", "polarization", "wall_distance_um", "loop_area")
    image = np.empty((len(names), grid, grid), dtype=np.float32)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            spectra[i, j] = spec.spectrum(float(x), float(y), v)["response_pm"]
            r, c = sample.index_of(float(x), float(y))
            image[:, i, j] = [maps[n][r, c] for n in names]
    out = Path(path)
    np.savez_compressed(
        out,
        image=image,
        spectra=spectra,
        waveform=v.astype(np.float32),
        extent_um=np.array([ex, ey]),
        channels=np.array(names),
    )
    return out
