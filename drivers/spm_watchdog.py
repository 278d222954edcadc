"""The SPM watchdog's own Nanonis connection: withdraw + bias 0 without the node thread.

The node thread owns its Nanonis link and may be blocked on it for a whole sweep or
scan. A Nanonis controller serves several TCP clients at once (one per port of its
TCP Programming Interface list, 6501-6504 by default; the twin serves any number on
one port), so the watchdog keeps a second connection, used by no one else: when the
agent falls silent it sends ``ZCtrl.Withdraw`` (Z controller off, tip retracted), then
``BiasSpectr.Stop`` (the protocol's own way to end a sweep another client started),
``Bias.Set 0`` and ``Scan.Action stop`` in one write, and the controller makes the tip
safe while the node thread still waits for its sweep. The link is opened with the node
(a node that cannot open it does not start), pinged every ``PING_S`` so a dropped one
is noticed (and reopened) before it is needed, and a failure is one logged line.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from drivers import nanonis_wire as wire

log = logging.getLogger(__name__)

PING_S = 1.0  # Bias.Get on an idle link this often: a dropped link is found early


class WatchdogLink:
    """One TCP connection to the controller, used only from the watchdog thread."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout_s: float,
        io_timeout_s: float,
        quick_timeout_s: float,
    ) -> None:
        """``quick_timeout_s`` bounds a ping and a reopen, which run on the watchdog
        thread between its checks: neither may delay a trip by more than that."""
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.connect_timeout_s = connect_timeout_s
        self.io_timeout_s = io_timeout_s
        self.quick_timeout_s = quick_timeout_s
        self.error = ""  # why the link is down ("" while it is up)
        self._sock: socket.socket | None = None
        self._last_ok = 0.0

    @property
    def up(self) -> bool:
        return self._sock is not None

    def open(self, timeout_s: float | None = None) -> None:
        """Connect; ConnectionError (one line naming the address) if the controller refuses."""
        timeout_s = timeout_s or self.connect_timeout_s
        try:
            sock = socket.create_connection((self.host, self.port), timeout_s)
        except OSError as exc:
            self.error = (
                f"cannot open the watchdog link to the Nanonis controller at {self.address} "
                f"within {timeout_s:g} s (watchdog_port): {exc}"
            )
            raise ConnectionError(self.error) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self.error, self._last_ok = sock, "", time.monotonic()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    def make_safe(self, withdraw_timeout_ms: int) -> None:
        """Tip withdrawn, then sweep stopped, bias 0 and scan stopped; RuntimeError if
        any step failed. A link found down is reopened once first."""
        if self._sock is None:
            self._reopen()
        self._calls(
            [
                ("ZCtrl.Withdraw", (1, withdraw_timeout_ms)),
                ("BiasSpectr.Stop", ()),
                ("Bias.Set", (0.0,)),
                ("Scan.Action", (1, 1)),  # 1 = stop
            ],
            withdraw_timeout_ms / 1000 + self.io_timeout_s,
        )

    def keep_alive(self) -> None:
        """Ping an idle link (or reopen a dropped one) at most every PING_S."""
        if time.monotonic() - self._last_ok < PING_S:
            return
        try:
            if self._sock is None:
                self._reopen()
            self._calls([("Bias.Get", ())], self.quick_timeout_s)
        except (RuntimeError, ConnectionError):
            self._last_ok = time.monotonic()  # retried after PING_S, not on every tick

    def _reopen(self) -> None:
        was = self.error
        try:
            self.open(self.quick_timeout_s)
        except ConnectionError:
            if self.error != was:
                log.error("%s; safe-off waits for the node thread until it is back", self.error)
            raise
        log.warning("watchdog link to %s reopened", self.address)

    def _calls(self, requests: Sequence[tuple[str, Sequence[Any]]], timeout_s: float) -> None:
        """Requests in one write, every reply read in order; errors name the command."""
        sock = self._sock
        if sock is None:
            raise RuntimeError(f"watchdog link to {self.address} is down: {self.error}")
        errors: list[str] = []
        try:
            sock.settimeout(timeout_s)
            sock.sendall(
                b"".join(wire.encode_request(wire.COMMANDS[c], args) for c, args in requests)
            )
            for command, _args in requests:
                _values, message = wire.read_response(sock, wire.COMMANDS[command])
                if message:
                    errors.append(f"{command}: {' '.join(message.split())}")
        except (OSError, wire.WireError) as exc:
            self.close()
            self.error = f"watchdog link to {self.address} lost ({type(exc).__name__}: {exc})"
            log.error("%s; reopening it", self.error)
            raise RuntimeError(self.error) from exc
        self._last_ok = time.monotonic()
        if errors:
            raise RuntimeError("Nanonis refused on the watchdog link: " + "; ".join(errors))
