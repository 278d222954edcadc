"""ZeroMQ transport: newest-frame stream over PUB/SUB and id-matched commands over ROUTER/DEALER."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from drivers.protocol import (
    EVENT_TOPIC,
    HEARTBEAT_TOPIC,
    PROTOCOL_VERSION,
    TRUTH_PREFIX,
    Frame,
    Reply,
    Request,
    pack,
)
from drivers.transport import (
    CommandClient,
    CommandError,
    CommandServer,
    CommandTimeout,
    IncomingRequest,
    StreamPublisher,
    StreamSubscriber,
)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Register anything with a close() method; closed at teardown in reverse order."""
    owned: list[Any] = []

    def register(obj: Any) -> Any:
        owned.append(obj)
        return obj

    yield register
    for obj in reversed(owned):
        obj.close()


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "tcp":
        yield "tcp://127.0.0.1:*"
        return
    folder = tempfile.mkdtemp(prefix="sl")  # short: ipc paths are limited to ~100 chars
    yield f"ipc://{folder}/s"
    shutil.rmtree(folder, ignore_errors=True)


def _connected_pair(
    ctx: zmq.Context, closing: Callable[[Any], Any], endpoint: str = "tcp://127.0.0.1:*"
) -> tuple[StreamPublisher, StreamSubscriber]:
    """A publisher and subscriber whose subscription has reached the publisher.

    PUB drops everything until the SUB's subscription arrives (slow joiner), so
    heartbeats are published until one gets through; they never touch frame stats.
    """
    pub = closing(StreamPublisher(ctx, endpoint))
    sub = closing(StreamSubscriber(ctx, pub.endpoint))
    deadline = time.monotonic() + 5
    while not sub.messages:
        assert time.monotonic() < deadline, "subscriber never connected"
        pub.publish(HEARTBEAT_TOPIC, {"warmup": True})
        sub.recv_newest(timeout_ms=20)
    time.sleep(0.05)
    sub.recv_newest(timeout_ms=0)
    sub.take_messages()
    assert sub.stats.received == sub.stats.skipped == sub.stats.rejected == 0
    return pub, sub


def _wait_frame(sub: StreamSubscriber, timeout_s: float = 3.0) -> Frame:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = sub.recv_newest(timeout_ms=50)
        if frame is not None:
            return frame
    raise AssertionError("no frame arrived")


