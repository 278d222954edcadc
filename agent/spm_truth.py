"""Ground truth of the PFM twin for evaluation and training only (never for policies).

Like ``agent.evaluate``'s truth recorder, this is the one place the agent side reads
the twin's hidden state: the true reward map over a candidate grid (every cell's loop
measured on an unperturbed copy of the sample), true wall masks aligned with a scan
(the scan's own drift applied), and labelled scans to train the wall segmenter.
"""

from __future__ import annotations

import numpy as np

from policies.active.grid import pfm_channels
from policies.active.reward import Reward
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


def twin_reward_map(
    seed: int,
    xy_um: np.ndarray,
    reward: Reward,
    waveform: np.ndarray | None = None,
    sample_config: FerroelectricSampleConfig | None = None,
) -> np.ndarray:
    """True reward at sample positions (um from the sample corner) of the twin `seed`."""
    v = triangular_waveform() if waveform is None else np.asarray(waveform, float)
    sample = FerroelectricSample(sample_config, seed=seed)
    spectra = twin_spectra(sample, xy_um, v, seed + 7919)
    return np.array([reward.of_spectrum(v, s) for s in spectra])


def replay_reward_map(grid: ReplayGrid, xy_um: np.ndarray, reward: Reward) -> np.ndarray:
    """Reward of the stored spectrum nearest each position of a replay grid."""
    return np.array([reward.of_spectrum(grid.waveform, grid.spectrum_at(x, y)) for x, y in xy_um])


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


def labelled_scans(
    seeds: list[int], pixels: int = 96, sample_config: FerroelectricSampleConfig | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full-sample twin scans (structure channels) and their true wall masks."""
    images, masks = [], []
    for seed in seeds:
        sample = FerroelectricSample(sample_config, seed=seed)
        scanner = PFMScanner(sample, ScanConfig(), seed=seed)
        ex, ey = sample.extent_um
        window = (0.0, 0.0, ex, ey)
        r = scanner.scan(window, (pixels, pixels))
        images.append(pfm_channels(r["amplitude_pm"], r["phase_deg"], r["height_nm"]))
        masks.append(wall_mask(sample, window, (pixels, pixels), np.asarray(r["drift_um"])))
    return images, masks


def fresh_wall_mask(seed: int, pixels: int, t_start_s: float, scanner: PFMScanner) -> np.ndarray:
    """True walls of the unperturbed twin `seed` as a full scan starting at t_start_s saw them."""
    sample = FerroelectricSample(seed=seed)
    ex, ey = sample.extent_um
    lt = scanner.line_time_s(ex)
    times = t_start_s + lt * np.arange(pixels) + 0.25 * lt
    return wall_mask(sample, (0.0, 0.0, ex, ey), (pixels, pixels), scanner.drift_um(times))
