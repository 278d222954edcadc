"""Property-based fuzzing of the protocol decoder: any bytes decode or raise ProtocolError."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.protocol import (
    ALLOWED_DTYPES,
    FRAME_PREFIX,
    FrameHeader,
    ProtocolError,
    Reply,
    Request,
    decode_frame,
    encode_frame,
)

FUZZ = settings(max_examples=150, deadline=None)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=8,
)
keys = st.sampled_from(["v", "id", "cmd", "args", "t_sent_ns", "reply", "ok", "result", "error"])
messages = st.dictionaries(keys | st.text(max_size=5), values, max_size=8).map(
    lambda d: {**d, "v": 1} if d.get("v") is None else d
)


def _decodes_or_refuses(decode: Any, data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError as exc:
        assert exc.code in {"malformed", "version"}
        assert "\n" not in str(exc)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_are_a_request_or_a_protocol_error(data: bytes) -> None:
    _decodes_or_refuses(Request.from_wire, data)
    _decodes_or_refuses(Reply.from_wire, data)


@FUZZ
@given(messages)
def test_any_msgpack_map_is_a_request_or_a_protocol_error(message: dict[str, Any]) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    try:
        request = Request.from_wire(data)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(request.id, int) and not isinstance(request.id, bool)
    assert isinstance(request.cmd, str) and request.cmd
    assert isinstance(request.args, dict)
    _decodes_or_refuses(Reply.from_wire, data)


@FUZZ
@given(messages, st.binary(max_size=64), st.integers(min_value=1, max_value=4))
def test_frame_messages_decode_or_refuse(header: dict[str, Any], buffer: bytes, n: int) -> None:
    parts = [FRAME_PREFIX + b"x", msgpack.packb(header, use_bin_type=True), buffer][:n]
    try:
        frame = decode_frame(parts)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    assert frame.data.nbytes == len(buffer) and not frame.data.flags.writeable


@FUZZ
@given(
    st.sampled_from(["uint8", "uint16", "float32"]),
    st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=3),
    st.integers(min_value=-3, max_value=3),
)
def test_a_frame_whose_buffer_does_not_match_its_header_is_refused(
    dtype: str, shape: list[int], extra: int
) -> None:
    array = np.zeros(shape, dtype=dtype)
    header = FrameHeader("s", 0, 0, 0, 0, tuple(shape), dtype)
    topic, head, buf = encode_frame(header, array)
    raw = bytes(buf)
    raw = raw + b"\0" * extra if extra >= 0 else raw[:extra]
    try:
        frame = decode_frame([topic, head, raw])
    except ProtocolError:
        assert len(raw) != array.nbytes
        return
    assert len(raw) == array.nbytes and frame.data.shape == tuple(shape)


buffer_specs = st.fixed_dictionaries(
    {},
    optional={
        "field": st.sampled_from(["image", "device", ""]) | values,
        "shape": st.lists(st.integers(min_value=-2, max_value=9), max_size=5) | values,
        "dtype": st.sampled_from(["uint8", "uint16", "float64", "object", "<U4"]) | values,
    },
)


VALID_HEADER = {"v": 1, "id": 1, "cmd": "set_slm_image", "args": {"device": "SLM"}}


@FUZZ
@given(
    messages | st.just(VALID_HEADER),
    buffer_specs | values,
    st.binary(max_size=128),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=0, max_value=256),
)
def test_commands_with_a_buffer_decode_or_refuse(
    header: dict[str, Any], spec: Any, buffer: bytes, n: int, limit: int
) -> None:
    """Header, `buf` spec, buffer and frame count all random: a Request whose array is
    exactly what the buffer holds, or a one-line ProtocolError."""
    head = msgpack.packb({**header, "buf": spec}, use_bin_type=True)
    parts = [head, buffer, buffer][:n]
    try:
        request = Request.from_parts(parts, max_buffer_bytes=limit)
    except ProtocolError as exc:
        assert exc.code in {"malformed", "version", "too_large"}
        assert "\n" not in str(exc)
        return
    assert n == 2 and len(buffer) <= limit
    array = request.args[spec["field"]]
    assert array.nbytes == len(buffer) and not array.flags.writeable
    assert array.tobytes() == buffer


@FUZZ
@given(
    st.sampled_from(sorted(ALLOWED_DTYPES)),
    st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=4),
)
def test_any_sendable_array_round_trips_through_a_command(dtype: str, shape: list[int]) -> None:
    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    parts = Request(1, "x", {"a": array, "b": 2}, 0).to_parts()
    back = Request.from_parts([bytes(p) for p in parts], max_buffer_bytes=array.nbytes)
    assert back.args["b"] == 2 and back.args["a"].dtype == array.dtype
    np.testing.assert_array_equal(back.args["a"], array)