def _wait_until(predicate: Callable[[], bool], sub: StreamSubscriber, timeout_s: float = 3.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        sub.recv_newest(timeout_ms=20)


# --- stream -----------------------------------------------------------------------


def test_frames_arrive_in_order_with_data_and_header_intact(
    ctx: zmq.Context, closing: Callable[[Any], Any], endpoint: str
) -> None:
    pub, sub = _connected_pair(ctx, closing, endpoint)
    rng = np.random.default_rng(7)
    seqs = []
    for i in range(5):
        array = rng.integers(0, 4096, size=(256, 200), dtype=np.uint16)
        sent = pub.publish_frame("camera", array, 1000 + i, 2000 + i, {"z_um": i * 0.5})
        frame = _wait_frame(sub)
        assert frame.header == sent
        assert frame.header.t_exposure_start_ns == 1000 + i
        assert frame.header.t_exposure_end_ns == 2000 + i
        assert frame.header.state == {"z_um": i * 0.5}
        np.testing.assert_array_equal(frame.data, array)
        seqs.append(frame.header.seq)
    assert seqs == list(range(5))
    assert sub.stats.received == 5
    assert sub.stats.skipped == 0
    assert sub.last_seq == {"camera": 4}


def test_sequence_numbers_are_per_stream(ctx: zmq.Context, closing: Callable[[Any], Any]) -> None:
    pub = closing(StreamPublisher(ctx, "tcp://127.0.0.1:*"))
    one = np.zeros((2, 2), np.uint8)
    assert [pub.publish_frame("a", one, 0, 0, {}).seq for _ in range(3)] == [0, 1, 2]
    assert pub.publish_frame("b", one, 0, 0, {}).seq == 0
    assert pub.publish_frame("a", one, 0, 0, {}).seq == 3


def test_received_frame_is_a_read_only_view(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    """The protocol promises a read-only numpy view on the received buffer."""
    pub, sub = _connected_pair(ctx, closing)
    array = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512)
    pub.publish_frame("camera", array, 0, 0, {})
    frame = _wait_frame(sub)
    np.testing.assert_array_equal(frame.data, array)
    assert not frame.data.flags.owndata
    assert not frame.data.flags.writeable


def test_slow_subscriber_gets_only_the_newest_frame(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    pub, sub = _connected_pair(ctx, closing)
    arrays = [np.full((64, 64), i, dtype=np.float32) for i in range(20)]
    for array in arrays:
        last = pub.publish_frame("camera", array, 0, 0, {"i": float(array[0, 0])})
    time.sleep(0.3)  # let all 20 reach the subscriber's queue
    frame = sub.recv_newest(timeout_ms=1000)
    assert frame is not None
    assert frame.header.seq == last.seq == 19
    np.testing.assert_array_equal(frame.data, arrays[-1])
    assert sub.stats.received == 20
    assert sub.stats.skipped == 19
    # Nothing older is left behind to be handed out later.
    assert sub.recv_newest(timeout_ms=100) is None


def test_frames_lost_upstream_count_as_skipped(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    pub, sub = _connected_pair(ctx, closing)
    one = np.zeros((4, 4), np.uint16)
    pub.publish_frame("camera", one, 0, 0, {})
    assert _wait_frame(sub).header.seq == 0
    pub._seq["camera"] = 6  # the next frame is seq 7: 1..6 never arrived
    pub.publish_frame("camera", one, 0, 0, {})
    assert _wait_frame(sub).header.seq == 7
    assert sub.stats.received == 2
    assert sub.stats.skipped == 6


def test_publisher_without_subscriber_never_blocks(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    pub = closing(StreamPublisher(ctx, "tcp://127.0.0.1:*", sndhwm=4))
    array = np.zeros((512, 512), dtype=np.uint16)
    start = time.perf_counter()
    for _ in range(2000):
        header = pub.publish_frame("camera", array, 0, 0, {})
    elapsed = time.perf_counter() - start
    assert header.seq == 1999
    assert elapsed < 3.0, f"publishing to nobody took {elapsed:.2f} s"


def test_publisher_never_blocks_on_a_stalled_subscriber(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    pub, sub = _connected_pair(ctx, closing)
    array = np.zeros((512, 512), dtype=np.uint16)
    start = time.perf_counter()
    for _ in range(1000):  # far beyond both high-water marks; sub never reads
        pub.publish_frame("camera", array, 0, 0, {})
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"publishing to a stalled subscriber took {elapsed:.2f} s"
    frame = _wait_frame(sub)
    # Old frames were dropped at the high-water marks or superseded; every frame up to
    # the one handed out, except that one, counts as skipped (never acted on).
    assert sub.stats.received < 1000
    assert sub.stats.skipped == frame.header.seq


def test_header_only_messages_go_to_take_messages(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    pub, sub = _connected_pair(ctx, closing)
    pub.publish(HEARTBEAT_TOPIC, {"t_ns": 11, "frames": 3})
    pub.publish(EVENT_TOPIC, {"event": "watchdog", "silent_ms": 250.0})
    pub.publish(TRUTH_PREFIX + b"camera", {"seq": 0, "x": [1.0]})  # not subscribed
    _wait_until(lambda: len(sub.messages) >= 2, sub)
    assert sub.recv_newest(timeout_ms=100) is None  # header-only: never a frame
    messages = sub.take_messages()
    assert messages == [
        (HEARTBEAT_TOPIC, {"v": PROTOCOL_VERSION, "t_ns": 11, "frames": 3}),
        (EVENT_TOPIC, {"v": PROTOCOL_VERSION, "event": "watchdog", "silent_ms": 250.0}),
    ]
    assert sub.take_messages() == []
    assert sub.stats.received == 0
    assert sub.stats.rejected == 0
    assert sub.last_message_ns > 0


def test_malformed_stream_messages_are_rejected_not_raised(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    raw = closing(_linger(ctx.socket(zmq.PUB)))
    raw.bind("tcp://127.0.0.1:*")
    sub = closing(StreamSubscriber(ctx, raw.getsockopt_string(zmq.LAST_ENDPOINT)))
    deadline = time.monotonic() + 5
    while not sub.messages:
        assert time.monotonic() < deadline, "subscriber never connected"
        raw.send_multipart([HEARTBEAT_TOPIC, pack({"v": PROTOCOL_VERSION})])
        sub.recv_newest(timeout_ms=20)
    time.sleep(0.05)
    sub.recv_newest(timeout_ms=0)
    sub.take_messages()
    good_header = {
        "v": PROTOCOL_VERSION,
        "stream": "camera",
        "seq": 0,
        "t_exp_start_ns": 0,
        "t_exp_end_ns": 0,
        "t_pub_ns": 0,
        "shape": [2, 2],
        "dtype": "uint16",
    }
    garbage = [
        [b"frame/camera", b"\xde\xad\xbe\xef garbage"],
        [b"frame/camera", b"\xc1", b"\x00" * 8],
        [b"frame/camera", pack(good_header), b"\x00" * 7],
        [b"frame/camera", pack({**good_header, "dtype": "object"}), b"\x00" * 8],
        [b"frame/camera", pack({**good_header, "v": 2}), b"\x00" * 8],
        [HEARTBEAT_TOPIC],
        [EVENT_TOPIC, b"\x93\x01\x02\x03"],  # a msgpack list, not a map
    ]
    for parts in garbage:
        raw.send_multipart(parts)
    raw.send_multipart([b"frame/camera", pack(good_header), b"\x01\x00" * 4])
    frame = _wait_frame(sub)
    _wait_until(lambda: sub.stats.rejected >= len(garbage), sub)
    assert sub.stats.rejected == len(garbage)
    assert frame.data.tolist() == [[1, 1], [1, 1]]
    assert sub.stats.received == 1
    assert sub.take_messages() == []


@pytest.mark.parametrize(
    "bad",
    [{"shape": [2**32, 2**32], "dtype": "uint8"}, {"seq": float("inf")}],
    ids=["shape-size-overflows", "seq-inf"],
)
def test_hostile_frame_header_cannot_crash_the_subscriber(
    ctx: zmq.Context, closing: Callable[[Any], Any], bad: dict[str, Any]
) -> None:
    """Well-formed msgpack with absurd values must be counted as rejected, not raise."""
    raw = closing(_linger(ctx.socket(zmq.PUB)))
    raw.bind("tcp://127.0.0.1:*")
    sub = closing(StreamSubscriber(ctx, raw.getsockopt_string(zmq.LAST_ENDPOINT)))
    deadline = time.monotonic() + 5
    while not sub.messages:
        assert time.monotonic() < deadline, "subscriber never connected"
        raw.send_multipart([HEARTBEAT_TOPIC, pack({"v": PROTOCOL_VERSION})])
        sub.recv_newest(timeout_ms=20)
    header = {
        "v": PROTOCOL_VERSION,
        "stream": "camera",
        "seq": 0,
        "t_exp_start_ns": 0,
        "t_exp_end_ns": 0,
        "t_pub_ns": 0,
        "shape": [2, 2],
        "dtype": "uint16",
        **bad,
    }
    payload = b"" if "shape" in bad else b"\x00" * 8
    raw.send_multipart([b"frame/camera", pack(header), payload])
    _wait_until(lambda: sub.stats.rejected >= 1, sub)
    assert sub.stats.rejected == 1
    assert sub.stats.received == 0


def _linger(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    return sock


# --- commands ---------------------------------------------------------------------


Handler = Callable[[IncomingRequest], Reply | None]


class _ServerThread:
    """Runs a CommandServer in its own thread; the socket is only touched there."""

    def __init__(self, server: CommandServer, handler: Handler) -> None:
        self.server = server
        self.handler = handler
        self.seen: list[IncomingRequest] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for incoming in self.server.poll(timeout_ms=10):
                self.seen.append(incoming)
                reply = self.handler(incoming)
                if reply is not None:
                    self.server.reply(incoming, reply)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.server.close()


def _echo(incoming: IncomingRequest) -> Reply | None:
    req = incoming.request
    assert req is not None
    if req.cmd == "fail":
        return Reply(req.id, False, error_code="out_of_limits", error_message="fail: too far")
    if req.cmd == "slow":
        time.sleep(0.3)
    if not req.expect_reply:
        return None
    return Reply(req.id, True, {"cmd": req.cmd, "echo": req.args}, t_received_ns=1, t_done_ns=2)


@pytest.fixture
def command_pair(
    ctx: zmq.Context, closing: Callable[[Any], Any], endpoint: str
) -> tuple[_ServerThread, CommandClient]:
    server = CommandServer(ctx, endpoint)
    running = closing(_ServerThread(server, _echo))
    client = closing(CommandClient(ctx, server.endpoint, timeout_ms=2000))
    return running, client


def test_request_gets_its_own_reply(command_pair: tuple[_ServerThread, CommandClient]) -> None:
    running, client = command_pair
    first = client.call("move_stage", {"x_um": 1.5})
    second = client.call("get_state")
    assert first.ok and second.ok
    assert first.result == {"cmd": "move_stage", "echo": {"x_um": 1.5}}
    assert second.result == {"cmd": "get_state", "echo": {}}
    assert second.id == first.id + 1
    assert [inc.request.id for inc in running.seen if inc.request] == [first.id, second.id]
    assert all(inc.error is None for inc in running.seen)
    assert client.late_replies == 0


def test_error_reply_raises_command_error_with_code(
    command_pair: tuple[_ServerThread, CommandClient],
) -> None:
    _, client = command_pair
    with pytest.raises(CommandError) as info:
        client.call("fail")
    assert info.value.code == "out_of_limits"
    assert "too far" in str(info.value)
    assert str(info.value).startswith("fail:")
    # The client is still usable afterwards.
    assert client.call("ping").result["cmd"] == "ping"


def test_fire_and_forget_send_then_call(command_pair: tuple[_ServerThread, CommandClient]) -> None:
    running, client = command_pair
    sent_id = client.send("heartbeat", reply=False)
    reply = client.call("get_state")
    assert reply.id == sent_id + 1
    assert client.late_replies == 0
    requests = [inc.request for inc in running.seen]
    assert requests[0] is not None and requests[0].expect_reply is False


def test_no_server_times_out_close_to_the_timeout(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    folder = tempfile.mkdtemp(prefix="sl")
    try:
        client = closing(CommandClient(ctx, f"ipc://{folder}/nobody", timeout_ms=300))
        start = time.monotonic()
        with pytest.raises(CommandTimeout) as info:
            client.call("get_state")
        elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < 1.5, elapsed
        assert "get_state" in str(info.value)
        start = time.monotonic()
        with pytest.raises(CommandTimeout):
            client.call("get_state", timeout_ms=100)
        elapsed = time.monotonic() - start
        assert 0.08 <= elapsed < 1.0, elapsed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_late_reply_is_discarded_and_next_call_gets_its_own(
    command_pair: tuple[_ServerThread, CommandClient],
) -> None:
    running, client = command_pair
    with pytest.raises(CommandTimeout):
        client.call("slow", timeout_ms=50)  # the server answers after 300 ms
    reply = client.call("fast", {"n": 2})
    assert reply.result == {"cmd": "fast", "echo": {"n": 2}}
    assert reply.id == 2
    assert client.late_replies == 1
    assert [inc.request.cmd for inc in running.seen if inc.request] == ["slow", "fast"]


def test_late_error_reply_does_not_raise_on_next_call(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    def handler(incoming: IncomingRequest) -> Reply:
        req = incoming.request
        assert req is not None
        if req.cmd == "slow_fail":
            time.sleep(0.3)
            return Reply(req.id, False, error_code="device_error", error_message="late")
        return Reply(req.id, True, {"ok": 1})

    server = CommandServer(ctx, "tcp://127.0.0.1:*")
    closing(_ServerThread(server, handler))
    client = closing(CommandClient(ctx, server.endpoint, timeout_ms=2000))
    with pytest.raises(CommandTimeout):
        client.call("slow_fail", timeout_ms=50)
    assert client.call("get_state").result == {"ok": 1}
    assert client.late_replies == 1


def _raw_dealer(ctx: zmq.Context, closing: Callable[[Any], Any], endpoint: str) -> zmq.Socket:
    dealer = closing(_linger(ctx.socket(zmq.DEALER)))
    dealer.setsockopt(zmq.IDENTITY, b"raw-agent")
    dealer.connect(endpoint)
    return dealer


def _poll_all(server: CommandServer, n: int, timeout_s: float = 3.0) -> list[IncomingRequest]:
    out: list[IncomingRequest] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(server.poll(timeout_ms=50))
    return out


def test_malformed_commands_come_back_as_errors(
    ctx: zmq.Context, closing: Callable[[Any], Any], endpoint: str
) -> None:
    server = closing(CommandServer(ctx, endpoint))
    dealer = _raw_dealer(ctx, closing, server.endpoint)
    bodies: list[list[bytes]] = [
        [b"\xde\xad\xbe\xef"],
        [pack({"v": PROTOCOL_VERSION, "id": True, "cmd": "x"})],
        [pack({"v": PROTOCOL_VERSION, "id": 1, "cmd": ""})],
        [pack({"v": PROTOCOL_VERSION, "id": 1, "cmd": "x", "args": [1]})],
        [Request(1, "x", {}, 0).to_wire(), b"extra frame"],
        [b"", Request(1, "x", {}, 0).to_wire()],  # REQ-style envelope
    ]
    for body in bodies:
        dealer.send_multipart(body)
    dealer.send(pack({"v": 2, "id": 1, "cmd": "x"}))
    dealer.send(Request(7, "get_state", {"a": 1}, 5).to_wire())
    incoming = _poll_all(server, len(bodies) + 2)
    assert len(incoming) == len(bodies) + 2
    *bad, wrong_version, good = incoming
    for inc in bad:
        assert inc.identity == b"raw-agent"
        assert inc.request is None
        assert inc.error is not None
        assert inc.error.code == "malformed", str(inc.error)
        assert inc.t_received_ns > 0
    assert "'buf'" in str(bad[-2].error)  # an extra frame no header announced
    assert "header frame is empty" in str(bad[-1].error)
    assert wrong_version.request is None
    assert wrong_version.error is not None and wrong_version.error.code == "version"
    assert good.error is None
    assert good.request == Request(7, "get_state", {"a": 1}, 5)

    # A reply addressed to the incoming identity reaches that dealer.
    server.reply(bad[0], Reply(None, False, error_code="malformed", error_message="bad"))
    assert dealer.poll(2000)
    back = Reply.from_wire(dealer.recv())
    assert (back.id, back.ok, back.error_code) == (None, False, "malformed")


def test_pickled_command_is_rejected_as_malformed(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    server = closing(CommandServer(ctx, "tcp://127.0.0.1:*"))
    dealer = _raw_dealer(ctx, closing, server.endpoint)
    dealer.send_pyobj({"v": 1, "id": 1, "cmd": "get_state"})
    (incoming,) = _poll_all(server, 1)
    assert incoming.request is None
    assert incoming.error is not None and incoming.error.code == "malformed"


@pytest.mark.parametrize("t_sent", ["yesterday", None, float("inf")], ids=["str", "none", "inf"])
def test_hostile_command_field_cannot_crash_the_server(
    ctx: zmq.Context, closing: Callable[[Any], Any], t_sent: Any
) -> None:
    """A bad optional field must become a 'malformed' IncomingRequest, not an exception."""
    server = closing(CommandServer(ctx, "tcp://127.0.0.1:*"))
    dealer = _raw_dealer(ctx, closing, server.endpoint)
    dealer.send(pack({"v": PROTOCOL_VERSION, "id": 1, "cmd": "x", "t_sent_ns": t_sent}))
    dealer.send(Request(2, "get_state", {}, 0).to_wire())
    incoming = _poll_all(server, 2)
    assert [inc.request.id if inc.request else None for inc in incoming] == [None, 2]
    assert incoming[0].error is not None and incoming[0].error.code == "malformed"


def test_reply_to_vanished_peer_does_not_block(
    ctx: zmq.Context, closing: Callable[[Any], Any]
) -> None:
    server = closing(CommandServer(ctx, "tcp://127.0.0.1:*"))
    ghost = IncomingRequest(b"nobody-here", Request(1, "x", {}, 0), 0)
    start = time.monotonic()
    for _ in range(1000):
        server.reply(ghost, Reply(1, True, {}))
    assert time.monotonic() - start < 2.0
    dealer = _raw_dealer(ctx, closing, server.endpoint)
    dealer.send(Request(3, "get_state", {}, 0).to_wire())
    (incoming,) = _poll_all(server, 1)
    server.reply(incoming, Reply(3, True, {"n": 3}))
    assert dealer.poll(2000)
    assert Reply.from_wire(dealer.recv()).result == {"n": 3}


class _LazyQueue:
    """A DEALER whose queue looks full once (ZeroMQ's lazily acknowledged reads), then
    has room when polled, or never has room."""

    def __init__(self, room_after_poll: bool) -> None:
        self.room_after_poll = room_after_poll
        self.full = True
        self.sent: list[list[Any]] = []

    def send_multipart(self, parts: list[Any], flags: int = 0, copy: bool = True) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append(parts)

    def poll(self, timeout: int, flags: int = zmq.POLLIN) -> int:
        assert flags == zmq.POLLOUT and timeout > 0
        self.full = not self.room_after_poll
        return 0 if self.full else zmq.POLLOUT

    def close(self) -> None:
        pass


def test_a_send_that_finds_the_queue_full_waits_for_room_instead_of_failing(
    ctx: zmq.Context,
) -> None:
    client = CommandClient(ctx, "ipc:///nonexistent/slot", max_buffer_bytes=0)
    real = client.socket
    try:
        client.socket = _LazyQueue(room_after_poll=True)  # type: ignore[assignment]
        client.send("heartbeat", reply=False)
        assert len(client.socket.sent) == 1 and client.send_waits == 1
        client.socket = _LazyQueue(room_after_poll=False)  # type: ignore[assignment]
        with pytest.raises(CommandTimeout, match="send queue full"):
            client.send("heartbeat", reply=False)
    finally:
        real.close()
