"""SPM bench: the PFM twin's own compute vs the same measurements through the driver chain.

Same run, interleaved rounds, medians (the machine is shared):

- twin alone: the twin the server serves (``PfmTwinBackend``, seed 0) called directly,
  given the same work as the chain's server in the same order (the same tip positions,
  the same scans), so both are in the same state when timed: its virtual clock (hence
  the drift under the tip), switched domains and tip wear change what a spectrum or a
  scan costs. 64-point sweeps; 128 x 128 scans (trace and retrace, 4 frames handed out);
- end to end, deployed as on an instrument: the twin Nanonis server (`scopeloop twin
  serve spm`, not realtime) and the SPM driver node (`scopeloop driver serve-spm`) each
  in its own process, and an agent-side ``CommandClient`` / ``StreamSubscriber`` here:
  ``spectra`` in batches of 16 positions (an active-learning q-batch; 64 points, no
  backward sweep), ``spectrum`` one at a time for comparison, and ``scan`` (128 x 128,
  4 channels); a measurement counts once its last frame has reached the subscriber.
  The agent side takes frames while it waits for the command's reply, as an agent
  loop does; the driver queues one point behind the sweep in progress
  (``spectra_queued``) so the controller goes from sweep to sweep.

``server_floor_spectrum_ratio`` is the same twin server fed by an ideal client (our wire
codec, 16 points in flight, no driver, protocol or agent): the best ratio any
client reaches against this server on this machine.

``overhead_ratio`` = max(twin rate / driver rate) over q-batched spectra and scan lines;
goal <= 1.2. ``grid_spectrum_overhead_ratio`` is a 16 x 16 grid in one command (the
round trip to the agent between q-batches, when the controller idles, is what separates
the two). ``single_spectrum_overhead_ratio`` is reported beside it: one command per
spectrum pays a full agent -> driver -> controller round trip each time.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
import zmq

from drivers import nanonis_wire as wire
from drivers.nanonis_server import ScanAction, ScanBuffer, ScanFrame
from drivers.protocol import HEARTBEAT_TOPIC
from drivers.spm_twin_backend import PfmTwinBackend
from drivers.transport import CommandClient, StreamSubscriber

Log = Callable[[str], None]
POINTS = 64
PIPELINE_DEPTH = 16  # points in flight from the ideal client (the floor measurement)
BATCH = 16  # positions per `spectra` command, like a q-batch of an active-learning step
GRID = 256  # a 16 x 16 spectroscopy grid in one `spectra` command
BIAS_V = 8.0
SIZE = 128  # scan lines and pixels per line
CHANNELS = ["Height", "Amplitude", "Phase", "Deflection"]
HALF_UM = 0.9  # random tip positions in [-HALF_UM, HALF_UM]^2 (2 um sample, centred)


class _Twin:
    """The twin the server serves (``PfmTwinBackend``, seed 0), called directly.

    It is given the same work as the driver chain's server, in the same order (the same
    tip positions, the same scans), so both are in the same state when timed: the
    virtual clock (hence the thermal drift under the tip), switched domains and tip wear
    all change what a spectrum or a scan costs to compute.
    """

    def __init__(self) -> None:
        self.backend = PfmTwinBackend(seed=0)
        b = self.backend
        b.set_z_controller(True)
        b.open_bias_spectroscopy()
        props = b.get_spectroscopy_props()
        b.set_spectroscopy_props(
            replace(props, num_sweeps=1, backward_sweep=False, num_points=POINTS, z_offset_m=0.0)
        )
        b.set_spectroscopy_limits(-BIAS_V, BIAS_V)
        b.set_scan_frame(ScanFrame(0.0, 0.0, 1e-6, 1e-6, 0.0))
        names = [n.split(" (")[0] for n in b.signal_names()]
        self.channels = tuple(names.index(c) for c in CHANNELS)
        b.set_scan_buffer(ScanBuffer(self.channels, SIZE, SIZE))

    def spectra_per_s(self, xy_um: list[list[float]]) -> float:
        b = self.backend
        t0 = time.perf_counter()
        for x, y in xy_um:
            b.move_tip_xy(x / 1e6, y / 1e6, True)
            b.run_bias_spectroscopy("")
        return len(xy_um) / (time.perf_counter() - t0)

    def scan_lines_per_s(self, n: int) -> float:
        """Each scan computes trace and retrace (Scan.Action) and hands out the frames."""
        b = self.backend
        t0 = time.perf_counter()
        for _ in range(n):
            b.scan_action(ScanAction.START, True)
            for channel in self.channels:
                b.grab_scan_frame(channel, True)
        return n * SIZE / (time.perf_counter() - t0)


class _BareClient:
    """The same twin server driven by a minimal Nanonis client (our wire codec, requests
    sent back to back): the controller's own rate, without our driver or protocol."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rng = np.random.default_rng(1)
        self.call("ZCtrl.OnOffSet", 1)
        self.call("BiasSpectr.Open")
        self.call("BiasSpectr.PropsSet", 0, 1, 2, POINTS, 0.0, 2, 2)
        self.call("BiasSpectr.LimitsSet", -BIAS_V, BIAS_V)
        spec = wire.COMMANDS["Signals.InSlotsGet"]  # buffers number channels by slot
        signals = [str(n) for n in wire.decode_response(spec, self.call(spec.name))[0][0]]
        self.indexes = [i for i, n in enumerate(signals) if n.split(" (")[0] in CHANNELS]

    def send(self, command: str, *args: Any) -> None:
        self.sock.sendall(wire.encode_request(wire.COMMANDS[command], args))

    def read(self) -> bytes:
        _name, size, _flag = wire.unpack_header(wire.recv_exact(self.sock, wire.HEADER_SIZE))
        return wire.recv_exact(self.sock, size)

    def call(self, command: str, *args: Any) -> bytes:
        self.send(command, *args)
        return self.read()

    def spectra_per_s(self, n: int, depth: int = 1) -> float:
        """Move + sweep per point, ``depth`` points in flight: 1 waits for each sweep;
        more keeps the controller's queue full, as no real client could do better."""
        xy = self.rng.uniform(-HALF_UM, HALF_UM, size=(n, 2)) / 1e6
        t0 = time.perf_counter()
        sent = 0
        for i in range(n):
            while sent < n and sent - i < depth:
                self.send("FolMe.XYPosSet", float(xy[sent, 0]), float(xy[sent, 1]), 1)
                self.send("BiasSpectr.Start", 1, "")
                sent += 1
            self.read()
            self.read()
        return n / (time.perf_counter() - t0)

    def scan_lines_per_s(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.call("Scan.FrameSet", 0.0, 0.0, 1e-6, 1e-6, 0.0)
            self.call("Scan.BufferSet", self.indexes, SIZE, SIZE)
            self.call("Scan.Action", 0, 1)
            self.call("Scan.StatusGet")
            for index in self.indexes:
                self.call("Scan.FrameDataGrab", index, 1)
        return n * SIZE / (time.perf_counter() - t0)

    def close(self) -> None:
        self.sock.close()


class _Chain:
    """The deployment: twin Nanonis server and SpmNode each in its own process (as the
    controller and the driver are on an instrument), the agent-side client here."""

    def __init__(self, tmp: str) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        host, port = self._start_server()
        # A second, identical server for the bare client, so that its work does not
        # change the state of the one the chain and the in-process twin mirror.
        self.bare_address = self._start_server()
        config = Path(tmp) / "spm-driver.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "stream_endpoint": f"ipc://{tmp}/s",
                    "command_endpoint": f"ipc://{tmp}/c",
                    "nanonis_host": host,
                    "nanonis_port": port,
                    "watchdog_ms": 5000,
                    "limits": {"x_um": [-1.0, 1.0], "y_um": [-1.0, 1.0]},
                }
            )
        )
        self._start(["driver", "serve-spm", str(config)], "spm driver ready")
        self.ctx = zmq.Context()
        self.client = CommandClient(self.ctx, f"ipc://{tmp}/c", timeout_ms=60_000)
        self.sub = StreamSubscriber(
            self.ctx,
            f"ipc://{tmp}/s",
            topics=(b"frame/spectrum", b"frame/scan/", HEARTBEAT_TOPIC),
            rcvhwm=100_000,
        )
        self.client.call("get_state")
        deadline = time.monotonic() + 10
        while not self.sub.last_message_ns:  # joined once a heartbeat arrives
            if time.monotonic() > deadline:
                raise RuntimeError("no heartbeat from the SPM node")
            self.sub.recv_newest(50)
        self.client.call("engage")
        self.rng = np.random.default_rng(1)

    def _call(self, cmd: str, args: dict[str, Any]) -> None:
        """Send a command and take frames while it runs, as an agent's loop does: the
        reply is awaited 1 ms at a time, frames taken in between (a few per wake-up)."""
        req_id = self.client.send(cmd, args)
        deadline = time.monotonic() + 60
        heartbeat_at = time.monotonic() + 0.1  # a waiting agent keeps feeding the watchdog
        while time.monotonic() < deadline:
            if self.client.socket.poll(1) and self.client.take_reply(req_id, cmd) is not None:
                return
            self.sub.recv_newest(0)
            if time.monotonic() > heartbeat_at:
                self.client.send("heartbeat", reply=False)
                heartbeat_at = time.monotonic() + 0.1
        raise RuntimeError(f"{cmd}: no reply from the SPM node within 60 s")

    def _start_server(self) -> tuple[str, int]:
        line = self._start(["twin", "serve", "spm", "--port", "0"], "serving Nanonis TCP on")
        host, port = line.rsplit(" ", 1)[-1].rsplit(":", 1)
        return host, int(port)

    def _start(self, args: list[str], ready: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        for line in proc.stdout:
            if ready in line:
                return line.strip()
        raise RuntimeError(f"`scopeloop {' '.join(args)}` exited before it was ready")

    def _await_frames(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while self.sub.stats.received < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"frames lost: {self.sub.stats.received} of {count}")
            self.sub.recv_newest(100)
        self.sub.messages.clear()

    def spectra_per_s(self, xy_um: list[list[float]], batch: int) -> float:
        """`spectrum` one at a time (batch 1) or `spectra` batches; a spectrum counts once
        its frame has reached the subscriber."""
        sweep = {"bias_from_v": -BIAS_V, "bias_to_v": BIAS_V, "points": POINTS}
        sweep["backward"] = False
        t0 = time.perf_counter()
        for i in range(0, len(xy_um), batch):
            chunk = xy_um[i : i + batch]
            target = self.sub.stats.received + len(chunk)
            if batch == 1:
                self._call("spectrum", {**sweep, "x_um": chunk[0][0], "y_um": chunk[0][1]})
            else:
                self._call("spectra", {**sweep, "positions_um": chunk})
            self._await_frames(target)
        return len(xy_um) / (time.perf_counter() - t0)

    def scan_lines_per_s(self, n: int) -> float:
        args = {"x_um": 0.0, "y_um": 0.0, "width_um": 1.0, "height_um": 1.0, "pixels": SIZE,
                "lines": SIZE, "channels": CHANNELS}  # fmt: skip
        t0 = time.perf_counter()
        for _ in range(n):
            target = self.sub.stats.received + len(CHANNELS)
            self._call("scan", args)
            self._await_frames(target)
        return n * SIZE / (time.perf_counter() - t0)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.call("shutdown")
        self.client.close()
        self.sub.close()
        self.ctx.term()
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run(quick: bool = False, log: Log = print) -> dict[str, float]:
    """Spectra/s and scan lines/s: twin compute, twin server, driver chain; flat metrics."""
    rounds, spectra, scans = (3, 128, 6) if quick else (9, 512, 30)
    twin = _Twin()
    rng = np.random.default_rng(1)
    # twin (t*) and chain (d*) rates of the same work: q-batches, grid, one at a time, scans
    keys = ("ts", "ds", "tg", "dg", "t1", "d1", "tl", "dl", "ns", "np", "nl")
    rates: dict[str, list[float]] = {k: [] for k in keys}
    with tempfile.TemporaryDirectory(prefix="spm-bench-") as tmp:
        chain = _Chain(tmp)
        bare = _BareClient(chain.bare_address)

        def spectra_both(n: int, batch: int) -> tuple[float, float]:
            xy = rng.uniform(-HALF_UM, HALF_UM, size=(n, 2)).tolist()
            return twin.spectra_per_s(xy), chain.spectra_per_s(xy, batch)

        try:
            spectra_both(BATCH, BATCH)  # warm-up: caches, first-call costs
            spectra_both(5, 1)
            twin.scan_lines_per_s(1)
            chain.scan_lines_per_s(1)
            bare.spectra_per_s(5)
            bare.scan_lines_per_s(1)
            for r in range(rounds):
                for t, d, n, batch in (
                    ("ts", "ds", spectra, BATCH),
                    ("tg", "dg", spectra, GRID),
                    ("t1", "d1", spectra // 4, 1),
                ):
                    twin_rate, chain_rate = spectra_both(n, batch)
                    rates[t].append(twin_rate)
                    rates[d].append(chain_rate)
                rates["tl"].append(twin.scan_lines_per_s(scans))
                rates["dl"].append(chain.scan_lines_per_s(scans))
                rates["ns"].append(bare.spectra_per_s(spectra))
                rates["np"].append(bare.spectra_per_s(spectra, depth=PIPELINE_DEPTH))
                rates["nl"].append(bare.scan_lines_per_s(scans))
                log(
                    f"round {r + 1}/{rounds}: spectra/s twin {rates['ts'][-1]:.0f} driver "
                    f"{rates['ds'][-1]:.0f} (grid {rates['dg'][-1]:.0f}, one at a time "
                    f"{rates['d1'][-1]:.0f}), server alone {rates['ns'][-1]:.0f}; scan "
                    f"lines/s twin {rates['tl'][-1]:.0f} driver {rates['dl'][-1]:.0f}, server "
                    f"alone {rates['nl'][-1]:.0f}"
                )
        finally:
            bare.close()
            chain.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    metrics = {
        "twin_spectra_per_s": med["ts"],
        "server_spectra_per_s": med["ns"],
        "server_pipelined_spectra_per_s": med["np"],
        "driver_spectra_per_s": med["ds"],
        "driver_single_spectra_per_s": med["d1"],
        "driver_grid_spectra_per_s": med["dg"],
        "twin_scan_lines_per_s": med["tl"],
        "server_scan_lines_per_s": med["nl"],
        "driver_scan_lines_per_s": med["dl"],
        "spectrum_overhead_ratio": med["ts"] / med["ds"],
        "single_spectrum_overhead_ratio": med["t1"] / med["d1"],
        "grid_spectrum_overhead_ratio": med["tg"] / med["dg"],
        "scan_overhead_ratio": med["tl"] / med["dl"],
        # What the TCP server costs by itself (a second server, serially driven by a bare
        # client: its state drifts apart, so this is indicative), and what our driver +
        # protocol add to it.
        "server_overhead_ratio": max(med["ts"] / med["ns"], med["tl"] / med["nl"]),
        "driver_overhead_ratio": max(med["ns"] / med["ds"], med["nl"] / med["dl"]),
        # The floor for spectra: the twin's TCP server fed by an ideal client that keeps
        # its queue full, with no driver, protocol or agent at all.
        "server_floor_spectrum_ratio": med["ts"] / med["np"],
    }
    metrics["overhead_ratio"] = max(
        metrics["spectrum_overhead_ratio"], metrics["scan_overhead_ratio"]
    )
    log(
        f"{POINTS}-point spectra: twin {med['ts']:.0f}/s, server {med['ns']:.0f}/s, driver "
        f"{med['ds']:.0f}/s in batches of {BATCH} (x{metrics['spectrum_overhead_ratio']:.2f}; "
        f"one at a time x{metrics['single_spectrum_overhead_ratio']:.2f}); {SIZE}x{SIZE} "
        f"scans, {len(CHANNELS)} channels: twin {med['tl']:.0f} lines/s, server "
        f"{med['nl']:.0f}, driver {med['dl']:.0f} (x{metrics['scan_overhead_ratio']:.2f}); "
        f"overhead_ratio {metrics['overhead_ratio']:.2f} (goal <= 1.2), of which the TCP "
        f"server alone x{metrics['server_overhead_ratio']:.2f}, driver + protocol "
        f"x{metrics['driver_overhead_ratio']:.2f}; floor (ideal pipelined client, no driver) "
        f"x{metrics['server_floor_spectrum_ratio']:.2f}"
    )
    return metrics


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
