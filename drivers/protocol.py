"""scopeloop wire protocol v1: small msgpack headers plus raw array buffers.

One protocol for every instrument. A stream message is three ZeroMQ frames:
``[topic, msgpack header, raw buffer]``; the buffer is sent without copying and
received as a read-only numpy view. A command is one msgpack map, optionally followed by
one raw buffer that carries an array argument (an SLM hologram): the header's `buf`
field names the argument and gives its shape and dtype, as a frame header does. Replies
are single msgpack maps. Never pickle: a message from the network can only ever decode
to plain data and arrays of the allowed dtypes.
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
    """A message that cannot be accepted; `code` is machine readable, str() is one line.

    `request_id` is the refused command's id when its header could be read, so the
    error reply reaches the caller waiting for it instead of reading as silence."""

    def __init__(self, code: str, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


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


# --- arrays (frame buffers and command buffers) ------------------------------


def check_array_spec(what: str, shape: tuple[int, ...], dtype: str) -> None:
    """Refuse a dtype outside ALLOWED_DTYPES or a shape of 1-4 non-negative sizes."""
    if dtype not in ALLOWED_DTYPES:
        raise ProtocolError(
            "malformed",
            f"{what}: field 'dtype' must be one of {sorted(ALLOWED_DTYPES)}, got {dtype!r}",
        )
    if not 1 <= len(shape) <= 4 or any(s < 0 for s in shape):
        raise ProtocolError("malformed", f"{what}: field 'shape' invalid: {shape}")


def array_from_buffer(what: str, buf: memoryview, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A read-only view of `buf` as the announced array, if its length matches."""
    expected = math.prod(shape) * np.dtype(dtype).itemsize  # Python ints: no int64 wrap
    if len(buf) != expected:
        raise ProtocolError(
            "malformed",
            f"{what}: {len(buf)} bytes but header shape {shape} {dtype} needs {expected}",
        )
    data = np.frombuffer(buf, dtype=dtype).reshape(shape)
    data.flags.writeable = False  # received data is evidence: nobody edits it in place
    return data


