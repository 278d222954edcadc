"""Nanonis TCP wire format: 40-byte header, big-endian typed body, trailing error section.

Mirrors what the vendor client ``nanonis_spm`` (1.0.9, ``NanonisClass.py``) writes and
parses, so a server built on this module is driven by the unmodified client:

* header (40 bytes): command name NUL-padded to 32 bytes, body size (int32), send
  response flag (uint16, the client always sends 1), 2 zero bytes;
* body: fields back to back, big-endian; strings are an int32 byte count then bytes;
  1-D arrays an int32 element count then elements; 2-D float32 arrays int32 rows, int32
  columns, then row-major data; string arrays (responses) int32 total bytes, int32 count,
  then each string with its int32 byte count;
* responses end with the error section: status (uint32, 0 = ok), description byte count
  (int32), description. The client ignores the status and reports an error whenever the
  description is non-empty, and it parses the return values *before* the error section
  whatever happened, so an error response must still carry (default) return values.

Commands are described once, in ``COMMANDS``, with field kinds from which the client's
own type codes follow (``CommandSpec.client_arg_codes``), so a test can check every
entry against the client's source.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

NAME_SIZE = 32
HEADER_SIZE = 40
MAX_BODY_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">32siHH")
_I32 = struct.Struct(">i")
_ERR = struct.Struct(">Ii")

# Scalar kinds use the client's (and struct's) letters.
SCALARS: dict[str, str] = {
    "H": "uint16",
    "h": "int16",
    "I": "uint32",
    "i": "int32",
    "f": "float32",
    "d": "float64",
}
# Composite kinds: a string, a string array, 1-D numeric arrays, a 2-D float32 array.
STR = "str"
STR_ARRAY = "str[]"
ARRAYS: dict[str, str] = {"i[]": "i", "I[]": "I", "f[]": "f", "d[]": "d"}
ARRAY2D_F = "f[][]"

Direction = Literal["request", "response"]


class WireError(ValueError):
    """Bytes that do not decode as the expected message; str() is one line."""


@dataclass(frozen=True)
class Header:
    name: str
    body_size: int
    send_response: bool


def pack_header(name: str | bytes, body_size: int, send_response: bool = True) -> bytes:
    raw = name.encode("ascii") if isinstance(name, str) else name
    if len(raw) > NAME_SIZE:
        raise WireError(f"command name longer than {NAME_SIZE} bytes: {raw[:40]!r}")
    return _HEADER.pack(raw.ljust(NAME_SIZE, b"\0"), body_size, int(send_response), 0)


def unpack_header(data: bytes) -> tuple[bytes, int, int]:
    """Raw name (NULs stripped), body size (may be negative: caller rejects it) and flag."""
    if len(data) != HEADER_SIZE:
        raise WireError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
    raw, size, flag, _zero = _HEADER.unpack(data)
    return raw.rstrip(b"\0"), size, flag


def decode_name(raw: bytes) -> str:
    """Printable form of a command name; non-ASCII bytes become escapes, never an exception."""
    text = raw.decode("ascii", errors="backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Field:
    """One semantic value; counts and sizes that prefix it on the wire are implicit."""

    name: str
    kind: str

    def __post_init__(self) -> None:
        if (
            self.kind not in SCALARS
            and self.kind not in ARRAYS
            and self.kind
            not in (
                STR,
                STR_ARRAY,
                ARRAY2D_F,
            )
        ):
            raise ValueError(f"unknown field kind {self.kind!r}")

    def client_codes(self, direction: Direction) -> list[str]:
        """The type codes nanonis_spm uses for this field (args in send, returns in parse)."""
        if self.kind in SCALARS:
            return [self.kind]
        if direction == "request":
            if self.kind in (STR, STR_ARRAY):
                return ["+*c"]
            if self.kind == ARRAY2D_F:
                return ["2f"]
            return ["+*" + ARRAYS[self.kind]]
        if self.kind == STR:
            return ["i", "*-c"]
        if self.kind == STR_ARRAY:
            return ["i", "i", "*+c"]
        if self.kind == ARRAY2D_F:
            return ["i", "i", "2f"]
        return ["i", "*" + ARRAYS[self.kind]]

    def default(self) -> Any:
        """Placeholder value for an error response (the client still parses return fields)."""
        if self.kind in SCALARS:
            return 0
        if self.kind == STR:
            return ""
        if self.kind == STR_ARRAY:
            return []
        if self.kind == ARRAY2D_F:
            return np.zeros((0, 0), np.float32)
        return np.zeros(0, ARRAYS[self.kind])


@dataclass(frozen=True)
class CommandSpec:
    name: str
    args: tuple[Field, ...] = ()
    returns: tuple[Field, ...] = ()

    def client_arg_codes(self) -> list[str]:
        return [c for f in self.args for c in f.client_codes("request")]

    def client_return_codes(self) -> list[str]:
        return [c for f in self.returns for c in f.client_codes("response")]

    def defaults(self) -> tuple[Any, ...]:
        return tuple(f.default() for f in self.returns)

    @cached_property
    def scalar_args(self) -> struct.Struct | None:
        """One struct for the arguments when all are scalars (decoded in one call)."""
        if not all(f.kind in SCALARS for f in self.args):
            return None
        return struct.Struct(">" + "".join(f.kind for f in self.args))


def _spec(name: str, args: str = "", returns: str = "") -> CommandSpec:
    """Compact table syntax: "name:kind name:kind ..." for arguments and returns."""

    def fields(text: str) -> tuple[Field, ...]:
        return tuple(Field(*item.split(":")) for item in text.split())

    return CommandSpec(name, fields(args), fields(returns))


# Argument and return types as in nanonis_spm.Nanonis.<Module_Command>; units are SI
# (m, V, s) except where the name says otherwise (deg, ms).
COMMANDS: dict[str, CommandSpec] = {
    s.name: s
    for s in (
        _spec("Bias.Set", "bias_v:f"),
        _spec("Bias.Get", "", "bias_v:f"),
        _spec("FolMe.XYPosSet", "x_m:d y_m:d wait_end_of_move:I"),
        _spec("FolMe.XYPosGet", "wait_for_newest:I", "x_m:d y_m:d"),
        _spec("Scan.Action", "action:H direction_up:I"),
        _spec("Scan.StatusGet", "", "running:I"),
        _spec("Scan.FrameSet", "center_x_m:f center_y_m:f width_m:f height_m:f angle_deg:f"),
        _spec("Scan.FrameGet", "", "center_x_m:f center_y_m:f width_m:f height_m:f angle_deg:f"),
        _spec("Scan.BufferSet", "channel_indexes:i[] pixels:i lines:i"),
        _spec("Scan.BufferGet", "", "channel_indexes:i[] pixels:i lines:i"),
        _spec(
            "Scan.FrameDataGrab",
            "channel_index:I forward:I",
            "channel_name:str data:f[][] direction_up:I",
        ),
        _spec("BiasSpectr.Open"),
        _spec(
            "BiasSpectr.Start",
            "get_data:I save_base_name:str",
            "channel_names:str[] data:f[][] parameters:f[]",
        ),
        _spec(
            "BiasSpectr.PropsSet",
            "save_all:H num_sweeps:i backward_sweep:H num_points:i z_offset_m:f"
            " autosave:H show_save_dialog:H",
        ),
        _spec(
            "BiasSpectr.PropsGet",
            "",
            "save_all:H num_sweeps:i backward_sweep:H num_points:i channels:str[]"
            " parameters:str[] fixed_parameters:str[]",
        ),
        _spec("BiasSpectr.Stop"),  # from another connection while Start waits
        _spec("BiasSpectr.LimitsSet", "start_v:f end_v:f"),
        _spec("BiasSpectr.LimitsGet", "", "start_v:f end_v:f"),
        _spec("Signals.NamesGet", "", "names:str[]"),
        # The 24 Signals Manager slots: scan buffers and frame grabs number channels by slot.
        _spec("Signals.InSlotsGet", "", "names:str[] signal_indexes:i[]"),
        _spec("Signals.ValGet", "signal_index:i wait_for_newest:I", "value:f"),
        _spec("ZCtrl.Withdraw", "wait_until_finished:I timeout_ms:i"),
        _spec("ZCtrl.OnOffSet", "on:I"),
        _spec("ZCtrl.OnOffGet", "", "on:I"),
        _spec("ZCtrl.ZPosGet", "", "z_m:f"),
    )
}


# ---------------------------------------------------------------- body encoding


def _encode_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _I32.pack(len(raw)) + raw


def _encode_field(field: Field, value: Any, direction: Direction) -> bytes | _Parts:
    kind = field.kind
    try:
        if kind in SCALARS:
            if kind in "fd":
                return struct.pack(">" + kind, float(value))
            return struct.pack(">" + kind, int(value))
        if kind == STR:
            return _encode_str(str(value))
        if kind == STR_ARRAY:
            items = b"".join(_encode_str(str(s)) for s in value)
            # The client sends 4*count as the "size" (its quirk); Nanonis replies with the
            # real byte count, which the client uses to skip the array.
            size = 4 * len(value) if direction == "request" else len(items)
            return _I32.pack(size) + _I32.pack(len(value)) + items
        if kind == ARRAY2D_F:
            arr = np.asarray(value, dtype=">f4")
            if arr.ndim != 2:
                raise WireError(f"{field.name}: expected a 2-D array, got shape {arr.shape}")
            # The array's own buffer is copied once, when the message is joined.
            return _Parts((struct.pack(">ii", *arr.shape), np.ascontiguousarray(arr).data))
        arr = np.asarray(value, dtype=">" + ARRAYS[kind]).reshape(-1)
        return _I32.pack(arr.size) + arr.tobytes()
    except (struct.error, TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, WireError):
            raise
        raise WireError(f"{field.name}: cannot encode {value!r} as {kind} ({exc})") from None


def encode_values(fields: Sequence[Field], values: Sequence[Any], direction: Direction) -> bytes:
    return b"".join(_value_parts(fields, values, direction))


def _value_parts(
    fields: Sequence[Field], values: Sequence[Any], direction: Direction
) -> list[bytes | memoryview]:
    """The encoded fields as buffers to join once (large arrays are not copied here)."""
    if len(fields) != len(values):
        raise WireError(f"expected {len(fields)} values, got {len(values)}")
    parts: list[bytes | memoryview] = []
    for f, v in zip(fields, values, strict=True):
        encoded = _encode_field(f, v, direction)
        if isinstance(encoded, _Parts):
            parts += encoded
        else:
            parts.append(encoded)
    return parts


class _Parts(tuple):  # type: ignore[type-arg]
    """Several buffers one field encodes to (a 2-D array: its shape, then its data)."""


def encode_error(message: str = "", status: int | None = None) -> bytes:
    """Error section; status defaults to 1 when there is a message, else 0."""
    raw = " ".join(message.split()).encode("utf-8")  # one line, always
    if status is None:
        status = 1 if raw else 0
    return _ERR.pack(status, len(raw)) + raw


# ---------------------------------------------------------------- body decoding


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(
                f"{what}: needs {n} bytes at offset {self.pos}, body has {len(self.data)}"
            )
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def view(self, n: int, what: str) -> memoryview:
        """The next n bytes without copying them (for arrays decoded straight from it)."""
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(
                f"{what}: needs {n} bytes at offset {self.pos}, body has {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def count(self, what: str) -> int:
        n: int = _I32.unpack(self.take(4, what))[0]
        if n < 0:
            raise WireError(f"{what}: negative count {n}")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"{what}: string is not valid UTF-8") from None


def _decode_field(field: Field, r: _Reader) -> Any:
    kind, name = field.kind, field.name
    if kind in SCALARS:
        fmt = ">" + kind
        value = struct.unpack(fmt, r.take(struct.calcsize(fmt), name))[0]
        return float(value) if kind in "fd" else int(value)
    if kind == STR:
        return r.string(name)
    if kind == STR_ARRAY:
        r.count(name)  # byte size: client sends 4*count, Nanonis the real size; not trusted
        n = r.count(name)
        return [r.string(f"{name}[{i}]") for i in range(n)]
    if kind == ARRAY2D_F:
        rows, cols = r.count(name), r.count(name)
        raw = r.view(4 * rows * cols, name)
        return np.frombuffer(raw, ">f4").astype(np.float32).reshape(rows, cols)
    code = ARRAYS[kind]
    n = r.count(name)
    raw = r.view(struct.calcsize(code) * n, name)
    return np.frombuffer(raw, ">" + code).astype(code)


def decode_args(spec: CommandSpec, body: bytes) -> tuple[Any, ...]:
    """A request's arguments (no trailing bytes allowed); all-scalar ones in one unpack."""
    packed = spec.scalar_args
    if packed is None or len(body) != packed.size:
        return decode_values(spec.args, body)[0]
    return packed.unpack(body)


