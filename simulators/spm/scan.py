"""Raster PFM scans of the ferroelectric twin: amplitude, phase, height, deflection.

The PFM signal is modelled as a complex (lock-in X + iY) response field blurred by the
tip: opposite polarisations cancel at 180-degree walls, which makes the amplitude dip
and the phase jump by 180 deg as in real scans. Additive complex noise then gives
noisy phase where the amplitude is low (a-domains, walls), again as observed. Line
offsets, linear thermal drift of the scan window and a first-order feedback lag on
height are optional nuisances. Each scan line is traced and retraced, so a line costs
2 * width / scan_speed seconds.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage, signal

from simulators.spm.sample import C_DOWN, C_UP, FerroelectricSample, TipState


class ScanConfig(BaseModel):
    """Scanner, lock-in and nuisance parameters (defaults matched to the real PTO scans)."""

    model_config = ConfigDict(extra="forbid")

    scan_speed_um_s: float = Field(2.0, gt=0.0, le=1e3)
    tip_blur_um: float = Field(0.008, ge=0.0, le=1.0)
    phase_offset_deg: float = Field(15.0, ge=-360.0, le=360.0)
    amplitude_noise_pm: float = Field(12.0, ge=0.0, le=1e5)
    height_noise_nm: float = Field(0.08, ge=0.0, le=1e3)
    line_offsets: bool = True
    line_offset_nm: float = Field(0.015, ge=0.0, le=1e3)
    line_offset_amp_frac: float = Field(0.03, ge=0.0, le=1.0)
    line_offset_phase_deg: float = Field(1.5, ge=0.0, le=180.0)
    drift: bool = True
    drift_um_s: tuple[float, float] = (2e-4, -1e-4)
    feedback_lag_px: float = Field(0.0, ge=0.0, le=100.0)
    height_offset_nm: float = Field(-600.0, ge=-1e6, le=1e6)
    tilt_nm_per_um: tuple[float, float] = (3.0, -2.0)
    tip_wear_per_line: float = Field(0.0, ge=0.0, le=0.1)


class PFMScanner:
    """Raster scanner over one sample; own noise stream, shared tip state."""

    def __init__(
        self,
        sample: FerroelectricSample,
        config: ScanConfig | None = None,
        seed: int = 0,
        tip: TipState | None = None,
    ) -> None:
        self.sample = sample
        self.config = config or ScanConfig()
        self.rng = np.random.default_rng(seed)
        self.tip = tip or TipState()
        self._field_version = -1
        self._re = self._im = np.zeros((1, 1), dtype=np.float32)

    def line_time_s(self, width_um: float) -> float:
        """Trace + retrace of one line: 2 * width / scan_speed."""
        return 2.0 * width_um / self.config.scan_speed_um_s

    def drift_um(self, t_s: np.ndarray | float) -> np.ndarray:
        """Sample displacement under the tip at time t (zero when drift is off)."""
        t = np.asarray(t_s, dtype=float)
        if not self.config.drift:
            return np.zeros((*t.shape, 2))
        return t[..., None] * np.asarray(self.config.drift_um_s)

    def _response_field(self) -> None:
        """Complex PFM response on the fine grid, tip-blurred; cached per sample version."""
        s = self.sample
        if self._field_version == s.version:
            return
        ph = math.radians(self.config.phase_offset_deg)
        sign = np.select([s.domain_type == C_UP, s.domain_type == C_DOWN], [1.0, -1.0], 0.0)
        # a-domains still give a small out-of-plane signal of either sign (mixed).
        sign = np.where(s.domain_type == 2, 0.5, sign)
        z = s.saturation_pm * sign
        sig = self.config.tip_blur_um / s.pixel_um
        if sig > 0:
            z = ndimage.gaussian_filter(z, sig, mode="nearest")
        self._re = (z * math.cos(ph)).astype(np.float32)
        self._im = (z * math.sin(ph)).astype(np.float32)
        self._field_version = s.version

    def scan(
        self,
        window_um: tuple[float, float, float, float],
        pixels: tuple[int, int] = (256, 256),
        t_start_s: float = 0.0,
    ) -> dict[str, np.ndarray | float]:
        """Raster-scan window (x0, y0, w, h) um at (ny, nx) pixels, starting at t_start_s.

        Returns float32 images `amplitude_pm`, `phase_deg` (wrapped to [-90, 270) like
        the instrument), `height_nm`, `deflection_nm` (feedback error), the true
        per-line drift `drift_um` (ny, 2), `elapsed_s` and `t_end_s`.
        """
        cfg = self.config
        x0, y0, w, h = (float(v) for v in window_um)
        ny, nx = (int(v) for v in pixels)
        if not (1 <= ny <= 4096 and 1 <= nx <= 4096):
            raise ValueError(f"pixels must be in 1..4096, got {pixels}")
        ex, ey = self.sample.extent_um
        if w <= 0 or h <= 0 or x0 < 0 or y0 < 0 or x0 + w > ex + 1e-9 or y0 + h > ey + 1e-9:
            raise ValueError(f"window_um {window_um} must lie inside the sample extent {ex, ey}")
        self._response_field()
        lt = self.line_time_s(w)
        # Pixel times within the trace half of each line.
        t_line = t_start_s + lt * np.arange(ny)
        t_px = t_line[:, None] + 0.5 * lt * (np.arange(nx) + 0.5)[None, :] / nx
        dr = self.drift_um(t_px)
        xs = x0 + (np.arange(nx) + 0.5) * (w / nx)
        ys = y0 + (np.arange(ny) + 0.5) * (h / ny)
        p = self.sample.pixel_um
        cols = (xs[None, :] + dr[..., 0]) / p - 0.5
        rows = (ys[:, None] + dr[..., 1]) / p - 0.5
        coords = np.stack([rows.ravel(), cols.ravel()])
        interp = {"order": 1, "mode": "nearest", "prefilter": False}
        re = ndimage.map_coordinates(self._re, coords, **interp).reshape(ny, nx)
        im = ndimage.map_coordinates(self._im, coords, **interp).reshape(ny, nx)
        hgt = ndimage.map_coordinates(self.sample.height_nm, coords, **interp).reshape(ny, nx)
        rng = self.rng
        # Tip wear scales the piezoresponse of every line scanned after it.
        wear = self.tip.amplitude_factor * (1.0 - cfg.tip_wear_per_line) ** np.arange(ny)
        self.tip.amplitude_factor *= (1.0 - cfg.tip_wear_per_line) ** ny
        self.tip.n_lines += ny
        re = re * wear[:, None] + cfg.amplitude_noise_pm * rng.standard_normal((ny, nx))
        im = im * wear[:, None] + cfg.amplitude_noise_pm * rng.standard_normal((ny, nx))
        amp = np.hypot(re, im)
        phase = np.degrees(np.arctan2(im, re))
        xabs = xs[None, :] - ex / 2
        yabs = ys[:, None] - ey / 2
        height = (
            hgt + cfg.height_offset_nm + cfg.tilt_nm_per_um[0] * xabs + cfg.tilt_nm_per_um[1] * yabs
        )
        if cfg.line_offsets:
            amp = amp * (1.0 + cfg.line_offset_amp_frac * rng.standard_normal((ny, 1)))
            phase = phase + cfg.line_offset_phase_deg * rng.standard_normal((ny, 1))
            height = height + cfg.line_offset_nm * rng.standard_normal((ny, 1))
        if cfg.feedback_lag_px > 0:
            a = math.exp(-1.0 / cfg.feedback_lag_px)
            # Start each line settled on its first pixel (filter state a * h0).
            zi = a * height[:, :1]
            tracked, _ = signal.lfilter([1.0 - a], [1.0, -a], height, axis=1, zi=zi)
        else:
            tracked = height
        deflection = height - tracked
        height_meas = tracked + cfg.height_noise_nm * rng.standard_normal((ny, nx))
        phase = (phase + 90.0) % 360.0 - 90.0
        elapsed = lt * ny
        return {
            "amplitude_pm": amp.astype(np.float32),
            "phase_deg": phase.astype(np.float32),
            "height_nm": height_meas.astype(np.float32),
            "deflection_nm": deflection.astype(np.float32),
            "drift_um": dr[:, 0, :].astype(np.float32),
            "elapsed_s": float(elapsed),
            "t_end_s": float(t_start_s + elapsed),
        }
