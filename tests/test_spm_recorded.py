"""A recorded SPM grid from a real instrument, in pycroscopy's HDF5 layouts (USID and
sidpy/pyNSID), replays through the same SPM plan with its channels named as the file
names them. The files are written here with plain h5py, as the layouts specify them."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console

from agent.config import ConfigError
from drivers.spm_recorded import load_hdf5_grid
from drivers.spm_twin_backend import ReplayBackend

pytestmark = pytest.mark.timeout(180)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _twin_grid(tmp_path: Path, cells: int) -> dict[str, np.ndarray]:
    from simulators.spm import FerroelectricSample, export_twin_grid

    path = export_twin_grid(FerroelectricSample(seed=4), tmp_path / "twin.npz", grid=cells)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _ancillary(group: h5py.Group, kind: str, labels: list[str], units: list[str], inds, vals):
    out = []
    for suffix, arr in (("Indices", inds), ("Values", vals)):
        d = group.create_dataset(f"{kind}_{suffix}", data=arr)
        d.attrs["labels"] = labels
        d.attrs["units"] = units
        out.append(d)
    return out


def _usid_main(group, name, quantity, units, data2d, pos, spec) -> None:
    """A USID Main dataset: (positions, spectroscopic) with references to its indices."""
    main = group.create_dataset(name, data=data2d)
    main.attrs["quantity"] = quantity
    main.attrs["units"] = units
    names = ("Position_Indices", "Position_Values", "Spectroscopic_Indices", "Spectroscopic_Values")
    for attr, dset in zip(names, [*pos, *spec], strict=True):
        main.attrs[attr] = dset.ref


def _positions(group: h5py.Group, rows: int, cols: int, ex: float, ey: float) -> list:
    """USID position indices / values (m) of a rows x cols raster, X varying fastest."""
    iy, ix = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    inds = np.stack([ix.ravel(), iy.ravel()], 1).astype(np.uint32)
    vals = (inds + 0.5) * np.array([ex / cols, ey / rows])
    return _ancillary(group, "Position", ["X", "Y"], ["m", "m"], inds, vals)


def _usid_image(group: h5py.Group, name: str, units: str, image: np.ndarray, ex, ey) -> None:
    arb = _ancillary(
        group, "Spectroscopic", ["arb"], ["a.u."], np.zeros((1, 1), np.uint32), np.zeros((1, 1))
    )
    pos = _positions(group, *image.shape, ex, ey)
    _usid_main(group, "Raw_Data", name, units, image.reshape(-1, 1), pos, arb)


def write_usid_grid(path: Path, grid: dict[str, np.ndarray], image_zoom: int = 2) -> Path:
    """A band-excitation-style USID file: a topography channel at `image_zoom` x the loop
    grid's resolution (its own positions) and a loop grid over DC_Offset (V)."""
    spectra, v = grid["spectra"], grid["waveform"]
    h, w, n = spectra.shape
    ex, ey = (float(e) * 1e-6 for e in grid["extent_um"])

    with h5py.File(path, "w") as f:
        loops = f.create_group("Measurement_000/Channel_000")
        spec = _ancillary(
            loops,
            "Spectroscopic",
            ["DC_Offset"],
            ["V"],
            np.arange(n)[None].astype(np.uint32),
            v[None],
        )
        pos = _positions(loops, h, w, ex, ey)
        _usid_main(loops, "Raw_Data", "Piezoresponse", "pm", spectra.reshape(h * w, n), pos, spec)
        height = np.repeat(np.repeat(grid["image"][0], image_zoom, 0), image_zoom, 1)
        _usid_image(
            f.create_group("Measurement_000/Channel_001"), "HeightRetrace", "nm", height, ex, ey
        )
    return path


