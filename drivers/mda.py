"""Event-driven acquisition: agent-submitted `useq.MDAEvent`s run by a queue-driven MDA.

The driver node runs `core.mda.run(iterator)` on its own thread; the iterator serves the
node's commands while no event is due and yields queued events as they come due, so
the agent keeps adding events while the MDA runs (see `EventSession`). Timing is kept on
the absolute CLOCK_MONOTONIC target of each event, not on sleeps between events, so
nothing drifts however long the session runs (the complaint of pymmcore-plus
#418/#537). The final wait happens *after* `setup_event` (stage, focus, channel,
exposure are already set) and right before the snap, so the exposure starts on time.
`TimedEngine` is a slim engine: hardware is touched only where an event changes it.

Wire form of an event: any `useq.MDAEvent` field (`x_pos`, `y_pos`, `z_pos`,
`exposure`, `channel`, `slm_image`, `properties`, `index`, `metadata`,
`min_start_time`) plus `t_start_ns`, the intended exposure start on CLOCK_MONOTONIC.
`min_start_time` (seconds) is relative to the session start, as in useq.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.core import SequencedEvent
from pymmcore_plus.mda import MDAEngine
from useq import AcquireImage, MDAEvent, SLMImage

from drivers.protocol import ProtocolError, now_ns

log = logging.getLogger(__name__)

SPIN_NS = 1_500_000  # the last part of a wait is spun: sleep() overshoots on busy hosts
MAX_EVENTS_PER_SUBMIT = 10_000
MAX_METADATA_BYTES = 4096
TARGET_KEY = "scopeloop_t_target_ns"
ID_KEY = "scopeloop_event_id"
PYMMCORE_LOGGER = "pymmcore-plus"
IDLE_POLL_MS = 1  # command poll while no event is due (bounds the watchdog's latency)


def wait_until_ns(t_target_ns: int) -> None:
    """Sleep, then spin the last ~1.5 ms, until CLOCK_MONOTONIC reaches the target."""
    while True:
        remaining = t_target_ns - now_ns()
        if remaining <= 0:
            return
        if remaining > SPIN_NS:
            time.sleep((remaining - SPIN_NS) / 1e9)
        else:
            time.sleep(0)  # yield the GIL while spinning


@dataclass(frozen=True)
class EventFrame:
    """One image an event produced, with when it was meant to and did start."""

    image: np.ndarray
    event: MDAEvent
    event_id: int
    t_target_ns: int | None
    t_start_ns: int
    t_end_ns: int

    @property
    def start_error_ns(self) -> int | None:
        return None if self.t_target_ns is None else self.t_start_ns - self.t_target_ns

    def wire_state(self) -> dict[str, Any]:
        """What a frame header says about the event that triggered it."""
        error = self.start_error_ns
        return {
            "id": self.event_id,
            "index": dict(self.event.index),
            # where and how this frame was taken (header stage_um may lag on fast stages)
            "x_pos": self.event.x_pos,
            "y_pos": self.event.y_pos,
            "z_pos": self.event.z_pos,
            "exposure_ms": self.event.exposure,
            "metadata": {k: v for k, v in self.event.metadata.items() if k not in _PRIVATE},
            "t_target_ns": self.t_target_ns,
            "start_error_ms": None if error is None else error / 1e6,
        }


_PRIVATE = frozenset({TARGET_KEY, ID_KEY, "runner_t0"})


@dataclass(frozen=True)
class LightGuard:
    """How the engine shows an event's SLM image: under the node's actuation lock, only
    if the node allows that light at that moment (the whole light on the sample within
    the limits, the watchdog not tripped), and reported back so frame headers say what
    is on the sample. Checked when the image is applied, not only when submitted: other
    light may have changed in between."""

    lock: threading.RLock
    allowed: Callable[[str, np.ndarray], bool]
    shown: Callable[[str, np.ndarray], None]


class TimedEngine(MDAEngine):
    """A slim MDAEngine for agent events: each exposure starts at its absolute target.

    Why not the stock engine: per event it calls `waitForSystem` (a Busy() query of every
    device; serial round trips on real rigs) even when nothing moved, and builds a full
    per-frame metadata dict (dozens of core reads). Agent events need neither: hardware is
    set only where the event asks for a change, the system is awaited only if something
    was set, and a frame carries its event plus exposure timing. Anything unusual
    (sequenced events, ROI, keep_shutter_open, non-image actions) goes the stock way.
    """

    light_guard: LightGuard | None = None

    def _set_event_slm_image(self, event: MDAEvent) -> None:
        guard = self.light_guard
        if guard is None:
            super()._set_event_slm_image(event)
            return
        assert event.slm_image is not None
        device = event.slm_image.device or self.mmcore.getSLMDevice()
        with guard.lock:
            if guard.allowed(device, np.asarray(event.slm_image.data)):
                super()._set_event_slm_image(event)

    def _exec_event_slm_image(self, img: SLMImage) -> None:
        guard = self.light_guard
        if guard is None:
            super()._exec_event_slm_image(img)
            return
        device = img.device or self.mmcore.getSLMDevice()
        image = np.asarray(img.data)
        with guard.lock:
            if guard.allowed(device, image):
                super()._exec_event_slm_image(img)
                guard.shown(device, image)

    def setup_event(self, event: MDAEvent) -> None:
        if isinstance(event, SequencedEvent) or event.keep_shutter_open or event.roi:
            super().setup_event(event)
            return
        core = self.mmcore
        changed = False
        if event.x_pos is not None or event.y_pos is not None:
            last_x, last_y = core._last_xy_position.get(None) or (None, None)
            changed = (
                self.force_set_xy_position
                or (event.x_pos is not None and event.x_pos != last_x)
                or (event.y_pos is not None and event.y_pos != last_y)
            )
            self._set_event_xy_position(event)  # skips unchanged positions itself
        if event.z_pos is not None:
            self._set_event_z(event)
            changed = True
        if event.slm_image is not None:
            self._set_event_slm_image(event)
            changed = True
        channel = event.channel
        if channel is not None and (channel.group, channel.config) != core._last_config:
            self._set_event_channel(event)
            changed = True
        if event.exposure is not None and event.exposure != core.getExposure():
            try:
                core.setExposure(event.exposure)
            except Exception as exc:
                log.warning("failed to set exposure: %s", exc)
            changed = True
        if event.properties:
            self._set_event_properties(event.properties)
            changed = True
        if changed:
            core.waitForSystem()

    def exec_event(self, event: MDAEvent) -> Any:
        if isinstance(event, SequencedEvent) or not isinstance(event.action, AcquireImage | None):
            return super().exec_event(event)
        target = event.metadata.get(TARGET_KEY)
        if isinstance(target, int):
            wait_until_ns(target)
        core = self.mmcore
        if self._af_was_engaged and self._af_succeeded:
            core.enableContinuousFocus(True)
        if event.slm_image is not None:
            self._exec_event_slm_image(event.slm_image)
        t_start = now_ns()
        try:
            core.snapImage()
        except Exception as exc:
            log.warning("failed to snap an image: %s", exc)
            return ()
        if not event.keep_shutter_open and self._autoshutter_was_set and not core.getAutoShutter():
            core.setShutterOpen(False)  # an earlier keep_shutter_open event held it open
        exposure_ms = event.exposure if event.exposure is not None else core.getExposure()
        meta = {
            "exposure_ms": exposure_ms,
            "t_exposure_start_ns": t_start,
            "t_exposure_end_ns": t_start + int(exposure_ms * 1e6),
        }
        n_cameras = core.getNumberOfCameraChannels()
        if n_cameras == 1:
            return ((core.getImage(), event, meta),)
        return tuple(
            (
                core.getImage(cam),
                event.model_copy(update={"index": {**event.index, "cam": cam}}),
                dict(meta),
            )
            for cam in range(n_cameras)
        )

    def teardown_event(self, event: MDAEvent) -> None:
        """Re-enable autoshutter only if an earlier event turned it off (the stock engine
        sets it after every event, a device call and a signal each time)."""
        if isinstance(event, SequencedEvent):
            super().teardown_event(event)
            return
        core = self.mmcore
        if not event.keep_shutter_open and self._autoshutter_was_set and not core.getAutoShutter():
            core.setAutoShutter(True)


@contextmanager
def _quiet_runner_log() -> Iterator[None]:
    """pymmcore-plus at WARNING and above while agent events run.

    Its runner logs every event at INFO to a rotating file log: formatting the event's
    repr and writing it costs ~0.3 ms per frame, on a loop whose whole budget is a
    fraction of a millisecond. The node logs the session itself; warnings still pass.
    """
    logger = logging.getLogger(PYMMCORE_LOGGER)
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)


Serve = Callable[[int], bool]  # handle commands for up to N ms; False: the node must stop


class EventSession:
    """A queue-driven MDA run on the node's own thread, fed by agent events.

    Why the node thread and not `run_mda`'s own thread: each thread hop costs a wake-up
    and a GIL hand-over (tens of microseconds each on a busy host), and the node
    already owns every instrument call (drivers/node.py). `run` blocks in
    `core.mda.run(iterator)`; the iterator serves commands (`serve`) while no event is
    due, so the agent can add, cancel or stop events, the watchdog keeps ticking and
    heartbeats keep going; it yields each event when its start is near, and the frame
    is published by `on_frame` on the same thread as soon as it is read. Commands wait
    only while an event executes (its moves, then its exposure), as with any camera.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        on_frame: Callable[[EventFrame], None],
        light_guard: LightGuard | None = None,
    ) -> None:
        self.core = core
        self.on_frame = on_frame
        self.t0_ns = now_ns()
        self.submitted = 0
        self.executed = 0
        self._pending: deque[MDAEvent] = deque()
        self._stopping = False
        self._previous_engine = core.mda.engine
        # XY moves only when an event's position differs from the last commanded one
        # (as pycromanager does); every move_stage also goes through this core.
        engine = TimedEngine(core, force_set_xy_position=False)
        engine.light_guard = light_guard
        core.mda.set_engine(engine)
        core.mda.events.frameReady.connect(self._frame_ready)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queued(self) -> int:
        return len(self._pending)

    def submit(self, events: list[MDAEvent]) -> list[int]:
        ids = []
        for event in events:
            event_id = self.submitted
            self.submitted += 1
            event.metadata[ID_KEY] = event_id  # events are fresh copies from parse_events
            self._pending.append(event)
            ids.append(event_id)
        return ids

    def stop(self, cancel: bool = False) -> None:
        """Finish the queued events (or drop them), then end the MDA."""
        self._stopping = True
        if cancel:
            self._pending.clear()

    def run(self, serve: Serve) -> None:
        """Run the MDA until stopped; `serve` handles commands between events."""
        with _quiet_runner_log():
            self.core.mda.run(self._events(serve))

    def close(self) -> None:
        self.core.mda.events.frameReady.disconnect(self._frame_ready)
        if self._previous_engine is not None:
            self.core.mda.set_engine(self._previous_engine)

    def _events(self, serve: Serve) -> Iterator[MDAEvent]:
        """The MDA's event iterator: serve commands until the next event is due."""
        while True:
            if not self._pending:
                if self._stopping or not serve(IDLE_POLL_MS):
                    return
                continue
            target = self._pending[0].metadata.get(TARGET_KEY)
            if isinstance(target, int):
                wait_ms = (target - now_ns() - SPIN_NS) // 1_000_000
                if wait_ms > 0:  # the engine spins the last part, right before the snap
                    if not serve(min(wait_ms, IDLE_POLL_MS)):
                        return
                    continue
            self.executed += 1
            yield self._pending.popleft()
            if self._pending and not serve(0):  # commands that came in during the event
                return

    def _frame_ready(self, image: np.ndarray, event: MDAEvent, meta: Any) -> None:
        t_start = meta.get("t_exposure_start_ns") if isinstance(meta, dict) else None
        exposure_ms = event.exposure if event.exposure is not None else self.core.getExposure()
        if not isinstance(t_start, int):  # a frame from the stock engine path
            t_start = now_ns() - int(exposure_ms * 1e6)
        target = event.metadata.get(TARGET_KEY)
        self.on_frame(
            EventFrame(
                image=image,
                event=event,
                event_id=int(event.metadata.get(ID_KEY, -1)),
                t_target_ns=target if isinstance(target, int) else None,
                t_start_ns=t_start,
                t_end_ns=t_start + int(exposure_ms * 1e6),
            )
        )


