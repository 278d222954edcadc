"""Run telemetry: what a live experiment shows the world, and the pause/resume/stop it obeys.

Any runner (feedback trap, smart acquisition, SPM active learning) creates one
`RunTelemetry`, writes its endpoints to `runs/<run>/telemetry.json` and, from its
own loop thread, publishes:

    frame   newest image (decimated to <= max_px, at most max_frame_hz) + overlays:
            detections, target, laser spots (all in um)
    map     named 2-D float arrays (GP mean, uncertainty, acquisition...) with their
            extent and the measured points
    metric  {name: value} at time t (loop latency, frames skipped, tracking error, reward)
    event   one log line
    state   starting / running / paused / stopping / stopped, run name and phase

on a ZeroMQ PUB socket with a small send high-water mark: a subscriber that does not
keep up loses messages at its own end and the publisher never blocks, so the loop
is never slowed by whoever watches. The runner also calls `poll_control()` once per
iteration: a ROUTER socket answers `pause`, `resume`, `stop` and `status` requests
and the runner reads `paused` / `stop_requested` (it, not this module, decides what
pausing means for its instrument; for the feedback trap it is laser off).

Who may connect: by default both sockets are ipc:// in a fresh 0700 directory, so only
the run's own user can reach them (who could equally kill the process). A tcp://
endpoint needs CURVE keys (drivers/auth.py), even on loopback, since every local
user can reach a loopback port; a dashboard token is never what guards these sockets.
Every receiving socket has a maximum message size (`max_part_bytes`, in telemetry.json).

Wire format (protocol v1 style, msgpack, never pickle): stream messages are
`[topic, header]` plus raw array buffers for `frame` and `map`; control requests are
one msgpack map `{"v": 1, "cmd": ...}`, replies `{"v": 1, "ok", "state", "error"}`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from drivers.auth import (
    ClientKeys,
    ServerKeys,
    check_bind,
    private_dir,
    release_server,
    secure_client,
    secure_server,
    set_max_message,
    tcp_host,
)
from drivers.protocol import PROTOCOL_VERSION, ProtocolError, now_ns, pack, unpack_map
from drivers.transport import COMMAND_MAX_BYTES

TELEMETRY_FILE = "telemetry.json"
TOPIC_FRAME = b"tm/frame"
TOPIC_MAP = b"tm/map"
TOPIC_METRIC = b"tm/metric"
TOPIC_EVENT = b"tm/event"
TOPIC_STATE = b"tm/state"
TOPICS = (TOPIC_FRAME, TOPIC_MAP, TOPIC_METRIC, TOPIC_EVENT, TOPIC_STATE)
COMMANDS = ("pause", "resume", "stop", "status")
STATES = ("starting", "running", "paused", "stopping", "stopped")
RECENT_EVENTS = 50  # replayed to a dashboard that attaches late (in the status reply)
MAX_EVENT_CHARS = 500
MAX_OVERLAY_POINTS = 256  # detections/measured points per message (keeps headers small)
STATE_REPEAT_S = 1.0  # late subscribers learn the state within this time
MAX_PX_RANGE = (16, 4096)  # published frames are decimated to <= max_px per side
MAX_MAP_PX = 1024  # per side of a map layer; a map is for a person to look at
DEFAULT_MAX_PART_BYTES = max(512 * 512 * 8, MAX_MAP_PX * MAX_MAP_PX * 4, COMMAND_MAX_BYTES)


def max_part_bytes(max_px: int) -> int:
    """The largest message part a run publishes: a float64 frame of max_px, or a map layer."""
    return max(max_px * max_px * 8, MAX_MAP_PX * MAX_MAP_PX * 4, COMMAND_MAX_BYTES)


@dataclass(frozen=True)
class TelemetryEndpoints:
    publish: str
    control: str


@dataclass(frozen=True)
class TelemetryInfo:
    """The contents of `telemetry.json`: where a dashboard attaches to a run."""

    run: str
    run_dir: Path
    publish: str
    control: str
    pid: int
    started_wall: float
    live: bool
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES
    server_public_key: str | None = None  # Z85, when the endpoints are CURVE tcp://

    def is_live(self) -> bool:
        """Marked live and its process still exists (a crashed run cannot unmark itself)."""
        if not self.live:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_telemetry_info(run_dir: Path) -> TelemetryInfo | None:
    """The run's telemetry.json, or None when it has none (or it is torn mid-write)."""
    try:
        raw = json.loads((Path(run_dir) / TELEMETRY_FILE).read_text())
        return TelemetryInfo(
            run=str(raw["run"]),
            run_dir=Path(run_dir),
            publish=str(raw["publish"]),
            control=str(raw["control"]),
            pid=int(raw["pid"]),
            started_wall=float(raw["started_wall"]),
            live=bool(raw["live"]),
            max_part_bytes=int(raw.get("max_part_bytes", DEFAULT_MAX_PART_BYTES)),
            server_public_key=raw.get("server_public_key"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_live_run(runs_dir: Path, since_wall: float = 0.0) -> TelemetryInfo | None:
    """The newest live run under runs_dir that started at or after since_wall."""
    best: TelemetryInfo | None = None
    for path in Path(runs_dir).glob(f"*/{TELEMETRY_FILE}"):
        info = read_telemetry_info(path.parent)
        if info is None or info.started_wall < since_wall or not info.is_live():
            continue
        if best is None or info.started_wall > best.started_wall:
            best = info
    return best


def decimate(image: np.ndarray, max_px: int) -> tuple[np.ndarray, int]:
    """A strided view-then-copy to <= max_px per side: ~30 us even for 2048x2048 frames.

    Block averaging looks nicer but costs milliseconds; the dashboard does that
    on its own thread, the loop only pays for the cheap part."""
    image = image if image.ndim == 2 else image.reshape(image.shape[-2:])
    stride = max(1, math.ceil(max(image.shape) / max_px))
    return np.ascontiguousarray(image[::stride, ::stride]), stride


def _points(xy: np.ndarray | Sequence[Sequence[float]] | None) -> list[list[float]]:
    if xy is None:
        return []
    arr = np.asarray(xy, dtype=float).reshape(-1, 2)[:MAX_OVERLAY_POINTS]
    return np.round(arr, 4).tolist()


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class RunTelemetry:
    """Publisher + control endpoint of one run; use it from one thread only (ZeroMQ rule)."""

    def __init__(
        self,
        run: str,
        ctx: zmq.Context | None = None,
        publish_endpoint: str = "auto",
        control_endpoint: str = "auto",
        max_frame_hz: float = 25.0,
        max_px: int = 512,
        sndhwm: int = 64,
        keys: ServerKeys | None = None,
    ) -> None:
        """`auto` endpoints: ipc:// in a fresh 0700 directory; tcp:// ones need `keys`."""
        if not MAX_PX_RANGE[0] <= max_px <= MAX_PX_RANGE[1]:
            raise ValueError(f"telemetry: max_px must be within {list(MAX_PX_RANGE)}, got {max_px}")
        for name, endpoint in (("publish", publish_endpoint), ("control", control_endpoint)):
            if tcp_host(endpoint) is not None and keys is None:
                raise ValueError(
                    f"telemetry {name} endpoint {endpoint}: tcp:// needs CURVE keys (any local "
                    "user can reach a loopback port); use 'auto' (ipc, 0700) or give keys"
                )
        self.run = run
        self.ctx = ctx or zmq.Context.instance()
        self.max_px = max_px
        self.keys = keys
        self._frame_period_ns = int(1e9 / max_frame_hz) if max_frame_hz > 0 else 0
        self._dir: Path | None = None
        if "auto" in (publish_endpoint, control_endpoint):
            self._dir = private_dir("scopeloop-tm-")
            if publish_endpoint == "auto":
                publish_endpoint = f"ipc://{self._dir}/pub"
            if control_endpoint == "auto":
                control_endpoint = f"ipc://{self._dir}/control"
        self._pub = self._bound(zmq.PUB, publish_endpoint, "publish")
        self._pub.setsockopt(zmq.SNDHWM, sndhwm)
        self._control = self._bound(zmq.ROUTER, control_endpoint, "control")
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.endpoints = TelemetryEndpoints(
            self._pub.getsockopt_string(zmq.LAST_ENDPOINT),
            self._control.getsockopt_string(zmq.LAST_ENDPOINT),
        )
        self.t0_ns = now_ns()
        self.state = "starting"
        self.phase = ""
        self.reason = ""
        self.frames_published = 0
        self._last_frame_ns = 0
        self._last_state_ns = 0
        self._last_cmd = ""
        self._recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self._info_path: Path | None = None
        self._started_wall = time.time()

    def _bound(self, kind: int, endpoint: str, name: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        set_max_message(sock, COMMAND_MAX_BYTES)  # control requests and subscriptions only
        check_bind(endpoint, self.keys, f"telemetry {name} endpoint")
        secure_server(sock, endpoint, self.keys)
        sock.bind(endpoint)
        return sock

    # --- lifecycle ------------------------------------------------------------

    def write_info(self, run_dir: Path) -> Path:
        """Write `run_dir/telemetry.json` so a dashboard can find and attach to this run."""
        self._info_path = Path(run_dir) / TELEMETRY_FILE
        self._write_info(live=True)
        return self._info_path

    def _write_info(self, live: bool) -> None:
        if self._info_path is None:
            return
        body = {
            "run": self.run,
            "publish": self.endpoints.publish,
            "control": self.endpoints.control,
            "pid": os.getpid(),
            "started_wall": self._started_wall,
            "live": live,
            "state": self.state,
            "max_part_bytes": max_part_bytes(self.max_px),
        }
        if self.keys is not None:
            body["server_public_key"] = self.keys.public.decode()
        tmp = self._info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(self._info_path)  # atomic: a dashboard never reads half a file

    def close(self, reason: str = "finished") -> None:
        """Publish the final state, mark telemetry.json not live, close the sockets."""
        if self._pub.closed:
            return
        self.reason = reason
        self.set_state("stopped")
        self._write_info(live=False)
        release_server(self._pub)
        release_server(self._control)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RunTelemetry:
        return self

    def __exit__(self, exc_type: object, *_exc: object) -> None:
        self.close("error" if exc_type is not None else self.reason or "finished")

    # --- publishing -----------------------------------------------------------

    def t_s(self) -> float:
        return (now_ns() - self.t0_ns) / 1e9

    def _send(self, parts: list[Any]) -> bool:
        """Queue for every subscriber; a PUB socket silently drops for a full subscriber.

        Copied (a decimated frame is <= max_px^2 pixels: ~10 us for 256x256 uint16): a
        zero-copy send of a buffer above pyzmq's copy threshold starts pyzmq's
        buffer-release thread, which then takes the GIL at random moments of the loop."""
        try:
            self._pub.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return False
        return True

    def _header(self, fields: Mapping[str, Any]) -> bytes:
        return pack({"v": PROTOCOL_VERSION, "t_s": round(self.t_s(), 6), **fields})

    def frame_due(self) -> bool:
        """Whether `frame()` would publish now; lets callers skip overlay work otherwise."""
        return now_ns() - self._last_frame_ns >= self._frame_period_ns

    def frame(
        self,
        image: np.ndarray,
        seq: int,
        pixel_size_um: float = 1.0,
        detections_um: np.ndarray | Sequence[Sequence[float]] | None = None,
        target_um: Sequence[float] | None = None,
        laser: Iterable[Mapping[str, float]] = (),
        info: Mapping[str, Any] | None = None,
    ) -> bool:
        """Publish the newest image with overlays, unless one went out < 1/max_frame_hz ago."""
        t = now_ns()
        if t - self._last_frame_ns < self._frame_period_ns:
            return False
        self._last_frame_ns = t
        small, stride = decimate(image, self.max_px)
        height, width = image.shape[-2:]
        header = self._header(
            {
                "seq": int(seq),
                "shape": list(small.shape),
                "dtype": str(small.dtype),
                "stride": stride,
                "pixel_size_um": float(pixel_size_um),
                "field_um": [width * pixel_size_um, height * pixel_size_um],
                "detections_um": _points(detections_um),
                "target_um": list(target_um) if target_um is not None else None,
                "laser": [dict(s) for s in laser][:MAX_OVERLAY_POINTS],
                "info": dict(info or {}),
                "phase": self.phase,
            }
        )
        sent = self._send([TOPIC_FRAME, header, memoryview(small).cast("B")])
        self.frames_published += int(sent)
        return sent

    def map(
        self,
        name: str,
        layers: Mapping[str, np.ndarray],
        extent: Sequence[float],
        points: np.ndarray | Sequence[Sequence[float]] | None = None,
        units: str = "",
    ) -> bool:
        """Publish named 2-D layers (e.g. mean, std, acquisition) over extent [x0, x1, y0, y1]."""
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in layers.values()]
        if any(a.ndim != 2 for a in arrays):
            raise ValueError(f"map {name!r}: every layer must be 2-D")
        if any(max(a.shape) > MAX_MAP_PX for a in arrays):
            raise ValueError(f"map {name!r}: a layer is larger than {MAX_MAP_PX} px per side")
        if len(extent) != 4:
            raise ValueError(f"map {name!r}: extent must be [x0, x1, y0, y1]")
        header = self._header(
            {
                "name": name,
                "layers": [
                    {"name": k, "shape": list(a.shape)} for k, a in zip(layers, arrays, strict=True)
                ],
                "extent": [float(e) for e in extent],
                "points": _points(points),
                "units": units,
            }
        )
        return self._send([TOPIC_MAP, header, *(memoryview(a).cast("B") for a in arrays)])

    def metrics(self, values: Mapping[str, float | None], t_s: float | None = None) -> bool:
        """Publish several scalar metrics taken at one time (None/NaN values are left out)."""
        clean = {k: v for k, v in ((k, _finite(v)) for k, v in values.items()) if v is not None}
        if not clean:
            return False
        fields: dict[str, Any] = {"values": clean}
        if t_s is not None:
            fields["t_s"] = float(t_s)
        return self._send([TOPIC_METRIC, self._header(fields)])

    def metric(self, name: str, value: float, t_s: float | None = None) -> bool:
        return self.metrics({name: value}, t_s)

    def event(self, message: str, level: str = "info") -> bool:
        fields = {"t_s": round(self.t_s(), 6), "level": level, "message": message[:MAX_EVENT_CHARS]}
        self._recent_events.append(fields)
        return self._send([TOPIC_EVENT, self._header(fields)])

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self._publish_state()

    def set_state(self, state: str) -> None:
        if state not in STATES:
            raise ValueError(f"state must be one of {list(STATES)}, got {state!r}")
        self.state = state
        self._publish_state()

    def _publish_state(self) -> None:
        self._last_state_ns = now_ns()
        fields = {"state": self.state, "run": self.run, "phase": self.phase, "reason": self.reason}
        self._send([TOPIC_STATE, self._header(fields)])

    # --- control --------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.state == "paused"

    @property
    def stop_requested(self) -> bool:
        return self.state in ("stopping", "stopped")

    def poll_control(self) -> list[str]:
        """Answer every pending control request (never waits); return the accepted
        pause/resume/stop commands (status requests are answered, not returned)."""
        accepted: list[str] = []
        while True:
            try:
                identity, *body = self._control.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            # A REQ peer sends an empty delimiter frame, a DEALER does not: echo it back.
            envelope = [identity, b""] if len(body) == 2 and body[0] == b"" else [identity]
            ok, error = self._apply(body[-1] if body else b"")
            if ok and self._last_cmd != "status":
                accepted.append(self._last_cmd)
            body = {"v": PROTOCOL_VERSION, "ok": ok, "state": self.state, "error": error}
            if ok and self._last_cmd == "status":
                body.update(run=self.run, phase=self.phase, events=list(self._recent_events))
            reply = pack(body)
            with contextlib.suppress(zmq.Again):  # requester gone: never block the loop for it
                self._control.send_multipart([*envelope, reply], flags=zmq.NOBLOCK)
        if now_ns() - self._last_state_ns > STATE_REPEAT_S * 1e9:
            self._publish_state()
        return accepted

    def _apply(self, body: bytes) -> tuple[bool, str]:
        self._last_cmd = ""
        try:
            cmd = unpack_map(body, "control").get("cmd")
        except ProtocolError as exc:
            return False, str(exc)
        if cmd not in COMMANDS:
            return False, f"control: cmd must be one of {list(COMMANDS)}, got {cmd!r}"
        self._last_cmd = str(cmd)
        if cmd == "status":
            return True, ""
        if self.stop_requested:
            return False, f"control: {cmd}: run is {self.state}"
        if cmd == "stop":
            self.reason = "stop command"
            self.set_state("stopping")
            self.event("stop requested: ending the phase, laser off", "warning")
        elif cmd == "pause" and self.state != "paused":
            self.set_state("paused")
        elif cmd == "resume" and self.state == "paused":
            self.set_state("running")
        return True, ""


@dataclass
class TelemetryMessage:
    """One decoded telemetry message: its kind, header fields and arrays (frame/map)."""

    kind: str
    header: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)


def decode_message(parts: Sequence[bytes | memoryview]) -> TelemetryMessage:
    """Decode `[topic, header, *buffers]`; raise ProtocolError for anything malformed."""
    if len(parts) < 2:
        raise ProtocolError("malformed", "telemetry: expected [topic, header, ...]")
    topic = bytes(parts[0])
    if topic not in TOPICS:
        raise ProtocolError("malformed", f"telemetry: unknown topic {topic!r}")
    header = unpack_map(memoryview(parts[1]), "telemetry header")
    kind = topic.split(b"/", 1)[1].decode()
    arrays: list[np.ndarray] = []
    try:
        if topic == TOPIC_FRAME:
            shape = tuple(int(s) for s in header["shape"])
            arrays.append(_array(parts[2], header["dtype"], shape))
        elif topic == TOPIC_MAP:
            layers = header["layers"]
            if len(layers) != len(parts) - 2:
                raise ProtocolError("malformed", "telemetry map: layer count != buffer count")
            for layer, buf in zip(layers, parts[2:], strict=True):
                arrays.append(_array(buf, "float32", tuple(int(s) for s in layer["shape"])))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ProtocolError("malformed", f"telemetry {kind}: bad field ({exc})") from None
    return TelemetryMessage(kind, header, arrays)


def _array(buf: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype not in ("uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"):
        raise ValueError(f"dtype {dtype!r}")
    return np.frombuffer(buf, dtype=np.dtype(dtype)).reshape(shape)


class TelemetrySubscriber:
    """SUB side: drains everything waiting; a small RCVHWM drops what a slow reader missed."""

    def __init__(
        self,
        endpoint: str,
        ctx: zmq.Context | None = None,
        rcvhwm: int = 64,
        keys: ClientKeys | None = None,
        max_bytes: int = DEFAULT_MAX_PART_BYTES,
    ) -> None:
        self.socket = (ctx or zmq.Context.instance()).socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        set_max_message(self.socket, max_bytes)  # per part: a larger one drops the link
        for topic in TOPICS:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        secure_client(self.socket, endpoint, keys)
        self.socket.connect(endpoint)
        self.rejected = 0

    def poll(self, timeout_ms: int) -> list[TelemetryMessage]:
        out: list[TelemetryMessage] = []
        if not self.socket.poll(timeout_ms):
            return out
        while True:
            try:
                parts = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(decode_message(parts))
            except ProtocolError:
                self.rejected += 1

    def close(self) -> None:
        self.socket.close()


def send_control(
    endpoint: str,
    cmd: str,
    timeout_ms: int = 2000,
    ctx: zmq.Context | None = None,
    keys: ClientKeys | None = None,
) -> dict[str, Any]:
    """One control request (pause/resume/stop/status); raise TimeoutError if unanswered."""
    sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    set_max_message(sock, COMMAND_MAX_BYTES)
    try:
        secure_client(sock, endpoint, keys)
        sock.connect(endpoint)
        sock.send(pack({"v": PROTOCOL_VERSION, "cmd": cmd}))
        if not sock.poll(timeout_ms):
            raise TimeoutError(f"control: {cmd}: no answer from {endpoint} in {timeout_ms} ms")
        return unpack_map(sock.recv(), "control reply")
    finally:
        sock.close()
