"""What every driver node shares: sockets, command dispatch, control lease, watchdog.

One thread owns the sockets and every instrument call, so commands and data are
ordered. Two exceptions, both for safety (drivers/lease.py): the watchdog thread reads
the command socket while the node thread is blocked in an instrument call, and it
switches the light off itself (`emergency_off`, under `actuation_lock`) without waiting
for the node thread. Subclasses add their commands, pump their instrument's data, and
say what "safe" means for their actuators.
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
from drivers.lease import ControlLease, SharedCommandServer, WatchdogThread, peer_name
from drivers.protocol import (
    EVENT_TOPIC,
    HEARTBEAT_TOPIC,
    MAX_HEADER_BYTES,
    ProtocolError,
    Reply,
    now_ns,
)
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

    Commands in ACTUATING need the control lease (drivers/lease.py); only its holder
    feeds the watchdog, so a monitoring client polling `get_state` cannot keep
    actuators live for a dead agent, and a refused command never grants control.
    """

    ACTUATING: frozenset[str] = frozenset()

    def __init__(
        self,
        settings: NodeSettings,
        ctx: zmq.Context | None = None,
        max_command_buffer_bytes: int = 0,
    ) -> None:
        """`max_command_buffer_bytes`: the largest array a command may carry (an SLM
        image); the command socket drops anything larger unread."""
        self.settings = settings
        self.ctx = ctx or zmq.Context.instance()
        keys = load_server_keys(getattr(settings, "auth", None))  # CURVE on tcp:// endpoints
        self.publisher = StreamPublisher(
            self.ctx, settings.stream_endpoint, settings.stream_hwm, keys, "driver.stream_endpoint"
        )
        try:
            self.server = SharedCommandServer(
                CommandServer(
                    self.ctx,
                    settings.command_endpoint,
                    keys,
                    "driver.command_endpoint",
                    max_command_buffer_bytes,
                ),
                self._on_read,
            )
        except ValueError:
            self.publisher.close()
            raise
        self.lease = ControlLease()
        self.watchdog_ns = settings.watchdog_ms * 1_000_000
        # Held around every call that changes the light, by whichever thread makes it.
        self.actuation_lock = threading.RLock()
        self.watchdog_tripped = False
        self._trip_silent_ms: float | None = None  # set by the watchdog thread
        self.commands_handled = 0
        self.commands_rejected = 0
        self._last_heartbeat_ns = 0
        self.handlers: dict[str, Handler] = {
            "get_state": self._cmd_get_state,
            "get_capabilities": self._cmd_get_capabilities,
            "heartbeat": lambda _args: {},
            "shutdown": self._cmd_shutdown,
        }
        self._peer_handlers: dict[str, Callable[[bytes, dict[str, Any]], dict[str, Any]]] = {
            "acquire_control": self._cmd_acquire_control,
            "release_control": self._cmd_release_control,
        }
        self.stop = threading.Event()
        self._watchdog = WatchdogThread(min(10.0, settings.watchdog_ms / 5), self._watch)

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
        """Put every actuator in its safe state; must be idempotent (node thread)."""

    def emergency_off(self, reason: str) -> bool:
        """Make the light safe from another thread while the node thread may be blocked.

        Called with `actuation_lock` held. False: this instrument cannot be made safe
        off the node thread (it shares one link); the node thread does it next tick.
        """
        return False

    def watchdog_paused(self) -> bool:
        """True while a long command the agent waits on runs under its own timeout."""
        return False

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
        self._watchdog.start()
        log.info("driver serving stream=%s commands=%s", *self.endpoints)
        try:
            while not self.stop.is_set():
                for incoming in self.server.poll(timeout_ms=1):
                    self._handle(incoming)
                self.pump()
                self._tick()
        finally:
            self._watchdog.close()
            self.safe_state("shutdown")
            self.teardown()
            self.publisher.close()
            self.server.close()
            sys.setswitchinterval(previous_interval)

    def _watch(self) -> None:
        """Watchdog thread: read commands if the node is blocked; trip on silence."""
        self.server.drain()
        t = now_ns()
        if self._trip_silent_ms is not None or self.watchdog_paused() or not self.actuators_live():
            return
        silent_ns = self.lease.silent_ns(t)
        if silent_ns <= self.watchdog_ns:
            return
        with self.actuation_lock:
            if self.actuators_live():
                self.emergency_off("watchdog")
                self.watchdog_tripped = True
                self._trip_silent_ms = silent_ns / 1e6

    def agent_waiting(self) -> None:
        """The controlling agent is blocked on our reply to a long command: not silence."""
        self.lease.fed_ns = now_ns()

    def _tick(self) -> None:
        t = now_ns()
        silent_ms = self._trip_silent_ms
        if silent_ms is not None:
            self.safe_state("watchdog")  # the full safe state, on the node thread
            self._trip_silent_ms = None
            self.publisher.publish(
                EVENT_TOPIC, {"event": "watchdog", "silent_ms": silent_ms, "t_ns": t}
            )
            log.warning("no agent message for %.0f ms: actuators made safe", silent_ms)
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
                    error.request_id,  # known when the header was readable: a direct answer
                    False,
                    error_code=error.code,
                    error_message=str(error),
                    t_received_ns=incoming.t_received_ns,
                    t_done_ns=now_ns(),
                ),
            )
            return
        identity = incoming.identity
        handler = self.handlers.get(request.cmd)
        try:
            if request.cmd in self._peer_handlers:
                result = self._peer_handlers[request.cmd](identity, request.args)
            elif handler is None:
                known = sorted({*self.handlers, *self._peer_handlers})
                raise ProtocolError(
                    "unknown_command",
                    f"command: field 'cmd' = {request.cmd!r} is not one of {known}",
                )
            else:
                actuating = request.cmd in self.ACTUATING
                if actuating:
                    self._require_control(request.cmd, identity)
                result = handler(request.args)
                if actuating and self.lease.holder != identity:
                    self._grant(identity, "granted")  # only once the command succeeded
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

    def _on_read(self, incoming: IncomingRequest) -> None:
        """Any message from the lease holder feeds the watchdog (on the reading thread)."""
        self.lease.feed(incoming.identity, incoming.t_received_ns)

    def _require_control(self, cmd: str, identity: bytes) -> None:
        t = now_ns()
        holder = self.lease.holder
        if holder not in (None, identity) and self.lease.live(t, self.watchdog_ns):
            raise ProtocolError(
                "not_controller",
                f"{cmd}: control is held by peer {peer_name(holder)} (heard from "
                f"{self.lease.silent_ns(t) / 1e6:.0f} ms ago); send acquire_control with "
                f"take: true to take it",
            )

    def _grant(self, identity: bytes, action: str) -> None:
        previous = self.lease.grant(identity, now_ns())
        payload = {
            "event": "control",
            "action": action,
            "peer": peer_name(identity),
            "previous": peer_name(previous),
            "t_ns": now_ns(),
        }
        if action == "taken":
            log.warning(
                "control taken from live peer %s by %s", payload["previous"], payload["peer"]
            )
        else:
            log.info("control %s to %s", action, payload["peer"])
        self.publisher.publish(EVENT_TOPIC, payload)

    def _cmd_acquire_control(self, identity: bytes, args: dict[str, Any]) -> dict[str, Any]:
        """Take the lease: free or lapsed at once, from a live holder only with take: true."""
        take = args.get("take", False)
        if not isinstance(take, bool):
            raise ProtocolError(
                "bad_args", f"acquire_control: field 'take' must be true or false, got {take!r}"
            )
        holder = self.lease.holder
        if holder != identity:
            live_other = holder is not None and self.lease.live(now_ns(), self.watchdog_ns)
            if live_other and not take:
                self._require_control("acquire_control", identity)
            self._grant(identity, "taken" if live_other else "granted")
        else:
            self.lease.feed(identity, now_ns())
        return {"controller": peer_name(identity), "watchdog_ms": self.settings.watchdog_ms}

    def _cmd_release_control(self, identity: bytes, _args: dict[str, Any]) -> dict[str, Any]:
        released = self.lease.release(identity)
        if released:
            self.publisher.publish(
                EVENT_TOPIC,
                {
                    "event": "control",
                    "action": "released",
                    "peer": peer_name(identity),
                    "previous": peer_name(identity),
                    "t_ns": now_ns(),
                },
            )
        return {"released": released}

    def _cmd_get_state(self, _args: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.state(),
            "commands_handled": self.commands_handled,
            "commands_rejected": self.commands_rejected,
            "watchdog_tripped": self.watchdog_tripped,
            "controller": peer_name(self.lease.holder),
            "controller_live": self.lease.live(now_ns(), self.watchdog_ns),
            **self.status(),
        }

    def _cmd_get_capabilities(self, _args: dict[str, Any]) -> dict[str, Any]:
        """What this node serves, so a plan can refuse a node it cannot use before
        anything moves, and where its stream is, so a client needs one endpoint."""
        return {
            "commands": sorted(self.handlers),
            "stream_endpoint": self.publisher.endpoint,
            "truth": getattr(self, "truth_source", None) is not None,  # a twin's truth topic
            "actuators": sorted(self.actuators()),
            # Clients refuse to send more than this (drivers/transport.py CommandClient).
            "max_command_bytes": MAX_HEADER_BYTES,
            "max_command_buffer_bytes": self.server.max_buffer_bytes,
        }

    def actuators(self) -> set[str]:
        """What this node can really move or light (not just which commands it parses):
        a rig without a laser still answers `set_laser`, with an error."""
        return set()

    def _cmd_shutdown(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.stop.set()
        return {}
