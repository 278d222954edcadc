"""Procedural ferroelectric thin film (PbTiO3-like) for the scanning-probe twin.

The sample is a set of fine-grid maps over a physical extent, all drawn from one seed:
out-of-plane c+/c- domains (blobs of a thresholded Gaussian random field), in-plane
a-domain bands at +-45 deg (ferroelastic), point defects, topography and per-point
hysteresis parameters derived from that structure (coercive bias lowered near walls
and defects, imprint, saturation response, nucleation near defects). Spectroscopy
switches domains in place (`switch_disk`); derived maps are then refreshed only in a
patch around the tip so a switching spectrum stays cheap.

Default statistics are tuned so that the twin's scans measure like the real PbTiO3
PFM scans in `shared/data/pfm-pto` (see `REAL_PFM_REFERENCE` in `simulators.spm.stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

#: Domain type codes in `FerroelectricSample.domain_type`.
C_UP, C_DOWN, A_DOMAIN = 0, 1, 2


class FerroelectricSampleConfig(BaseModel):
    """Structure and hysteresis parameters; bounds give one-line errors naming the field."""

    model_config = ConfigDict(extra="forbid")

    extent_um: tuple[float, float] = (2.0, 2.0)
    grid: int = Field(512, ge=32, le=2048)
    # Out-of-plane domains: blob size and the area fraction of the minority (c-) phase.
    domain_size_um: float = Field(0.06, gt=0.0, le=10.0)
    down_fraction: float = Field(0.05, ge=0.0, le=0.5)
    # In-plane a-domain bands at +-45 deg: period, band width fraction, area coverage.
    a_band_period_um: float = Field(0.22, gt=0.0, le=10.0)
    a_band_width_frac: float = Field(0.12, ge=0.0, le=0.5)
    a_band_coverage: float = Field(0.35, ge=0.0, le=1.0)
    defect_density_per_um2: float = Field(25.0, ge=0.0, le=1e4)
    # Topography: fractal roughness (PSD ~ k^-slope), a/c tilt corrugation, defect bumps.
    roughness_nm: float = Field(8.0, ge=0.0, le=1e3)
    roughness_psd_slope: float = Field(4.0, ge=1.0, le=6.0)
    corrugation_nm: float = Field(1.5, ge=0.0, le=100.0)
    defect_bump_nm: float = Field(1.0, ge=0.0, le=100.0)
    # Piezoresponse (pm) of c+ domains; c- and a-domains relative to it; lognormal spread.
    response_pm: float = Field(60.0, gt=0.0, le=1e5)
    down_response_ratio: float = Field(3.0, gt=0.0, le=10.0)
    a_response_ratio: float = Field(0.15, ge=0.0, le=1.0)
    response_spread: float = Field(0.65, ge=0.0, le=2.0)
    # Hysteresis: coercive bias (V), its softening near walls / defects, imprint (V).
    coercive_v: float = Field(3.0, gt=0.0, le=100.0)
    coercive_spread: float = Field(0.12, ge=0.0, le=1.0)
    a_coercive_factor: float = Field(1.6, ge=1.0, le=10.0)
    wall_softening: float = Field(0.45, ge=0.0, le=0.95)
    wall_length_um: float = Field(0.03, gt=0.0, le=1.0)
    defect_softening: float = Field(0.35, ge=0.0, le=0.95)
    defect_length_um: float = Field(0.04, gt=0.0, le=1.0)
    imprint_v: float = Field(0.3, ge=-50.0, le=50.0)
    imprint_spread_v: float = Field(0.3, ge=0.0, le=50.0)
    switching_width_v: float = Field(0.6, gt=0.0, le=20.0)
    nucleation_fraction: float = Field(0.35, ge=0.0, le=1.0)
    #: Distances to walls are exact up to this cap; softening beyond it is negligible.
    wall_distance_cap_um: float = Field(0.12, gt=0.0, le=1.0)

    @property
    def pixel_um(self) -> float:
        """Grid spacing (um); square pixels over the longer side."""
        return max(self.extent_um) / self.grid

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the fine grid."""
        p = self.pixel_um
        return (max(2, round(self.extent_um[1] / p)), max(2, round(self.extent_um[0] / p)))


