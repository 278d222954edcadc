"""Camera image formation: pixel-integrated PSF, motion blur and sCMOS-like noise.

Frame convention: the centre of pixel (row i, col j) is at (x = j*p, y = i*p) um, so
detections in um map directly onto the contract's field frame. The noise chain is
photons -> electrons (QE) -> shot noise -> read noise -> gain -> offset -> ADC clip.

PSFs: "gaussian" is integrated exactly over each pixel with erf (separable, and the
sub-step profiles of one particle are summed into one window before touching the
frame). "airy" and "defocus" are not separable: their pixel-integrated profiles are
tabulated once per config on a sub-pixel grid of spot offsets, so rendering is a
table gather. Shot noise never loops over the frame in Python: pixels that only see
the flat background draw their final ADU value in one table lookup (the exact
distribution of the whole noise chain for that background), and only the pixels a
particle or hot pixel lights go through the explicit chain. A 512x512 frame with 100
particles x 5 sub-steps costs ~1-2 ms.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.special import erf, i0e, j1, ndtr

#: Below this expected count shot noise is exact Poisson; at or above, Gaussian(λ, λ).
GAUSSIAN_SHOT_THRESHOLD_E = 20.0
#: Gaussian PSF windows extend this many sigmas either side of the spot.
WINDOW_SIGMAS = 4.0
#: Airy windows extend this many first-dark-ring radii (0.61 λ/NA) either side; the
#: ~3 % of light in the far wings beyond is folded back so flux is conserved.
AIRY_WINDOW_RADII = 6.0
#: Tabulated PSFs hold at most this many floats (sub-pixel offsets^2 x window^2).
LUT_MAX_FLOATS = 1 << 21

_TABLE_BITS = 16
_TABLE_SIZE = 1 << _TABLE_BITS
_AMBIGUOUS = np.uint16(0xFFFF)


class CameraConfig(BaseModel):
    """Sensor and optics parameters; bounds make bad values fail with a one-line error."""

    model_config = ConfigDict(extra="forbid")

    width_px: int = Field(256, ge=8, le=4096)
    height_px: int = Field(256, ge=8, le=4096)
    pixel_size_um: float = Field(0.1, ge=0.005, le=10.0)
    # Sigma of the "gaussian" PSF, and the in-focus blur of the "defocus" ring;
    # unused by "airy", whose width follows from wavelength and NA.
    psf_sigma_um: float = Field(0.2, gt=0.0, le=100.0)
    photons_per_particle_per_ms: float = Field(200.0, ge=0.0, le=1e9)
    background_photons_per_px_per_ms: float = Field(0.3, ge=0.0, le=1e6)
    quantum_efficiency: float = Field(0.8, ge=0.0, le=1.0)
    read_noise_e: float = Field(1.5, ge=0.0, le=1e4)
    gain_adu_per_e: float = Field(0.5, gt=0.0, le=1e4)
    offset_adu: float = Field(100.0, ge=0.0, le=65535.0)
    bit_depth: int = Field(16, ge=8, le=16)
    psf: Literal["gaussian", "airy", "defocus"] = "gaussian"
    wavelength_um: float = Field(0.6, gt=0.05, le=20.0)
    numerical_aperture: float = Field(1.2, gt=0.0, le=1.7)
    # Refractive index of the sample medium: sets the marginal-ray angle of "defocus".
    medium_refractive_index: float = Field(1.33, ge=1.0, le=2.5)
    defocus_um: float = Field(0.0, ge=-1000.0, le=1000.0)
    # Fixed pixels (chosen once from the seed) with extra dark current every frame.
    hot_pixel_fraction: float = Field(0.0, ge=0.0, le=0.1)
    hot_pixel_e_per_ms: float = Field(50.0, ge=0.0, le=1e6)
    # Image formation: "fluorescence" (the PSF above, photons_per_particle), or the
    # scattering contrasts of dielectric spheres under transmitted illumination
    # (simulators.brightfield): "brightfield" (background_photons_per_px_per_ms is the
    # illumination; spheres show a bright centre in a dark ring that changes with
    # defocus_um) or "darkfield" (only scattered light: bright rings on a dark field).
    contrast: Literal["fluorescence", "brightfield", "darkfield"] = "fluorescence"
    particle_radius_um: float = Field(0.5, gt=0.0, le=20.0)
    particle_refractive_index: float = Field(1.59, ge=1.0, le=3.0)  # polystyrene
    condenser_na: float = Field(0.3, gt=0.0, le=1.4)
    # Illumination falling off towards the corners (vignetting), as a fraction lost there.
    illumination_falloff: float = Field(0.0, ge=0.0, le=0.9)
    # Out-of-focus dust on optics: this many faint, wide dark blobs fixed per camera.
    dust_count: int = Field(0, ge=0, le=1000)

    @model_validator(mode="after")
    def _check_defocus_optics(self) -> CameraConfig:
        if self.psf == "defocus" and self.numerical_aperture >= self.medium_refractive_index:
            raise ValueError(
                "numerical_aperture must be below medium_refractive_index for psf='defocus'"
            )
        return self

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

    @property
    def airy_radius_um(self) -> float:
        """First dark ring of the Airy pattern, 0.61 λ / NA."""
        return 0.6098 * self.wavelength_um / self.numerical_aperture

    @property
    def defocus_ring_radius_um(self) -> float:
        """Marginal-ray radius |dz| NA / sqrt(n^2 - NA^2) of the defocused image."""
        na, n = self.numerical_aperture, self.medium_refractive_index
        return abs(self.defocus_um) * na / math.sqrt(max(n * n - na * na, 1e-12))


def _poisson_pmf(lam: float) -> np.ndarray:
    """Poisson(λ) probabilities for k = 0..kmax, the negligible tail folded into kmax."""
    if lam <= 0.0:
        return np.ones(1)
    kmax = int(lam + 12.0 * math.sqrt(lam) + 30.0)
    k = np.arange(kmax + 1)
    logp = k * math.log(lam) - lam - np.array([math.lgamma(i + 1.0) for i in k])
    pmf = np.exp(logp)
    pmf[-1] += max(0.0, 1.0 - pmf.sum())
    return pmf


class _TableSampler:
    """Exact sampler of an integer distribution via a 16-bit inverse-CDF lookup table.

    A 16-bit uniform selects a table bin; the few bins straddling a CDF step hold a
    sentinel and are refined with a second uniform, so the result is exact (to float64)
    yet costs one gather per draw: ~10x faster than numpy's per-pixel Poisson.
    Values are `first + index` and must fit in uint16.
    """

    def __init__(self, pmf: np.ndarray, first: int = 0) -> None:
        cdf = np.cumsum(pmf, dtype=float)
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        self.cdf = cdf
        self.first = int(first)
        last = len(cdf) - 1
        if self.first < 0 or self.first + last > 0xFFFF:
            raise ValueError("table values must fit in uint16")
        edges = np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE
        lo = np.minimum(np.searchsorted(cdf, edges[:-1], side="right"), last)
        hi = np.minimum(np.searchsorted(cdf, edges[1:], side="left"), last)
        values = (lo + self.first).astype(np.uint16)
        ambiguous = lo != hi
        # The sentinel must be a value no determined bin holds; one always exists.
        used = np.bincount(values[~ambiguous], minlength=_TABLE_SIZE)
        self.sentinel = np.uint16(0xFFFF if used[0xFFFF] == 0 else int(np.argmin(used)))
        values[ambiguous] = self.sentinel
        self.table = values

    def sample_into(self, rng: np.random.Generator, out: np.ndarray) -> None:
        """Fill the uint16 1-D array `out` with independent draws."""
        n = len(out)
        u16 = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
        np.take(self.table, u16, out=out)
        amb = np.flatnonzero(out == self.sentinel)
        if len(amb):
            u = (u16[amb] + rng.random(len(amb))) / _TABLE_SIZE
            idx = np.minimum(np.searchsorted(self.cdf, u, side="right"), len(self.cdf) - 1)
            out[amb] = idx + self.first

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n draws as float64."""
        out = np.empty(n, dtype=np.uint16)
        self.sample_into(rng, out)
        return out.astype(float)


