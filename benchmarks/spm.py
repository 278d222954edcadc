"""SPM bench: the PFM twin's own compute vs the same measurements through the driver chain.

Same run, interleaved rounds, medians (the machine is shared):

- twin alone: ``SwitchingSpectroscopy.spectrum`` for 64-point sweeps at random tip
  positions, and ``PFMScanner.scan`` for 128 x 128 frames, called directly. A scan
  counts a forward trace and its retrace, as the twin backend computes both for every
  ``Scan.Action`` start;
- end to end: the twin Nanonis server (``serve_spm``, port 0, not realtime), an
  ``SpmNode`` in a thread and an agent-side ``CommandClient`` / ``StreamSubscriber``:
  ``spectrum`` (64 points, no backward sweep) and ``scan`` (128 x 128, 4 channels); a
  measurement counts once its last frame has reached the subscriber.

``overhead_ratio`` = max(twin rate / driver rate) over spectra and scan lines; goal <= 1.2.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from drivers.protocol import HEARTBEAT_TOPIC
from drivers.spm_config import SpmDriverConfig, SpmLimits
from drivers.spm_twin_backend import serve_spm
from drivers.transport import CommandClient, StreamSubscriber
from simulators.spm import (
    FerroelectricSample,
    PFMScanner,
    SwitchingSpectroscopy,
    triangular_waveform,
)

Log = Callable[[str], None]
POINTS = 64
BIAS_V = 8.0
SIZE = 128  # scan lines and pixels per line
CHANNELS = ["Height", "Amplitude", "Phase", "Deflection"]
HALF_UM = 0.9  # random tip positions in [-HALF_UM, HALF_UM]^2 (2 um sample, centred)


class _Twin:
    """The simulator classes alone, as the twin backend builds them (seed 0)."""

    def __init__(self) -> None:
        self.sample = FerroelectricSample(None, seed=0)
        self.scanner = PFMScanner(self.sample, seed=0)
        self.retrace = PFMScanner(self.sample, self.scanner.config, seed=1)
        self.spectroscope = SwitchingSpectroscopy(self.sample, seed=0)
        self.waveform = triangular_waveform(-BIAS_V, POINTS)
        self.rng = np.random.default_rng(1)
        ex, ey = self.sample.extent_um
        self.centre = (ex / 2, ey / 2)

    def spectra_per_s(self, n: int) -> float:
        xy = self.rng.uniform(-HALF_UM, HALF_UM, size=(n, 2))
        t0 = time.perf_counter()
        for x, y in xy:
            self.spectroscope.spectrum(self.centre[0] + x, self.centre[1] + y, self.waveform)
        return n / (time.perf_counter() - t0)

    def scan_lines_per_s(self, n: int) -> float:
        window = (self.centre[0] - 0.5, self.centre[1] - 0.5, 1.0, 1.0)
        t0 = time.perf_counter()
        for _ in range(n):
            self.scanner.scan(window, (SIZE, SIZE))
            self.retrace.scan(window, (SIZE, SIZE))
        return n * SIZE / (time.perf_counter() - t0)


class _Chain:
    """Twin Nanonis server + SpmNode (thread) + agent-side client and subscriber."""

    def __init__(self, tmp: str) -> None:
        from drivers.spm_node import SpmNode  # needs the vendor client

        self.server = serve_spm(port=0)
        host, port = self.server.address
        self.ctx = zmq.Context()
        config = SpmDriverConfig(
            stream_endpoint=f"ipc://{tmp}/s",
            command_endpoint=f"ipc://{tmp}/c",
            nanonis_host=host,
            nanonis_port=port,
            watchdog_ms=5000,
            limits=SpmLimits(x_um=(-1.0, 1.0), y_um=(-1.0, 1.0)),
        )
        self.node = SpmNode(config, ctx=self.ctx)
        self.thread = threading.Thread(target=self.node.serve, daemon=True)
        self.thread.start()
        self.client = CommandClient(self.ctx, self.node.endpoints[1], timeout_ms=60_000)
        self.sub = StreamSubscriber(
            self.ctx,
            self.node.endpoints[0],
            topics=(b"frame/spectrum", b"frame/scan/", HEARTBEAT_TOPIC),
            rcvhwm=1000,
        )
        self.client.call("get_state")
        deadline = time.monotonic() + 10
        while not self.sub.last_message_ns:  # joined once a heartbeat arrives
            if time.monotonic() > deadline:
                raise RuntimeError("no heartbeat from the SPM node")
            self.sub.recv_newest(50)
        self.client.call("engage")
        self.rng = np.random.default_rng(1)

    def _await_frames(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while self.sub.stats.received < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"frames lost: {self.sub.stats.received} of {count}")
            self.sub.recv_newest(100)
        self.sub.messages.clear()

    def spectra_per_s(self, n: int) -> float:
        xy = self.rng.uniform(-HALF_UM, HALF_UM, size=(n, 2))
        args: dict[str, Any] = {"bias_from_v": -BIAS_V, "bias_to_v": BIAS_V, "points": POINTS}
        args["backward"] = False
        t0 = time.perf_counter()
        for x, y in xy:
            self.client.call("spectrum", {**args, "x_um": float(x), "y_um": float(y)})
            self._await_frames(self.sub.stats.received + 1)
        return n / (time.perf_counter() - t0)

    def scan_lines_per_s(self, n: int) -> float:
        args = {"x_um": 0.0, "y_um": 0.0, "width_um": 1.0, "height_um": 1.0, "pixels": SIZE,
                "lines": SIZE, "channels": CHANNELS}  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(n):
            self.client.call("scan", args)
            self._await_frames(self.sub.stats.received + len(CHANNELS))
        return n * SIZE / (time.perf_counter() - t0)

    def close(self) -> None:
        self.node.stop.set()
        self.thread.join(timeout=10)
        self.client.close()
        self.sub.close()
        self.server.stop()
        self.ctx.term()


def run(quick: bool = False, log: Log = print) -> dict[str, float]:
    """Spectra/s and scan lines/s, twin alone vs end to end; returns flat metrics."""
    rounds, spectra, scans = (5, 200, 10) if quick else (9, 500, 30)
    twin = _Twin()
    rates: dict[str, list[float]] = {k: [] for k in ("ts", "ds", "tl", "dl")}
    with tempfile.TemporaryDirectory(prefix="spm-bench-") as tmp:
        chain = _Chain(tmp)
        try:
            twin.spectra_per_s(5)  # warm-up: caches, first-call costs
            twin.scan_lines_per_s(1)
            chain.spectra_per_s(5)
            chain.scan_lines_per_s(1)
            for r in range(rounds):
                rates["ts"].append(twin.spectra_per_s(spectra))
                rates["ds"].append(chain.spectra_per_s(spectra))
                rates["tl"].append(twin.scan_lines_per_s(scans))
                rates["dl"].append(chain.scan_lines_per_s(scans))
                log(
                    f"round {r + 1}/{rounds}: spectra/s twin {rates['ts'][-1]:.0f} "
                    f"driver {rates['ds'][-1]:.0f}; scan lines/s twin {rates['tl'][-1]:.0f} "
                    f"driver {rates['dl'][-1]:.0f}"
                )
        finally:
            chain.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    metrics = {
        "twin_spectra_per_s": med["ts"],
        "driver_spectra_per_s": med["ds"],
        "twin_scan_lines_per_s": med["tl"],
        "driver_scan_lines_per_s": med["dl"],
        "spectrum_overhead_ratio": med["ts"] / med["ds"],
        "scan_overhead_ratio": med["tl"] / med["dl"],
    }
    metrics["overhead_ratio"] = max(
        metrics["spectrum_overhead_ratio"], metrics["scan_overhead_ratio"]
    )
    log(
        f"{POINTS}-point spectra: twin {med['ts']:.0f}/s, driver {med['ds']:.0f}/s "
        f"(x{metrics['spectrum_overhead_ratio']:.2f}); {SIZE}x{SIZE} scans, "
        f"{len(CHANNELS)} channels: twin {med['tl']:.0f} lines/s, driver {med['dl']:.0f} "
        f"lines/s (x{metrics['scan_overhead_ratio']:.2f}); overhead_ratio "
        f"{metrics['overhead_ratio']:.2f} (goal <= 1.2)"
    )
    return metrics


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
