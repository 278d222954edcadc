"""One SPM microscope for an experiment, reached only by its driver node's endpoints.

The node may be one the run started (`drivers.spm_host`: twin, replay grid or a real
Nanonis controller behind it) or one already running elsewhere (`driver.connect`);
the agent speaks protocol v1 to it either way (scan frames and spectra over ZeroMQ,
commands with replies), exactly as it would to hardware. The sample extent is the
travel the node allows (its `limits`), so the plan never reads the instrument's insides.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import zmq

from agent.config import ConfigError
from agent.engine.link import DriverLink, attach, client_keys
from drivers.protocol import FRAME_PREFIX, HEARTBEAT_TOPIC, Frame, decode_frame
from drivers.spm_host import SpmHost, SpmHostConfig
from drivers.transport import CommandClient, CommandError, CommandTimeout, StreamSubscriber

PM_PER_UM = 1e6
# Commands the SPM plans send: a node without them (a camera node) is refused up front.
SPM_NEEDS = {"scan", "spectrum", "engage", "withdraw", "get_state"}
HEARTBEAT_MS = 100  # while waiting for a reply: well inside any node's watchdog_ms


class SpmSession:
    """Use (engage / scan / spectrum) one SPM driver node behind protocol v1."""

    def __init__(self, ctx: zmq.Context, link: DriverLink) -> None:
        self.ctx = ctx
        self.link = link
        self.channels: list[str] = []  # what the run scans (spm_driver sets them)
        self.last_scan_seq = self.last_spectrum_seq = -1
        self.client = CommandClient(ctx, link.command_endpoint, timeout_ms=120_000, keys=link.keys)
        self.sub = StreamSubscriber(ctx, link.stream_endpoint, rcvhwm=1000, keys=link.keys)
        self._await_heartbeat()
        limits = self.client.call("get_state").result["limits"]
        (x0, x1), (y0, y1) = limits["x_um"], limits["y_um"]
        self.origin_um = (float(x0), float(y0))
        self.extent_um = (float(x1) - float(x0), float(y1) - float(y0))

    def _await_heartbeat(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(t == HEARTBEAT_TOPIC for t, _ in self.sub.take_messages()):
            if time.monotonic() > deadline:
                raise RuntimeError("SPM driver node published no heartbeat")
            self.sub.recv_newest(50)

    def _frames(self, wanted: dict[str, int], timeout_s: float = 60.0) -> dict[str, Frame]:
        """Every frame of `wanted` {stream: seq}; older traffic is dropped, none skipped."""
        got: dict[str, Frame] = {}
        deadline = time.monotonic() + timeout_s
        sock = self.sub.socket
        while len(got) < len(wanted):
            if time.monotonic() > deadline:
                missing = sorted(set(wanted) - set(got))
                raise RuntimeError(f"no frame on {missing} within {timeout_s:g} s")
            if not sock.poll(100):
                continue
            parts = sock.recv_multipart(copy=False)
            if not bytes(parts[0].buffer).startswith(FRAME_PREFIX):
                continue
            frame = decode_frame(parts)
            if wanted.get(frame.header.stream) == frame.header.seq:
                got[frame.header.stream] = frame
        return got

    def call(
        self, cmd: str, args: dict[str, Any] | None = None, timeout_ms: int = 120_000
    ) -> dict[str, Any]:
        """A command's result; heartbeats go out while a long one (a scan, a sweep) runs,
        since only the agent's messages keep the node's watchdog from withdrawing the tip."""
        req_id = self.client.send(cmd, args or {})
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            if self.client.socket.poll(HEARTBEAT_MS):
                reply = self.client.take_reply(req_id, cmd)
                if reply is not None:
                    return reply.result
            else:
                self.client.send("heartbeat", reply=False)
        raise CommandTimeout(f"{cmd}: no reply within {timeout_ms} ms")

    def ensure_engaged(self) -> None:
        """Tip in feedback (the watchdog or an operator may have withdrawn it)."""
        if not self.call("get_state").get("z_controller_on"):
            self.call("engage")

    def to_node_xy(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Sample coordinates (um from the corner of the allowed travel) -> node coordinates."""
        return x_um + self.origin_um[0], y_um + self.origin_um[1]

    def scan(self, pixels: int, channels: list[str]) -> dict[str, np.ndarray]:
        """Scan the whole sample at pixels x pixels; one (H, W) image per channel."""
        return self.scan_window((0.0, 0.0, *self.extent_um), pixels, pixels, channels)

    def scan_window(
        self, window_um: tuple[float, ...], pixels: int, lines: int, channels: list[str]
    ) -> dict[str, np.ndarray]:
        """Scan (x0, y0, w, h) um of the sample (corner-based); one (lines, pixels) image each."""
        x0, y0, w, h = (float(v) for v in window_um)
        cx, cy = self.to_node_xy(x0 + w / 2, y0 + h / 2)
        self.ensure_engaged()
        try:
            reply = self._scan_call(cx, cy, w, h, pixels, lines, channels)
        except CommandError as exc:  # a channel the controller lacks: one line, its list
            if "'channels[" in str(exc):
                raise ConfigError(f"config error: scan_channels: {exc}") from None
            raise
        wanted = {f"scan/{name}": int(seq) for name, seq in reply["seqs"].items()}
        self.last_scan_seq = min(wanted.values())  # names the scan in truth records
        frames = self._frames(wanted)
        return {
            name: np.array(frames[f"scan/{name}"].data, dtype=np.float64) for name in reply["seqs"]
        }

    def _scan_call(
        self, cx: float, cy: float, w: float, h: float, pixels: int, lines: int, channels: list[str]
    ) -> dict[str, Any]:
        return self.call(
            "scan",
            {
                "x_um": cx,
                "y_um": cy,
                "width_um": w,
                "height_um": h,
                "pixels": pixels,
                "lines": lines,
                "channels": channels,
            },
            timeout_ms=300_000,
        )

    def spectrum(self, x_um: float, y_um: float, bias_v: float, points: int) -> np.ndarray:
        """(2, L) bias waveform and piezoresponse (pm) at a sample position."""
        nx, ny = self.to_node_xy(x_um, y_um)
        reply = self.call(
            "spectrum",
            {
                "x_um": nx,
                "y_um": ny,
                "bias_from_v": bias_v,
                "bias_to_v": -bias_v,
                "points": points,
                "backward": False,
            },
        )
        self.last_spectrum_seq = int(reply["seq"])
        frame = self._frames({"spectrum": self.last_spectrum_seq})["spectrum"]
        k = reply["channels"].index("Piezoresponse")
        waveform = np.asarray(reply["waveform_v"], dtype=np.float64)
        return np.stack([waveform, np.asarray(frame.data[k], np.float64) * PM_PER_UM])

    def close(self) -> None:
        """Withdraw the tip and let go; a node we started is stopped by its host."""
        with contextlib.suppress(Exception):
            self.client.call("withdraw")
        self.client.close()
        self.sub.close()


