"""Ground truth of the PFM twin, on the driver side, for evaluation and training only
(never for policies): the twin is built here, where the instrument lives.

What it gives is raw physics, in the instrument's units (loops in pm over a bias
waveform in V, wall masks, scans); the agent turns it into rewards and network inputs
with its own code, so drivers still import nothing of `policies`. A run reaches it
through `drivers.spm_host.SpmHost.truth`, which exists only when the host runs a twin
or a replay grid; a real controller has no truth and the scores are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulators.spm import (
    FerroelectricSample,
    FerroelectricSampleConfig,
    PFMScanner,
    ReplayGrid,
    ScanConfig,
    SpectroscopyConfig,
    SwitchingSpectroscopy,
    triangular_waveform,
)

# Multiplicative (noise, drift) and additive (phase offset, deg) ranges of the scan
# nuisances drawn per training/calibration scan; the twin defaults sit inside them.
SCAN_JITTER = {"noise": (0.5, 2.0), "drift": (0.0, 2.0), "phase_offset_deg": (0.0, 30.0)}


def twin_spectra(
    sample: FerroelectricSample, xy_um: np.ndarray, waveform: np.ndarray, seed: int
) -> np.ndarray:
    """(N, L) loops at sample positions, switching and tip wear off (a snapshot)."""
    spec = SwitchingSpectroscopy(
        sample, SpectroscopyConfig(switching=False, tip_wear_per_spectrum=0.0), seed=seed
    )
    return np.stack(
        [np.asarray(spec.spectrum(float(x), float(y), waveform)["response_pm"]) for x, y in xy_um]
    )


def twin_true_spectra(
    seed: int,
    xy_um: np.ndarray,
    waveform: np.ndarray | None = None,
    sample_config: FerroelectricSampleConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(waveform, (N, L) loops) at sample positions (um from the corner) of twin `seed`,
    measured on an unperturbed copy of the sample."""
    v = triangular_waveform() if waveform is None else np.asarray(waveform, float)
    sample = FerroelectricSample(sample_config, seed=seed)
    return v, twin_spectra(sample, xy_um, v, seed + 7919)


def replay_true_spectra(grid: ReplayGrid, xy_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(waveform, (N, L)) the stored spectrum nearest each position of a replay grid."""
    return grid.waveform, np.stack([grid.spectrum_at(x, y) for x, y in xy_um])


def wall_mask(
    sample: FerroelectricSample,
    window_um: tuple[float, float, float, float],
    shape: tuple[int, int],
    drift_um: np.ndarray | None = None,
    tol_px: float = 0.75,
) -> np.ndarray:
    """(H, W) bool: pixel centre (plus that line's drift) within tol_px pixels of a wall."""
    x0, y0, w, h = window_um
    ny, nx = shape
    xs = x0 + (np.arange(nx) + 0.5) * w / nx
    ys = y0 + (np.arange(ny) + 0.5) * h / ny
    dr = np.zeros((ny, 2)) if drift_um is None else np.asarray(drift_um, float)
    p = sample.pixel_um
    fy, fx = sample.wall_distance_um.shape
    cols = np.clip(((xs[None, :] + dr[:, :1]) / p).astype(int), 0, fx - 1)
    rows = np.clip(((ys[:, None] + dr[:, 1:2]) / p).astype(int), 0, fy - 1)
    dist = sample.wall_distance_um[rows, cols]
    return dist <= tol_px * max(w / nx, h / ny)


def jittered_scan_config(seed: int) -> ScanConfig:
    """A ScanConfig with nuisances drawn from SCAN_JITTER (deterministic in seed)."""
    base = ScanConfig()
    rng = np.random.default_rng(seed + 55_555)
    noise = float(np.exp(rng.uniform(*np.log(SCAN_JITTER["noise"]))))
    drift = float(rng.uniform(*SCAN_JITTER["drift"]))
    return base.model_copy(
        update={
            "amplitude_noise_pm": base.amplitude_noise_pm * noise,
            "height_noise_nm": base.height_noise_nm * noise,
            "drift_um_s": tuple(drift * v for v in base.drift_um_s),
            "phase_offset_deg": float(rng.uniform(*SCAN_JITTER["phase_offset_deg"])),
        }
    )


def labelled_scans(
    seeds: list[int],
    pixels: int = 96,
    jitter: bool = False,
    sample_config: FerroelectricSampleConfig | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Full-sample twin scans ({"Amplitude" pm, "Phase" deg, "Height" nm}) and their true
    wall masks, one per seed; `jitter` draws scan nuisances per seed (SCAN_JITTER)."""
    scans, masks = [], []
    for seed in seeds:
        sample = FerroelectricSample(sample_config, seed=seed)
        cfg = jittered_scan_config(seed) if jitter else ScanConfig()
        window = (0.0, 0.0, *sample.extent_um)
        r = PFMScanner(sample, cfg, seed=seed).scan(window, (pixels, pixels))
        scans.append(
            {
                "Amplitude": np.asarray(r["amplitude_pm"]),
                "Phase": np.asarray(r["phase_deg"]),
                "Height": np.asarray(r["height_nm"]),
            }
        )
        masks.append(wall_mask(sample, window, (pixels, pixels), np.asarray(r["drift_um"])))
    return scans, masks


def fresh_wall_mask(seed: int, pixels: int, t_start_s: float, scanner: PFMScanner) -> np.ndarray:
    """True walls of the unperturbed twin `seed` as a full scan starting at t_start_s saw them."""
    sample = FerroelectricSample(seed=seed)
    ex, ey = sample.extent_um
    lt = scanner.line_time_s(ex)
    times = t_start_s + lt * np.arange(pixels) + 0.25 * lt
    return wall_mask(sample, (0.0, 0.0, ex, ey), (pixels, pixels), scanner.drift_um(times))


class TwinTruth:
    """What evaluation may ask of a PFM twin the host runs (seed `seed`, live `backend`)."""

    def __init__(self, seed: int, backend: Any) -> None:
        self.seed = seed
        self._backend = backend
        self._sample = FerroelectricSample(seed=seed)  # unperturbed: walls as first scanned

    def clock_s(self) -> float:
        """The twin's virtual time (advances with every scan line and spectrum)."""
        return float(self._backend.clock_s)

    def true_spectra(
        self, xy_um: np.ndarray, bias_v: float, points: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return twin_true_spectra(self.seed, xy_um, triangular_waveform(bias_v, points))

    def tip_on_wall(
        self, xy_um: list[tuple[float, float]], t_s: float, tol_um: float
    ) -> list[bool]:
        """Whether the tip, aimed at each sample position at twin time t_s, sat on a wall
        (the scanner's drift at that time applied)."""
        dx, dy = (float(v) for v in self._backend.scanner.drift_um(t_s))
        out = []
        for x, y in xy_um:
            i, j = self._sample.index_of(x + dx, y + dy)
            out.append(float(self._sample.wall_distance_um[i, j]) <= tol_um)
        return out

    def wall_mask_of_scan(self, pixels: int, t_start_s: float) -> np.ndarray:
        return fresh_wall_mask(self.seed, pixels, t_start_s, self._backend.scanner)


class ReplayTruth:
    """A replay grid: its stored spectra are the truth; it has no walls or drift."""

    def __init__(self, grid: ReplayGrid) -> None:
        self._grid = grid

    def true_spectra(
        self, xy_um: np.ndarray, _bias_v: float, _points: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return replay_true_spectra(self._grid, xy_um)
