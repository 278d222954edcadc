"""ZeroMQ sockets speaking protocol v1: frame stream (PUB/SUB) and commands (ROUTER/DEALER).

Each class owns one socket and is used from one thread, as ZeroMQ requires.
Queues are bounded by high-water marks: a slow subscriber loses old frames at
its own end, the publisher never blocks. Every receiving socket has a maximum
message size (a larger message disconnects its sender before it is read), and
tcp:// endpoints given keys use CURVE (drivers/auth.py).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from drivers.auth import (
    ClientKeys,
    ServerKeys,
    check_bind,
    release_server,
    secure_client,
    secure_server,
    set_max_message,
)
from drivers.protocol import (
    EVENT_TOPIC,
    FRAME_PREFIX,
    HEARTBEAT_TOPIC,
    MAX_HEADER_BYTES,
    Frame,
    FrameHeader,
    ProtocolError,
    Reply,
    Request,
    decode_frame,
    encode_frame,
    encode_message,
    now_ns,
    unpack_map,
)

log = logging.getLogger(__name__)

# Commands, replies and headers are single msgpack maps the decoder refuses above this.
COMMAND_MAX_BYTES = MAX_HEADER_BYTES
# How long a command send waits for room in a queue that looks full (see _send_parts).
SEND_WAIT_MS = 20
# A frame buffer when the config does not say how large its camera is: 4096 x 4096 x 32 bit.
DEFAULT_FRAME_MAX_BYTES = 4096 * 4096 * 4


class CommandError(RuntimeError):
    """The driver answered a command with an explicit error reply."""

    def __init__(self, cmd: str, code: str, message: str) -> None:
        # Driver messages already start with the command name; do not say it twice.
        super().__init__(message if message.startswith(f"{cmd}:") else f"{cmd}: {message}")
        self.code = code


class CommandTimeout(TimeoutError):
    """No reply within the command's timeout: the driver may be gone or overloaded."""


def _linger(sock: zmq.Socket, ms: int = 0) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, ms)
    return sock


def _bind(sock: zmq.Socket, endpoint: str, keys: ServerKeys | None, name: str) -> str:
    """Bind as a CURVE server when keys are given; refuse unsafe binds in one line."""
    check_bind(endpoint, keys, name)
    secure_server(sock, endpoint, keys)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        release_server(sock)
        raise ValueError(f"{name}: cannot bind {endpoint} ({exc})") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _connect(sock: zmq.Socket, endpoint: str, keys: ClientKeys | None) -> None:
    secure_client(sock, endpoint, keys)
    sock.connect(endpoint)


def raw_subscriber(
    ctx: zmq.Context,
    endpoint: str,
    topics: Iterable[bytes],
    rcvhwm: int,
    keys: ClientKeys | None = None,
    max_part_bytes: int = COMMAND_MAX_BYTES,
) -> zmq.Socket:
    """A SUB socket for readers that take raw parts (truth, recorders): the same CURVE
    keys and size limit as `StreamSubscriber`, without its decoding."""
    sock = _linger(ctx.socket(zmq.SUB))
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    set_max_message(sock, max(max_part_bytes, COMMAND_MAX_BYTES))
    for topic in topics:
        sock.setsockopt(zmq.SUBSCRIBE, topic)
    _connect(sock, endpoint, keys)
    return sock


# --- stream ---------------------------------------------------------------


