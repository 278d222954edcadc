"""Camera image formation: pixel-integrated Gaussian PSF, motion blur and sCMOS-like noise.

Frame convention: the centre of pixel (row i, col j) is at (x = j*p, y = i*p) um, so
detections in um map directly onto the contract's field frame. The noise chain is
photons -> electrons (QE) -> shot noise -> read noise -> gain -> offset -> ADC clip.
Rendering is windowed and separable and the shot noise uses a table sampler for the
flat background, so a 512x512 frame with hundreds of spots stays a few ms: fast
enough to drive a real-time loop from the twin.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import erf

#: Below this expected count shot noise is exact Poisson; at or above, Gaussian(λ, λ).
GAUSSIAN_SHOT_THRESHOLD_E = 20.0
#: PSF windows extend this many sigmas either side of the spot.
WINDOW_SIGMAS = 4.0

_TABLE_BITS = 16
_TABLE_SIZE = 1 << _TABLE_BITS
_AMBIGUOUS = np.uint16(0xFFFF)


class CameraConfig(BaseModel):
    """Sensor and optics parameters; bounds make bad values fail with a one-line error."""

    model_config = ConfigDict(extra="forbid")

    width_px: int = Field(256, ge=8, le=4096)
    height_px: int = Field(256, ge=8, le=4096)
    pixel_size_um: float = Field(0.1, ge=0.005, le=10.0)
    psf_sigma_um: float = Field(0.2, gt=0.0, le=100.0)
    photons_per_particle_per_ms: float = Field(200.0, ge=0.0, le=1e9)
    background_photons_per_px_per_ms: float = Field(0.3, ge=0.0, le=1e6)
    quantum_efficiency: float = Field(0.8, ge=0.0, le=1.0)
    read_noise_e: float = Field(1.5, ge=0.0, le=1e4)
    gain_adu_per_e: float = Field(0.5, gt=0.0, le=1e4)
    offset_adu: float = Field(100.0, ge=0.0, le=65535.0)
    bit_depth: int = Field(16, ge=8, le=16)

    @property
    def field_um(self) -> tuple[float, float]:
        """(width, height) of the field in um, as reported in observations."""
        p = self.pixel_size_um
        return (self.width_px * p, self.height_px * p)

    @property
    def box_um(self) -> tuple[float, float, float, float]:
        """(xmin, xmax, ymin, ymax) spanned by pixel centres: the particle twin's walls."""
        p = self.pixel_size_um
        return (0.0, (self.width_px - 1) * p, 0.0, (self.height_px - 1) * p)