@dataclass
class TipState:
    """Shared tip condition: wear multiplies every measured piezoresponse."""

    amplitude_factor: float = 1.0
    n_spectra: int = 0
    n_lines: int = 0


def random_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean unit-variance Gaussian random field, correlation ~sigma_px, periodic."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), max(sigma_px, 0.5), mode="wrap")
    return (f - f.mean()) / max(float(f.std()), 1e-12)


def _fractal(rng: np.random.Generator, shape: tuple[int, int], slope: float) -> np.ndarray:
    """Unit-rms surface with a radial power spectrum ~ k^-slope (self-affine roughness)."""
    ky = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.fftfreq(shape[1])[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = 1.0
    amp = k ** (-slope / 2.0)
    amp[0, 0] = 0.0
    f = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * amp).real
    return (f - f.mean()) / max(float(f.std()), 1e-12)


class FerroelectricSample:
    """Ground-truth domain structure, topography and local hysteresis of one film."""

    def __init__(self, config: FerroelectricSampleConfig | None = None, seed: int = 0) -> None:
        self.config = cfg = config or FerroelectricSampleConfig()
        self.seed = int(seed)
        rng = np.random.default_rng(self.seed)
        ny, nx = cfg.shape
        p = cfg.pixel_um
        yy, xx = np.mgrid[0:ny, 0:nx] * p
        # c+/c- blobs: the top `down_fraction` quantile of a smooth field.
        f = random_field(rng, (ny, nx), 0.5 * cfg.domain_size_um / p)
        thr = np.quantile(f, 1.0 - cfg.down_fraction) if cfg.down_fraction > 0 else np.inf
        dtype = np.where(f > thr, C_DOWN, C_UP).astype(np.int8)
        # a-domain bands at +-45 deg, present only in patches; orientation chosen per patch.
        orient = random_field(rng, (ny, nx), 0.4 / p) > 0
        u = np.where(orient, xx + yy, xx - yy) / math.sqrt(2.0)
        wobble = 0.25 * random_field(rng, (ny, nx), 0.15 / p)
        band = np.mod(u / cfg.a_band_period_um + wobble, 1.0) < cfg.a_band_width_frac
        presence = random_field(rng, (ny, nx), 0.3 / p)
        pthr = (
            np.quantile(presence, 1.0 - cfg.a_band_coverage) if cfg.a_band_coverage > 0 else np.inf
        )
        a_mask = band & (presence > pthr)
        dtype[a_mask] = A_DOMAIN
        self.domain_type = dtype
        # Point defects (Poisson) and their smoothed density (per um^2).
        area = cfg.extent_um[0] * cfg.extent_um[1]
        n_def = int(rng.poisson(cfg.defect_density_per_um2 * area))
        self.defects_um = np.column_stack(
            [rng.uniform(0, nx * p, n_def), rng.uniform(0, ny * p, n_def)]
        )
        counts = np.zeros((ny, nx))
        if n_def:
            ij = np.minimum((self.defects_um[:, ::-1] / p).astype(int), [ny - 1, nx - 1])
            np.add.at(counts, (ij[:, 0], ij[:, 1]), 1.0)
        sd = cfg.defect_length_um / p
        self.defect_density = ndimage.gaussian_filter(counts, sd, mode="wrap") / (
            2.0 * math.pi * cfg.defect_length_um**2
        )
        # Topography (nm).
        topo = cfg.roughness_nm * _fractal(rng, (ny, nx), cfg.roughness_psd_slope)
        topo += cfg.corrugation_nm * ndimage.gaussian_filter(a_mask.astype(float), 2.0)
        topo += cfg.defect_bump_nm * ndimage.gaussian_filter(counts, 3.0) * (2 * math.pi * 9.0)
        self.height_nm = topo.astype(np.float32)
        # Fixed random modulations of response and hysteresis.
        self._resp_mod = np.exp(cfg.response_spread * random_field(rng, (ny, nx), 0.03 / p))
        self._vc_mod = 1.0 + cfg.coercive_spread * random_field(rng, (ny, nx), 0.05 / p)
        self._imprint_mod = cfg.imprint_spread_v * random_field(rng, (ny, nx), 0.1 / p)
        self.wall_distance_um = np.zeros((ny, nx))
        self.vc_pos = np.zeros((ny, nx))
        self.vc_neg = np.zeros((ny, nx))
        self.saturation_pm = np.zeros((ny, nx))
        self.nucleation = np.zeros((ny, nx))
        self.version = 0
        self._derive(0, ny, 0, nx)

    # -- derived maps -------------------------------------------------------------------
    def _derive(self, y0: int, y1: int, x0: int, x1: int) -> None:
        """Recompute wall distance and hysteresis maps in [y0:y1, x0:x1] (padded patch)."""
        cfg = self.config
        p = cfg.pixel_um
        ny, nx = self.domain_type.shape
        m = math.ceil(cfg.wall_distance_cap_um / p) + 1
        py0, py1, px0, px1 = max(0, y0 - m), min(ny, y1 + m), max(0, x0 - m), min(nx, x1 + m)
        d = self.domain_type[py0:py1, px0:px1]
        wall = np.zeros(d.shape, dtype=bool)
        dx = d[:, 1:] != d[:, :-1]
        dy = d[1:, :] != d[:-1, :]
        wall[:, 1:] |= dx
        wall[:, :-1] |= dx
        wall[1:, :] |= dy
        wall[:-1, :] |= dy
        dist = ndimage.distance_transform_edt(~wall) * p if wall.any() else np.full(d.shape, 1e3)
        dist = np.minimum(dist, cfg.wall_distance_cap_um)
        sl = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
        out = (slice(y0, y1), slice(x0, x1))
        dist = dist[sl]
        dt = d[sl]
        rho = self.defect_density[out]
        rho0 = max(cfg.defect_density_per_um2, 1.0)
        soft_w = 1.0 - cfg.wall_softening * np.exp(-dist / cfg.wall_length_um)
        soft_d = 1.0 - cfg.defect_softening * rho / (rho + rho0)
        vc = cfg.coercive_v * self._vc_mod[out] * soft_w * soft_d
        vc = np.where(dt == A_DOMAIN, vc * cfg.a_coercive_factor, vc)
        vc = np.maximum(vc, 0.05 * cfg.coercive_v)
        imprint = (
            cfg.imprint_v + self._imprint_mod[out] + 0.5 * cfg.imprint_spread_v * rho / (rho + rho0)
        )
        resp = cfg.response_pm * self._resp_mod[out]
        resp = np.where(dt == C_DOWN, resp * cfg.down_response_ratio, resp)
        resp = np.where(dt == A_DOMAIN, resp * cfg.a_response_ratio, resp)
        resp *= 1.0 - 0.5 * np.exp(-dist / cfg.wall_length_um)
        self.wall_distance_um[out] = dist
        self.vc_pos[out] = imprint + vc
        self.vc_neg[out] = imprint - vc
        self.saturation_pm[out] = resp
        self.nucleation[out] = cfg.nucleation_fraction * rho / (rho + rho0)
        self.version += 1

    # -- queries -------------------------------------------------------------------------
    @property
    def pixel_um(self) -> float:
        """Fine-grid spacing (um)."""
        return self.config.pixel_um

    @property
    def extent_um(self) -> tuple[float, float]:
        """(width, height) of the grid in um."""
        ny, nx = self.domain_type.shape
        return (nx * self.pixel_um, ny * self.pixel_um)

    @property
    def polarization(self) -> np.ndarray:
        """Out-of-plane polarisation sign: +1 (c+), -1 (c-), 0 (in-plane a)."""
        return np.select([self.domain_type == C_UP, self.domain_type == C_DOWN], [1, -1], 0).astype(
            np.int8
        )

    @property
    def loop_area(self) -> np.ndarray:
        """Analytic loop area (V*pm) of the noise-free, nucleation-free loop: 2 Rs (Vc+ - Vc-)."""
        return 2.0 * self.saturation_pm * (self.vc_pos - self.vc_neg)

    def index_of(self, x_um: float, y_um: float) -> tuple[int, int]:
        """Nearest grid point (row, col) of a position, clipped to the grid."""
        ny, nx = self.domain_type.shape
        j = min(max(int(x_um / self.pixel_um), 0), nx - 1)
        i = min(max(int(y_um / self.pixel_um), 0), ny - 1)
        return i, j

    def properties_at(self, x_um: float, y_um: float) -> dict[str, float]:
        """Ground truth at the nearest grid point: structure and local hysteresis."""
        i, j = self.index_of(x_um, y_um)
        return {
            "domain_type": float(self.domain_type[i, j]),
            "polarization": float(self.polarization[i, j]),
            "wall_distance_um": float(self.wall_distance_um[i, j]),
            "defect_density_per_um2": float(self.defect_density[i, j]),
            "height_nm": float(self.height_nm[i, j]),
            "vc_pos_v": float(self.vc_pos[i, j]),
            "vc_neg_v": float(self.vc_neg[i, j]),
            "imprint_v": float(0.5 * (self.vc_pos[i, j] + self.vc_neg[i, j])),
            "saturation_pm": float(self.saturation_pm[i, j]),
            "nucleation": float(self.nucleation[i, j]),
            "loop_area": float(self.loop_area[i, j]),
        }

    def property_maps(self) -> dict[str, np.ndarray]:
        """All ground-truth maps on the fine grid (copies)."""
        return {
            "domain_type": self.domain_type.copy(),
            "polarization": self.polarization,
            "wall_distance_um": self.wall_distance_um.copy(),
            "defect_density_per_um2": self.defect_density.copy(),
            "height_nm": self.height_nm.copy(),
            "vc_pos_v": self.vc_pos.copy(),
            "vc_neg_v": self.vc_neg.copy(),
            "saturation_pm": self.saturation_pm.copy(),
            "nucleation": self.nucleation.copy(),
            "loop_area": self.loop_area,
        }

    # -- mutation ------------------------------------------------------------------------
    def switch_disk(
        self, x_um: float, y_um: float, radius_um: float, sign: int, bias_v: float
    ) -> int:
        """Set c-domains within radius to `sign` where |bias| beats the local coercive bias.

        a-domains (ferroelastic) are left alone. Returns the number of grid points flipped.
        """
        p = self.pixel_um
        ny, nx = self.domain_type.shape
        r = max(radius_um / p, 0.5)
        ci, cj = y_um / p - 0.5, x_um / p - 0.5
        y0, y1 = max(0, int(ci - r) - 1), min(ny, int(ci + r) + 2)
        x0, x1 = max(0, int(cj - r) - 1), min(nx, int(cj + r) + 2)
        if y0 >= y1 or x0 >= x1:
            return 0
        ii, jj = np.mgrid[y0:y1, x0:x1]
        disk = (ii - ci) ** 2 + (jj - cj) ** 2 <= r * r
        dt = self.domain_type[y0:y1, x0:x1]
        target = C_UP if sign > 0 else C_DOWN
        beats = (
            bias_v >= self.vc_pos[y0:y1, x0:x1] if sign > 0 else bias_v <= self.vc_neg[y0:y1, x0:x1]
        )
        flip = disk & beats & (dt != A_DOMAIN) & (dt != target)
        n = int(flip.sum())
        if n:
            dt[flip] = target
            self._derive(y0, y1, x0, x1)
        return n
