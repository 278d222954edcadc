"""One SPM microscope for an experiment: Nanonis server (twin or replay) + driver node.

Both run in threads of this process, as ``scopeloop twin serve spm`` and
``scopeloop driver serve-spm`` would in their own: the agent still reaches the
instrument only through protocol v1 (scan frames and spectra over ZeroMQ, commands
with replies), exactly as it would reach hardware. Keeping them in-process lets the
evaluation read the twin's ground truth afterwards without a second channel.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from drivers.nanonis_server import NanonisServer
from drivers.protocol import FRAME_PREFIX, HEARTBEAT_TOPIC, Frame, decode_frame
from drivers.spm_config import SpmDriverConfig, SpmLimits
from drivers.spm_node import SpmNode
from drivers.spm_twin_backend import PfmTwinBackend, ReplayBackend, spm_limits
from drivers.transport import CommandClient, StreamSubscriber

PM_PER_UM = 1e6


class SpmSession:
    """Start, use (engage / scan / spectrum) and stop one SPM behind protocol v1."""

    def __init__(
        self, seed: int = 0, replay: Path | None = None, watchdog_ms: int = 30_000
    ) -> None:
        self.backend: PfmTwinBackend | ReplayBackend = (
            ReplayBackend(replay) if replay is not None else PfmTwinBackend(seed=seed)
        )
        self.extent_um = tuple(float(v) for v in self.backend.extent_um)
        self.server = NanonisServer(self.backend, "127.0.0.1", 0, limits=spm_limits(self.backend))
        self.server.start()
        self._dir = Path(tempfile.mkdtemp(prefix="sl-spm-"))
        half_x, half_y = self.extent_um[0] / 2, self.extent_um[1] / 2
        host, port = self.server.address
        config = SpmDriverConfig(
            stream_endpoint=f"ipc://{self._dir}/s",
            command_endpoint=f"ipc://{self._dir}/c",
            nanonis_host=host,
            nanonis_port=port,
            watchdog_ms=watchdog_ms,
            state_poll_ms=0,
            limits=SpmLimits(x_um=(-half_x, half_x), y_um=(-half_y, half_y)),
        )
        self.ctx = zmq.Context()
        self.node = SpmNode(config, ctx=self.ctx)
        self._thread = threading.Thread(target=self.node.serve, daemon=True)
        self._thread.start()
        self.client = CommandClient(self.ctx, self.node.endpoints[1], timeout_ms=120_000)
        self.sub = StreamSubscriber(self.ctx, self.node.endpoints[0], rcvhwm=1000)
        self._await_heartbeat()
        self.client.call("get_state")

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

    def call(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.client.call(cmd, args or {}).result

    def ensure_engaged(self) -> None:
        """Tip in feedback (the watchdog or an operator may have withdrawn it)."""
        if not self.call("get_state").get("z_controller_on"):
            self.call("engage")

    def to_node_xy(self, x_um: float, y_um: float) -> tuple[float, float]:
        """Sample coordinates (um from the corner) -> node coordinates (centred)."""
        return x_um - self.extent_um[0] / 2, y_um - self.extent_um[1] / 2

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
        reply = self.client.call(
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
        ).result
        wanted = {f"scan/{name}": int(seq) for name, seq in reply["seqs"].items()}
        frames = self._frames(wanted)
        return {
            name: np.array(frames[f"scan/{name}"].data, dtype=np.float64) for name in reply["seqs"]
        }

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
        frame = self._frames({"spectrum": int(reply["seq"])})["spectrum"]
        k = reply["channels"].index("Piezoresponse")
        waveform = np.asarray(reply["waveform_v"], dtype=np.float64)
        return np.stack([waveform, np.asarray(frame.data[k], np.float64) * PM_PER_UM])

    def close(self) -> None:
        # Shutting down anyway: the node's own stop makes the instrument safe.
        with contextlib.suppress(Exception):
            self.client.call("withdraw")
        self.client.close()
        self.sub.close()
        self.node.stop.set()
        self._thread.join(timeout=10)
        self.server.stop()
        self.ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SpmSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