def decode_values(
    fields: Sequence[Field], body: bytes, *, allow_trailing: bool = False
) -> tuple[tuple[Any, ...], int]:
    """Decoded values and the offset after them; trailing bytes are an error unless allowed."""
    r = _Reader(body)
    values = tuple(_decode_field(f, r) for f in fields)
    if not allow_trailing and r.pos != len(body):
        raise WireError(f"{len(body) - r.pos} unexpected trailing bytes after the arguments")
    return values, r.pos


def decode_error(body: bytes, offset: int) -> tuple[int, str]:
    r = _Reader(body)
    r.pos = offset
    status, size = _ERR.unpack(r.take(_ERR.size, "error section"))
    return status, r.take(size, "error description").decode("utf-8", errors="replace")


# ---------------------------------------------------------------- whole messages


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly n bytes from a socket (ConnectionError if it closes first)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf  # bytes-like; decoded without another copy


def encode_request(spec: CommandSpec, values: Sequence[Any], send_response: bool = True) -> bytes:
    body = encode_values(spec.args, values, "request")
    return pack_header(spec.name, len(body), send_response) + body


_ACKS: dict[bytes, bytes] = {}


def encode_response(
    name: str | bytes, values: Sequence[Any] | None, returns: Sequence[Field], error: str = ""
) -> bytes:
    """A full response: header echoing the name, return values (defaults if None), error."""
    if not returns and not error:  # a plain acknowledgement: the same bytes every time
        raw = name.encode("ascii") if isinstance(name, str) else name
        ack = _ACKS.get(raw)
        if ack is None:
            ack = _ACKS[raw] = pack_header(raw, _ERR.size, False) + _ERR.pack(0, 0)
        return ack
    if values is None:
        values = [f.default() for f in returns]
    parts = [*_value_parts(returns, values, "response"), encode_error(error)]
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return b"".join([pack_header(name, size, False), *parts])


def decode_response(spec: CommandSpec | None, body: bytes) -> tuple[tuple[Any, ...], int, str]:
    """Return values, error status and description of a response body (spec None: no values)."""
    values, pos = decode_values(spec.returns if spec else (), body, allow_trailing=True)
    status, message = decode_error(body, pos)
    return values, status, message


def read_response(sock: socket.socket, spec: CommandSpec) -> tuple[tuple[Any, ...], str]:
    """The next whole response on a blocking socket, which must answer ``spec``: its
    values and error description. WireError if it cannot be framed or names another
    command (the stream is out of step); OSError from the socket."""
    name, size, _flag = unpack_header(recv_exact(sock, HEADER_SIZE))
    if size < 0 or size > MAX_BODY_BYTES:
        raise WireError(f"reply body size {size} out of range")
    body = recv_exact(sock, size)
    if name != spec.name.encode("ascii"):
        raise WireError(f"stream out of step: got the reply of {decode_name(name)!r}")
    values, _status, message = decode_response(spec, body)
    return values, message