def write_usid_with_real_scans(path: Path, grid: dict[str, np.ndarray], scan: Path) -> Path:
    """A real PFM scan's channels (256 x 256, m and deg, as the instrument named them)
    over the area of a coarser loop grid, each its own USID Main dataset."""
    write_usid_grid(path, grid)
    ex, ey = (float(e) * 1e-6 for e in grid["extent_um"])
    with np.load(scan) as real, h5py.File(path, "a") as f:
        for k, (name, units) in enumerate(
            [("HeightRetrace", "m"), ("AmplitudeRetrace", "m"), ("PhaseRetrace", "deg")]
        ):
            group = f.create_group(f"Measurement_001/Channel_{k:03d}")
            _usid_image(group, name, units, np.asarray(real[name], float), ex, ey)
    return path


def write_sidpy_grid(path: Path, grid: dict[str, np.ndarray]) -> Path:
    """The sidpy Dataset layout pyNSID writes: N-D data (x, y[, bias]) with one dimension
    scale per axis (DTMicroscope's recorded AFM files are saved this way)."""
    spectra, v = grid["spectra"], grid["waveform"]
    h, w, _ = spectra.shape
    ex, ey = (float(e) * 1e-6 for e in grid["extent_um"])
    with h5py.File(path, "w") as f:
        for k, (name, quantity, units, data, kind) in enumerate(
            [
                ("loops", "Response", "pm", np.transpose(spectra, (1, 0, 2)), "SPECTRAL_IMAGE"),
                ("topo", "Height", "nm", grid["image"][0].T, "IMAGE"),
                ("pol", "Polarization", "a.u.", grid["image"][1].T, "IMAGE"),
            ]
        ):
            group = f.create_group(f"Measurement_000/Channel_{k:03d}/{name}")
            main = group.create_dataset(name, data=data)
            attrs = {
                "quantity": quantity,
                "units": units,
                "main_data_name": name,
                "pyNSID_version": "0.0.7",
                "data_type": kind,
                "modality": "PFM",
                "source": "test",
                "title": name,
            }
            main.attrs.update(attrs)
            axes = [
                ("x", (np.arange(w) + 0.5) * ex / w, "m", "spatial"),
                ("y", (np.arange(h) + 0.5) * ey / h, "m", "spatial"),
                ("DC Offset", v, "V", "spectral"),
            ][: data.ndim]
            for i, (label, values, unit, dim_type) in enumerate(axes):
                scale = group.create_dataset(label, data=values)
                scale.attrs.update(
                    {"name": label, "units": unit, "quantity": label, "dimension_type": dim_type}
                )
                scale.make_scale(label)
                main.dims[i].label = label
                main.dims[i].attach_scale(scale)
    return path


def test_usid_grid_reads_with_its_own_channel_names_units_and_extent(tmp_path: Path) -> None:
    grid = _twin_grid(tmp_path, 8)
    replay, channels = load_hdf5_grid(write_usid_grid(tmp_path / "be.h5", grid))
    assert channels == (("HeightRetrace", "m", 1e-9),)
    assert replay.spectra.shape == (8, 8, grid["waveform"].size)
    np.testing.assert_allclose(replay.spectra, grid["spectra"], rtol=1e-6)  # pm, (Y, X, L)
    np.testing.assert_allclose(replay.image[0], grid["image"][0], rtol=1e-6)  # 16x16 -> 8x8
    np.testing.assert_allclose(replay.extent_um, grid["extent_um"])
    np.testing.assert_allclose(replay.waveform, grid["waveform"])


def test_sidpy_grid_reads_x_first_axes_into_rows_and_columns(tmp_path: Path) -> None:
    grid = _twin_grid(tmp_path, 6)
    replay, channels = load_hdf5_grid(write_sidpy_grid(tmp_path / "nsid.h5", grid))
    assert [c[0] for c in channels] == ["Height", "Polarization"]
    np.testing.assert_allclose(replay.spectra, grid["spectra"], rtol=1e-6)
    np.testing.assert_allclose(replay.image, grid["image"][:2], rtol=1e-6)
    backend = ReplayBackend(tmp_path / "nsid.h5")
    assert backend.default_channels == ("Height (m)", "Polarization (a.u.)")