def scan_channels(wanted: list[str] | None, host: SpmHost | None) -> list[str]:
    """The channels a run scans: those the config names, each checked against what a
    twin or recorded grid offers (one line naming its channels), or, with none named,
    every image channel it has. A real controller is asked at the first scan."""
    offered = host.signals if host is not None else None
    if wanted is None:
        if host is None or host.channels is None:
            raise ConfigError(
                "config error: scan_channels: required for a real controller or an attached "
                "node (the channels to scan, e.g. [Amplitude, Phase, Height])"
            )
        return list(host.channels)
    if offered is not None:
        for i, name in enumerate(wanted):
            if name not in offered:
                assert host is not None
                raise ConfigError(
                    f"config error: scan_channels[{i}]: {name!r} is not a channel of "
                    f"{host.source_name}; its channels: {list(host.channels or ())}"
                )
    return list(wanted)


@contextlib.contextmanager
def spm_driver(
    config: SpmHostConfig, ctx: zmq.Context, channels: list[str] | None = None
) -> Iterator[SpmSession]:
    """The run's SPM session, its `channels` resolved by `scan_channels`. Attaches to
    `config.connect` if set, else starts the driver side; either way the node is asked
    what it serves (and whether it has a truth topic), and the channels are checked,
    before anything moves."""
    host: SpmHost | None = None
    try:
        if config.connect is not None:
            link = attach(ctx, config.connect, keys=client_keys(config.client_auth))
        else:
            try:
                host = SpmHost(config, ctx)
            except ValueError as exc:  # a bad replay file: one line naming it
                raise ConfigError(f"config error: driver.replay: {exc}") from None
            except ConnectionError as exc:
                raise ConfigError(f"config error: driver.nanonis_host: {exc}") from None
            link = attach(ctx, host.command_endpoint, "driver")
        link.require(SPM_NEEDS, "spm-active")
        resolved = scan_channels(channels, host)
        session = SpmSession(ctx, link)
        session.channels = resolved
        try:
            yield session
        finally:
            session.close()
    finally:
        if host is not None:
            host.close()
