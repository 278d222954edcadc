"""Who controls a driver node, and the watchdog thread that nothing on the node can stall.

Control is an explicit lease. One peer (a ZeroMQ identity) holds it; only its messages
feed the watchdog. A peer gets it with `acquire_control`, or by an actuating command
that *succeeded* while nobody live held it; a refused command never grants it. Taking
the lease from a live holder needs `acquire_control {take: true}`, is logged and
published as an event. Safe commands (laser off, withdraw, stop) are open to every peer.

The watchdog runs on its own thread so it trips on time even while the node thread is
blocked in an instrument call (a long exposure and snap). While the node thread is
blocked it does not touch the command socket, so the watchdog thread borrows it (a
ZeroMQ socket may change threads behind a lock, a full memory barrier) to read what
arrived: the holder's heartbeats keep feeding the lease, and the requests are queued
for the node thread in arrival order. When the holder is silent too long and an actuator
is live, the thread calls the node's thread-safe light-off path itself.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import zmq

from drivers.protocol import Reply, now_ns
from drivers.transport import CommandServer, IncomingRequest

log = logging.getLogger(__name__)

INBOX_MAX = 4096  # requests the watchdog thread queues for a blocked node thread


class ControlLease:
    """The peer in control and when it was last heard from (all on CLOCK_MONOTONIC)."""

    def __init__(self) -> None:
        self.holder: bytes | None = None
        self.fed_ns = now_ns()

    def feed(self, identity: bytes, t_ns: int) -> None:
        if identity == self.holder:
            self.fed_ns = t_ns

    def silent_ns(self, t_ns: int) -> int:
        return t_ns - self.fed_ns

    def live(self, t_ns: int, watchdog_ns: int) -> bool:
        """Whether a holder exists and was heard from within the watchdog period."""
        return self.holder is not None and self.silent_ns(t_ns) <= watchdog_ns

    def grant(self, identity: bytes, t_ns: int) -> bytes | None:
        """Give the lease to `identity`; returns the previous holder."""
        previous, self.holder = self.holder, identity
        self.fed_ns = t_ns
        return previous

    def release(self, identity: bytes) -> bool:
        if identity != self.holder:
            return False
        self.holder = None
        return True


def peer_name(identity: bytes | None) -> str:
    """A short printable name for a ZeroMQ peer identity."""
    return "none" if identity is None else identity.hex()[:16]


class SharedCommandServer:
    """The node's command socket, readable by the watchdog thread while the node is busy.

    Every use holds one lock; the node thread takes it only around socket calls, never
    around an instrument call, so the watchdog thread finds it free exactly when the
    node thread is blocked. Each request is stamped and fed to the lease when read.
    """

    def __init__(self, server: CommandServer, on_read: Callable[[IncomingRequest], None]) -> None:
        self._server = server
        self._on_read = on_read
        self._lock = threading.Lock()
        self._inbox: deque[IncomingRequest] = deque()

    @property
    def endpoint(self) -> str:
        return self._server.endpoint

    @property
    def max_buffer_bytes(self) -> int:
        return self._server.max_buffer_bytes

    @property
    def socket(self) -> zmq.Socket:
        return self._server.socket

    def poll(self, timeout_ms: int) -> list[IncomingRequest]:
        # Inbox and socket are read under one lock hold: requests keep their arrival order.
        with self._lock:
            queued = self._take_inbox()
            read = self._server.poll(0 if queued else timeout_ms)
        for incoming in read:
            self._on_read(incoming)
        return queued + read

    def drain(self) -> None:
        """Watchdog thread: read what arrived if the node thread is not using the socket."""
        if len(self._inbox) >= INBOX_MAX or not self._lock.acquire(blocking=False):
            return
        try:
            for incoming in self._server.poll(0):
                self._on_read(incoming)
                self._inbox.append(incoming)
        finally:
            self._lock.release()

    def waiting(self) -> bool:
        if self._inbox:
            return True
        with self._lock:
            return self._server.waiting()

    def reply(self, incoming: IncomingRequest, reply: Reply) -> None:
        with self._lock:
            self._server.reply(incoming, reply)

    def close(self) -> None:
        with self._lock:
            self._server.close()

    def _take_inbox(self) -> list[IncomingRequest]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        return out


class WatchdogThread:
    """Calls `check` every `period_ms` on its own thread until closed."""

    def __init__(self, period_ms: float, check: Callable[[], None]) -> None:
        self.period_s = period_ms / 1000.0
        self.check = check
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driver-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check()
            except Exception:  # the watchdog must outlive any one failure
                log.exception("watchdog check failed")