def array_buffer(array: np.ndarray) -> memoryview:
    """The array's bytes, flat and without a copy when it is already C-contiguous."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    # Reshape first: memoryview cannot cast an empty 2-D shape.
    return memoryview(array.reshape(-1).view(np.uint8))


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
        check_array_spec("frame header", shape, header.dtype)
        return header


@dataclass(frozen=True, slots=True)
class Frame:
    header: FrameHeader
    data: np.ndarray  # read-only view on the received buffer


def encode_frame(header: FrameHeader, array: np.ndarray) -> list[Any]:
    """Multipart message for a frame; the array buffer itself is not copied."""
    topic = FRAME_PREFIX + header.stream.encode()
    return [topic, pack(header.to_wire()), array_buffer(array)]


def decode_frame(parts: Sequence[Any]) -> Frame:
    """Decode ``[topic, header, buffer]`` (bytes or zmq.Frame) into a zero-copy view."""
    if len(parts) != 3:
        raise ProtocolError("malformed", f"frame message: expected 3 parts, got {len(parts)}")
    header = FrameHeader.from_wire(unpack_map(_buffer(parts[1]), "frame header"))
    data = array_from_buffer("frame buffer", _buffer(parts[2]), header.shape, header.dtype)
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
    """One command. At most one of its args may be a numpy array: it travels as the raw
    buffer after the header (never as a msgpack list, whose size the header limit caps),
    and the decoder puts it back under the same name, as a read-only array."""

    id: int
    cmd: str
    args: dict[str, Any]
    t_sent_ns: int
    expect_reply: bool = True

    def to_parts(self) -> list[bytes | memoryview]:
        """``[header]``, or ``[header, buffer]`` when an arg is an array."""
        arrays = [k for k, v in self.args.items() if isinstance(v, np.ndarray)]
        if len(arrays) > 1:
            raise ProtocolError(
                "bad_args", f"{self.cmd}: at most one array argument per command, got {arrays}"
            )
        body: dict[str, Any] = {
            "v": PROTOCOL_VERSION,
            "id": self.id,
            "cmd": self.cmd,
            "args": {k: v for k, v in self.args.items() if k not in arrays},
            "t_sent_ns": self.t_sent_ns,
            "reply": self.expect_reply,
        }
        if not arrays:
            return [pack(body)]
        name = arrays[0]
        array: np.ndarray = self.args[name]
        if str(array.dtype) not in ALLOWED_DTYPES:
            raise ProtocolError(
                "bad_args",
                f"{self.cmd}: field '{name}' has dtype {array.dtype}, which cannot be sent; "
                f"use one of {sorted(ALLOWED_DTYPES)}",
            )
        body["buf"] = {"field": name, "shape": list(array.shape), "dtype": str(array.dtype)}
        return [pack(body), array_buffer(array)]

    def to_wire(self) -> bytes:
        """The single-frame message of a command without an array argument."""
        parts = self.to_parts()
        if len(parts) != 1:
            raise ProtocolError("bad_args", f"{self.cmd}: an array argument needs to_parts()")
        return bytes(parts[0])

    @staticmethod
    def from_wire(data: bytes | memoryview) -> Request:
        return Request.from_parts([data])

    @staticmethod
    def from_parts(parts: Sequence[Any], max_buffer_bytes: int = 0) -> Request:
        """Decode ``[header]`` or ``[header, buffer]``; a buffer larger than
        `max_buffer_bytes` is refused before it is looked at."""
        if not 1 <= len(parts) <= 2:
            raise ProtocolError(
                "malformed",
                f"command: expected a header and at most 1 buffer, got {len(parts)} frames",
            )
        if len(_buffer(parts[0])) == 0:
            raise ProtocolError(
                "malformed", "command: the header frame is empty (a REQ envelope? use a DEALER)"
            )
        obj = unpack_map(_buffer(parts[0]), "command")
        req_id = obj.get("id")
        if not isinstance(req_id, int) or isinstance(req_id, bool):
            raise ProtocolError(
                "malformed", f"command: field 'id' must be an integer, got {req_id!r}"
            )
        try:
            request = _request_fields(obj, req_id)
            if len(parts) == 1 and "buf" not in obj:
                return request
            array = _command_array(obj.get("buf"), parts, max_buffer_bytes, request)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, str(exc), req_id) from None
        return Request(
            request.id,
            request.cmd,
            {**request.args, array[0]: array[1]},
            request.t_sent_ns,
            request.expect_reply,
        )


def _request_fields(obj: dict[str, Any], req_id: int) -> Request:
    cmd, args = obj.get("cmd"), obj.get("args", {})
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
    return Request(req_id, cmd, args, t_sent_ns, bool(obj.get("reply", True)))


def _command_array(
    spec: Any, parts: Sequence[Any], max_buffer_bytes: int, request: Request
) -> tuple[str, np.ndarray]:
    """The array a command's buffer carries, checked against its header's `buf` field."""
    what = f"{request.cmd}: command buffer"
    if len(parts) != 2:
        raise ProtocolError("malformed", f"{what}: header field 'buf' announces one, none came")
    if not isinstance(spec, dict):
        raise ProtocolError("malformed", f"{what}: header field 'buf' must be a map, got {spec!r}")
    buf = _buffer(parts[1])
    if len(buf) > max_buffer_bytes:
        raise ProtocolError(
            "too_large",
            f"{what}: {len(buf)} bytes, the allowed range is [0, {max_buffer_bytes}] bytes "
            f"(get_capabilities: max_command_buffer_bytes)",
        )
    name = spec.get("field")
    if not isinstance(name, str) or not name or name in request.args:
        raise ProtocolError(
            "malformed",
            f"{what}: field 'buf.field' must name an argument not in args, got {name!r}",
        )
    try:
        shape = tuple(int(s) for s in spec["shape"])
        dtype = str(spec["dtype"])
    except KeyError as exc:
        raise ProtocolError("malformed", f"{what}: missing field 'buf.{exc.args[0]}'") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("malformed", f"{what}: bad field 'buf' ({exc})") from None
    check_array_spec(what, shape, dtype)
    return name, array_from_buffer(what, buf, shape, dtype)


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
