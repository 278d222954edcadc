"""Micro-Manager driver node: streams camera frames, executes commands, keeps the rig safe.

Works on any `CMMCorePlus`: a user's hardware config, the C++ demo adapters, or the
twin's pure-Python devices in `UniMMCore`. Every command is checked by the node's one
gate (drivers/gate.py) before it touches a device, whoever sent it; if the controlling
agent goes silent for `watchdog_ms` while light is on, the watchdog thread switches it
off even while this thread is blocked in a snap (see `drivers/node.py`).

Thread safety of the off path: the watchdog thread touches only the light devices
(galvo power, SLM, shutter), never the camera, and always under `actuation_lock`, which
this thread holds around each of its own light changes (and the MDA engine around
showing an event's SLM image). pymmcore-plus's Python devices lock per device and the
C++ MMCore per device adapter module, so these calls may run beside a snap on this
thread; a shutter in the camera's own adapter module waits for the snap to end.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq
from pymmcore_plus import CMMCorePlus

from drivers.config import DriverConfig
from drivers.event_hooks import EventHook, HookGuard, load_event_hook
from drivers.gate import MicroscopeGate
from drivers.light import LaserState, slm_image_spots
from drivers.mda import EventFrame, EventSession, LightGuard, parse_events
from drivers.node import InstrumentNode
from drivers.protocol import EVENT_TOPIC, TRUTH_PREFIX, ProtocolError, now_ns

log = logging.getLogger(__name__)

TruthSource = Callable[[Any], dict[str, Any] | None]
LightTruth = Callable[[], list[dict[str, Any]]]  # light changes on the sample since last call
Temperature = Callable[[], tuple[float, str]]  # (sample temperature K, where it comes from)
STREAM = "camera"
# The twin's record of light on the sample: beside truth/ (whose records are per-frame
# scene truth), so subscribers of either get only the records they expect.
LIGHT_TRUTH_TOPIC = b"light-truth"
PUBLISHED_RING = 512
POSITION_REFRESH_NS = 200_000_000
TEMPERATURE_REFRESH_NS = 1_000_000_000  # a sensor read can be a serial round trip too


def temperature_reader(core: CMMCorePlus, config: DriverConfig) -> Temperature:
    """The config's sensor property (checked now: a typo fails at start), else its value."""
    if config.temperature_property is None:
        return lambda: (config.temperature_k, "config driver.temperature_k")
    device, _, prop = config.temperature_property.partition(".")
    if device not in core.getLoadedDevices() or not core.hasProperty(device, prop):
        raise ValueError(
            f"driver.temperature_property: {config.temperature_property!r} is not a property "
            f"of a loaded device (loaded: {', '.join(core.getLoadedDevices())})"
        )
    offset = 273.15 if config.temperature_unit == "C" else 0.0
    where = f"property {config.temperature_property}"
    return lambda: (float(core.getProperty(device, prop)) + offset, where)


def _playback_extra(meta: Any) -> dict[str, Any]:
    """A recorded frame's header says which frame it was, and that the loop is open.
    (pymmcore's C++ Metadata raises on a missing key where a dict returns None.)"""
    try:
        played = meta.get("playback_frame")
    except (KeyError, ValueError):
        played = None
    return {"playback_frame": int(played), "open_loop": True} if played is not None else {}


def slm_image_bytes(core: CMMCorePlus, slm: str) -> int:
    """The one array a command may carry here: an 8-bit image of the configured SLM."""
    if slm not in core.getLoadedDevices():
        return 0
    return int(core.getSLMHeight(slm)) * int(core.getSLMWidth(slm))


