"""Ground truth of the PFM twin, on the driver side, for evaluation and training only
(never for policies): the twin is built here, where the instrument lives.

What it gives is raw physics, in the instrument's units (loops in pm over a bias
waveform in V, wall masks, scans); the agent turns it into rewards and network inputs
with its own code, so drivers still import nothing of `policies`. A run reaches it
only on the node's truth topic (`truth/spm`, published by `TwinSpmNode` like the
camera twins publish theirs), which only agent/records/evaluate.py subscribes to; a
replay grid or a real controller has no truth topic and the scores are left out.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from drivers.protocol import TRUTH_PREFIX
from drivers.spm_config import SpmDriverConfig
from drivers.spm_node import SpmNode
from simulators.spm import (
    FerroelectricSample,
    FerroelectricSampleConfig,
    PFMScanner,
    ScanConfig,
    SpectroscopyConfig,
    SwitchingSpectroscopy,
)

SPM_TRUTH_TOPIC = TRUTH_PREFIX + b"spm"
# A loop map costs one twin spectrum per scan pixel (about 1 ms each): published for
# scans up to this many pixels (the inverse workflows' candidate grids), not for the
# forward workflow's segmentation scans, which are scored on walls only.
LOOP_TRUTH_MAX_PIXELS = 64 * 64
TRUTH_FLOATS_PER_MESSAGE = 6000  # a truth message stays far below MAX_HEADER_BYTES

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


def scan_wall_mask(
    sample: FerroelectricSample,
    scanner: PFMScanner,
    window_um: tuple[float, float, float, float],
    shape: tuple[int, int],
    t_start_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W), drift (H, 2) um) of the unperturbed sample's walls as a scan of
    `window_um` (sample um from the corner) starting at t_start_s saw them."""
    lt = scanner.line_time_s(window_um[2])
    times = t_start_s + lt * np.arange(shape[0]) + 0.25 * lt
    drift = np.asarray(scanner.drift_um(times), dtype=float).reshape(shape[0], 2)
    return wall_mask(sample, window_um, shape, drift), drift


class TwinSpmNode(SpmNode):
    """The SPM node in front of the PFM twin's Nanonis server, publishing the twin's
    truth on `truth/spm` after each measurement (on the node thread, which owns the
    publisher), like the camera twins publish theirs after each frame. Records, all in
    node coordinates (um, origin at the sample centre):

    Each names its `record`:

    - ``scan`` (one per scan row): ``seq`` of its first frame, ``window_um`` (x0, y0, w,
      h), ``shape``, ``row``, ``walls`` (hex of the row's packed wall bits) and
      ``drift_um`` of that line: where the unperturbed walls were as the scan saw them.
    - ``spectrum``: ``seq``, the twin time ``t_s`` and ``drift_um`` at the sweep.
    - ``loops`` (first spectrum after a whole-sample scan of at most
      LOOP_TRUTH_MAX_PIXELS, per waveform): the unperturbed loops (pm) at that scan's
      pixel centres, ``row`` / ``col0`` blocks, ``waveform_v`` on the first block.

    A ``spectra`` batch publishes no truth yet (the plans send single spectra).
    """

    truth_source = "pfm twin"  # the node's capabilities say it has a truth topic

    def __init__(
        self, config: SpmDriverConfig, backend: Any, seed: int, ctx: zmq.Context | None = None
    ) -> None:
        super().__init__(config, ctx=ctx)
        self._backend = backend
        self._sample = FerroelectricSample(seed=seed)  # unperturbed: walls as first scanned
        self._seed = seed
        self._full_scan: dict[str, Any] | None = None  # the last whole-sample scan
        self._loops_sent: set[tuple[float, ...]] = set()

    def _publish_truth(self, record: dict[str, Any]) -> None:
        self.publisher.publish(SPM_TRUTH_TOPIC, record)

    def _cmd_scan(self, args: dict[str, Any]) -> dict[str, Any]:
        t_start = float(self._backend.clock_s)
        reply = super()._cmd_scan(args)
        if float(args.get("angle_deg", 0.0) or 0.0) != 0.0:
            return reply  # rotated frames: no truth mask (the plans scan unrotated)
        w, h = float(args["width_um"]), float(args["height_um"])
        x0, y0 = float(args["x_um"]) - w / 2, float(args["y_um"]) - h / 2
        shape = (int(args["lines"]), int(args["pixels"]))
        ex, ey = self._backend.extent_um
        window = (x0 + ex / 2, y0 + ey / 2, w, h)  # sample um from the corner
        mask, drift = scan_wall_mask(self._sample, self._backend.scanner, window, shape, t_start)
        seq = min(int(v) for v in reply["seqs"].values())
        for row in range(shape[0]):
            self._publish_truth(
                {
                    "record": "scan",
                    "seq": seq,
                    "window_um": [x0, y0, w, h],
                    "shape": list(shape),
                    "row": row,
                    "walls": np.packbits(mask[row]).tobytes().hex(),
                    "drift_um": [float(v) for v in drift[row]],
                }
            )
        whole = w >= 0.999 * ex and h >= 0.999 * ey
        if whole and shape[0] * shape[1] <= LOOP_TRUTH_MAX_PIXELS:
            self._full_scan = {"seq": seq, "window": window, "shape": shape}
            self._loops_sent.clear()
        return reply

    def _cmd_spectrum(self, args: dict[str, Any]) -> dict[str, Any]:
        reply = super()._cmd_spectrum(args)
        t_s = float(self._backend.clock_s)
        drift = [float(v) for v in np.ravel(self._backend.scanner.drift_um(t_s))[:2]]
        self._publish_truth(
            {"record": "spectrum", "seq": int(reply["seq"]), "t_s": t_s, "drift_um": drift}
        )
        waveform = np.asarray(reply["waveform_v"], dtype=float)
        key = tuple(np.round(waveform, 9).tolist())
        if self._full_scan is not None and key not in self._loops_sent:
            self._loops_sent.add(key)
            self._publish_loops(self._full_scan, waveform)
        return reply

    def _publish_loops(self, scan: dict[str, Any], waveform: np.ndarray) -> None:
        x0, y0, w, h = scan["window"]
        rows, cols = scan["shape"]
        xs = x0 + (np.arange(cols) + 0.5) * w / cols
        ys = y0 + (np.arange(rows) + 0.5) * h / rows
        xy = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)  # row by row
        maps = twin_spectra(self._sample, xy, waveform, self._seed + 7919)
        maps = maps.reshape(rows, cols, waveform.size)
        block = max(1, TRUTH_FLOATS_PER_MESSAGE // max(1, waveform.size))
        for r in range(rows):
            loops = maps[r]
            for c0 in range(0, cols, block):
                record: dict[str, Any] = {
                    "record": "loops",
                    "seq": scan["seq"],
                    "shape": [rows, cols],
                    "row": r,
                    "col0": c0,
                    "loops_pm": np.round(loops[c0 : c0 + block], 4).tolist(),
                }
                if r == 0 and c0 == 0:
                    record["waveform_v"] = waveform.tolist()
                self._publish_truth(record)