class StreamPublisher:
    """Publishes frames and header-only messages; never blocks on subscribers."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        sndhwm: int = 32,
        keys: ServerKeys | None = None,
        name: str = "stream_endpoint",
    ) -> None:
        self.socket = _linger(ctx.socket(zmq.PUB))
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        set_max_message(self.socket, COMMAND_MAX_BYTES)  # it only ever reads subscriptions
        self.endpoint = _bind(self.socket, endpoint, keys, name)
        self._seq: dict[str, int] = {}

    def publish_frame(
        self,
        stream: str,
        array: np.ndarray,
        t_exposure_start_ns: int,
        t_exposure_end_ns: int,
        state: Mapping[str, Any],
    ) -> FrameHeader:
        seq = self._seq.get(stream, -1) + 1
        self._seq[stream] = seq
        header = FrameHeader(
            stream=stream,
            seq=seq,
            t_exposure_start_ns=t_exposure_start_ns,
            t_exposure_end_ns=t_exposure_end_ns,
            t_published_ns=now_ns(),
            shape=tuple(array.shape),
            dtype=str(array.dtype),
            state=dict(state),
        )
        self.socket.send_multipart(encode_frame(header, array), copy=False)
        return header

    def publish(self, topic: bytes, payload: Mapping[str, Any]) -> None:
        self.socket.send_multipart(encode_message(topic, payload))

    def close(self) -> None:
        release_server(self.socket)


@dataclass
class StreamStats:
    received: int = 0
    skipped: int = 0  # frames the agent never acted on (dropped upstream or superseded)
    rejected: int = 0  # malformed messages


class StreamSubscriber:
    """Receives the frame stream and hands out only the newest frame.

    Everything older that is waiting is drained and counted as skipped, so the
    agent always acts on the freshest image instead of working through a backlog.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        topics: Iterable[bytes] = (FRAME_PREFIX, HEARTBEAT_TOPIC, EVENT_TOPIC),
        rcvhwm: int = 32,
        keys: ClientKeys | None = None,
        max_frame_bytes: int = DEFAULT_FRAME_MAX_BYTES,
    ) -> None:
        self.socket = _linger(ctx.socket(zmq.SUB))
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        # Per message part: a header is <= COMMAND_MAX_BYTES, a buffer <= one frame.
        set_max_message(self.socket, max(max_frame_bytes, COMMAND_MAX_BYTES))
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        _connect(self.socket, endpoint, keys)
        self.stats = StreamStats()
        self.last_seq: dict[str, int] = {}
        self.last_message_ns = 0
        # Header-only messages since the last take; bounded if nobody takes them.
        self.messages: deque[tuple[bytes, dict[str, Any]]] = deque(maxlen=1000)

    def recv_newest(self, timeout_ms: int) -> Frame | None:
        """Wait up to timeout_ms for traffic, then return the newest frame (or None)."""
        newest: Frame | None = None
        if not self.socket.poll(timeout_ms):
            return None
        while True:
            try:
                parts = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.last_message_ns = now_ns()
            topic = bytes(parts[0].buffer)
            try:
                if topic.startswith(FRAME_PREFIX):
                    frame = decode_frame(parts)
                    self._count(frame)
                    if newest is not None:
                        self.stats.skipped += 1  # superseded before the agent saw it
                    newest = frame
                else:
                    self.messages.append((topic, unpack_map(parts[1].buffer, "message")))
            except (ProtocolError, IndexError) as exc:
                self.stats.rejected += 1
                log.warning("rejected stream message on %r: %s", topic, exc)
        return newest

    def take_messages(self) -> list[tuple[bytes, dict[str, Any]]]:
        out = list(self.messages)
        self.messages.clear()
        return out

    def _count(self, frame: Frame) -> None:
        stream = frame.header.stream
        last = self.last_seq.get(stream)
        if last is not None:
            gap = frame.header.seq - last - 1
            self.stats.skipped += max(gap, 0)
        self.stats.received += 1
        self.last_seq[stream] = frame.header.seq

    def close(self) -> None:
        self.socket.close()


# --- commands -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    identity: bytes
    request: Request | None  # None when the message could not be parsed
    t_received_ns: int
    error: ProtocolError | None = None