def parse_events(raw: Any, t0_ns: int, cmd: str = "submit_events") -> list[MDAEvent]:
    """Validate wire events into MDAEvents carrying their absolute start target.

    One-line ProtocolError naming `events[i].field` for anything wrong.
    """
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("bad_args", f"{cmd}: field 'events' must be a non-empty list")
    if len(raw) > MAX_EVENTS_PER_SUBMIT:
        raise ProtocolError(
            "out_of_limits",
            f"{cmd}: field 'events' has {len(raw)} events, the allowed range is "
            f"[1, {MAX_EVENTS_PER_SUBMIT}]",
        )
    events = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ProtocolError("bad_args", f"{cmd}: field 'events[{i}]' must be a map")
        unknown = sorted(set(item) - _WIRE_FIELDS)
        if unknown:
            raise ProtocolError(
                "bad_args",
                f"{cmd}: field 'events[{i}].{unknown[0]}' is not an MDAEvent field "
                f"(allowed: {sorted(_WIRE_FIELDS)})",
            )
        fields = dict(item)
        t_start = fields.pop("t_start_ns", None)
        if t_start is not None and (isinstance(t_start, bool) or not isinstance(t_start, int)):
            raise ProtocolError(
                "bad_args", f"{cmd}: field 'events[{i}].t_start_ns' must be an integer"
            )
        metadata = fields.get("metadata") or {}
        try:
            size = len(json.dumps(metadata))
        except (TypeError, ValueError):
            raise ProtocolError(
                "bad_args", f"{cmd}: field 'events[{i}].metadata' must be plain JSON data"
            ) from None
        if size > MAX_METADATA_BYTES:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field 'events[{i}].metadata' is {size} bytes, the allowed range is "
                f"[0, {MAX_METADATA_BYTES}]",
            )
        if isinstance(fields.get("slm_image"), dict) and "data" in fields["slm_image"]:
            slm = dict(fields["slm_image"])
            slm["data"] = np.asarray(slm["data"], dtype=np.uint8)
            fields["slm_image"] = slm
        try:
            event = MDAEvent.model_validate(fields)
        except (ValidationError, ValueError, TypeError) as exc:
            raise ProtocolError(
                "bad_args", f"{cmd}: field 'events[{i}]' {first_error(exc)}"
            ) from None
        if event.sequence is not None or event.action.type != "acquire_image":
            raise ProtocolError(
                "bad_args", f"{cmd}: field 'events[{i}]' must be a plain image acquisition"
            )
        if t_start is None and event.min_start_time is not None:
            t_start = t0_ns + int(event.min_start_time * 1e9)
        update: dict[str, Any] = {"min_start_time": None}
        if t_start is not None:
            update["metadata"] = {**event.metadata, TARGET_KEY: int(t_start)}
        events.append(event.model_copy(update=update))
    return events


_WIRE_FIELDS = frozenset(MDAEvent.model_fields) - {"sequence", "action"} | {"t_start_ns"}


def first_error(exc: Exception) -> str:
    """One line for an exception: a pydantic error's first field and message."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else err["msg"]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