def test_hdf5_without_a_loop_grid_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "image-only.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("junk", data=np.zeros(3))
    with pytest.raises(ValueError, match=r"^replay: image-only.h5 has no spectral image") as err:
        load_hdf5_grid(path)
    assert "\n" not in str(err.value)


def test_replay_config_runs_on_a_recorded_usid_grid(tmp_path: Path) -> None:
    from agent.plans.spm_active import run_spm_active

    path = write_usid_grid(tmp_path / "be.h5", _twin_grid(tmp_path, 10))
    overrides = [
        f"runs_dir={tmp_path}",
        f"driver.replay={path}",
        "grid=10",
        "policy.kind=random",
        "policy.budget=12",
        "scan_channels=[HeightRetrace]",
    ]
    summary = run_spm_active(CONFIGS / "replay-spm-dkl.yaml", overrides, Console(quiet=True))
    assert summary["measured"] == 12 and summary["grid_points"] == 100
    assert "top1pct_found" not in summary  # a recorded grid has no truth topic
    assert np.isfinite(summary["best_reward"])


def test_a_channel_the_file_lacks_fails_in_one_line_naming_its_channels(tmp_path: Path) -> None:
    from agent.plans.spm_active import run_spm_active

    path = write_usid_grid(tmp_path / "be.h5", _twin_grid(tmp_path, 6))
    overrides = [f"runs_dir={tmp_path}", f"driver.replay={path}", "scan_channels=[Height]"]
    with pytest.raises(ConfigError) as err:
        run_spm_active(CONFIGS / "replay-spm-dkl.yaml", overrides, Console(quiet=True))
    message = str(err.value)
    assert "\n" not in message and "scan_channels" in message
    assert "'Height'" in message and "HeightRetrace" in message


def test_an_npz_without_channel_names_lists_its_generic_ones(tmp_path: Path) -> None:
    """The case of the issue: a converted grid whose channels the file does not name."""
    from agent.plans.spm_active import run_spm_active

    grid = _twin_grid(tmp_path, 6)
    path = tmp_path / "unnamed.npz"
    np.savez(path, **{k: v for k, v in grid.items() if k != "channels"})
    overrides = [f"runs_dir={tmp_path}", f"driver.replay={path}", "scan_channels=[Height]"]
    with pytest.raises(ConfigError, match=r"'Channel 0', 'Channel 1'") as err:
        run_spm_active(CONFIGS / "replay-spm-dkl.yaml", overrides, Console(quiet=True))
    assert "\n" not in str(err.value)


def test_real_pfm_scans_on_their_own_raster_line_up_with_the_loop_grid(tmp_path: Path) -> None:
    scan = Path(__file__).resolve().parents[1].parent / "shared/data/pfm-pto/pto_scan_1.npz"
    if not scan.is_file():
        pytest.skip("the shared real PFM scans are not beside this checkout")
    grid = _twin_grid(tmp_path, 8)
    path = write_usid_with_real_scans(tmp_path / "real.h5", grid, scan)
    replay, channels = load_hdf5_grid(path)
    names = [c[0] for c in channels]
    assert names[1:] == ["HeightRetrace", "AmplitudeRetrace", "PhaseRetrace"]
    assert [c[1] for c in channels[1:]] == ["m", "m", "deg"]
    with np.load(scan) as real:
        height = np.asarray(real["HeightRetrace"], float)
    # a loop cell's centre falls between 4 scan pixels (16 + 32 k): one of them is taken
    edge = ((np.arange(8) + 0.5) * 256 / 8).astype(int)
    near = [height[np.ix_(edge - dr, edge - dc)] for dr in (0, 1) for dc in (0, 1)]
    assert np.all(np.any([np.isclose(replay.image[1], n, rtol=0, atol=0) for n in near], 0))
    assert not np.allclose(replay.image[1], replay.image[1].mean())  # a real image, not flat
    backend = ReplayBackend(path)
    assert "PhaseRetrace (deg)" in backend.default_channels
