"""Recorded SPM grids from a real instrument, read from HDF5 in pycroscopy's layouts.

A band-excitation or switching-spectroscopy grid is saved by the field's tools either
as USID (pyUSID: a 2-D "Main" dataset, positions x spectroscopic steps, with
Position/Spectroscopic Indices and Values) or as sidpy Datasets (pyNSID: N-D data with
one dimension scale per axis). Both are read here with their own libraries into the
replay grid the Nanonis replay backend serves: image channels (C, H, W) named as the
file names them (its `quantity`, with its `units`), spectra (H, W, L) over the bias
axis, and the physical extent. Every unreadable file is one ValueError line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulators.spm import ReplayGrid

PM = 1e-12
# Lengths to metres and angles to degrees: what the Nanonis signals speak.
LENGTH_TO_M = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "nm": 1e-9, "pm": 1e-12}
VOLT = {"v": 1.0, "volt": 1.0, "volts": 1.0, "mv": 1e-3}
Channel = tuple[str, str, float]  # label, SI unit, factor from the file's unit to it


@dataclass(frozen=True)
class Recorded:
    """One dataset of the file: data with axes (H=y, W=x[, L]), named as the file names it."""

    name: str
    units: str
    data: np.ndarray  # (H, W) image or (H, W, L) spectra
    x_m: np.ndarray | None  # pixel centres along x, metres (None: no length axis)
    y_m: np.ndarray | None
    bias_v: np.ndarray | None  # spectra only: the bias of each step


def channel_of(name: str, units: str) -> Channel:
    """(label, SI unit, factor) of a recorded image channel; unknown units are a.u."""
    u = units.strip()
    label = " ".join(name.replace("_", " ").split())[:30] or "Channel"
    if u in LENGTH_TO_M:
        return label, "m", LENGTH_TO_M[u]
    if u.lower() in ("deg", "degree", "degrees", "°"):
        return label, "deg", 1.0
    if u.lower() in ("rad", "radian", "radians"):
        return label, "deg", 180.0 / math.pi
    if u.lower() in VOLT:
        return label, "V", VOLT[u.lower()]
    return label, "a.u.", 1.0


def _axis_m(values: np.ndarray, units: str) -> np.ndarray | None:
    scale = LENGTH_TO_M.get(units.strip())
    return None if scale is None else np.asarray(values, dtype=np.float64) * scale


def _bias(values: np.ndarray, units: str, where: str) -> np.ndarray:
    scale = VOLT.get(units.strip().lower())
    if scale is None:
        raise ValueError(f"{where}: spectroscopic axis in {units!r}, expected a bias in V")
    return np.asarray(values, dtype=np.float64) * scale


def _usid_datasets(path: Path) -> list[Recorded]:
    """Every USID Main dataset with two position dimensions (X, Y) and at most one
    spectroscopic dimension longer than 1."""
    import h5py
    import pyUSID

    out: list[Recorded] = []
    with h5py.File(path, "r") as f:
        for main in pyUSID.hdf_utils.get_all_main(f):
            pos = list(main.pos_dim_labels)
            spec = [
                (k, n) for k, n in enumerate(main.spec_dim_labels) if main.spec_dim_sizes[k] > 1
            ]
            where = f"{Path(main.name).name} ({main.name})"
            if len(pos) != 2 or len(spec) > 1:
                continue
            data = np.asarray(main.get_n_dim_form(), dtype=np.float64)
            data = data.reshape(data.shape[0], data.shape[1], -1)  # (pos0, pos1, L)
            xi = next((k for k, n in enumerate(pos) if n.lower().startswith("x")), 0)
            data = np.moveaxis(data, [xi, 1 - xi], [1, 0])  # (Y, X[, L])
            units = dict(zip(pos, main.pos_dim_descriptors, strict=True))
            x_unit = units[pos[xi]].rsplit("(", 1)[-1].rstrip(")")
            y_unit = units[pos[1 - xi]].rsplit("(", 1)[-1].rstrip(")")
            bias = None
            if spec:
                k, label = spec[0]
                unit = main.spec_dim_descriptors[k].rsplit("(", 1)[-1].rstrip(")")
                bias = _bias(main.get_spec_values(label), unit, where)
            elif data.ndim == 3:
                data = data[..., 0]
            out.append(
                Recorded(
                    str(main.attrs.get("quantity", Path(main.name).name)),
                    str(main.attrs.get("units", "a.u.")),
                    data,
                    _axis_m(main.get_pos_values(pos[xi]), x_unit),
                    _axis_m(main.get_pos_values(pos[1 - xi]), y_unit),
                    bias,
                )
            )
    return out


def _nsid_datasets(path: Path) -> list[Recorded]:
    """Every sidpy Dataset (pyNSID layout) with two spatial axes and at most one spectral."""
    import h5py
    from pyNSID.io.hdf_utils import get_all_main, read_h5py_dataset

    out: list[Recorded] = []
    with h5py.File(path, "r") as f:
        for h5 in get_all_main(f):
            ds = read_h5py_dataset(h5)
            axes = [ds._axes[k] for k in range(ds.ndim)]
            spatial = [k for k, a in enumerate(axes) if a.dimension_type.name == "SPATIAL"]
            others = [k for k in range(ds.ndim) if k not in spatial]
            spectral = [k for k in others if len(axes[k].values) > 1]
            if len(spatial) != 2 or len(spectral) > 1:
                continue
            first_is_x = str(axes[spatial[0]].name).lower().startswith("x")
            xi, yi = spatial if first_is_x else spatial[::-1]
            data = np.transpose(np.asarray(ds, dtype=np.float64), [yi, xi, *others])
            data = data.reshape(data.shape[0], data.shape[1], -1)
            if not spectral:
                data = data[..., 0]
            quantity = str(ds.quantity)
            name = quantity if quantity and quantity != "generic" else str(ds.title)
            out.append(
                Recorded(
                    name,
                    str(ds.units),
                    data,
                    _axis_m(axes[xi].values, str(axes[xi].units)),
                    _axis_m(axes[yi].values, str(axes[yi].units)),
                    _bias(axes[spectral[0]].values, str(axes[spectral[0]].units), h5.name)
                    if spectral
                    else None,
                )
            )
    return out


def _step(axis: np.ndarray | None, n: int) -> float | None:
    if axis is None or n < 2:
        return None
    step = abs(float(axis[-1]) - float(axis[0])) / (n - 1)
    return step if math.isfinite(step) and step > 0 else None


def _nearest(src: np.ndarray | None, dst: np.ndarray | None, n_src: int, n_dst: int) -> np.ndarray:
    """Index of the source pixel nearest each destination centre."""
    if src is None or dst is None:  # no positions: both span the same area
        return np.minimum(((np.arange(n_dst) + 0.5) * n_src / n_dst).astype(int), n_src - 1)
    return np.abs(src[None, :] - dst[:, None]).argmin(axis=1)


def _on_grid(image: Recorded, spectra: Recorded) -> np.ndarray:
    """The image at the spectral grid's cell centres (nearest pixel by position), so a
    256 x 256 topography and a 50 x 50 loop grid recorded over one area line up."""
    h, w = spectra.data.shape[:2]
    if image.data.shape == (h, w):
        return image.data
    ih, iw = image.data.shape
    rows = _nearest(image.y_m, spectra.y_m, ih, h)
    cols = _nearest(image.x_m, spectra.x_m, iw, w)
    return image.data[np.ix_(rows, cols)]


def load_hdf5_grid(path: str | Path) -> tuple[ReplayGrid, tuple[Channel, ...]]:
    """A replay grid and its image channels (label, SI unit, factor) from a USID or
    sidpy-layout HDF5 file; spectra are stored in pm (a.u. responses are kept as is)."""
    p = Path(path)
    try:
        found = _usid_datasets(p) or _nsid_datasets(p)
    except (OSError, KeyError, TypeError) as exc:
        raise ValueError(f"replay: {p.name} cannot be read as USID or sidpy HDF5: {exc}") from None
    spectra = [d for d in found if d.bias_v is not None]
    images = [d for d in found if d.bias_v is None]
    if not spectra:
        names = [d.name for d in found] or "none"
        raise ValueError(
            f"replay: {p.name} has no spectral image (X, Y, bias) dataset; datasets: {names}"
        )
    grid_data = spectra[0]
    if not images:
        raise ValueError(
            f"replay: {p.name} has no image (X, Y) dataset to scan, only spectra "
            f"{[d.name for d in spectra]}"
        )
    h, w, _ = grid_data.data.shape
    sx, sy = _step(grid_data.x_m, w), _step(grid_data.y_m, h)
    extent = (w * sx * 1e6, h * sy * 1e6) if sx and sy else (float(w), float(h))
    unit = grid_data.units.strip()
    to_pm = LENGTH_TO_M[unit] / PM if unit in LENGTH_TO_M else 1.0
    channels = tuple(channel_of(d.name, d.units) for d in images)
    image = np.stack([_on_grid(d, grid_data) for d in images])
    for name, arr in (("image", image), ("spectra", grid_data.data), ("bias", grid_data.bias_v)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"replay: {p.name}: {name} contains non-finite values")
    assert grid_data.bias_v is not None
    grid = ReplayGrid(
        image=image, spectra=grid_data.data * to_pm, waveform=grid_data.bias_v, extent_um=extent
    )
    return grid, channels