def _poisson_small(rng: np.random.Generator, lam: np.ndarray) -> np.ndarray:
    """Exact Poisson draws for small λ (< ~20) by vectorised sequential CDF search.

    Cost per draw is ~1 + λ compare steps but only draws still searching stay in the
    working set, so the many faint PSF-wing pixels (λ << 1) finish after one step.
    """
    n = len(lam)
    k = np.zeros(n)
    if n == 0:
        return k
    u = rng.random(n)
    p = np.exp(-lam)
    act = np.flatnonzero(u >= p)
    ua, pa, la = u[act], p[act], lam[act]
    fa = pa.copy()
    i = 1
    cap = int(np.max(lam, initial=0.0) + 12.0 * math.sqrt(max(np.max(lam), 0.0)) + 30.0)
    while len(act) and i <= cap:
        k[act] += 1.0
        pa *= la / i
        fa += pa
        keep = ua >= fa
        act, ua, pa, fa, la = act[keep], ua[keep], pa[keep], fa[keep], la[keep]
        i += 1
    return k


class _AduSampler:
    """Final ADU value of a pixel that sees only the flat background, as one table draw.

    The whole chain clip(rint(gain * (shot + read) + offset)) maps a background level to
    a distribution over integer ADU values; computing it exactly once per level turns
    the dominant per-frame cost (a shot and a read-noise draw per pixel) into a gather.
    """

    def __init__(self, cfg: CameraConfig, bg_e: float) -> None:
        g, o, rn = cfg.gain_adu_per_e, cfg.offset_adu, cfg.read_noise_e
        top = (1 << cfg.bit_depth) - 1
        if bg_e >= GAUSSIAN_SHOT_THRESHOLD_E:
            sd = math.sqrt(bg_e + rn * rn)
            lo = int(min(max(0.0, math.floor(g * (bg_e - 14.0 * sd) + o)), top))
            hi = int(min(max(0.0, math.ceil(g * (bg_e + 14.0 * sd) + o)), top))
            a = np.arange(lo, hi + 1, dtype=float)
            cdf = ndtr(((a + 0.5 - o) / g - bg_e) / sd)
        else:
            pk = _poisson_pmf(bg_e)
            k = np.arange(len(pk), dtype=float)
            if rn > 0.0:
                lo = int(min(max(0.0, math.floor(o - 14.0 * g * rn)), top))
                hi = int(min(max(0.0, math.ceil(g * (k[-1] + 14.0 * rn) + o)), top))
                a = np.arange(lo, hi + 1, dtype=float)
                z = ((a[:, None] + 0.5 - o) / g - k[None, :]) / rn
                cdf = ndtr(z) @ pk
            else:
                # No read noise: map each count exactly as the lit-pixel path rounds it.
                adu = np.clip(np.rint(k * g + o), 0, top).astype(np.int64)
                lo, hi = int(adu.min()), int(adu.max())
                pmf = np.bincount(adu - lo, weights=pk, minlength=hi - lo + 1)
                cdf = np.cumsum(pmf)
        cdf[-1] = 1.0  # clip: everything above the last value lands on it
        pmf = np.diff(cdf, prepend=0.0)
        self.sampler = _TableSampler(np.maximum(pmf, 0.0), first=lo)


