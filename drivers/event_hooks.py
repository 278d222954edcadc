"""Event hooks: agent logic that answers each event frame on the driver node's own thread.

Why: a decision taken by an agent across the stream and command sockets pays two
thread wake-ups and a frame transfer per image. Pycro-Manager's smart microscopy runs
user code inside its engine instead (`image_process_fn` putting the next events on its
queue); an event hook is ours. The node calls the hook with each frame of the event
session, before it publishes that frame, and queues the events the hook returns.

What a hook may do is narrow on purpose: it returns events in the wire form of
`submit_events`, and the node validates them and enforces every limit exactly as for
the command; it gets no handle on the core. Its frames are still published and
recorded like any other. If it raises, the session is cancelled and the actuators go
safe; if one call runs longer than `hook_timeout_ms`, the `HookGuard` thread makes
the actuators safe at once, since the node thread (and its watchdog) is stuck in it.
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from drivers.mda import EventFrame, first_error
from drivers.protocol import now_ns

log = logging.getLogger(__name__)

WireEvents = Sequence[Mapping[str, Any]]
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class EventHook(Protocol):
    def __call__(self, frame: EventFrame) -> WireEvents | None:
        """The events to queue after this frame (wire form), or None for none."""
        ...


def load_event_hook(spec: str, args: Mapping[str, Any]) -> EventHook:
    """Build the hook named by ``"package.module:factory"``, called with ``args``.

    Any failure is a one-line ValueError naming the config field.
    """
    if not _SPEC.match(spec):
        raise ValueError(f"driver.event_hook: {spec!r} must look like 'package.module:factory'")
    module_name, name = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"driver.event_hook: cannot load {spec!r} ({exc})") from None
    if not callable(factory):
        raise ValueError(f"driver.event_hook: {spec!r} is not callable")
    try:
        hook = factory(**dict(args))
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError included
        raise ValueError(
            f"driver.event_hook_args: {spec} refused them ({first_error(exc)})"
        ) from None
    if not callable(hook):
        raise ValueError(f"driver.event_hook: {spec!r} did not return a callable hook")
    return hook


class HookGuard:
    """Makes the actuators safe when one hook call overruns its time budget.

    The node thread marks each call (`enter` / `leave`: two attribute writes, no
    wake-up); this thread looks every quarter budget, so an overrun is caught within
    1.25 budgets. `on_overrun` runs on this thread, once per overrunning call.
    """

    def __init__(self, timeout_ms: int, on_overrun: Callable[[float], None]) -> None:
        self.timeout_ns = timeout_ms * 1_000_000
        self.on_overrun = on_overrun
        self._entered_ns = 0  # 0: no hook call in progress
        self._call = 0
        self._flagged_call = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="event-hook-guard", daemon=True)
        self._thread.start()

    def enter(self) -> None:
        self._call += 1
        self._entered_ns = now_ns()

    def leave(self) -> None:
        self._entered_ns = 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.timeout_ns / 4e9):
            entered, call = self._entered_ns, self._call
            if not entered or call == self._flagged_call:
                continue
            running_ns = now_ns() - entered
            if running_ns > self.timeout_ns:
                self._flagged_call = call
                try:
                    self.on_overrun(running_ns / 1e6)
                except Exception:  # the guard must outlive a failing safe state
                    log.exception("event hook guard: making the actuators safe failed")
