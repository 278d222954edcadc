"""The SPM driver side a run starts for itself: an `SpmNode` in front of a Nanonis
controller, which is the PFM twin's Nanonis server (`source: twin`), a recorded grid
(`replay`) or a real controller at `nanonis_host:nanonis_port` (`nanonis`).

The agent reaches it only by the node's endpoints, exactly as it reaches a node it
attaches to (`connect`, e.g. `scopeloop driver serve-spm` on the microscope's PC).
Ground truth exists only for the twin, on the node's truth topic (`TwinSpmNode`); a
recorded grid or a real controller has none.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Literal

import zmq
from pydantic import Field

from drivers.config import ENDPOINT_PATTERN, ClientAuth, StrictModel
from drivers.nanonis_server import NanonisServer
from drivers.spm_config import SpmDriverConfig, SpmLimits
from drivers.spm_node import SpmNode, split_signal
from drivers.spm_truth import TwinSpmNode
from drivers.spm_twin_backend import PfmTwinBackend, ReplayBackend, spm_limits


class SpmHostConfig(StrictModel):
    """Where an SPM run's instrument comes from (the `driver` section of `spm-active`)."""

    source: Literal["twin", "replay", "nanonis"] = "twin"
    replay: Path | None = None  # recorded grid (source: replay)
    seed: int = Field(0, ge=0, le=2**31 - 1)  # the twin's sample (the run's seed)
    nanonis_host: str = "127.0.0.1"  # source: nanonis
    nanonis_port: int = Field(6501, ge=1, le=65_535)
    limits: SpmLimits | None = None  # source nanonis: the controller's safe travel, bias
    watchdog_ms: int = Field(30_000, ge=100, le=600_000)
    # A node already running (`scopeloop driver serve-spm`): its command endpoint.
    connect: str | None = Field(None, pattern=ENDPOINT_PATTERN)
    client_auth: ClientAuth = ClientAuth()  # the agent's CURVE keys for a tcp:// `connect`


class SpmHost:
    """Nanonis server (twin or replay; none for a real controller) + SpmNode, in threads."""

    def __init__(self, config: SpmHostConfig, ctx: zmq.Context | None = None) -> None:
        self.server: NanonisServer | None = None
        # What a twin or a recorded grid can scan (`signals`) and its own image channels
        # (`channels`), as its file names them; None: only the controller knows (a real
        # one reports its signals when a scan asks for one it lacks).
        self.signals: tuple[str, ...] | None = None
        self.channels: tuple[str, ...] | None = None
        self.source_name = f"{config.nanonis_host}:{config.nanonis_port}"
        host, port, limits = config.nanonis_host, config.nanonis_port, config.limits
        if config.source == "nanonis" and limits is None:
            raise ValueError("limits: required in front of a real controller")
        if config.source in ("twin", "replay"):
            backend: PfmTwinBackend | ReplayBackend
            if config.source == "replay":
                if config.replay is None:
                    raise ValueError("required with source replay")
                backend = ReplayBackend(config.replay)  # ValueError: a bad file, one line
            else:
                backend = PfmTwinBackend(seed=config.seed)
            self.signals = tuple(split_signal(name)[0] for name in backend.signals)
            self.channels = tuple(split_signal(name)[0] for name in backend.default_channels)
            self.source_name = config.replay.name if config.replay else "the PFM twin"
            self.server = NanonisServer(backend, "127.0.0.1", 0, limits=spm_limits(backend))
            self.server.start()
            host, port = self.server.address
            half_x, half_y = (float(v) / 2 for v in backend.extent_um)
            limits = SpmLimits(x_um=(-half_x, half_x), y_um=(-half_y, half_y))
        self._dir = Path(tempfile.mkdtemp(prefix="sl-spm-"))
        node_config = SpmDriverConfig(
            stream_endpoint=f"ipc://{self._dir}/s",
            command_endpoint=f"ipc://{self._dir}/c",
            nanonis_host=host,
            nanonis_port=port,
            watchdog_ms=config.watchdog_ms,
            state_poll_ms=0 if self.server is not None else 500,
            limits=limits or SpmLimits(),
        )
        try:
            self.node = (
                TwinSpmNode(node_config, backend, config.seed, ctx=ctx)
                if config.source == "twin"
                else SpmNode(node_config, ctx=ctx)
            )
        except Exception:
            self._stop_server()
            raise
        self._thread = threading.Thread(target=self.node.serve, daemon=True, name="spm-node")
        self._thread.start()

    @property
    def command_endpoint(self) -> str:
        return self.node.endpoints[1]

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def close(self) -> None:
        """Stop the node (it makes the instrument safe on the way out), then the server."""
        self.node.stop.set()
        self._thread.join(timeout=10)
        self._stop_server()
