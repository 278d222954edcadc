"""SPM backends for the Nanonis TCP server: the PFM digital twin, and a replay grid.

``PfmTwinBackend`` puts ``simulators.spm`` (ferroelectric sample, raster scanner,
switching spectroscopy) behind the ``SpmBackend`` protocol, so a Nanonis client scans
and poles the twin; ``ReplayBackend`` serves a recorded hyperspectral grid the same way,
so a policy can be evaluated on recorded data through the same client calls.

Coordinates and units. The Nanonis side is SI (m, V, s; angles in deg); the twin works
in um (positions), nm (height, deflection) and pm (piezoresponse). A sample (or grid)
of extent (W, H) um is centred on the Nanonis origin::

    x_m = (x_um - W / 2) * 1e-6        y_m = (y_um - H / 2) * 1e-6

so the reachable tip range is [-W/2, W/2] x [-H/2, H/2] um. Twin rows grow with y_um,
i.e. with Nanonis y, so an upward scan's first line (row 0 of a grabbed frame) is the
frame's lowest y; a downward scan returns the rows flipped (first acquired = top).
Frames must be axis-aligned (angle 0) and lie inside the sample.

Truth (``truth_log``): every change of what the tip does to the sample (Z controller,
the bias applied, a sweep running) is stamped on the host's monotonic clock as it
happens, so a bench sees the instrument's safe state itself, not a driver's reply.

Scan and spectroscopy are computed on the twin's virtual clock (``clock_s``), which
advances by each scan's and spectrum's acquisition time, so thermal drift accumulates
between measurements as on an instrument, and the same seed and command sequence give
bit-identical data.
"""

from __future__ import annotations

import logging
import math
import time
import zipfile
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from drivers.nanonis_server import (
    NanonisLimits,
    NanonisServer,
    ScanAction,
    ScanBuffer,
    ScanFrame,
    ScanImage,
    SpectroscopyProps,
    SpectroscopyResult,
)
from drivers.spm_recorded import load_hdf5_grid
from simulators.spm import (
    A_DOMAIN,
    C_DOWN,
    C_UP,
    FerroelectricSample,
    FerroelectricSampleConfig,
    PFMScanner,
    ReplayGrid,
    ScanConfig,
    SpectroscopyConfig,
    SwitchingSpectroscopy,
    TipState,
    load_replay_grid,
    triangular_waveform,
)

log = logging.getLogger(__name__)

UM, NM, PM = 1e-6, 1e-9, 1e-12
#: Z piezo position after ZCtrl.Withdraw (fully retracted), metres.
Z_RETRACTED_M = 2e-7
#: Frames reaching this far (um) past the sample edge are clipped (float32 wire rounding).
EDGE_SLACK_UM = 1e-3

BIAS_CALC = "Bias calc (V)"
SPECTRUM_PARAMETERS = ("X (m)", "Y (m)", "Z offset (m)")
SPECTRUM_FIXED_PARAMETERS = ("Sweep Start (V)", "Sweep End (V)")
#: Signals of the PFM twin (Signals.NamesGet order). "Z (m)" is the Z piezo: the
#: topography ("Height (m)") while the Z controller is on, Z_RETRACTED_M once withdrawn.
PFM_SIGNALS: tuple[str, ...] = (
    "Bias (V)",
    "X (m)",
    "Y (m)",
    "Z (m)",
    "Height (m)",
    "Amplitude (m)",
    "Phase (deg)",
    "Deflection (m)",
)
#: Spectroscopy channels of the twin after the swept bias; "[bwd]" copies follow when
#: the backward sweep is on. Piezoresponse is the signed in-phase (loop) signal.
PFM_SPECTRUM_CHANNELS: tuple[str, ...] = ("Piezoresponse (m)", "Amplitude (m)", "Phase (deg)")

Sweep = Literal["triangular", "linear"]


@dataclass(frozen=True)
class TipTruth:
    """What the tip does to the sample from ``t_ns`` (CLOCK_MONOTONIC) on."""

    t_ns: int
    z_on: bool
    bias_v: float  # the bias set; a running sweep applies its waveform instead
    sweeping: bool

    @property
    def safe(self) -> bool:
        """Tip retracted, no bias, no sweep: nothing reaches the sample."""
        return not self.z_on and self.bias_v == 0.0 and not self.sweeping


