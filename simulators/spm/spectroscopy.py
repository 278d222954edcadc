"""Point switching spectroscopy (BEPS-like hysteresis loops) on the ferroelectric twin.

The polarisation under the tip follows a two-population play (Preisach-like) model:
on a rising bias the switched fraction can only grow towards tanh((V - Vc+)/w), on a
falling bias only shrink towards tanh((V - Vc-)/w); a defect-nucleated sub-population
switches at half the bias and puts a kink into the loop. Memory makes a spectrum act on
the sample: whatever state the loop ends in is written into the domain map within the
tip radius, where the bias beat the local coercive bias. The tip wears with every
spectrum, lowering the measured response.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simulators.spm.sample import A_DOMAIN, FerroelectricSample, TipState


class SpectroscopyConfig(BaseModel):
    """Waveform timing, noise, switching footprint and tip wear."""

    model_config = ConfigDict(extra="forbid")

    step_time_s: float = Field(0.05, gt=0.0, le=100.0)
    noise_pm: float = Field(3.0, ge=0.0, le=1e5)
    electrostatic_pm_per_v: float = Field(0.5, ge=-1e3, le=1e3)
    tip_radius_um: float = Field(0.03, gt=0.0, le=1.0)
    tip_wear_per_spectrum: float = Field(0.002, ge=0.0, le=0.5)
    switching: bool = True
    # Waveform repeats; only the last cycle is returned, so a loop from a poled state closes.
    cycles: int = Field(2, ge=1, le=10)


def triangular_waveform(amplitude_v: float = 10.0, steps: int = 64) -> np.ndarray:
    """0 -> +A -> -A -> 0 triangle sampled at `steps` points (a closed loop)."""
    if steps < 4:
        raise ValueError(f"steps must be >= 4, got {steps}")
    phase = np.arange(steps) / steps
    return amplitude_v * np.where(
        phase < 0.25, 4 * phase, np.where(phase < 0.75, 2 - 4 * phase, 4 * phase - 4)
    )


def _play(v: np.ndarray, p0: float, vc_pos: float, vc_neg: float, width: float) -> np.ndarray:
    """Switched state (-1..1) of a play operator driven by bias v starting at p0."""
    up = np.tanh((v - vc_pos) / width)
    dn = np.tanh((v - vc_neg) / width)
    out = np.empty(v.shape)
    p = p0
    prev = v[0]
    for k in range(v.size):
        p = max(p, up[k]) if v[k] >= prev else min(p, dn[k])
        out[k] = p
        prev = v[k]
    return out


def loop_features(waveform: np.ndarray, response: np.ndarray) -> dict[str, float]:
    """Area, coercive biases, imprint and remanent response of one hysteresis loop.

    Area is |closed line integral of R dV| (the waveform is closed back to its start);
    coercive biases are where each branch crosses the loop's mid response; remanent
    response is half the gap between the branches at zero bias.
    """
    v = np.asarray(waveform, dtype=float).ravel()
    r = np.asarray(response, dtype=float).ravel()
    if v.shape != r.shape or v.size < 4:
        raise ValueError(f"response: shape {r.shape} does not match waveform {v.shape}")
    vc, rc = np.append(v, v[0]), np.append(r, r[0])
    area = float(abs(np.sum(0.5 * (rc[1:] + rc[:-1]) * np.diff(vc))))
    dv = np.diff(vc)
    mid = 0.5 * (float(r.max()) + float(r.min()))

    def crossing(rising: bool) -> float:
        sel = dv > 0 if rising else dv < 0
        vals = []
        for k in np.nonzero(sel)[0]:
            a, b = rc[k] - mid, rc[k + 1] - mid
            if (a < 0 <= b) if rising else (a > 0 >= b):
                vals.append(vc[k] + (vc[k + 1] - vc[k]) * a / (a - b) if a != b else vc[k])
        return float(np.mean(vals)) if vals else float("nan")

    def at_zero(rising: bool) -> float:
        sel = dv > 0 if rising else dv < 0
        vals = []
        for k in np.nonzero(sel)[0]:
            lo, hi = sorted((vc[k], vc[k + 1]))
            if lo <= 0.0 <= hi and hi > lo:
                f = (0.0 - vc[k]) / (vc[k + 1] - vc[k])
                vals.append(rc[k] + f * (rc[k + 1] - rc[k]))
        return float(np.mean(vals)) if vals else float("nan")

    vc_pos, vc_neg = crossing(True), crossing(False)
    return {
        "area": area,
        "vc_pos_v": vc_pos,
        "vc_neg_v": vc_neg,
        "coercive_width_v": vc_pos - vc_neg,
        "imprint_v": 0.5 * (vc_pos + vc_neg),
        "remanent": 0.5 * (at_zero(False) - at_zero(True)),
        "saturation": 0.5 * (float(r.max()) - float(r.min())),
    }


class SwitchingSpectroscopy:
    """Hysteresis loops at tip positions; acts on the sample and wears the tip."""

    def __init__(
        self,
        sample: FerroelectricSample,
        config: SpectroscopyConfig | None = None,
        seed: int = 0,
        tip: TipState | None = None,
    ) -> None:
        self.sample = sample
        self.config = config or SpectroscopyConfig()
        self.rng = np.random.default_rng(seed)
        self.tip = tip or TipState()

    def time_cost_s(self, n_steps: int) -> float:
        """Acquisition time of a spectrum: one step_time per bias step and cycle."""
        return n_steps * self.config.cycles * self.config.step_time_s

    def spectrum(
        self, x_um: float, y_um: float, waveform: np.ndarray | None = None
    ) -> dict[str, np.ndarray | float | dict[str, float]]:
        """Measure one loop at (x_um, y_um); returns waveform, response (pm), features, time."""
        cfg = self.config
        v = triangular_waveform() if waveform is None else np.asarray(waveform, dtype=float)
        if v.ndim != 1 or v.size < 2 or not np.all(np.isfinite(v)):
            raise ValueError(f"waveform must be a finite 1-D array of >= 2 biases, got {v.shape}")
        s = self.sample
        i, j = s.index_of(x_um, y_um)
        dt = int(s.domain_type[i, j])
        p0 = 0.0 if dt == A_DOMAIN else (1.0 if dt == 0 else -1.0)
        vp, vn = float(s.vc_pos[i, j]), float(s.vc_neg[i, j])
        imp = 0.5 * (vp + vn)
        w = s.config.switching_width_v
        n = v.size
        v_all = np.tile(v, cfg.cycles)
        state = _play(v_all, p0, vp, vn, w)
        f_nuc = float(s.nucleation[i, j])
        if f_nuc > 0.0:
            nuc = _play(v_all, p0, imp + 0.5 * (vp - imp), imp + 0.5 * (vn - imp), 0.5 * w)
            state = (1.0 - f_nuc) * state + f_nuc * nuc
        state = state[-n:]
        gain = self.tip.amplitude_factor
        resp = gain * (s.saturation_pm[i, j] * state + cfg.electrostatic_pm_per_v * v)
        resp = resp + cfg.noise_pm * self.rng.standard_normal(v.size)
        switched = 0
        if cfg.switching and dt != A_DOMAIN and abs(state[-1]) > 0.5:
            sign = 1 if state[-1] > 0 else -1
            bias = float(v.max()) if sign > 0 else float(v.min())
            switched = s.switch_disk(x_um, y_um, cfg.tip_radius_um, sign, bias)
        self.tip.amplitude_factor *= 1.0 - cfg.tip_wear_per_spectrum
        self.tip.n_spectra += 1
        return {
            "waveform": v,
            "response_pm": resp,
            "features": loop_features(v, resp),
            "switched_points": float(switched),
            "elapsed_s": self.time_cost_s(v.size),
        }
