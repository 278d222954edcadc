"""Scanning-probe (PFM) digital twin: ferroelectric sample, raster scans, spectroscopy."""

from simulators.spm.replay import ReplayGrid, export_twin_grid, load_replay_grid
from simulators.spm.sample import (
    A_DOMAIN,
    C_DOWN,
    C_UP,
    FerroelectricSample,
    FerroelectricSampleConfig,
    TipState,
)
from simulators.spm.scan import PFMScanner, ScanConfig
from simulators.spm.spectroscopy import (
    SpectroscopyConfig,
    SwitchingSpectroscopy,
    loop_features,
    triangular_waveform,
)
from simulators.spm.stats import REAL_PFM_REFERENCE, pfm_statistics

__all__ = [
    "A_DOMAIN",
    "C_DOWN",
    "C_UP",
    "REAL_PFM_REFERENCE",
    "FerroelectricSample",
    "FerroelectricSampleConfig",
    "PFMScanner",
    "ReplayGrid",
    "ScanConfig",
    "SpectroscopyConfig",
    "SwitchingSpectroscopy",
    "TipState",
    "export_twin_grid",
    "load_replay_grid",
    "loop_features",
    "pfm_statistics",
    "triangular_waveform",
]