def _bwd(name: str) -> str:
    """Nanonis names the backward copy of "Name (unit)" "Name [bwd] (unit)"."""
    head, sep, unit = name.rpartition(" (")
    return f"{head} [bwd] ({unit}" if sep else f"{name} [bwd]"


def _wrap_phase(phase_deg: np.ndarray) -> np.ndarray:
    """Phase wrapped to [-90, 270) deg, as the twin's scanner (and the instrument) reports."""
    return (phase_deg + 90.0) % 360.0 - 90.0


def _range_error(name: str, value: float, lo: float, hi: float, what: str) -> ValueError:
    return ValueError(f"{name}={value:.6g} m is outside the {what} [{lo:.6g}, {hi:.6g}] m")


class _GridBackend:
    """State shared by the twin and replay backends: bias, tip, frame, scan and Z state.

    Subclasses provide the signals, the scan images of a window and the spectroscopy.
    """

    signals: tuple[str, ...] = ()
    default_channels: tuple[str, ...] = ()

    def __init__(self, extent_um: tuple[float, float], realtime: bool) -> None:
        self.extent_um = (float(extent_um[0]), float(extent_um[1]))
        self.realtime = realtime
        self.clock_s = 0.0
        self.bias_v = 0.0
        self.tip_xy_m = (0.0, 0.0)
        self.z_on = True
        self.spectroscopy_open = False
        w, h = self.extent_um
        self.frame = ScanFrame(0.0, 0.0, w * UM, h * UM, 0.0)
        idx = tuple(self.signals.index(c) for c in self.default_channels if c in self.signals)
        self.buffer = ScanBuffer(idx or (0,), 256, 256)
        self.spectr_props = SpectroscopyProps(
            num_points=64,
            parameters=SPECTRUM_PARAMETERS,
            fixed_parameters=SPECTRUM_FIXED_PARAMETERS,
        )
        self.spectr_limits_v = (10.0, -10.0)
        self._waveform_key: tuple[object, ...] = ()
        self._waveform = np.zeros(0)
        self._channel_names: tuple[bool | None, tuple[str, ...]] = (None, ())
        # Last scan: SI images per signal name (forward, backward), rows ascending y.
        self._images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._scan_lines = 0
        self._line_time_s = 0.0
        self._direction_up = True
        self._run_s = 0.0
        self._since: float | None = None
        self._stopped = True
        self.sweeping = False  # a real-time sweep is applying its waveform
        self.truth_log: deque[TipTruth] = deque(maxlen=4096)
        self._record()

    # ------------------------------------------------------------ truth

    def _record(self) -> None:
        """Stamp the tip's state if it changed (called by every method that changes it)."""
        last = self.truth_log[-1] if self.truth_log else None
        state = (self.z_on, self.bias_v, self.sweeping)
        if last is None or (last.z_on, last.bias_v, last.sweeping) != state:
            self.truth_log.append(TipTruth(time.monotonic_ns(), *state))

    def safe_since_ns(self, after_ns: int) -> int | None:
        """When the tip first became safe after ``after_ns`` (None: it has not)."""
        for entry in list(self.truth_log):
            if entry.t_ns > after_ns and entry.safe:
                return entry.t_ns
        return None

    # ------------------------------------------------------------ coordinates

    @property
    def xy_range_m(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((x_lo, x_hi), (y_lo, y_hi)) of the sample in Nanonis metres."""
        w, h = self.extent_um
        return ((-w / 2 * UM, w / 2 * UM), (-h / 2 * UM, h / 2 * UM))

    def to_sample_um(self, x_m: float, y_m: float) -> tuple[float, float]:
        """Nanonis (m, origin at the sample centre) -> twin (um, origin at a corner)."""
        return (x_m / UM + self.extent_um[0] / 2, y_m / UM + self.extent_um[1] / 2)

    def to_nanonis_m(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Twin (um, origin at a corner) -> Nanonis (m, origin at the sample centre)."""
        return ((x_um - self.extent_um[0] / 2) * UM, (y_um - self.extent_um[1] / 2) * UM)

    def window_um(self, frame: ScanFrame) -> tuple[float, float, float, float]:
        """Twin scan window (x0, y0, w, h) um of an axis-aligned frame inside the sample."""
        if frame.angle_deg != 0.0:
            raise ValueError(
                f"angle_deg={frame.angle_deg:.6g} is not supported: this backend scans "
                "axis-aligned frames only (angle 0)"
            )
        out: list[float] = []
        for axis, c_m, s_m, ext in (
            ("x", frame.center_x_m, frame.width_m, self.extent_um[0]),
            ("y", frame.center_y_m, frame.height_m, self.extent_um[1]),
        ):
            lo = c_m / UM + ext / 2 - s_m / UM / 2
            hi = lo + s_m / UM
            if s_m <= 0 or lo < -EDGE_SLACK_UM or hi > ext + EDGE_SLACK_UM:
                raise ValueError(
                    f"frame {axis} span [{(lo - ext / 2) * UM:.6g}, {(hi - ext / 2) * UM:.6g}] m "
                    f"is outside the sample extent [{-ext / 2 * UM:.6g}, {ext / 2 * UM:.6g}] m"
                )
            lo, hi = max(lo, 0.0), min(hi, ext)
            out += [lo, hi - lo]
        return (out[0], out[2], out[1], out[3])

    # ------------------------------------------------------------ bias / tip

    def get_bias(self) -> float:
        return self.bias_v

    def set_bias(self, bias_v: float) -> None:
        self.bias_v = float(bias_v)
        self._record()

    def get_tip_xy(self) -> tuple[float, float]:
        return self.tip_xy_m

    def move_tip_xy(self, x_m: float, y_m: float, wait: bool) -> None:
        """Moves are instantaneous; each axis must stay over the sample (non-square ones too)."""
        for name, v, (lo, hi) in zip(("x_m", "y_m"), (x_m, y_m), self.xy_range_m, strict=True):
            if not (math.isfinite(v) and lo - 1e-12 <= v <= hi + 1e-12):
                raise _range_error(name, v, lo, hi, "sample extent")
        self.tip_xy_m = (float(x_m), float(y_m))

    # ------------------------------------------------------------ scan

    def get_scan_frame(self) -> ScanFrame:
        return self.frame

    def set_scan_frame(self, frame: ScanFrame) -> None:
        self.window_um(frame)  # validate now, so the client gets the error at FrameSet
        self.frame = frame

    def get_scan_buffer(self) -> ScanBuffer:
        return self.buffer

    def set_scan_buffer(self, buffer: ScanBuffer) -> None:
        self.buffer = buffer

    def _require_engaged(self) -> None:
        if not self.z_on:
            raise RuntimeError(
                "tip is withdrawn (Z controller off): re-engage before measuring "
                "(ZCtrl.OnOffSet 1, or the driver's engage command)"
            )

    def _acquire(
        self, window_um: tuple[float, float, float, float], lines: int, pixels: int
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
        """SI images (forward, backward) of a window, rows ascending y; and line time (s)."""
        raise NotImplementedError

    def _pixel_images(
        self, window_um: tuple[float, float, float, float], lines: int, pixels: int
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Bias and X/Y (Nanonis m) images at the pixel centres, for any recorded channel."""
        x0, y0, w, h = window_um
        xs = x0 + (np.arange(pixels) + 0.5) * (w / pixels)
        ys = y0 + (np.arange(lines) + 0.5) * (h / lines)
        xx, yy = np.meshgrid((xs - self.extent_um[0] / 2) * UM, (ys - self.extent_um[1] / 2) * UM)
        bias = np.full((lines, pixels), self.bias_v)
        return {"Bias (V)": (bias, bias), "X (m)": (xx, xx), "Y (m)": (yy, yy)}

    def scan_action(self, action: ScanAction, direction_up: bool) -> None:
        """START computes the whole frame at once; with realtime it is revealed line by line."""
        if action == ScanAction.START:
            self._require_engaged()
            win = self.window_um(self.frame)
            lines, pixels = self.buffer.lines, self.buffer.pixels
            images, line_time = self._acquire(win, lines, pixels)
            self._images = {**self._pixel_images(win, lines, pixels), **images}
            self._scan_lines, self._line_time_s = lines, line_time
            self._direction_up = direction_up
            self.clock_s += lines * line_time
            self._stopped = False
            if self.realtime:
                self._run_s, self._since = 0.0, time.monotonic()
            else:
                self._run_s, self._since = lines * line_time, None
        elif action in (ScanAction.STOP, ScanAction.GO_TO_CENTER):
            self._pause()
            self._stopped = True
            if action == ScanAction.GO_TO_CENTER:
                self.move_tip_xy(self.frame.center_x_m, self.frame.center_y_m, True)
        elif action in (ScanAction.PAUSE, ScanAction.FREEZE):
            self._pause()
        elif (  # RESUME / UNFREEZE: only a paused, unfinished, not stopped frame
            not self._stopped
            and self._since is None
            and self.scan_running_time() < self._scan_time_s()
        ):
            self._since = time.monotonic()

    def _scan_time_s(self) -> float:
        return self._scan_lines * self._line_time_s

    def _pause(self) -> None:
        if self._since is not None:
            self._run_s += time.monotonic() - self._since
            self._since = None

    def scan_running_time(self) -> float:
        """Seconds of the current frame acquired so far (all of it unless realtime)."""
        t = self._run_s + (time.monotonic() - self._since if self._since is not None else 0.0)
        return min(t, self._scan_time_s())

    def scan_running(self) -> bool:
        return self._since is not None and self.scan_running_time() < self._scan_time_s()

    def grab_scan_frame(self, channel_index: int, forward: bool) -> ScanImage:
        """Last frame of a channel; lines not yet (realtime) or never (stopped) scanned are NaN."""
        name = self.signals[channel_index]
        if not self._images:
            raise RuntimeError("no scan data yet: start a scan first (Scan.Action 0)")
        fwd, bwd = self._images[name]
        data = np.array(fwd if forward else bwd, dtype=np.float64)
        if not self._direction_up:
            data = data[::-1]
        t = self.scan_running_time()
        if t < self._scan_time_s():
            data[int(t / self._line_time_s) :] = np.nan
        return ScanImage(name, data, self._direction_up)

    # ------------------------------------------------------------ spectroscopy

    def open_bias_spectroscopy(self) -> None:
        self.spectroscopy_open = True

    def get_spectroscopy_limits(self) -> tuple[float, float]:
        return self.spectr_limits_v

    def set_spectroscopy_limits(self, start_v: float, end_v: float) -> None:
        self.spectr_limits_v = (float(start_v), float(end_v))

    def sweep_time_s(self) -> float:
        """Wall-clock time of the next sweep: 0 (computed at once) unless realtime."""
        return 0.0

    def _begin_sweep(self) -> None:
        if self.sweep_time_s() > 0:
            self.sweeping = True
            self._record()

    def end_sweep(self) -> None:
        """The sweep's time is up or it was interrupted: the set bias is back."""
        self.sweeping = False
        self._record()

    # ------------------------------------------------------------ signals / Z

    def signal_names(self) -> Sequence[str]:
        return self.signals

    def withdraw(self, wait: bool, timeout_s: float | None) -> None:
        """Safe state: Z controller off (tip retracted), scan stopped, bias 0 V."""
        self.z_on = False
        self.scan_action(ScanAction.STOP, self._direction_up)
        self.bias_v = 0.0
        self.sweeping = False
        self._record()

    def engage(self) -> None:
        """Z controller back on (approach): ZCtrl.OnOffSet 1 over the wire."""
        self.z_on = True
        self._record()

    def set_z_controller(self, on: bool) -> None:
        if on:
            self.engage()
        else:
            self.withdraw(False, None)

    def z_controller_on(self) -> bool:
        return self.z_on

    def signal_value(self, index: int) -> float:
        """Bias, tip position and Z are the instrument's own; the rest come from the sample."""
        name = self.signals[index]
        if name == "Bias (V)":
            return self.bias_v
        if name in ("X (m)", "Y (m)"):
            return self.tip_xy_m[0 if name == "X (m)" else 1]
        if name == "Z (m)":
            return self.get_z()
        return self._channel_value(name, index)

    def _channel_value(self, name: str, index: int) -> float:
        raise NotImplementedError

    def get_z(self) -> float:
        raise NotImplementedError


class PfmTwinBackend(_GridBackend):
    """The PFM digital twin as a Nanonis SPM: scans, switching spectroscopy, signals.

    One seed fixes the sample, the scanner's noise (same stream as
    ``PFMScanner(sample, scan_config, seed=seed)``, so the first forward frame equals
    the twin's own scan of that window at ``t_start_s=0``) and the spectroscope's
    noise (as ``SwitchingSpectroscopy(sample, spectroscopy_config, seed=seed)``).
    Backward frames are a second trace with their own noise stream. Spectra act on the
    sample (switch domains) and both wear the shared tip. ``sweep`` picks the bias
    waveform: "triangular" 0 -> start -> end -> 0 (limits (10, -10) V give exactly the
    twin's ``triangular_waveform(10, n)``), or "linear" start -> end as Nanonis sweeps.
    ``realtime``: ``scan_running()`` stays true for the twin's scan time and unscanned
    lines grab as NaN, and a sweep takes its acquisition time on the wall clock
    (``sweep_time_s``; the server waits it out unlocked, a withdraw interrupts it).
    Its data and its switching of the sample are computed when it starts.
    """

    signals = PFM_SIGNALS
    default_channels = ("Height (m)", "Amplitude (m)", "Phase (deg)", "Deflection (m)")

    def __init__(
        self,
        sample_config: FerroelectricSampleConfig | None = None,
        scan_config: ScanConfig | None = None,
        spectroscopy_config: SpectroscopyConfig | None = None,
        seed: int = 0,
        realtime: bool = False,
        sweep: Sweep = "triangular",
    ) -> None:
        if sweep not in ("triangular", "linear"):
            raise ValueError(f"sweep={sweep!r} must be 'triangular' or 'linear'")
        self.seed = int(seed)
        self.sweep: Sweep = sweep
        self.sample = FerroelectricSample(sample_config, seed=self.seed)
        self.tip = TipState()
        self.scanner = PFMScanner(self.sample, scan_config, seed=self.seed, tip=self.tip)
        self._bwd_scanner = PFMScanner(self.sample, self.scanner.config, seed=self.seed)
        self._bwd_scanner.rng = np.random.default_rng([self.seed, 1])
        self.spectroscope = SwitchingSpectroscopy(
            self.sample, spectroscopy_config, seed=self.seed, tip=self.tip
        )
        self._signal_rng = np.random.default_rng([self.seed, 2])
        super().__init__(self.sample.extent_um, realtime)

    # ------------------------------------------------------------ scan

    def _acquire(
        self, window_um: tuple[float, float, float, float], lines: int, pixels: int
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
        wear = self.tip.amplitude_factor
        fwd = self.scanner.scan(window_um, (lines, pixels), t_start_s=self.clock_s)
        # Retrace: same drift and wear, own noise; its tip is a copy so wear counts once.
        self._bwd_scanner.tip = TipState(amplitude_factor=wear)
        bwd = self._bwd_scanner.scan(window_um, (lines, pixels), t_start_s=self.clock_s)

        def si(key: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
            f, b = (np.asarray(r[key], dtype=np.float64) for r in (fwd, bwd))
            return (f * scale, b * scale) if scale != 1.0 else (f, b)

        height = si("height_nm", NM)
        images = {
            "Z (m)": height,
            "Height (m)": height,
            "Amplitude (m)": si("amplitude_pm", PM),
            "Phase (deg)": si("phase_deg", 1.0),
            "Deflection (m)": si("deflection_nm", NM),
        }
        return images, self.scanner.line_time_s(window_um[2])

    # ------------------------------------------------------------ spectroscopy

    def get_spectroscopy_props(self) -> SpectroscopyProps:
        names = list(PFM_SPECTRUM_CHANNELS)
        if self.spectr_props.backward_sweep:
            names += [_bwd(n) for n in PFM_SPECTRUM_CHANNELS]
        return replace(self.spectr_props, channels=tuple(names))

    def _spectrum_channel_names(self) -> tuple[str, ...]:
        backward = self.spectr_props.backward_sweep
        if self._channel_names[0] != backward:
            self._channel_names = (backward, (BIAS_CALC, *self.get_spectroscopy_props().channels))
        return self._channel_names[1]

    def set_spectroscopy_props(self, props: SpectroscopyProps) -> None:
        if self.sweep == "triangular" and props.num_points < 4:
            raise ValueError(f"num_points={props.num_points} must be >= 4 for a triangular sweep")
        self.spectr_props = props

    def sweep_waveform(self) -> np.ndarray:
        """The forward bias sweep (V) that BiasSpectr.Start applies, from props and limits
        (read-only; rebuilt only when the points or limits change)."""
        n = self.spectr_props.num_points
        start, end = self.spectr_limits_v
        key = (n, start, end, self.sweep)
        if self._waveform_key != key:
            self._waveform = self._build_waveform(n, start, end)
            self._waveform.flags.writeable = False
            self._waveform_key = key
        return self._waveform

    def _build_waveform(self, n: int, start: float, end: float) -> np.ndarray:
        if self.sweep == "linear":
            return np.linspace(start, end, n)
        if start == -end:
            return triangular_waveform(start, n)
        p = np.arange(n) / n
        mid = start + (end - start) * (2.0 * p - 0.5)
        return np.where(p < 0.25, 4.0 * p * start, np.where(p < 0.75, mid, end * (4.0 - 4.0 * p)))

    def sweep_time_s(self) -> float:
        """Acquisition time of the next sweep (every loop, both directions) if realtime."""
        if not self.realtime:
            return 0.0
        p = self.spectr_props
        points = p.num_points * (2 if p.backward_sweep else 1)
        return max(1, p.num_sweeps) * self.spectroscope.time_cost_s(points)

    def _tip_sample_um(self) -> tuple[float, float]:
        """Sample point under the tip now: tip position plus the drift at the clock time."""
        x_um, y_um = self.to_sample_um(*self.tip_xy_m)
        dx, dy = self.scanner.drift_um(self.clock_s)
        return float(x_um + dx), float(y_um + dy)

    def _pfm_channels(self, response_m: np.ndarray, out: np.ndarray) -> None:
        """Piezoresponse, amplitude and phase of a signed in-phase response, into out."""
        offset = self.scanner.config.phase_offset_deg
        positive, negative = _wrap_phase(np.array([offset, offset + 180.0]))
        out[0] = response_m
        np.abs(response_m, out=out[1])
        out[2] = positive
        out[2][response_m < 0] = negative

    def run_bias_spectroscopy(self, save_base_name: str) -> SpectroscopyResult:
        """Loop(s) at the tip; the sample keeps the switched state (as the twin does).

        With the backward sweep on, one loop runs the sweep and then its reverse; the
        backward channels are stored reversed so each column matches row 0's bias, as
        Nanonis does. ``num_sweeps`` loops are averaged; z_offset is recorded only.
        """
        self._require_engaged()
        self._begin_sweep()
        p = self.spectr_props
        v = self.sweep_waveform()
        full = np.concatenate([v, v[::-1]]) if p.backward_sweep else v
        x_um, y_um = self._tip_sample_um()
        sweeps = max(1, p.num_sweeps)
        total: np.ndarray | None = None
        for _ in range(sweeps):
            out = self.spectroscope.spectrum(x_um, y_um, full)
            resp_pm = np.asarray(out["response_pm"], dtype=np.float64)
            total = resp_pm if total is None else total + resp_pm
            self.clock_s += float(out["elapsed_s"])  # type: ignore[arg-type]
        assert total is not None
        resp = total * (PM / sweeps)
        n = v.size
        rows = np.empty((7 if p.backward_sweep else 4, n))
        rows[0] = v
        self._pfm_channels(resp[:n], rows[1:4])
        if p.backward_sweep:
            self._pfm_channels(resp[n:][::-1], rows[4:7])
        start, end = self.spectr_limits_v
        x_m, y_m = self.tip_xy_m
        return SpectroscopyResult(
            self._spectrum_channel_names(),
            rows,
            (start, end, x_m, y_m, p.z_offset_m),
        )

    # ------------------------------------------------------------ signals / Z

    def _height_at_tip_m(self) -> float:
        """Topography under the tip (m), with the scanner's offset and tilt."""
        cfg = self.scanner.config
        x_um, y_um = self._tip_sample_um()
        i, j = self.sample.index_of(x_um, y_um)
        ex, ey = self.extent_um
        tilt = cfg.tilt_nm_per_um[0] * (x_um - ex / 2) + cfg.tilt_nm_per_um[1] * (y_um - ey / 2)
        return (float(self.sample.height_nm[i, j]) + cfg.height_offset_nm + tilt) * NM

    def _lockin_at_tip(self) -> tuple[float, float]:
        """One noisy lock-in reading at the tip: (amplitude m, phase deg); withdrawn: noise."""
        cfg = self.scanner.config
        z = 0.0
        if self.z_on:
            i, j = self.sample.index_of(*self._tip_sample_um())
            dt = int(self.sample.domain_type[i, j])
            sign = {C_UP: 1.0, C_DOWN: -1.0, A_DOMAIN: 0.5}.get(dt, 0.0)
            z = float(self.sample.saturation_pm[i, j]) * sign * self.tip.amplitude_factor
        ph = math.radians(cfg.phase_offset_deg)
        noise = cfg.amplitude_noise_pm * self._signal_rng.standard_normal(2)
        re, im = z * math.cos(ph) + float(noise[0]), z * math.sin(ph) + float(noise[1])
        phase = (math.degrees(math.atan2(im, re)) + 90.0) % 360.0 - 90.0
        return math.hypot(re, im) * PM, phase

    def _channel_value(self, name: str, index: int) -> float:
        if name == "Height (m)":
            return self.get_z()
        if name == "Deflection (m)":
            return 0.0  # a parked tip in feedback has no error signal
        amp, phase = self._lockin_at_tip()
        return amp if name == "Amplitude (m)" else phase

    def get_z(self) -> float:
        return self._height_at_tip_m() if self.z_on else Z_RETRACTED_M


def _replay_signal_name(key: str) -> tuple[str, str, float]:
    """Label, SI unit and the factor to SI of a recorded channel key ("height_nm")."""
    units = {"_nm": ("m", NM), "_um": ("m", UM), "_pm": ("m", PM), "_deg": ("deg", 1.0)}
    base, unit, scale = key, "a.u.", 1.0
    for suffix, (u, f) in units.items():
        if key.lower().endswith(suffix) and len(key) > len(suffix):
            base, unit, scale = key[: -len(suffix)], u, f
            break
    label = base.replace("_", " ").strip().capitalize()[:30] or "Channel"
    return label, unit, scale


def load_replay(path: str | Path) -> tuple[ReplayGrid, tuple[tuple[str, str, float], ...]]:
    """Replay grid and its image channels (label, SI unit, factor to it) from an NPZ or a
    USID / sidpy HDF5 file; every unreadable file is a one-line ValueError."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"replay: {p} does not exist or is not a file")
    if h5py.is_hdf5(p):
        return load_hdf5_grid(p)
    if not zipfile.is_zipfile(p):
        raise ValueError(f"replay: {p.name} is not an NPZ archive or an HDF5 file")
    try:
        grid = load_replay_grid(p)
        with np.load(p, allow_pickle=False) as data:
            keys = data["channels"] if "channels" in data.files else None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"replay: {p.name} cannot be read: {exc}") from None
    n = grid.image.shape[0]
    if keys is not None and keys.ndim == 1 and keys.size == n and keys.dtype.kind == "U":
        names = tuple(str(k) for k in keys)
    else:
        names = tuple(f"channel_{k}" for k in range(n))
    return grid, tuple(_replay_signal_name(key) for key in names)


class ReplayBackend(_GridBackend):
    """A recorded grid (image + spectra) served as an SPM; measurements never change it.

    Scans sample the image channels nearest-neighbour at the frame's pixel centres
    (forward = backward, no noise). Spectroscopy returns the recorded spectrum of the
    grid cell nearest the tip over the recorded waveform: the requested num_points,
    limits and backward sweep are accepted but ignored (PropsGet/LimitsGet report the
    recorded ones). Recorded responses are multiplied by ``response_scale_m`` (default:
    pm, what ``export_twin_grid`` writes) into "Piezoresponse (m)". Image channel keys
    ending in _nm/_um/_pm are converted to metres, _deg kept, others served as a.u.
    """

    def __init__(
        self,
        path: str | Path,
        response_scale_m: float = PM,
        scan_speed_um_s: float = 2.0,
        realtime: bool = False,
    ) -> None:
        self.grid, channels = load_replay(path)
        self.path = Path(path)
        self.response_scale_m = float(response_scale_m)
        self.scan_speed_um_s = float(scan_speed_um_s)
        taken = ["Bias (V)", "X (m)", "Y (m)", "Z (m)"]
        self._image_scale: dict[str, float] = {}
        for k, (label, unit, scale) in enumerate(channels):
            name = f"{label} ({unit})"
            name = name if name not in taken else f"{label} {k} ({unit})"
            taken.append(name)
            self._image_scale[name] = scale
        names = taken[4:]
        self.signals = tuple(taken)
        self.default_channels = tuple(names)
        super().__init__(self.grid.extent_um, realtime)
        v = self.grid.waveform
        lo, hi = float(v.min()), float(v.max())
        self.spectr_limits_v = (hi, lo) if int(np.argmax(v)) <= int(np.argmin(v)) else (lo, hi)
        self.spectr_props = replace(self.spectr_props, num_points=int(v.size))

    def _acquire(
        self, window_um: tuple[float, float, float, float], lines: int, pixels: int
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
        x0, y0, w, h = window_um
        gh, gw = self.grid.shape
        ex, ey = self.grid.extent_um
        xs = x0 + (np.arange(pixels) + 0.5) * (w / pixels)
        ys = y0 + (np.arange(lines) + 0.5) * (h / lines)
        cols = np.clip((xs / ex * gw).astype(int), 0, gw - 1)
        rows = np.clip((ys / ey * gh).astype(int), 0, gh - 1)
        images: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for k, name in enumerate(self.signals[4:]):
            img = self.grid.image[k][np.ix_(rows, cols)] * self._image_scale[name]
            images[name] = (img, img)
        if "Height (m)" in images:
            images["Z (m)"] = images["Height (m)"]
        return images, 2.0 * w / self.scan_speed_um_s

    def get_spectroscopy_props(self) -> SpectroscopyProps:
        return replace(
            self.spectr_props,
            num_points=int(self.grid.waveform.size),
            backward_sweep=False,
            channels=("Piezoresponse (m)",),
        )

    def set_spectroscopy_props(self, props: SpectroscopyProps) -> None:
        self.spectr_props = props

    def get_spectroscopy_limits(self) -> tuple[float, float]:
        return self.spectr_limits_v

    def set_spectroscopy_limits(self, start_v: float, end_v: float) -> None:
        """Accepted for client compatibility; the recorded waveform is what is served."""

    def grid_index(self) -> tuple[int, int]:
        """(row, col) of the grid cell nearest the tip."""
        return self.grid.index_of(*self.to_sample_um(*self.tip_xy_m))

    def run_bias_spectroscopy(self, save_base_name: str) -> SpectroscopyResult:
        self._require_engaged()
        i, j = self.grid_index()
        resp = self.grid.spectra[i, j] * self.response_scale_m
        start, end = self.spectr_limits_v
        x_m, y_m = self.tip_xy_m
        return SpectroscopyResult(
            (BIAS_CALC, "Piezoresponse (m)"),
            np.array([self.grid.waveform, resp]),
            (start, end, x_m, y_m, self.spectr_props.z_offset_m),
        )

    def _channel_value(self, name: str, index: int) -> float:
        i, j = self.grid_index()
        return float(self.grid.image[index - 4, i, j] * self._image_scale[name])

    def get_z(self) -> float:
        if not self.z_on:
            return Z_RETRACTED_M
        if "Height (m)" in self._image_scale:
            k = self.signals.index("Height (m)") - 4
            i, j = self.grid_index()
            return float(self.grid.image[k, i, j] * self._image_scale["Height (m)"])
        return 0.0


def spm_limits(
    backend: PfmTwinBackend | ReplayBackend, bias_v: tuple[float, float] = (-10.0, 10.0)
) -> NanonisLimits:
    """Server limits for a backend: tip/frame within its extent (the larger half-side;
    the backend itself refuses the shorter axis' overhang), bias within bias_v."""
    half = max(backend.extent_um) / 2 * UM
    return NanonisLimits(bias_v=bias_v, xy_m=(-half, half))


def serve_spm(
    port: int = 6501,
    host: str = "127.0.0.1",
    seed: int = 0,
    replay: Path | None = None,
    limits: NanonisLimits | None = None,
) -> NanonisServer:
    """Start a Nanonis TCP server on the PFM twin (or on a replay file); returns it running.

    A bad replay file raises ValueError before any socket is opened. Spectroscopy
    limits are clipped into the server's bias limits so the defaults are reachable.
    """
    backend: PfmTwinBackend | ReplayBackend
    backend = ReplayBackend(replay) if replay is not None else PfmTwinBackend(seed=seed)
    lim = limits or spm_limits(backend)
    lo, hi = lim.bias_v
    start, end = backend.get_spectroscopy_limits()
    if not isinstance(backend, ReplayBackend):
        backend.set_spectroscopy_limits(min(max(start, lo), hi), min(max(end, lo), hi))
    server = NanonisServer(backend, host, port, limits=lim).start()
    what = f"replay {replay}" if replay is not None else f"PFM twin (seed {seed})"
    log.info("nanonis SPM server on %s:%d: %s", *server.address, what)
    return server
