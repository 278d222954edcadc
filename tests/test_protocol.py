"""Wire protocol v1: frame encoding, header validation, commands and replies, no pickle."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from drivers import protocol
from drivers.protocol import (
    ALLOWED_DTYPES,
    FRAME_PREFIX,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    FrameHeader,
    ProtocolError,
    Reply,
    Request,
    decode_frame,
    encode_frame,
    encode_message,
    pack,
    unpack_map,
)


def _header(array: np.ndarray, **kw: Any) -> FrameHeader:
    base: dict[str, Any] = {
        "stream": "camera",
        "seq": 41,
        "t_exposure_start_ns": 1_700_000_000_123_456_789,
        "t_exposure_end_ns": 1_700_000_000_133_456_789,
        "t_published_ns": 1_700_000_000_140_000_001,
        "shape": tuple(array.shape),
        "dtype": str(array.dtype),
        "state": {"laser": {"x_um": 12.5, "power_mw": 0.0}, "stage_z_um": -3.25, "tag": "a"},
    }
    base.update(kw)
    return FrameHeader(**base)


def _wire_header(**overrides: Any) -> dict[str, Any]:
    """A valid wire header for a 4x6 uint16 frame, with fields replaced or removed."""
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "stream": "camera",
        "seq": 3,
        "t_exp_start_ns": 10,
        "t_exp_end_ns": 20,
        "t_pub_ns": 30,
        "shape": [4, 6],
        "dtype": "uint16",
        "state": {},
    }
    for key, value in overrides.items():
        if value is _DROP:
            obj.pop(key)
        else:
            obj[key] = value
    return obj


_DROP = object()
_GOOD_BUFFER = np.arange(24, dtype=np.uint16).reshape(4, 6).tobytes()


def _raises(parts: list[Any], code: str, *needles: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_frame(parts)
    err = info.value
    assert err.code == code, (err.code, str(err))
    message = str(err)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return err


# --- frame round trips ------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(1).integers(0, 65535, size=(64, 48), dtype=np.uint16),
        np.random.default_rng(2).normal(size=(3, 17, 5)).astype(np.float32),
    ],
    ids=["uint16", "float32-3d"],
)
def test_frame_round_trip_preserves_data_and_every_header_field(array: np.ndarray) -> None:
    header = _header(array)
    parts = encode_frame(header, array)
    assert parts[0] == FRAME_PREFIX + b"camera"
    # Simulate the network: every part arrives as immutable bytes.
    wire = [bytes(p) for p in parts]
    frame = decode_frame(wire)

    assert frame.header == header
    h = frame.header
    assert h.stream == "camera"
    assert h.seq == 41
    assert h.t_exposure_start_ns == header.t_exposure_start_ns
    assert h.t_exposure_end_ns == header.t_exposure_end_ns
    assert h.t_published_ns == header.t_published_ns
    assert h.shape == array.shape
    assert h.dtype == str(array.dtype)
    assert h.state == header.state
    raw = unpack_map(wire[1], "frame header")
    assert raw["v"] == PROTOCOL_VERSION

    assert frame.data.dtype == array.dtype
    assert frame.data.shape == array.shape
    np.testing.assert_array_equal(frame.data, array)
    # Zero copy: the array is a read-only view on the received buffer.
    assert not frame.data.flags.writeable
    assert np.shares_memory(frame.data, np.frombuffer(wire[2], dtype=np.uint8))


def test_encode_frame_does_not_copy_contiguous_array() -> None:
    array = np.arange(100, dtype=np.float32).reshape(10, 10)
    parts = encode_frame(_header(array), array)
    assert np.shares_memory(np.frombuffer(parts[2], dtype=np.uint8), array)
    frame = decode_frame(parts)
    assert np.shares_memory(frame.data, array)
    np.testing.assert_array_equal(frame.data, array)


def test_encode_frame_makes_non_contiguous_array_contiguous() -> None:
    base = np.arange(200, dtype=np.uint16).reshape(10, 20)
    view = base[:, ::3]
    assert not view.flags.c_contiguous
    frame = decode_frame([bytes(p) for p in encode_frame(_header(view), view)])
    np.testing.assert_array_equal(frame.data, view)
    assert frame.data.shape == view.shape


def test_decode_frame_from_zmq_frames_is_a_view_on_the_frame_buffer() -> None:
    array = np.arange(300 * 300, dtype=np.uint16).reshape(300, 300)
    topic, header, buf = encode_frame(_header(array), array)
    parts = [zmq.Frame(topic), zmq.Frame(header), zmq.Frame(bytes(buf))]
    frame = decode_frame(parts)
    np.testing.assert_array_equal(frame.data, array)
    assert np.shares_memory(frame.data, np.asarray(parts[2].buffer))


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_every_allowed_dtype_round_trips(dtype: str) -> None:
    array = (np.arange(12) % 7).astype(dtype).reshape(3, 4)
    frame = decode_frame([bytes(p) for p in encode_frame(_header(array), array)])
    assert frame.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(frame.data, array)


def test_header_only_message_round_trip() -> None:
    topic, body = encode_message(b"hb", {"t_ns": 5, "frames": 9})
    assert topic == b"hb"
    assert unpack_map(body, "message") == {"v": PROTOCOL_VERSION, "t_ns": 5, "frames": 9}


# --- frame rejection --------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 4])
def test_wrong_part_count_is_malformed(count: int) -> None:
    parts = [b"frame/camera", pack(_wire_header()), _GOOD_BUFFER, b"extra"][:count]
    _raises(parts, "malformed", "3 parts", f"got {count}")


def test_non_msgpack_header_is_malformed() -> None:
    _raises([b"frame/camera", b"\xc1\xc1 not msgpack", _GOOD_BUFFER], "malformed", "msgpack")


def test_list_header_is_malformed() -> None:
    header = msgpack.packb([1, "camera", 3])
    _raises([b"frame/camera", header, _GOOD_BUFFER], "malformed", "expected a map", "list")


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_protocol_version_is_rejected(version: Any) -> None:
    header = _wire_header(v=version) if version is not None else _wire_header(v=_DROP)
    _raises([b"frame/camera", pack(header), _GOOD_BUFFER], "version", "'v'", repr(version))


@pytest.mark.parametrize("missing", ["seq", "stream", "shape", "dtype", "t_pub_ns"])
def test_missing_field_is_malformed_and_named(missing: str) -> None:
    header = pack(_wire_header(**{missing: _DROP}))
    _raises([b"frame/camera", header, _GOOD_BUFFER], "malformed", "missing", f"'{missing}'")


@pytest.mark.parametrize("dtype", ["object", "O", "float16", "complex128", ">u2", "bool"])
def test_disallowed_dtype_is_malformed(dtype: str) -> None:
    header = pack(_wire_header(dtype=dtype))
    _raises([b"frame/camera", header, _GOOD_BUFFER], "malformed", "'dtype'", repr(dtype))


@pytest.mark.parametrize("shape", [[], [1, 1, 1, 1, 1], [-4, -6]])
def test_invalid_shape_is_malformed(shape: list[int]) -> None:
    header = pack(_wire_header(shape=shape))
    _raises([b"frame/camera", header, _GOOD_BUFFER], "malformed", "'shape'")


@pytest.mark.parametrize("delta", [-2, -1, 1, 2, len(_GOOD_BUFFER)])
def test_buffer_length_must_match_shape_and_itemsize(delta: int) -> None:
    buf = _GOOD_BUFFER + b"\0" * delta if delta > 0 else _GOOD_BUFFER[:delta]
    _raises(
        [b"frame/camera", pack(_wire_header()), buf],
        "malformed",
        "frame buffer",
        f"{len(buf)} bytes",
        str(len(_GOOD_BUFFER)),
    )


def test_buffer_length_uses_dtype_itemsize() -> None:
    # 48 bytes would fit 4x6 uint16 but a float32 header needs 96.
    header = pack(_wire_header(dtype="float32"))
    _raises([b"frame/camera", header, _GOOD_BUFFER], "malformed", "96")


def test_oversized_header_is_malformed() -> None:
    header = pack(_wire_header(state={"blob": "x" * (MAX_HEADER_BYTES + 1)}))
    assert len(header) > MAX_HEADER_BYTES
    _raises([b"frame/camera", header, _GOOD_BUFFER], "malformed", str(MAX_HEADER_BYTES))


def test_header_at_size_limit_is_accepted() -> None:
    small = len(pack(_wire_header(state={"blob": ""})))
    n = MAX_HEADER_BYTES - small - 2  # "" is a 1-byte fixstr, a long str has a 3-byte prefix
    header = pack(_wire_header(state={"blob": "x" * n}))
    assert len(header) == MAX_HEADER_BYTES
    frame = decode_frame([b"frame/camera", header, _GOOD_BUFFER])
    assert frame.header.state["blob"] == "x" * n
    with pytest.raises(ProtocolError):
        decode_frame([b"frame/camera", pack(_wire_header(state={"blob": "x" * (n + 1)})), b""])


@pytest.mark.parametrize(
    "overrides",
    [
        {"seq": "three"},
        {"seq": None},
        {"shape": 7},
        {"state": [1, 2]},
        # Non-finite numbers are valid msgpack floats; they must not escape as OverflowError.
        {"seq": float("inf")},
        {"t_exp_end_ns": float("-inf")},
        {"shape": [float("inf"), 6]},
    ],
    ids=["seq-str", "seq-none", "shape-int", "state-list", "seq-inf", "t-inf", "shape-inf"],
)
def test_bad_field_values_are_malformed(overrides: dict[str, Any]) -> None:
    _raises([b"frame/camera", pack(_wire_header(**overrides)), _GOOD_BUFFER], "malformed")


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4]], ids=["2^64", "2^64-b"])
def test_shape_whose_size_overflows_int64_is_malformed(shape: list[int]) -> None:
    """The byte count check must not wrap around: these shapes need 2**64 bytes, not 0."""
    header = pack(_wire_header(shape=shape, dtype="uint8"))
    _raises([b"frame/camera", header, b""], "malformed")


# --- commands and replies ---------------------------------------------------------


def test_request_round_trip() -> None:
    req = Request(
        id=2**40 + 7,
        cmd="set_laser",
        args={"spots": [{"x_um": 1.5, "y_um": -2.0, "power_mw": 3}], "note": "hi"},
        t_sent_ns=123_456_789_012,
        expect_reply=False,
    )
    back = Request.from_wire(req.to_wire())
    assert back == req
    assert back.expect_reply is False
    assert unpack_map(req.to_wire(), "command")["reply"] is False


def test_request_defaults_for_optional_fields() -> None:
    back = Request.from_wire(pack({"v": PROTOCOL_VERSION, "id": 5, "cmd": "get_state"}))
    assert (back.id, back.cmd, back.args, back.t_sent_ns, back.expect_reply) == (
        5,
        "get_state",
        {},
        0,
        True,
    )


def test_ok_reply_round_trip() -> None:
    reply = Reply(9, True, {"state": {"z": 1.25}, "n": [1, 2]}, "", "", 111, 222)
    back = Reply.from_wire(reply.to_wire())
    assert back == reply
    wire = unpack_map(reply.to_wire(), "reply")
    assert "error" not in wire
    assert wire["result"] == {"state": {"z": 1.25}, "n": [1, 2]}


def test_error_reply_round_trip() -> None:
    reply = Reply(
        10,
        False,
        error_code="out_of_limits",
        error_message="set_laser: field 'power_mw' too high",
        t_received_ns=5,
        t_done_ns=6,
    )
    back = Reply.from_wire(reply.to_wire())
    assert back == reply
    assert back.ok is False
    assert (back.error_code, back.error_message) == (reply.error_code, reply.error_message)
    wire = unpack_map(reply.to_wire(), "reply")
    assert "result" not in wire
    assert wire["error"] == {"code": "out_of_limits", "message": reply.error_message}


def test_error_reply_without_id_round_trip() -> None:
    reply = Reply(None, False, error_code="malformed", error_message="bad")
    back = Reply.from_wire(reply.to_wire())
    assert back.id is None
    assert back.error_code == "malformed"


def _request_error(obj: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        Request.from_wire(pack(obj) if isinstance(obj, dict) else obj)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize("req_id", [True, False, "1", None, 1.0, [1]])
def test_request_rejects_non_integer_ids(req_id: Any) -> None:
    err = _request_error({"v": 1, "id": req_id, "cmd": "get_state"})
    assert err.code == "malformed"
    assert "'id'" in str(err)


@pytest.mark.parametrize("cmd", ["", None, 3, ["get_state"]])
def test_request_rejects_empty_or_non_string_cmd(cmd: Any) -> None:
    err = _request_error({"v": 1, "id": 1, "cmd": cmd})
    assert err.code == "malformed"
    assert "'cmd'" in str(err)


@pytest.mark.parametrize("args", [[1, 2], "x=1", 5, None])
def test_request_rejects_non_map_args(args: Any) -> None:
    err = _request_error({"v": 1, "id": 1, "cmd": "move", "args": args})
    assert err.code == "malformed"
    assert "'args'" in str(err)


def test_request_rejects_wrong_version_and_non_map() -> None:
    assert _request_error({"v": 2, "id": 1, "cmd": "x"}).code == "version"
    assert _request_error(msgpack.packb([1, 1, "x"])).code == "malformed"
    assert _request_error(b"\xc1").code == "malformed"
    big = pack({"v": 1, "id": 1, "cmd": "x", "args": {"b": b"\0" * MAX_HEADER_BYTES}})
    assert _request_error(big).code == "malformed"


@pytest.mark.parametrize(
    "t_sent", ["yesterday", None, [1], float("inf")], ids=["str", "none", "list", "inf"]
)
def test_request_rejects_bad_timestamp_with_protocol_error(t_sent: Any) -> None:
    """Any bad field must surface as ProtocolError, never TypeError/ValueError/OverflowError."""
    err = _request_error({"v": 1, "id": 1, "cmd": "x", "t_sent_ns": t_sent})
    assert err.code == "malformed"


@pytest.mark.parametrize(
    "obj",
    [
        {"v": 1, "id": 1, "ok": False, "error": "boom"},
        {"v": 1, "id": 1, "ok": True, "result": [1, 2]},
        {"v": 1, "id": 1, "ok": True, "t_recv_ns": "soon"},
    ],
    ids=["error-str", "result-list", "t-str"],
)
def test_reply_rejects_bad_fields_with_protocol_error(obj: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        Reply.from_wire(pack(obj))
    assert info.value.code == "malformed"


# --- never pickle -------------------------------------------------------------------


class _Boobytrap:
    triggered = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Boobytrap._trigger, ())

    @staticmethod
    def _trigger() -> None:
        _Boobytrap.triggered = True


@pytest.mark.parametrize("proto", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickled_payloads_are_rejected_and_never_unpickled(proto: int) -> None:
    _Boobytrap.triggered = False
    payload = pickle.dumps({"v": 1, "id": 1, "cmd": "x", "trap": _Boobytrap()}, protocol=proto)
    with pytest.raises(ProtocolError) as info:
        Request.from_wire(payload)
    assert info.value.code == "malformed"
    with pytest.raises(ProtocolError) as info:
        Reply.from_wire(payload)
    assert info.value.code == "malformed"
    _raises([b"frame/camera", payload, _GOOD_BUFFER], "malformed")
    assert not _Boobytrap.triggered


def test_decoders_never_call_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    frame = decode_frame([bytes(p) for p in encode_frame(_header(array), array)])
    np.testing.assert_array_equal(frame.data, array)
    assert Request.from_wire(Request(1, "a", {}, 0).to_wire()).cmd == "a"
    source = Path(protocol.__file__).read_text()
    assert "import pickle" not in source
    assert "pyobj" not in source


# --- a command carrying one array as a raw buffer ---------------------------------------


def test_an_array_argument_travels_as_a_raw_buffer_and_comes_back_read_only() -> None:
    image = np.arange(512 * 512, dtype=np.uint32).reshape(512, 512).astype(np.uint8)
    req = Request(3, "set_slm_image", {"image": image, "device": "SLM"}, 9)
    head, buf = req.to_parts()
    assert len(head) < 200 and len(buf) == image.nbytes  # not a msgpack list
    assert unpack_map(head, "command")["buf"] == {
        "field": "image",
        "shape": [512, 512],
        "dtype": "uint8",
    }
    back = Request.from_parts([head, bytes(buf)], max_buffer_bytes=image.nbytes)
    assert (back.id, back.cmd, back.args["device"]) == (3, "set_slm_image", "SLM")
    np.testing.assert_array_equal(back.args["image"], image)
    assert not back.args["image"].flags.writeable


def test_a_non_contiguous_array_is_sent_as_its_values() -> None:
    image = np.arange(64, dtype=np.uint16).reshape(8, 8)[:, ::2]
    head, buf = Request(1, "x", {"a": image}, 0).to_parts()
    back = Request.from_parts([head, buf], max_buffer_bytes=1024)
    np.testing.assert_array_equal(back.args["a"], image)


def _buffer_error(spec: Any, buf: bytes | None, limit: int = 1024) -> ProtocolError:
    head = pack({"v": 1, "id": 42, "cmd": "set_slm_image", "args": {"device": "S"}, "buf": spec})
    parts = [head] if buf is None else [head, buf]
    with pytest.raises(ProtocolError) as info:
        Request.from_parts(parts, max_buffer_bytes=limit)
    assert "\n" not in str(info.value)
    assert info.value.request_id == 42  # the header was readable: the reply names the id
    return info.value


@pytest.mark.parametrize(
    ("spec", "buf", "words"),
    [
        ({"field": "image", "shape": [4, 4], "dtype": "uint8"}, bytes(15), "needs 16"),
        ({"field": "image", "shape": [4, 4], "dtype": "uint8"}, None, "none came"),
        ({"field": "image", "shape": [4, 4], "dtype": "object"}, bytes(16), "dtype"),
        ({"field": "image", "shape": [-4, -4], "dtype": "uint8"}, bytes(16), "shape"),
        ({"field": "image", "shape": "4x4", "dtype": "uint8"}, bytes(16), "'buf'"),
        ({"field": "image", "dtype": "uint8"}, bytes(16), "buf.shape"),
        ({"field": "device", "shape": [4, 4], "dtype": "uint8"}, bytes(16), "buf.field"),
        ({"field": 3, "shape": [4, 4], "dtype": "uint8"}, bytes(16), "buf.field"),
        ([1, 2], bytes(16), "'buf' must be a map"),
    ],
)
def test_a_malformed_command_buffer_is_refused_naming_the_field(
    spec: Any, buf: bytes | None, words: str
) -> None:
    err = _buffer_error(spec, buf)
    assert err.code == "malformed" and words in str(err)


def test_a_buffer_beyond_the_node_limit_is_refused_before_it_is_read() -> None:
    spec = {"field": "image", "shape": [64, 64], "dtype": "uint8"}
    err = _buffer_error(spec, bytes(64 * 64), limit=1024)
    assert err.code == "too_large" and "[0, 1024]" in str(err)
    assert _buffer_error(spec, bytes(64 * 64), limit=0).code == "too_large"  # node takes none


def test_a_buffer_without_a_header_announcing_it_is_refused() -> None:
    head = Request(5, "get_state", {}, 0).to_wire()
    with pytest.raises(ProtocolError) as info:
        Request.from_parts([head, b"\0" * 8], max_buffer_bytes=1024)
    assert info.value.request_id == 5 and "'buf'" in str(info.value)
    with pytest.raises(ProtocolError, match="at most 1 buffer"):
        Request.from_parts([head, b"", b""], max_buffer_bytes=1024)


def test_the_sender_refuses_two_arrays_and_unsendable_dtypes() -> None:
    two = Request(1, "x", {"a": np.zeros(2, np.uint8), "b": np.zeros(2, np.uint8)}, 0)
    with pytest.raises(ProtocolError, match="at most one array"):
        two.to_parts()
    with pytest.raises(ProtocolError, match="dtype bool"):
        Request(1, "x", {"a": np.zeros(2, bool)}, 0).to_parts()
    with pytest.raises(ProtocolError, match="to_parts"):
        Request(1, "x", {"a": np.zeros(2, np.uint8)}, 0).to_wire()
