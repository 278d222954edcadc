"""What every driver node shares: sockets, command dispatch, watchdog, heartbeats.

One thread owns both sockets and every instrument call, so commands and data are
ordered and no socket is shared between threads. Subclasses add their commands,
pump their instrument's data, and say what "safe" means for their actuators.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from drivers.auth import load_server_keys
from drivers.protocol import EVENT_TOPIC, HEARTBEAT_TOPIC, ProtocolError, Reply, now_ns
from drivers.transport import CommandServer, IncomingRequest, StreamPublisher

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class NodeSettings(Protocol):
    stream_endpoint: str
    command_endpoint: str
    watchdog_ms: int
    heartbeat_ms: int
    stream_hwm: int


def number_arg(cmd: str, args: dict[str, Any], name: str, where: str = "") -> float:
    """A finite number from a command's args, or a one-line bad_args error naming it."""
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        field = f"{where}.{name}" if where else name
        raise ProtocolError(
            "bad_args", f"{cmd}: field '{field}' must be a finite number, got {value!r}"
        )
    return float(value)


def check_within(cmd: str, name: str, value: float, rng: tuple[float, float], unit: str) -> None:
    """Refuse a value outside its configured range, naming the field and the range."""
    lo, hi = rng
    if not lo <= value <= hi:
        raise ProtocolError(
            "out_of_limits",
            f"{cmd}: field '{name}' = {value:g} {unit} is outside the allowed range "
            f"[{lo:g}, {hi:g}] {unit}",
        )


class InstrumentNode:
    """Serves one instrument over protocol v1 until `stop` is set.

    The watchdog is fed only by the peer that last sent an actuating command, so a
    monitoring client polling `get_state` cannot keep actuators live for a dead agent.
    """

    ACTUATING: frozenset[str] = frozenset()

    def __init__(self, settings: NodeSettings, ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.ctx = ctx or zmq.Context.instance()
        keys = load_server_keys(getattr(settings, "auth", None))  # CURVE on tcp:// endpoints
        self.publisher = StreamPublisher(
            self.ctx, settings.stream_endpoint, settings.stream_hwm, keys, "driver.stream_endpoint"
        )
        try:
            self.server = CommandServer(
                self.ctx, settings.command_endpoint, keys, "driver.command_endpoint"
            )
        except ValueError:
            self.publisher.close()
            raise
        self.watchdog_tripped = False
        self.last_agent_ns = 0
        self.controller: bytes | None = None
        self.commands_handled = 0
        self.commands_rejected = 0
        self._last_heartbeat_ns = 0
        self.handlers: dict[str, Handler] = {
            "get_state": self._cmd_get_state,
            "get_capabilities": self._cmd_get_capabilities,
            "heartbeat": lambda _args: {},
            "shutdown": self._cmd_shutdown,
        }
        self.stop = threading.Event()

    # --- what a subclass provides ---------------------------------------------

    def setup(self) -> None:
        """Start acquisition (called once, after the actuators were made safe)."""

    def pump(self) -> None:
        """Publish whatever the instrument produced since the last call."""

    def teardown(self) -> None:
        """Stop acquisition (called once, after the final safe state)."""

    def actuators_live(self) -> bool:
        """True while something the watchdog must be able to stop is active."""
        return False

    def safe_state(self, reason: str) -> None:
        """Put every actuator in its safe state; must be idempotent."""

    def state(self) -> dict[str, Any]:
        """Instrument state for headers, heartbeats and get_state."""
        return {}

    def status(self) -> dict[str, Any]:
        """Extra get_state fields (limits, counters of the instrument)."""
        return {}

    # --- the loop ---------------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, str]:
        return self.publisher.endpoint, self.server.endpoint

    def serve(self) -> None:
        """Run until stopped; always leaves actuators in their safe state."""
        # Short GIL slices: a command must not wait behind an acquisition thread.
        previous_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        self.safe_state("start")
        self.setup()
        log.info("driver serving stream=%s commands=%s", *self.endpoints)
        try:
            while not self.stop.is_set():
                for incoming in self.server.poll(timeout_ms=1):
                    self._handle(incoming)
                self.pump()
                self._tick()
        finally:
            self.safe_state("shutdown")
            self.teardown()
            self.publisher.close()
            self.server.close()
            sys.setswitchinterval(previous_interval)

    def _tick(self) -> None:
        t = now_ns()
        silent_ns = t - self.last_agent_ns
        if self.actuators_live() and silent_ns > self.settings.watchdog_ms * 1_000_000:
            self.watchdog_tripped = True
            self.safe_state("watchdog")
            self.publisher.publish(
                EVENT_TOPIC, {"event": "watchdog", "silent_ms": silent_ns / 1e6, "t_ns": t}
            )
            log.warning("no agent message for %.0f ms: actuators made safe", silent_ns / 1e6)
        if t - self._last_heartbeat_ns >= self.settings.heartbeat_ms * 1_000_000:
            self._last_heartbeat_ns = t
            self.publisher.publish(HEARTBEAT_TOPIC, {"t_ns": t, "state": self.state()})

    def _handle(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request is None:
            self.commands_rejected += 1
            error = incoming.error or ProtocolError("malformed", "unreadable command")
            log.warning("rejected command: %s", error)
            self.server.reply(
                incoming,
                Reply(
                    None,
                    False,
                    error_code=error.code,
                    error_message=str(error),
                    t_received_ns=incoming.t_received_ns,
                    t_done_ns=now_ns(),
                ),
            )
            return
        if request.cmd in self.ACTUATING:
            self.controller = incoming.identity
        if self.controller in (None, incoming.identity):
            self.last_agent_ns = incoming.t_received_ns
        handler = self.handlers.get(request.cmd)
        try:
            if handler is None:
                raise ProtocolError(
                    "unknown_command",
                    f"command: field 'cmd' = {request.cmd!r} is not one of {sorted(self.handlers)}",
                )
            result = handler(request.args)
            ok, code, message = True, "", ""
            self.commands_handled += 1
        except ProtocolError as exc:
            result, ok, code, message = {}, False, exc.code, str(exc)
        except Exception as exc:  # a device error must not kill the node
            result, ok, code, message = {}, False, "device_error", f"{request.cmd}: {exc}"
        if not ok:
            self.commands_rejected += 1
            log.warning("command %s refused: %s", request.cmd, message)
        if request.expect_reply:
            self.server.reply(
                incoming,
                Reply(request.id, ok, result, code, message, incoming.t_received_ns, now_ns()),
            )

    def _cmd_get_state(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.state(),
            "commands_handled": self.commands_handled,
            "commands_rejected": self.commands_rejected,
            "watchdog_tripped": self.watchdog_tripped,
            **self.status(),
        }

    def _cmd_get_capabilities(self, _args: dict[str, Any]) -> dict[str, Any]:
        """What this node serves, so a plan can refuse a node it cannot use before
        anything moves, and where its stream is, so a client needs one endpoint."""
        return {
            "commands": sorted(self.handlers),
            "stream_endpoint": self.publisher.endpoint,
            "truth": getattr(self, "truth_source", None) is not None,  # a twin's truth topic
        }

    def _cmd_shutdown(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.stop.set()
        return {}