class DriverNode(InstrumentNode):
    """Serves one Micro-Manager core over protocol v1 until `stop` is set."""

    # Everything that can light the sample, move hardware or change acquisition needs
    # the control lease; laser_off and stop_events are open to every peer.
    ACTUATING = frozenset(
        {
            "set_laser",
            "move_stage",
            "move_z",
            "set_slm_image",
            "submit_events",
            "set_property",
            "set_config",
            "set_shutter",
            "set_exposure",
            "snap",
        }
    )

    def __init__(
        self,
        core: CMMCorePlus,
        config: DriverConfig,
        ctx: zmq.Context | None = None,
        truth_source: TruthSource | None = None,
        field_um: tuple[float, float] | None = None,
        event_hook: EventHook | None = None,
        light_truth: LightTruth | None = None,
        temperature: Temperature | None = None,
    ) -> None:
        if event_hook is None and config.event_hook is not None:
            event_hook = load_event_hook(config.event_hook, config.event_hook_args)
        temperature = temperature or temperature_reader(core, config)  # before any bind
        self.core = core
        self.config = config
        self.field_um = field_um or self._field_from_core()
        self.gate = MicroscopeGate(core, config, self.field_um)  # refuses before any bind
        super().__init__(config, ctx, slm_image_bytes(core, config.devices.slm))
        self.truth_source = truth_source
        self.light_truth = light_truth
        loaded = set(core.getLoadedDevices())
        names = config.devices
        self.galvo_device = names.laser if names.laser in loaded else None
        self.slm_device = names.slm if names.slm in loaded else None
        self._slm_shape: tuple[int, int] = (0, 0)
        if self.slm_device:
            self._slm_shape = (core.getSLMHeight(names.slm), core.getSLMWidth(names.slm))
        laser_device = self.slm_device if names.laser_kind == "slm" else self.galvo_device
        self.laser_device = laser_device  # the device set_laser drives, if loaded
        # What is on the sample, as applied: the galvo spot and the SLM's spots.
        self._galvo: list[LaserState] = []
        self._slm_light: list[LaserState] = []
        self._shutter_opened = False  # opened by command: the safe state closes it
        self.safe_verified = True
        self.frames_published = 0
        self._published_ns: OrderedDict[int, int] = OrderedDict()
        self._position_cache: dict[str, Any] | None = None
        self._position_read_ns = 0
        self._temperature = temperature
        self._temperature_cache: tuple[int, dict[str, Any]] | None = None
        self.handlers.update(
            {
                "set_laser": self._cmd_set_laser,
                "laser_off": self._cmd_laser_off,
                "move_stage": self._cmd_move_stage,
                "set_exposure": self._cmd_set_exposure,
                "move_z": self._cmd_move_z,
                "set_property": self._cmd_set_property,
                "set_config": self._cmd_set_config,
                "set_shutter": self._cmd_set_shutter,
                "snap": self._cmd_snap,
                "set_slm_image": self._cmd_set_slm_image,
                "submit_events": self._cmd_submit_events,
                "stop_events": self._cmd_stop_events,
            }
        )
        self.events: EventSession | None = None
        self._events_light = False  # an event of the session drives the laser SLM
        self.event_frames_published = 0
        self.event_light_refused = 0  # event SLM images the light limits kept off
        self.event_hook = event_hook
        self.hook_calls = 0
        self.hook_refusals = 0
        self._hook_overrun_ms = 0.0  # set by the guard thread, handled on the node thread
        self._hook_guard = (
            HookGuard(config.hook_timeout_ms, self._hook_overran) if event_hook else None
        )

    # --- InstrumentNode hooks ----------------------------------------------------

    def setup(self) -> None:
        self.core.startContinuousSequenceAcquisition(0)

    def teardown(self) -> None:
        self._end_events(cancel=True)
        if self.core.isSequenceRunning():
            self.core.stopSequenceAcquisition()
        if self._hook_guard is not None:
            self._hook_guard.close()

    @property
    def laser(self) -> list[LaserState]:
        """Every lit spot on the sample (galvo and SLM), as applied."""
        return self._galvo + self._slm_light

    def actuators_live(self) -> bool:
        return bool(self._galvo or self._slm_light or self._shutter_opened) or (
            self.events is not None and self._events_light
        )

    def _tick(self) -> None:
        self._publish_light_truth()
        super()._tick()

    def _publish_light_truth(self) -> None:
        """The twin's record of light changes on the sample, on its own truth topic."""
        if self.light_truth is None:
            return
        changes = self.light_truth()
        if changes:
            self.publisher.publish(LIGHT_TRUTH_TOPIC, {"changes": changes})

    def pump(self) -> None:
        if self.events is not None:
            self._run_events()
        else:
            self._pump_frames()

    def _pump_frames(self) -> None:
        while self.core.getRemainingImageCount() > 0:
            image, meta = self.core.popNextImageAndMD()
            t_end = int(float(meta.get("t_exp_end_ns", now_ns())))
            exposure_ns = int(self.core.getExposure() * 1e6)
            t_start = int(float(meta.get("t_exp_start_ns", t_end - exposure_ns)))
            extra = _playback_extra(meta)
            seq = self._publish_image(image, t_start, t_end, extra)
            if self.truth_source is not None:
                truth = self.truth_source(meta)
                if truth is not None:
                    self.publisher.publish(TRUTH_PREFIX + STREAM.encode(), {"seq": seq, **truth})

    def _cmd_set_laser(self, args: dict[str, Any]) -> dict[str, Any]:
        names = self.config.devices
        wanted = self.gate.laser_spots("set_laser", args.get("spots"))
        if not wanted:
            return self._cmd_laser_off(args)
        if self.laser_device is None:
            device = names.slm if names.laser_kind == "slm" else names.laser
            raise ProtocolError(
                "device_error",
                f"set_laser: this configuration has no {names.laser_kind} device {device!r} "
                f"(driver.devices)",
            )
        with self.actuation_lock:
            if names.laser_kind == "galvo":
                x, y, p = wanted[0].x_um, wanted[0].y_um, wanted[0].power_mw
                self.gate.check_light("set_laser", "spots", wanted + self._slm_light)
                # Move first, then power: the spot never lights up at the previous position.
                self.core.setProperty(names.laser, names.laser_x_property, x)
                self.core.setProperty(names.laser, names.laser_y_property, y)
                self.core.setProperty(names.laser, names.laser_power_property, p)
                self._galvo = [LaserState(x, y, p)] if p > 0 else []
            else:
                image = self._slm_pattern(wanted)
                applied = slm_image_spots(image, self.gate.slm_calibration)
                self.gate.check_light("set_laser", "spots", self._galvo + applied)
                self.core.setSLMImage(names.slm, image)
                self.core.displaySLMImage(names.slm)
                self._slm_light = applied
            self.watchdog_tripped = False
        return self._applied(args)

    def _slm_pattern(self, spots: list[LaserState]) -> np.ndarray:
        """Draw spots into an SLM image (the inverse of the SLM's calibration)."""
        cal = self.gate.slm_calibration
        height, width = self._slm_shape
        image = np.zeros((height, width), dtype=np.uint8)
        x0, y0 = cal.origin_um
        for i, spot in enumerate(spots):
            col = round((spot.x_um - x0) / cal.pixel_um)
            row = round((spot.y_um - y0) / cal.pixel_um)
            if not (0 <= row < height and 0 <= col < width):
                raise ProtocolError(
                    "out_of_limits",
                    f"set_laser: field 'spots[{i}]' at ({spot.x_um:g}, {spot.y_um:g}) um is "
                    f"outside the SLM pattern area",
                )
            if image[row, col]:
                raise ProtocolError(
                    "bad_args", f"set_laser: field 'spots[{i}]' falls on an SLM pixel already used"
                )
            image[row, col] = round(spot.power_mw / cal.max_power_mw * 255)
        return image

    def _cmd_laser_off(self, args: dict[str, Any]) -> dict[str, Any]:
        self.safe_state("command")
        return self._applied(args)

    def _applied(self, args: dict[str, Any]) -> dict[str, Any]:
        t_applied = now_ns()
        result: dict[str, Any] = {"t_applied_ns": t_applied, "laser": self._laser_list()}
        seq = args.get("frame_seq")
        if isinstance(seq, int) and seq in self._published_ns:
            result["latency_ns"] = t_applied - self._published_ns[seq]
        return result

    def _cmd_move_stage(self, args: dict[str, Any]) -> dict[str, Any]:
        x, y = self.gate.stage("move_stage", args)
        wait = self.gate.wait_flag("move_stage", args)
        if not self.core.getXYStageDevice():
            raise ProtocolError("device_error", "move_stage: this configuration has no XY stage")
        self.core.setXYPosition(x, y)
        self._forget_positions()
        if wait:  # blocks the stream while moving: opt-in only
            self.core.waitForDevice(self.core.getXYStageDevice())
        return {"stage_um": [x, y]}

    def _cmd_set_exposure(self, args: dict[str, Any]) -> dict[str, Any]:
        exposure = self.gate.exposure("set_exposure", args)
        self._camera_paused(True, lambda: self.core.setExposure(exposure))
        return {"exposure_ms": exposure}

    def _camera_paused(self, touches_camera: bool, change: Callable[[], None]) -> None:
        """Cameras refuse most changes while acquiring: pause the stream around them."""
        if touches_camera and self.events is not None:
            raise ProtocolError(
                "busy",
                "camera settings cannot change during an event-driven acquisition; submit "
                "them with the events (exposure, channel, properties) or send stop_events",
            )
        running = touches_camera and self.core.isSequenceRunning()
        if running:
            self.core.stopSequenceAcquisition()
        try:
            change()
        finally:
            if running:
                self.core.startContinuousSequenceAcquisition(0)

    def _cmd_move_z(self, args: dict[str, Any]) -> dict[str, Any]:
        z = self.gate.z("move_z", args)
        wait = self.gate.wait_flag("move_z", args)
        if not self.core.getFocusDevice():
            raise ProtocolError("device_error", "move_z: this configuration has no focus device")
        self.core.setPosition(z)
        self._forget_positions()
        if wait:
            self.core.waitForDevice(self.core.getFocusDevice())
        return {"z_um": z}

    def _cmd_set_property(self, args: dict[str, Any]) -> dict[str, Any]:
        """An allow-listed device property, within its rule and the device's own limits."""
        device, prop = args.get("device"), args.get("property")
        value = self.gate.property_value("set_property", "", device, prop, args.get("value"))
        camera = device == self.core.getCameraDevice()
        self._camera_paused(camera, lambda: self.core.setProperty(device, prop, value))
        return {"value": self.core.getProperty(device, prop)}

    def _cmd_set_config(self, args: dict[str, Any]) -> dict[str, Any]:
        group, preset = args.get("group"), args.get("preset")
        camera = self.gate.preset("set_config", "", group, preset)
        self._camera_paused(camera, lambda: self.core.setConfig(group, preset))
        return {"group": group, "preset": preset}

    def _cmd_set_shutter(self, args: dict[str, Any]) -> dict[str, Any]:
        state = self.gate.shutter("set_shutter", args)
        if not self.core.getShutterDevice():
            raise ProtocolError("device_error", "set_shutter: this configuration has no shutter")
        with self.actuation_lock:
            self.core.setShutterOpen(state)
            self._shutter_opened = state
            if state:
                self.watchdog_tripped = False
        return {"open": state}

    # --- snap, SLM images, event-driven acquisition --------------------------------

    def _publish_image(
        self, image: np.ndarray, t_start: int, t_end: int, extra: dict[str, Any]
    ) -> int:
        state = {**self.state(), **extra} if extra else self.state()
        header = self.publisher.publish_frame(STREAM, image, t_start, t_end, state)
        self.frames_published += 1
        self._published_ns[header.seq] = header.t_published_ns
        while len(self._published_ns) > PUBLISHED_RING:
            self._published_ns.popitem(last=False)
        return header.seq

    def _idle_or_refuse(self, cmd: str) -> None:
        if self.events is not None:
            raise ProtocolError(
                "busy",
                f"{cmd}: an event-driven acquisition is running; submit the change as an "
                f"event or send stop_events first",
            )

    def _cmd_snap(self, _args: dict[str, Any]) -> dict[str, Any]:
        """One frame with the current settings, published on the stream (snap: true)."""
        self._idle_or_refuse("snap")
        images: list[tuple[np.ndarray, int, int]] = []

        def snap() -> None:
            t_start = now_ns()
            self.core.snapImage()
            images.append((self.core.getImage(), t_start, now_ns()))

        self._camera_paused(True, snap)
        image, t_start, t_end = images[0]
        seq = self._publish_image(image, t_start, t_end, {"snap": True})
        return {"seq": seq, "shape": list(image.shape), "dtype": str(image.dtype)}

    def _cmd_set_slm_image(self, args: dict[str, Any]) -> dict[str, Any]:
        """Show an 8-bit image on the calibrated SLM, within the light limits (any laser
        kind: the SLM lights the sample whatever steers the main laser)."""
        cmd = "set_slm_image"
        device = args.get("device") or self.core.getSLMDevice()
        image, spots = self.gate.slm_image(cmd, "image", device, args.get("image"))
        with self.actuation_lock:
            self.gate.check_light(cmd, "image", self._galvo + spots)
            self.core.setSLMImage(device, image)
            self.core.displaySLMImage(device)
            self._slm_light = spots
            if spots:
                self.watchdog_tripped = False
        return {"device": device, "lit_pixels": int(np.count_nonzero(image))}

    def _cmd_submit_events(self, args: dict[str, Any]) -> dict[str, Any]:
        """Queue MDAEvents on the running event-driven MDA (started on first use)."""
        ids = self._queue_events(args.get("events"), "submit_events")
        assert self.events is not None
        return {"ids": ids, "t0_ns": self.events.t0_ns}

    def _queue_events(self, raw: Any, cmd: str) -> list[int]:
        """Validate events (command or hook alike), check every limit, queue them."""
        t0 = self.events.t0_ns if self.events is not None else now_ns()
        events = parse_events(raw, t0, cmd)
        lights = [self._check_event(i, event, cmd) for i, event in enumerate(events)]
        if self.events is not None and self.events.stopping:
            raise ProtocolError("busy", f"{cmd}: the event session is stopping; wait for it to end")
        if self.events is None:
            if self.core.isSequenceRunning():
                self.core.stopSequenceAcquisition()
            self._drop_pending_sequence_frames()
            if not self.core.getShutterDevice():
                self.core.setAutoShutter(False)  # MDA needs a shutter label otherwise
            guard = LightGuard(self.actuation_lock, self._light_allowed, self._slm_shown)
            self.events = EventSession(self.core, self._publish_event_frame, guard)
            self._events_light = False
        self._events_light = self._events_light or any(lights)
        if any(lights):
            self.watchdog_tripped = False
        return self.events.submit(events)

    def _check_event(self, i: int, event: Any, cmd: str = "submit_events") -> bool:
        """The gate's limits on every event, as on the matching command; True if the
        event puts light on the sample (its SLM image lights a pixel)."""
        light = self.gate.event(cmd, i, event, self._galvo)
        return light is not None and bool(light[1])

    def _light_allowed(self, device: str, image: np.ndarray) -> bool:
        """Whether the MDA engine may show an event's SLM image now: not after a trip,
        and only if the whole light on the sample stays within the limits."""
        if self._trip_silent_ms is not None or self.stop.is_set():
            return False
        spots = (
            slm_image_spots(image, self.gate.slm_calibration) if device == self.slm_device else []
        )
        try:
            self.gate.check_light("submit_events", "slm_image", self._galvo + spots)
        except ProtocolError as exc:
            self.event_light_refused += 1
            log.warning("event SLM image not shown: %s", exc)
            return False
        return True

    def _slm_shown(self, device: str, image: np.ndarray) -> None:
        if device == self.slm_device:
            self._slm_light = slm_image_spots(image, self.gate.slm_calibration)

    def _cmd_stop_events(self, args: dict[str, Any]) -> dict[str, Any]:
        """End the event session: after the queued events, or at once with cancel: true."""
        if self.events is None:
            return {"running": False, "submitted": 0}
        cancel = args.get("cancel") is True
        self.events.stop(cancel=cancel)
        return {"running": True, "submitted": self.events.submitted, "cancelled": cancel}

    def _run_events(self) -> None:
        """Run the event session's MDA on this thread until it is stopped or drained.

        Commands, the watchdog and heartbeats are served inside the MDA's event
        iterator whenever no event is executing; see drivers/mda.py EventSession.
        """
        session = self.events
        assert session is not None
        try:
            session.run(self._serve_between_events)
        except Exception:  # a device failure ends the session, never the node
            log.exception("event-driven acquisition failed")
        self._end_events(cancel=False)

    def _serve_between_events(self, timeout_ms: int) -> bool:
        for incoming in self.server.poll(timeout_ms=timeout_ms):
            self._handle(incoming)
        self._tick()
        return not self.stop.is_set()

    def _publish_event_frame(self, frame: EventFrame) -> None:
        """Publish the frame the moment it is read (zero-copy), on the node thread; the
        event hook, if any, sees it first, so its next events are queued before the
        publish and execute right after."""
        if self.event_hook is not None:
            self._run_event_hook(frame)
        self._publish_image(
            frame.image, frame.t_start_ns, frame.t_end_ns, {"event": frame.wire_state()}
        )
        self.event_frames_published += 1

    def _run_event_hook(self, frame: EventFrame) -> None:
        """One hook call under the guard; its events go through `_queue_events`."""
        assert self.event_hook is not None and self._hook_guard is not None
        self.hook_calls += 1
        self._hook_guard.enter()
        failure = ""
        try:
            raw = self.event_hook(frame)
        except Exception as exc:  # agent code must not take the node down
            raw, failure = None, f"event_hook: raised {type(exc).__name__}: {exc}"
        self._hook_guard.leave()  # before anything slow, so the guard times the hook alone
        if failure:
            self._end_hook_loop(failure)
            return
        if self._hook_overrun_ms:
            ran_ms, self._hook_overrun_ms = self._hook_overrun_ms, 0.0
            self._end_hook_loop(
                f"event_hook: one call ran over {ran_ms:.0f} ms, the allowed range is "
                f"[0, {self.config.hook_timeout_ms}] ms (hook_timeout_ms)"
            )
            return
        if raw is None:
            return
        try:
            self._queue_events(list(raw) if isinstance(raw, list | tuple) else raw, "event_hook")
        except ProtocolError as exc:
            self.hook_refusals += 1
            log.warning("event hook's events refused: %s", exc)
            self._publish_hook_event("hook_refused", str(exc))

    def _end_hook_loop(self, message: str) -> None:
        """A failed or overrunning hook: cancel what is queued, leave the rig safe."""
        log.error("%s; event session cancelled", message)
        self._publish_hook_event("hook_failed", message)
        if self.events is not None:
            self.events.stop(cancel=True)
        if self.actuators_live():
            self.safe_state("event hook failed")

    def _hook_overran(self, running_ms: float) -> None:
        """Guard thread: the node thread is stuck in the hook; switch the light off now."""
        log.error("event hook running for %.0f ms: actuators made safe", running_ms)
        self._hook_overrun_ms = running_ms
        with self.actuation_lock:
            if self.actuators_live():
                self.emergency_off("event hook overran")

    def _publish_hook_event(self, kind: str, message: str) -> None:
        self.publisher.publish(EVENT_TOPIC, {"event": kind, "message": message, "t_ns": now_ns()})

    def _end_events(self, cancel: bool) -> None:
        """Close the session and go back to the continuous stream."""
        session, self.events = self.events, None
        if session is None:
            return
        if cancel:
            session.stop(cancel=True)
        session.close()
        if self._events_light:
            self._events_light = False
            self.safe_state("events ended")
        if not self.stop.is_set():
            self.core.startContinuousSequenceAcquisition(0)

    def _drop_pending_sequence_frames(self) -> None:
        while self.core.getRemainingImageCount() > 0:
            self.core.popNextImage()

    def status(self) -> dict[str, Any]:
        return {
            "frames_published": self.frames_published,
            "event_frames_published": self.event_frames_published,
            "events_running": self.events is not None,
            "event_hook": self.event_hook is not None,
            "hook_calls": self.hook_calls,
            "hook_refusals": self.hook_refusals,
            "event_light_refused": self.event_light_refused,
            "laser_kind": self.config.devices.laser_kind,
            "safe_verified": self.safe_verified,
            "limits": self.config.limits.model_dump(),
        }

    # --- state ----------------------------------------------------------------

    def safe_state(self, reason: str) -> None:
        """All light off through the devices themselves, read back (node thread)."""
        if self.events is not None and self._events_light:
            self.events.stop(cancel=True)  # queued events would light the laser again
        with self.actuation_lock:
            self.emergency_off(reason)
        problems = self._light_read_back()
        self.safe_verified = not problems
        if problems:
            message = f"safe state ({reason}) not confirmed by the devices: " + "; ".join(problems)
            log.error(message)
            raise RuntimeError(message)

    def emergency_off(self, reason: str) -> bool:
        """Galvo power 0, SLM blank, shutter closed: light devices only, any thread."""
        names = self.config.devices
        failures = []
        steps: list[tuple[str, Callable[[], None]]] = []
        if self.galvo_device:
            steps.append(
                (
                    "galvo",
                    lambda: self.core.setProperty(names.laser, names.laser_power_property, 0.0),
                )
            )
        if self.slm_device:
            steps.append(("slm", self._blank_slm))
        if self.core.getShutterDevice() and (
            self._shutter_opened or reason in ("start", "watchdog")
        ):
            steps.append(("shutter", lambda: self.core.setShutterOpen(False)))
        for name, step in steps:
            try:  # every step tried even if one fails
                step()
            except Exception:
                log.exception("could not make the %s safe (%s)", name, reason)
                failures.append(name)
        if "galvo" not in failures:
            self._galvo = []
        if "slm" not in failures:
            self._slm_light = []
        if "shutter" not in failures:
            self._shutter_opened = False
        if failures:
            raise RuntimeError(f"safe state ({reason}): {', '.join(failures)} not made safe")
        return True

    def _blank_slm(self) -> None:
        self.core.setSLMImage(self.config.devices.slm, np.zeros(self._slm_shape, dtype=np.uint8))
        self.core.displaySLMImage(self.config.devices.slm)

    def _light_read_back(self) -> list[str]:
        """What the devices say after the safe state; a list of what is still lit."""
        names = self.config.devices
        problems = []
        if self.galvo_device:
            power = float(self.core.getProperty(names.laser, names.laser_power_property))
            if power != 0.0:
                problems.append(f"{names.laser}.{names.laser_power_property} reads {power:g}")
        if self.slm_device and hasattr(self.core, "getSLMImage"):  # UniMMCore reads it back
            try:
                lit = int(np.count_nonzero(self.core.getSLMImage(names.slm)))
            except Exception:  # a C++ SLM adapter cannot be read back
                lit = 0
            if lit:
                problems.append(f"{names.slm} shows {lit} lit pixels")
        return problems

    def actuators(self) -> set[str]:
        core = self.core
        found = {
            "laser": self.laser_device is not None,
            "slm": self.slm_device is not None,
            "xy_stage": bool(core.getXYStageDevice()),
            "focus": bool(core.getFocusDevice()),
            "shutter": bool(core.getShutterDevice()),
            "camera": bool(core.getCameraDevice()),
        }
        return {name for name, present in found.items() if present}

    def _laser_list(self) -> list[dict[str, float]]:
        return [{"x_um": s.x_um, "y_um": s.y_um, "power_mw": s.power_mw} for s in self.laser]

    def state(self) -> dict[str, Any]:
        return {
            "exposure_ms": self.core.getExposure(),
            "pixel_size_um": self._pixel_size_um(),
            "field_um": list(self.field_um),
            "laser": self._laser_list(),
            "shutter_open": self._shutter_opened,
            **self._positions(),
            "watchdog_tripped": self.watchdog_tripped,
            **self._temperature_state(),
        }

    def _temperature_state(self) -> dict[str, Any]:
        """Sample temperature for the header; the config's value, said so, if a read fails."""
        t = now_ns()
        if self._temperature_cache and t - self._temperature_cache[0] < TEMPERATURE_REFRESH_NS:
            return self._temperature_cache[1]
        try:
            value, source = self._temperature()
        except (RuntimeError, ValueError) as exc:
            value, source = self.config.temperature_k, f"config (sensor read failed: {exc})"
        state = {"temperature_k": float(value), "temperature_source": source}
        self._temperature_cache = (t, state)
        return state

    def _positions(self) -> dict[str, Any]:
        """Stage and focus positions, re-read at most every POSITION_REFRESH_NS: on real
        hardware each read can be a serial round trip, too slow for every frame header."""
        t = now_ns()
        if self._position_cache is None or t - self._position_read_ns > POSITION_REFRESH_NS:
            core = self.core
            self._position_cache = {
                "stage_um": list(core.getXYPosition()) if core.getXYStageDevice() else [],
                "z_um": core.getPosition() if core.getFocusDevice() else None,
            }
            self._position_read_ns = t
        return self._position_cache

    def _forget_positions(self) -> None:
        self._position_cache = None

    def _pixel_size_um(self) -> float:
        size = self.core.getPixelSizeUm()
        return float(size) if size > 0 else self.field_um[0] / max(self.core.getImageWidth(), 1)

    def _field_from_core(self) -> tuple[float, float]:
        size = self.core.getPixelSizeUm() or 1.0
        return (self.core.getImageWidth() * size, self.core.getImageHeight() * size)
