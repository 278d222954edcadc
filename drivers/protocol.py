"""scopeloop wire protocol v1: small msgpack headers plus raw array buffers.

One protocol for every instrument. A stream message is three ZeroMQ frames:
``[topic, msgpack header, raw buffer]``; the buffer is sent without copying and
received as a read-only numpy view. Commands and replies are single msgpack maps.
Never pickle: a message from the network can only ever decode to plain data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

# Topics on the PUB stream. Subscriptions are prefix matches, so topics are
# "kind/stream": subscribing to FRAME_PREFIX never delivers ground truth.
FRAME_PREFIX = b"frame/"
TRUTH_PREFIX = b"truth/"
HEARTBEAT_TOPIC = b"hb"
EVENT_TOPIC = b"event"

ALLOWED_DTYPES = frozenset({"uint8", "uint16", "uint32", "int16", "int32", "float32", "float64"})
MAX_HEADER_BYTES = 64 * 1024


class ProtocolError(ValueError):
    """A message that cannot be accepted; `code` is machine readable, str() is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def now_ns() -> int:
    """Monotonic clock shared by every process on a host (CLOCK_MONOTONIC)."""
    return time.monotonic_ns()


def pack(obj: Mapping[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_map(data: bytes | memoryview, what: str) -> dict[str, Any]:
    """Decode a msgpack map, refusing anything else with a one-line ProtocolError."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError("malformed", f"{what}: {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("malformed", f"{what}: not valid msgpack ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed", f"{what}: expected a map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"{what}: field 'v' must be {PROTOCOL_VERSION}, got {version!r}"
        )
    return obj


# --- frames ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """Everything needed to interpret one frame without asking the driver."""

    stream: str
    seq: int
    t_exposure_start_ns: int
    t_exposure_end_ns: int
    t_published_ns: int
    shape: tuple[int, ...]
    dtype: str
    state: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": PROTOCOL_VERSION,
            "stream": self.stream,
            "seq": self.seq,
            "t_exp_start_ns": self.t_exposure_start_ns,
            "t_exp_end_ns": self.t_exposure_end_ns,
            "t_pub_ns": self.t_published_ns,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "state": self.state,
        }

    @staticmethod
    def from_wire(obj: Mapping[str, Any]) -> FrameHeader:
        try:
            shape = tuple(int(s) for s in obj["shape"])
            header = FrameHeader(
                stream=str(obj["stream"]),
                seq=int(obj["seq"]),
                t_exposure_start_ns=int(obj["t_exp_start_ns"]),
                t_exposure_end_ns=int(obj["t_exp_end_ns"]),
                t_published_ns=int(obj["t_pub_ns"]),
                shape=shape,
                dtype=str(obj["dtype"]),
                state=dict(obj.get("state") or {}),
            )
        except KeyError as exc:
            raise ProtocolError("malformed", f"frame header: missing field {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise ProtocolError("malformed", f"frame header: bad field value ({exc})") from None
        if header.dtype not in ALLOWED_DTYPES:
            raise ProtocolError(
                "malformed",
                f"frame header: field 'dtype' must be one of {sorted(ALLOWED_DTYPES)}, "
                f"got {header.dtype!r}",
            )
        if not 1 <= len(shape) <= 4 or any(s < 0 for s in shape):
            raise ProtocolError("malformed", f"frame header: field 'shape' invalid: {shape}")
        return header


@dataclass(frozen=True, slots=True)
class Frame:
    header: FrameHeader
    data: np.ndarray  # read-only view on the received buffer


def encode_frame(header: FrameHeader, array: np.ndarray) -> list[Any]:
    """Multipart message for a frame; the array buffer itself is not copied."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    topic = FRAME_PREFIX + header.stream.encode()
    # Flat bytes view, no copy; reshape first: memoryview cannot cast an empty 2-D shape.
    return [topic, pack(header.to_wire()), memoryview(array.reshape(-1).view(np.uint8))]


def decode_frame(parts: Sequence[Any]) -> Frame:
    """Decode ``[topic, header, buffer]`` (bytes or zmq.Frame) into a zero-copy view."""
    if len(parts) != 3:
        raise ProtocolError("malformed", f"frame message: expected 3 parts, got {len(parts)}")
    header = FrameHeader.from_wire(unpack_map(_buffer(parts[1]), "frame header"))
    buf = _buffer(parts[2])
    dtype = np.dtype(header.dtype)
    expected = math.prod(header.shape) * dtype.itemsize  # Python ints: no int64 wrap-around
    if len(buf) != expected:
        raise ProtocolError(
            "malformed",
            f"frame buffer: {len(buf)} bytes but header shape {header.shape} {header.dtype} "
            f"needs {expected}",
        )
    data = np.frombuffer(buf, dtype=dtype).reshape(header.shape)
    data.flags.writeable = False  # a received frame is evidence: nobody edits it in place
    return Frame(header=header, data=data)


def encode_message(topic: bytes, payload: Mapping[str, Any]) -> list[bytes]:
    """A header-only stream message (heartbeat, event, ground truth)."""
    return [topic, pack({"v": PROTOCOL_VERSION, **payload})]


def _buffer(part: Any) -> memoryview:
    if hasattr(part, "buffer"):  # zmq.Frame received with copy=False
        return part.buffer
    return memoryview(part)


# --- commands -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    cmd: str
    args: dict[str, Any]
    t_sent_ns: int
    expect_reply: bool = True

    def to_wire(self) -> bytes:
        return pack(
            {
                "v": PROTOCOL_VERSION,
                "id": self.id,
                "cmd": self.cmd,
                "args": self.args,
                "t_sent_ns": self.t_sent_ns,
                "reply": self.expect_reply,
            }
        )

    @staticmethod
    def from_wire(data: bytes | memoryview) -> Request:
        obj = unpack_map(data, "command")
        req_id, cmd, args = obj.get("id"), obj.get("cmd"), obj.get("args", {})
        if not isinstance(req_id, int) or isinstance(req_id, bool):
            raise ProtocolError(
                "malformed", f"command: field 'id' must be an integer, got {req_id!r}"
            )
        if not isinstance(cmd, str) or not cmd:
            raise ProtocolError("malformed", f"command: field 'cmd' must be a name, got {cmd!r}")
        if not isinstance(args, dict):
            raise ProtocolError("malformed", f"command: field 'args' must be a map, got {args!r}")
        try:
            t_sent_ns = int(obj.get("t_sent_ns", 0))
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError(
                "malformed",
                f"command: field 't_sent_ns' must be an integer, got {obj['t_sent_ns']!r}",
            ) from None
        return Request(
            id=req_id,
            cmd=cmd,
            args=args,
            t_sent_ns=t_sent_ns,
            expect_reply=bool(obj.get("reply", True)),
        )


@dataclass(frozen=True, slots=True)
class Reply:
    id: int | None
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    t_received_ns: int = 0
    t_done_ns: int = 0

    def to_wire(self) -> bytes:
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "id": self.id,
            "ok": self.ok,
            "t_recv_ns": self.t_received_ns,
            "t_done_ns": self.t_done_ns,
        }
        if self.ok:
            body["result"] = self.result
        else:
            body["error"] = {"code": self.error_code, "message": self.error_message}
        return pack(body)

    @staticmethod
    def from_wire(data: bytes | memoryview) -> Reply:
        obj = unpack_map(data, "reply")
        error = obj.get("error") or {}
        try:
            return Reply(
                id=obj.get("id"),
                ok=bool(obj.get("ok")),
                result=dict(obj.get("result") or {}),
                error_code=str(error.get("code", "")),
                error_message=str(error.get("message", "")),
                t_received_ns=int(obj.get("t_recv_ns", 0)),
                t_done_ns=int(obj.get("t_done_ns", 0)),
            )
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ProtocolError("malformed", f"reply: bad field value ({exc})") from None
