"""ZeroMQ sockets speaking protocol v1: frame stream (PUB/SUB) and commands (ROUTER/DEALER).

Each class owns one socket and is used from one thread, as ZeroMQ requires.
Queues are bounded by high-water marks: a slow subscriber loses old frames at
its own end, the publisher never blocks.
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

from drivers.protocol import (
    EVENT_TOPIC,
    FRAME_PREFIX,
    HEARTBEAT_TOPIC,
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


# --- stream ---------------------------------------------------------------


class StreamPublisher:
    """Publishes frames and header-only messages; never blocks on subscribers."""

    def __init__(self, ctx: zmq.Context, endpoint: str, sndhwm: int = 32) -> None:
        self.socket = _linger(ctx.socket(zmq.PUB))
        self.socket.setsockopt(zmq.SNDHWM, sndhwm)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
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
        self.socket.close()


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
    ) -> None:
        self.socket = _linger(ctx.socket(zmq.SUB))
        self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)
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
    """ROUTER side: receives commands from any number of agents, replies to each."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.socket = _linger(ctx.socket(zmq.ROUTER))
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

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
                if len(parts) != 2:
                    raise ProtocolError(
                        "malformed", f"command: expected 1 body frame, got {len(parts) - 1}"
                    )
                out.append(IncomingRequest(identity, Request.from_wire(parts[1]), t))
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
        self.socket.close()


class CommandClient:
    """DEALER side: request/reply with ids and timeouts; stale replies are discarded."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout_ms: int = 1000) -> None:
        self.socket = _linger(ctx.socket(zmq.DEALER))
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.connect(endpoint)
        self.timeout_ms = timeout_ms
        self._ids = itertools.count(1)
        self.late_replies = 0

    def send(self, cmd: str, args: Mapping[str, Any] | None = None, reply: bool = True) -> int:
        req = Request(
            id=next(self._ids),
            cmd=cmd,
            args=dict(args or {}),
            t_sent_ns=now_ns(),
            expect_reply=reply,
        )
        try:
            self.socket.send(req.to_wire(), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise CommandTimeout(
                f"{cmd}: driver not accepting commands (send queue full)"
            ) from None
        return req.id

    def call(
        self, cmd: str, args: Mapping[str, Any] | None = None, timeout_ms: int | None = None
    ) -> Reply:
        """Send a command and wait for its reply; raise CommandError on an error reply."""
        req_id = self.send(cmd, args)
        deadline = now_ns() + (timeout_ms or self.timeout_ms) * 1_000_000
        while True:
            remaining_ms = max((deadline - now_ns()) // 1_000_000, 0)
            if not self.socket.poll(int(remaining_ms)):
                raise CommandTimeout(f"{cmd}: no reply within {timeout_ms or self.timeout_ms} ms")
            reply = self.take_reply(req_id, cmd)
            if reply is not None:
                return reply

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