class CommandServer:
    """ROUTER side: receives commands from any number of agents, replies to each.

    A command is a header, optionally followed by one array buffer of at most
    `max_buffer_bytes` (the node's largest legitimate array, an SLM image); the socket's
    maximum message size is the larger of the two limits, so a bigger part disconnects
    its sender unread, and a part within it but beyond its own limit gets an error reply.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        keys: ServerKeys | None = None,
        name: str = "command_endpoint",
        max_buffer_bytes: int = 0,
    ) -> None:
        self.socket = _linger(ctx.socket(zmq.ROUTER))
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.max_buffer_bytes = max_buffer_bytes
        set_max_message(self.socket, max(COMMAND_MAX_BYTES, max_buffer_bytes))
        self.endpoint = _bind(self.socket, endpoint, keys, name)

    def poll(self, timeout_ms: int) -> list[IncomingRequest]:
        out: list[IncomingRequest] = []
        if not self.socket.poll(timeout_ms):
            return out
        while True:
            try:
                parts = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            t = now_ns()
            identity = parts[0]
            try:
                request = Request.from_parts(parts[1:], self.max_buffer_bytes)
                out.append(IncomingRequest(identity, request, t))
            except ProtocolError as exc:
                out.append(IncomingRequest(identity, None, t, exc))

    def waiting(self) -> bool:
        """Whether a command is waiting to be read (without reading it)."""
        return bool(self.socket.poll(0))

    def reply(self, incoming: IncomingRequest, reply: Reply) -> None:
        try:
            self.socket.send_multipart([incoming.identity, reply.to_wire()], flags=zmq.NOBLOCK)
        except zmq.Again:  # peer gone or its queue full: never block the driver
            log.warning("reply to a vanished peer dropped (id=%s)", reply.id)

    def close(self) -> None:
        release_server(self.socket)


class CommandClient:
    """DEALER side: request/reply with ids and timeouts; stale replies are discarded.

    A numpy array among a command's args travels as the raw buffer after its header.
    Nothing larger than the node takes is ever sent (the node would drop it unread and
    the caller would only see silence): the header against MAX_HEADER_BYTES, a buffer
    against the node's `max_command_buffer_bytes`, given here or asked once from its
    get_capabilities on a socket of its own (pipelined replies on this one stay intact).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        timeout_ms: int = 1000,
        keys: ClientKeys | None = None,
        max_buffer_bytes: int | None = None,
    ) -> None:
        self.socket = _linger(ctx.socket(zmq.DEALER))
        self.socket.setsockopt(zmq.SNDHWM, 64)
        set_max_message(self.socket, COMMAND_MAX_BYTES)
        _connect(self.socket, endpoint, keys)
        self._ctx, self._endpoint, self._keys = ctx, endpoint, keys
        self.timeout_ms = timeout_ms
        self.max_buffer_bytes = max_buffer_bytes
        self._ids = itertools.count(1)
        self.late_replies = 0
        self.send_waits = 0  # sends that found the queue full and waited for it
        self._buffer_sent: dict[int, int] = {}  # request id -> bytes, for the timeout line

    def send(self, cmd: str, args: Mapping[str, Any] | None = None, reply: bool = True) -> int:
        req = Request(
            id=next(self._ids),
            cmd=cmd,
            args=dict(args or {}),
            t_sent_ns=now_ns(),
            expect_reply=reply,
        )
        try:
            parts = req.to_parts()
        except ProtocolError as exc:
            raise CommandError(cmd, exc.code, str(exc)) from None
        self._check_size(cmd, parts)
        self._send_parts(cmd, parts)
        if len(parts) == 2 and reply:
            self._buffer_sent = {req.id: len(parts[1])}
        return req.id

    def _check_size(self, cmd: str, parts: list[bytes | memoryview]) -> None:
        """Refuse, in one line naming the limit, a message the node would drop unread."""
        if len(parts[0]) > MAX_HEADER_BYTES:
            raise CommandError(
                cmd,
                "too_large",
                f"{cmd}: the command header is {len(parts[0])} bytes, the allowed range is "
                f"[0, {MAX_HEADER_BYTES}] bytes; pass large arrays as numpy arrays, which "
                f"travel as a raw buffer",
            )
        if len(parts) == 2:
            limit = self.buffer_limit(cmd)
            if len(parts[1]) > limit:
                raise CommandError(
                    cmd,
                    "too_large",
                    f"{cmd}: the array argument is {len(parts[1])} bytes, the allowed range "
                    f"is [0, {limit}] bytes (the node's max_command_buffer_bytes)",
                )

    def buffer_limit(self, cmd: str = "get_capabilities") -> int:
        """The largest array buffer the node takes (asked once, then remembered)."""
        if self.max_buffer_bytes is None:
            probe = CommandClient(
                self._ctx, self._endpoint, self.timeout_ms, self._keys, max_buffer_bytes=0
            )
            try:
                caps = probe.call("get_capabilities").result
            except CommandTimeout:
                raise CommandTimeout(
                    f"{cmd}: the node did not say how large an array it takes "
                    f"(get_capabilities: no reply within {self.timeout_ms} ms)"
                ) from None
            finally:
                probe.close()
            self.max_buffer_bytes = int(caps.get("max_command_buffer_bytes", 0))
        return self.max_buffer_bytes

    def _send_parts(self, cmd: str, parts: list[bytes | memoryview]) -> None:
        """Send without blocking the caller for long. ZeroMQ learns that the peer read
        our messages lazily (every SNDHWM/2 of them, through the I/O thread's mailbox),
        so a queue can look full for a moment while the node keeps up: wait up to
        SEND_WAIT_MS for room (polling processes those notices) before giving up."""
        if self._try_send(parts):
            return
        if self.socket.poll(SEND_WAIT_MS, zmq.POLLOUT):
            self.send_waits += 1
            if self._try_send(parts):
                return
        raise CommandTimeout(
            f"{cmd}: driver not accepting commands (send queue full for {SEND_WAIT_MS} ms)"
        )

    def call(
        self, cmd: str, args: Mapping[str, Any] | None = None, timeout_ms: int | None = None
    ) -> Reply:
        """Send a command and wait for its reply; raise CommandError on an error reply."""
        req_id = self.send(cmd, args)
        deadline = now_ns() + (timeout_ms or self.timeout_ms) * 1_000_000
        while True:
            remaining_ms = max((deadline - now_ns()) // 1_000_000, 0)
            if not self.socket.poll(int(remaining_ms)):
                raise CommandTimeout(self._silence(cmd, req_id, timeout_ms or self.timeout_ms))
            reply = self.take_reply(req_id, cmd)
            if reply is not None:
                return reply

    def _try_send(self, parts: list[bytes | memoryview]) -> bool:
        try:
            self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _silence(self, cmd: str, req_id: int, timeout_ms: int) -> str:
        """The timeout line; for a command that carried an array, it names the limit."""
        sent = self._buffer_sent.get(req_id)
        if sent is None:
            return f"{cmd}: no reply within {timeout_ms} ms"
        return (
            f"{cmd}: no reply within {timeout_ms} ms to a command carrying a {sent}-byte "
            f"array (the node drops a part above its max_command_buffer_bytes = "
            f"{self.max_buffer_bytes} unread)"
        )

    def take_reply(self, req_id: int, cmd: str) -> Reply | None:
        """The reply to request `req_id` if it has arrived (never waits), so a caller can
        keep serving other sockets; stale replies are discarded, errors raise
        CommandError."""
        while True:
            try:
                raw = self.socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                reply = Reply.from_wire(raw)
            except ProtocolError as exc:
                log.warning("%s: unreadable reply ignored: %s", cmd, exc)
                continue
            if reply.id != req_id:
                self.late_replies += 1
                continue
            if not reply.ok:
                raise CommandError(cmd, reply.error_code, reply.error_message)
            return reply

    def close(self) -> None:
        self.socket.close()


# --- one way for an agent to attach to a driver -------------------------------------


@dataclass
class DriverClient:
    """The agent's two sockets to one driver node: its frame stream and its commands."""

    stream: StreamSubscriber
    commands: CommandClient

    def close(self) -> None:
        self.stream.close()
        self.commands.close()


def connect_client(
    ctx: zmq.Context,
    stream_endpoint: str,
    command_endpoint: str,
    keys: ClientKeys | None = None,
    timeout_ms: int = 1000,
    max_frame_bytes: int = DEFAULT_FRAME_MAX_BYTES,
    rcvhwm: int = 32,
) -> DriverClient:
    """Attach to a driver node, over CURVE on tcp:// when keys are given (from
    `drivers.auth.load_client_keys(config.driver.client_auth)`); ipc:// needs none."""
    return DriverClient(
        StreamSubscriber(
            ctx, stream_endpoint, rcvhwm=rcvhwm, keys=keys, max_frame_bytes=max_frame_bytes
        ),
        CommandClient(ctx, command_endpoint, timeout_ms, keys=keys),
    )