class _PoissonTable:
    """Exact Poisson(λ) sampler for one fixed λ via a 16-bit inverse-CDF lookup table.

    A 16-bit uniform selects a table bin; the few bins straddling a CDF step are refined
    with a second uniform, so the result is exact (to float64) yet ~10x faster than
    numpy's per-pixel Poisson for the flat background that fills most of a frame.
    """

    def __init__(self, lam: float) -> None:
        kmax = int(lam + 12.0 * math.sqrt(lam) + 30.0)
        k = np.arange(kmax + 1)
        logp = k * math.log(lam) - lam - np.array([math.lgamma(i + 1.0) for i in k])
        cdf = np.cumsum(np.exp(logp))
        cdf[-1] = 1.0  # the truncated tail mass (< 1e-30) goes to the last bin
        self.cdf = cdf
        edges = np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE
        lo = np.searchsorted(cdf, edges[:-1], side="right")
        hi = np.searchsorted(cdf, edges[1:], side="left")
        table = np.minimum(lo, kmax).astype(np.uint16)
        table[lo != np.minimum(hi, kmax)] = _AMBIGUOUS
        self.table = table

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n exact Poisson draws as float32."""
        u16 = rng.integers(0, _TABLE_SIZE, size=n, dtype=np.uint16)
        k = self.table[u16]
        amb = np.flatnonzero(k == _AMBIGUOUS)
        if len(amb):
            u = (u16[amb] + rng.random(len(amb))) / _TABLE_SIZE
            k[amb] = np.searchsorted(self.cdf, u, side="right")
        return k.astype(np.float32)


class CameraModel:
    """Renders expected and noisy frames from sub-step particle positions."""

    def __init__(self, config: CameraConfig, seed: int) -> None:
        self.config = config
        self._rng = np.random.default_rng(seed)  # own stream: never perturbs the physics
        self._tables: dict[float, _PoissonTable] = {}

    # --------------------------------------------------------------- optics
    def _bg_electrons(self, exposure_s: float) -> float:
        cfg = self.config
        return cfg.background_photons_per_px_per_ms * exposure_s * 1e3 * cfg.quantum_efficiency

    def _signal_electrons(self, substep_positions_um: np.ndarray, exposure_s: float) -> np.ndarray:
        """Noise-free particle electrons only (float64, (H, W)), without background."""
        cfg = self.config
        h, w = cfg.height_px, cfg.width_px
        pos = np.asarray(substep_positions_um, dtype=float)
        if pos.ndim == 2:
            pos = pos[None]
        if pos.ndim != 3 or pos.shape[-1] != 2:
            raise ValueError(f"substep_positions_um must be (S, N, 2), got {pos.shape}")
        n_sub = pos.shape[0]
        img = np.zeros(h * w)
        xy = pos.reshape(-1, 2)
        if n_sub == 0 or len(xy) == 0:
            return img.reshape(h, w)
        p = cfg.pixel_size_um
        sig_px = cfg.psf_sigma_um / p
        half = math.ceil(WINDOW_SIGMAS * sig_px)
        cx, cy = xy[:, 0] / p, xy[:, 1] / p  # positions in pixel units
        # Skip spots whose window misses the frame entirely (and NaNs from lost tracks).
        keep = (cx > -half - 1) & (cx < w + half) & (cy > -half - 1) & (cy < h + half)
        cx, cy = cx[keep], cy[keep]
        if len(cx) == 0:
            return img.reshape(h, w)
        offs = np.arange(-half, half + 1)
        cols = np.rint(cx).astype(np.int64)[:, None] + offs  # (K, L)
        rows = np.rint(cy).astype(np.int64)[:, None] + offs
        inv = 1.0 / (math.sqrt(2.0) * sig_px)
        # Pixel j spans [j - 0.5, j + 0.5]: integrate the 1-D Gaussian over it.
        gx = 0.5 * np.diff(
            erf((np.concatenate((cols, cols[:, -1:] + 1), 1) - 0.5 - cx[:, None]) * inv), axis=1
        )
        gy = 0.5 * np.diff(
            erf((np.concatenate((rows, rows[:, -1:] + 1), 1) - 0.5 - cy[:, None]) * inv), axis=1
        )
        gx[(cols < 0) | (cols >= w)] = 0.0
        gy[(rows < 0) | (rows >= h)] = 0.0
        amp = cfg.photons_per_particle_per_ms * exposure_s * 1e3 * cfg.quantum_efficiency / n_sub
        gy *= amp
        np.clip(cols, 0, w - 1, out=cols)
        np.clip(rows, 0, h - 1, out=rows)
        flat = (rows[:, :, None] * w + cols[:, None, :]).ravel()
        weights = (gy[:, :, None] * gx[:, None, :]).ravel()
        img += np.bincount(flat, weights=weights, minlength=h * w)
        return img.reshape(h, w)

    def expected_electrons(self, substep_positions_um: np.ndarray, exposure_s: float) -> np.ndarray:
        """Noise-free (H, W) float32 electrons: background + motion-blurred PSFs."""
        sig = self._signal_electrons(substep_positions_um, exposure_s)
        return (sig + self._bg_electrons(exposure_s)).astype(np.float32)

    # ---------------------------------------------------------------- noise
    def _background_poisson(self, lam: float, n: int) -> np.ndarray:
        table = self._tables.get(lam)
        if table is None:
            if len(self._tables) > 64:
                self._tables.clear()
            table = self._tables[lam] = _PoissonTable(lam)
        return table.sample(self._rng, n)

    def render(
        self,
        substep_positions_um: np.ndarray,
        exposure_s: float,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Noisy uint16 (H, W) frame in ADU, clipped at 2**bit_depth - 1 like a real ADC.

        Shot noise is exact Poisson below 20 e and Gaussian(λ, λ) at or above. Because
        the background is flat, Poisson(bg + signal) is drawn as Poisson(bg) from a
        lookup table plus Poisson(signal) only where the particles add light.
        """
        cfg = self.config
        h, w = cfg.height_px, cfg.width_px
        if exposure_s < 0.0:
            raise ValueError(f"exposure_s must be >= 0, got {exposure_s}")
        rng = self._rng
        sig = self._signal_electrons(substep_positions_um, exposure_s).ravel().astype(np.float32)
        bg = self._bg_electrons(exposure_s)
        lam = sig + np.float32(bg)
        read_var = np.float32(cfg.read_noise_e**2)
        if bg >= GAUSSIAN_SHOT_THRESHOLD_E:
            # Every pixel is in the Gaussian regime: shot and read noise in one draw.
            e = rng.standard_normal(h * w, dtype=np.float32)
            e *= np.sqrt(lam + read_var)
            e += lam
        else:
            e = self._background_poisson(bg, h * w) if bg > 0.0 else np.zeros(h * w, np.float32)
            lit = np.flatnonzero(sig > 0.0)
            high = lit[lam[lit] >= GAUSSIAN_SHOT_THRESHOLD_E]
            low = lit[lam[lit] < GAUSSIAN_SHOT_THRESHOLD_E]
            if len(low):
                e[low] += rng.poisson(sig[low]).astype(np.float32)
            if cfg.read_noise_e > 0.0:
                e += rng.standard_normal(h * w, dtype=np.float32) * np.float32(cfg.read_noise_e)
            if len(high):
                # Replace bright pixels by the Gaussian approximation of shot + read noise.
                lh = lam[high]
                e[high] = lh + np.sqrt(lh + read_var) * rng.standard_normal(
                    len(high), dtype=np.float32
                )
        e *= np.float32(cfg.gain_adu_per_e)
        e += np.float32(cfg.offset_adu)
        np.rint(e, out=e)
        np.clip(e, 0.0, float((1 << cfg.bit_depth) - 1), out=e)
        if out is None:
            out = np.empty((h, w), dtype=np.uint16)
        elif out.shape != (h, w) or out.dtype != np.uint16:
            raise ValueError(f"out must be uint16 {(h, w)}, got {out.dtype} {out.shape}")
        out.reshape(-1)[:] = e
        return out