class _PsfLut:
    """Pixel-integrated, window-normalised PSF tabulated for sub-pixel spot offsets.

    lut[iy, ix] is the (L, L) window for a spot offset by (ix / sub - 1/2, iy / sub - 1/2)
    px from the window's centre pixel (sub + 1 offsets per axis, so a spot exactly on a
    pixel centre is exact and symmetric), each pixel integrated as the mean of sub x sub
    midpoint samples. Sample points of all offsets share one fine grid, so the table is
    one radial-profile evaluation plus box sums.
    """

    def __init__(self, cfg: CameraConfig) -> None:
        p = cfg.pixel_size_um
        if cfg.psf == "airy":
            half = math.ceil(AIRY_WINDOW_RADII * cfg.airy_radius_um / p)
            k = 2.0 * math.pi * cfg.numerical_aperture / cfg.wavelength_um

            def profile(r: np.ndarray) -> np.ndarray:
                v = k * r
                safe = np.where(v > 0.0, v, 1.0)
                return np.where(v > 0.0, (2.0 * j1(safe) / safe) ** 2, 1.0)

        else:
            ring = cfg.defocus_ring_radius_um
            sig = cfg.psf_sigma_um
            half = math.ceil((ring + WINDOW_SIGMAS * sig) / p)

            def profile(r: np.ndarray) -> np.ndarray:
                # Thin ring of radius R convolved with a 2-D Gaussian (exact; R=0: Gaussian).
                return np.exp(-((r - ring) ** 2) / (2.0 * sig * sig)) * i0e(r * ring / sig**2)

        half = max(half, 1)
        size = 2 * half + 1
        sub = int(min(32, max(4, math.isqrt(LUT_MAX_FLOATS) // size - 1)))
        # Fine grid at (q + 1/2) / sub px for q in [-(half + 1) sub, (half + 1) sub).
        q = (np.arange(-(half + 1) * sub, (half + 1) * sub) + 0.5) / sub * p
        fine = profile(np.hypot(q[:, None], q[None, :]))
        # Box sums of sub consecutive samples along each axis via cumulative sums.
        c = np.concatenate((np.zeros((1, len(q))), np.cumsum(fine, axis=0)), axis=0)
        box = c[sub:] - c[:-sub]
        c = np.concatenate((np.zeros((box.shape[0], 1)), np.cumsum(box, axis=1)), axis=1)
        box = c[:, sub:] - c[:, :-sub]
        # Pixel index jj (pixel jj - half), offset i: samples start at fine index
        # jj * sub + sub - i.
        start = (np.arange(size)[None, :] * sub + sub) - np.arange(sub + 1)[:, None]
        lut = box[start[:, None, :, None], start[None, :, None, :]]  # (sub+1, sub+1, L, L)
        lut /= lut.sum(axis=(2, 3), keepdims=True)
        self.lut = lut.astype(np.float32)
        self.half = half
        self.sub = sub


class CameraModel:
    """Renders expected and noisy frames from sub-step particle positions."""

    def __init__(self, config: CameraConfig, seed: int) -> None:
        self.config = config
        self._rng = np.random.default_rng(seed)  # own stream: never perturbs the physics
        # Hot pixels come from a child stream so they never shift the noise draws.
        self._hot_rng_seed = np.random.SeedSequence(seed).spawn(1)[0]
        self._tables: dict[float, _TableSampler] = {}
        self._adu: dict[tuple[float, ...], _AduSampler] = {}
        self._luts: dict[tuple[object, ...], _PsfLut] = {}
        self._shape: tuple[int, int] | None = None
        self._hot: tuple[tuple[int, int, float], np.ndarray] | None = None

    # ------------------------------------------------------------ buffers
    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense float32 signal and bool lit-mask scratch, reused while the shape holds.

        Both are all-zero between calls: users clear exactly the pixels they touched.
        """
        shape = (self.config.height_px, self.config.width_px)
        if self._shape != shape:
            self._shape = shape
            self._sig = np.zeros(shape[0] * shape[1], np.float32)
            self._mark = np.zeros(shape[0] * shape[1], bool)
        return self._sig, self._mark

    @property
    def hot_pixels(self) -> np.ndarray:
        """Sorted flat indices (row * width + col) of the hot pixels; fixed per camera."""
        cfg = self.config
        key = (cfg.height_px, cfg.width_px, cfg.hot_pixel_fraction)
        if self._hot is None or self._hot[0] != key:
            n = cfg.height_px * cfg.width_px
            count = round(cfg.hot_pixel_fraction * n)
            rng = np.random.default_rng(self._hot_rng_seed)
            self._hot = (key, np.sort(rng.choice(n, size=count, replace=False)))
        return self._hot[1]

    def _lut(self) -> _PsfLut:
        cfg = self.config
        key = (
            cfg.psf,
            cfg.pixel_size_um,
            cfg.psf_sigma_um,
            cfg.wavelength_um,
            cfg.numerical_aperture,
            cfg.medium_refractive_index,
            cfg.defocus_um,
        )
        lut = self._luts.get(key)
        if lut is None:
            if len(self._luts) > 8:
                self._luts.clear()
            lut = self._luts[key] = _PsfLut(cfg)
        return lut

    # --------------------------------------------------------------- optics
    def _bg_electrons(self, exposure_s: float) -> float:
        cfg = self.config
        return cfg.background_photons_per_px_per_ms * exposure_s * 1e3 * cfg.quantum_efficiency

    def _accumulate(self, substep_positions_um: np.ndarray, exposure_s: float) -> np.ndarray:
        """Add particle and hot-pixel electrons into the signal scratch; return lit indices.

        The caller reads `self._sig[lit]` and must zero it afterwards (`_release`).
        """
        cfg = self.config
        pos = np.asarray(substep_positions_um, dtype=float)
        if pos.ndim == 2:
            pos = pos[None]
        if pos.ndim != 3 or pos.shape[-1] != 2:
            raise ValueError(f"substep_positions_um must be (S, N, 2), got {pos.shape}")
        sig, mark = self._buffers()
        n_sub = pos.shape[0]
        if n_sub and pos.shape[1]:
            amp = cfg.photons_per_particle_per_ms * exposure_s * 1e3 * cfg.quantum_efficiency
            amp /= n_sub
            p = cfg.pixel_size_um
            cx, cy = pos[..., 0] / p, pos[..., 1] / p  # (S, N) in pixel units
            if cfg.psf == "gaussian":
                idx, wts = self._gaussian_windows(cx, cy, amp)
            else:
                idx, wts = self._lut_windows(cx, cy, amp)
            if len(idx):
                np.add.at(sig, idx, wts)
                mark[idx] = True
        if cfg.hot_pixel_fraction > 0.0 and cfg.hot_pixel_e_per_ms > 0.0:
            hot = self.hot_pixels
            sig[hot] += np.float32(cfg.hot_pixel_e_per_ms * exposure_s * 1e3)
            mark[hot] = True
        lit = np.flatnonzero(mark)
        mark[lit] = False
        return lit

    def _release(self, lit: np.ndarray) -> np.ndarray:
        """Signal electrons (float64) of the lit pixels, leaving the scratch all-zero."""
        vals = self._sig[lit].astype(float)
        self._sig[lit] = 0.0
        return vals

    def _visible(self, cx: np.ndarray, cy: np.ndarray, half: int) -> np.ndarray:
        """(S, N) spots whose window touches the frame (NaNs from lost tracks are not)."""
        h, w = self.config.height_px, self.config.width_px
        return (cx > -half - 1) & (cx < w + half) & (cy > -half - 1) & (cy < h + half)

    def _gaussian_windows(
        self, cx: np.ndarray, cy: np.ndarray, amp: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact erf-integrated Gaussian, the S sub-step profiles of a particle summed
        into one window first (a particle moves ~1 px per exposure: 5x fewer scatters)."""
        cfg = self.config
        h, w = cfg.height_px, cfg.width_px
        sig_px = cfg.psf_sigma_um / cfg.pixel_size_um
        half = math.ceil(WINDOW_SIGMAS * sig_px)
        vis = self._visible(cx, cy, half)
        keep = vis.any(axis=0)
        if not keep.any():
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        cx, cy, vis = cx[:, keep].T, cy[:, keep].T, vis[:, keep].T  # (K, S)
        if not vis.all():
            # Park invisible sub-steps on a visible one with zero light (keeps windows small).
            j = np.argmax(vis, axis=1)[:, None]
            cx = np.where(vis, cx, np.take_along_axis(cx, j, 1))
            cy = np.where(vis, cy, np.take_along_axis(cy, j, 1))
        ix, iy = np.rint(cx).astype(np.int64), np.rint(cy).astype(np.int64)
        x0, y0 = ix.min(axis=1) - half, iy.min(axis=1) - half
        lx = int((ix.max(axis=1) - x0).max()) + half + 1
        ly = int((iy.max(axis=1) - y0).max()) + half + 1
        s = cx.shape[1]
        size = 2 * half + 1
        if s > 1 and lx * ly > s * size * size:
            # Fast movers: one window per sub-step is cheaper than a huge union window.
            return self._gaussian_windows(cx.reshape(1, -1), cy.reshape(1, -1), amp)
        inv = 1.0 / (math.sqrt(2.0) * sig_px)
        ex = (x0[:, None] - 0.5 + np.arange(lx + 1))[:, None, :]  # pixel edges (K, 1, L+1)
        ey = (y0[:, None] - 0.5 + np.arange(ly + 1))[:, None, :]
        gx = np.diff(erf((ex - cx[:, :, None]) * inv), axis=2)  # (K, S, Lx), sums to 2
        gy = np.diff(erf((ey - cy[:, :, None]) * inv), axis=2)
        cols = x0[:, None] + np.arange(lx)
        rows = y0[:, None] + np.arange(ly)
        # Each sub-step keeps exactly its own +-half window (same flux whatever the motion).
        gx *= ((cols >= 0) & (cols < w))[:, None, :] & (
            np.abs(cols[:, None, :] - ix[:, :, None]) <= half
        )
        gy *= (
            ((rows >= 0) & (rows < h))[:, None, :]
            & (np.abs(rows[:, None, :] - iy[:, :, None]) <= half)
        ) * (vis * (0.25 * amp))[:, :, None]
        win = np.matmul(gy.transpose(0, 2, 1), gx)  # (K, Ly, Lx): sum over sub-steps
        np.clip(cols, 0, w - 1, out=cols)
        np.clip(rows, 0, h - 1, out=rows)
        idx = (rows[:, :, None] * w + cols[:, None, :]).ravel()
        return idx, win.ravel().astype(np.float32)

    def _lut_windows(
        self, cx: np.ndarray, cy: np.ndarray, amp: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tabulated PSF: one (L, L) window per visible spot, at the nearest 1/sub offset
        (error <= 1/(2 sub) px, 1/64 px for typical windows)."""
        cfg = self.config
        h, w = cfg.height_px, cfg.width_px
        lut = self._lut()
        half, sub = lut.half, lut.sub
        vis = self._visible(cx, cy, half)
        cx, cy = cx[vis], cy[vis]
        if len(cx) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        jx, jy = np.rint(cx), np.rint(cy)
        ox = np.clip(np.rint((cx - jx + 0.5) * sub).astype(np.int64), 0, sub)
        oy = np.clip(np.rint((cy - jy + 0.5) * sub).astype(np.int64), 0, sub)
        offs = np.arange(-half, half + 1)
        cols = jx.astype(np.int64)[:, None] + offs
        rows = jy.astype(np.int64)[:, None] + offs
        win = lut.lut[oy, ox] * np.float32(amp)  # (K, L, L)
        out_c = (cols < 0) | (cols >= w)
        out_r = (rows < 0) | (rows >= h)
        if out_c.any() or out_r.any():
            win *= ~(out_r[:, :, None] | out_c[:, None, :])
            np.clip(cols, 0, w - 1, out=cols)
            np.clip(rows, 0, h - 1, out=rows)
        idx = (rows[:, :, None] * w + cols[:, None, :]).ravel()
        return idx, win.ravel()

    def expected_electrons(self, substep_positions_um: np.ndarray, exposure_s: float) -> np.ndarray:
        """Noise-free (H, W) float32 electrons: background + motion-blurred PSFs + hot pixels."""
        cfg = self.config
        lit = self._accumulate(substep_positions_um, exposure_s)
        img = np.full(cfg.height_px * cfg.width_px, self._bg_electrons(exposure_s))
        img[lit] += self._release(lit)
        return img.astype(np.float32).reshape(cfg.height_px, cfg.width_px)

    # ---------------------------------------------------------------- noise
    def _poisson_table(self, lam: float) -> _TableSampler:
        table = self._tables.get(lam)
        if table is None:
            if len(self._tables) > 64:
                self._tables.clear()
            table = self._tables[lam] = _TableSampler(_poisson_pmf(lam))
        return table

    def _adu_sampler(self, bg: float) -> _TableSampler:
        cfg = self.config
        key = (bg, cfg.read_noise_e, cfg.gain_adu_per_e, cfg.offset_adu, float(cfg.bit_depth))
        entry = self._adu.get(key)
        if entry is None:
            if len(self._adu) > 64:
                self._adu.clear()
            entry = self._adu[key] = _AduSampler(cfg, bg)
        return entry.sampler

    def _to_adu(self, e: np.ndarray) -> np.ndarray:
        """Electrons -> ADU: gain, offset, rounding and clipping, as the ADC does."""
        cfg = self.config
        e *= cfg.gain_adu_per_e
        e += cfg.offset_adu
        np.rint(e, out=e)
        return np.clip(e, 0.0, float((1 << cfg.bit_depth) - 1), out=e)

    def _overwrite_lit(self, flat: np.ndarray, lit: np.ndarray, sig: np.ndarray, bg: float) -> None:
        """Redraw the lit pixels of a background-filled frame: exact Poisson below 20 e,
        Gaussian(λ, λ + read²) at or above.

        Below 20 e, Poisson(bg + s) = Poisson(bg) + Poisson(s): draw Poisson(s) first; where
        it is 0 (most faint PSF-wing pixels) the background draw already in `flat` is
        exactly right and is kept; elsewhere Poisson(bg) and read noise are drawn afresh.
        """
        cfg = self.config
        rng = self._rng
        lam = sig + bg
        read_var = cfg.read_noise_e**2
        high = np.flatnonzero(lam >= GAUSSIAN_SHOT_THRESHOLD_E)
        if len(high) < len(sig):
            low = np.flatnonzero(lam < GAUSSIAN_SHOT_THRESHOLD_E)
            k = _poisson_small(rng, sig[low])
            hit = np.flatnonzero(k)
            e = k[hit]
            if bg > 0.0:
                e += self._poisson_table(bg).sample(rng, len(hit))
            if cfg.read_noise_e > 0.0:
                e += rng.standard_normal(len(hit)) * cfg.read_noise_e
            flat[lit[low[hit]]] = self._to_adu(e)
        if len(high):
            lh = lam[high]
            e = lh + np.sqrt(lh + read_var) * rng.standard_normal(len(high))
            flat[lit[high]] = self._to_adu(e)

    # ------------------------------------------------------- brightfield
    def _illumination(self) -> np.ndarray:
        """Relative illumination (H, W): vignetting times out-of-focus dust; cached."""
        cfg = self.config
        key = (cfg.height_px, cfg.width_px, cfg.illumination_falloff, cfg.dust_count)
        if getattr(self, "_illum_key", None) != key:
            h, w = cfg.height_px, cfg.width_px
            yy, xx = np.mgrid[0:h, 0:w]
            r2 = ((xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2) / (
                ((w - 1) / 2) ** 2 + ((h - 1) / 2) ** 2
            )
            illum = 1.0 - cfg.illumination_falloff * r2
            rng = np.random.default_rng(self._hot_rng_seed.spawn(1)[0])
            for _ in range(cfg.dust_count):
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                sigma, depth = rng.uniform(8.0, 30.0), rng.uniform(0.01, 0.05)
                illum *= 1.0 - depth * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
            self._illum_map = illum.astype(np.float32)
            self._illum_key = key
        return self._illum_map

    def _render_scattering(self, substep_positions_um: np.ndarray, exposure_s: float) -> np.ndarray:
        """Brightfield/darkfield frame: illumination x (1 + sphere contrasts), with noise.

        Particles are drawn at their mean sub-step position (transmitted-light exposures
        are short next to the motion), and shot noise is Gaussian(λ, λ) in brightfield
        (hundreds of e per pixel) and exact Poisson in darkfield (few e).
        """
        from simulators.brightfield import contrast_profile, render_contrast

        cfg = self.config
        pos = np.asarray(substep_positions_um, dtype=float)
        if pos.ndim == 2:
            pos = pos[None]
        if pos.ndim != 3 or pos.shape[-1] != 2:
            raise ValueError(f"substep_positions_um must be (S, N, 2), got {pos.shape}")
        dark = cfg.contrast == "darkfield"
        profile = contrast_profile(
            cfg.particle_radius_um,
            cfg.particle_refractive_index,
            cfg.medium_refractive_index,
            cfg.wavelength_um,
            min(cfg.numerical_aperture, cfg.medium_refractive_index * 0.99),
            cfg.defocus_um,
            cfg.pixel_size_um,
            darkfield=dark,
            condenser_na=cfg.condenser_na,
        )
        xy = np.nanmean(pos, axis=0) / cfg.pixel_size_um if pos.shape[0] else np.zeros((0, 2))
        c = render_contrast((cfg.height_px, cfg.width_px), xy[np.isfinite(xy).all(axis=1)], profile)
        bg = self._bg_electrons(exposure_s)
        illum = self._illumination()
        # Darkfield keeps 1 % stray light so the background is not exactly zero.
        lam = bg * illum * (c + 0.01) if dark else bg * illum * np.maximum(1.0 + c, 0.0)
        if cfg.hot_pixel_fraction > 0.0:
            lam.reshape(-1)[self.hot_pixels] += cfg.hot_pixel_e_per_ms * exposure_s * 1e3
        rng = self._rng
        if dark:
            e = rng.poisson(np.maximum(lam, 0.0)).astype(np.float64)
        else:
            e = lam + np.sqrt(lam) * rng.standard_normal(lam.shape)
        if cfg.read_noise_e > 0.0:
            e += cfg.read_noise_e * rng.standard_normal(lam.shape)
        return self._to_adu(e).astype(np.uint16)

    def render(
        self,
        substep_positions_um: np.ndarray,
        exposure_s: float,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Noisy uint16 (H, W) frame in ADU, clipped at 2**bit_depth - 1 like a real ADC.

        Shot noise is exact Poisson below 20 e and Gaussian(λ, λ) at or above, read
        noise Gaussian, then gain, offset, rounding and clipping. Background-only pixels
        get their final ADU from one exact table draw; lit pixels run the chain.
        """
        cfg = self.config
        h, w = cfg.height_px, cfg.width_px
        if exposure_s < 0.0:
            raise ValueError(f"exposure_s must be >= 0, got {exposure_s}")
        if out is None:
            out = np.empty((h, w), dtype=np.uint16)
        elif out.shape != (h, w) or out.dtype != np.uint16:
            raise ValueError(f"out must be uint16 {(h, w)}, got {out.dtype} {out.shape}")
        if cfg.contrast != "fluorescence":
            out[...] = self._render_scattering(substep_positions_um, exposure_s)
            return out
        flat = out.reshape(-1) if out.flags.c_contiguous else np.empty(h * w, np.uint16)
        lit = self._accumulate(substep_positions_um, exposure_s)
        sig = self._release(lit)
        bg = self._bg_electrons(exposure_s)
        self._adu_sampler(bg).sample_into(self._rng, flat)
        if len(lit):
            self._overwrite_lit(flat, lit, sig, bg)
        if not out.flags.c_contiguous:
            out[...] = flat.reshape(h, w)
        return out
