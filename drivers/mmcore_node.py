"""Micro-Manager driver node: streams camera frames, executes commands, keeps the rig safe.

Works on any `CMMCorePlus`: a user's hardware config, the C++ demo adapters, or the
twin's pure-Python devices in `UniMMCore`. Limits are enforced here, on every
command, whoever sent it; if the controlling agent goes silent for `watchdog_ms`
while the laser is on, the laser goes off (see `drivers/node.py`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from pymmcore_plus import CMMCorePlus

from drivers.config import DriverConfig
from drivers.event_hooks import EventHook, HookGuard, load_event_hook
from drivers.mda import EventFrame, EventSession, parse_events
from drivers.node import InstrumentNode, check_within, number_arg
from drivers.protocol import EVENT_TOPIC, TRUTH_PREFIX, ProtocolError, now_ns

log = logging.getLogger(__name__)

TruthSource = Callable[[Any], dict[str, Any] | None]
STREAM = "camera"
PUBLISHED_RING = 512
POSITION_REFRESH_NS = 200_000_000


@dataclass(frozen=True)
class LaserState:
    x_um: float
    y_um: float
    power_mw: float


class DriverNode(InstrumentNode):
    """Serves one Micro-Manager core over protocol v1 until `stop` is set."""

    ACTUATING = frozenset({"set_laser", "move_stage", "move_z", "set_slm_image", "submit_events"})

    def __init__(
        self,
        core: CMMCorePlus,
        config: DriverConfig,
        ctx: zmq.Context | None = None,
        truth_source: TruthSource | None = None,
        field_um: tuple[float, float] | None = None,
        event_hook: EventHook | None = None,
    ) -> None:
        if event_hook is None and config.event_hook is not None:
            event_hook = load_event_hook(config.event_hook, config.event_hook_args)
        super().__init__(config, ctx)
        self.core = core
        self.config = config
        self.truth_source = truth_source
        self.field_um = field_um or self._field_from_core()
        limits = config.limits
        self.laser_x_range = limits.laser_x_um or (0.0, self.field_um[0])
        self.laser_y_range = limits.laser_y_um or (0.0, self.field_um[1])
        self.laser: list[LaserState] = []  # lit spots as applied
        loaded = set(core.getLoadedDevices())
        names = config.devices
        laser_device = names.slm if names.laser_kind == "slm" else names.laser
        self.laser_device = laser_device if laser_device in loaded else None
        self._slm_shape: tuple[int, int] = (0, 0)
        if names.laser_kind == "slm" and self.laser_device:
            self._slm_shape = (
                core.getSLMHeight(config.devices.slm),
                core.getSLMWidth(config.devices.slm),
            )
        self.frames_published = 0
        self._published_ns: OrderedDict[int, int] = OrderedDict()
        self._position_cache: dict[str, Any] | None = None
        self._position_read_ns = 0
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

    def actuators_live(self) -> bool:
        return bool(self.laser) or (self.events is not None and self._events_light)

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
            seq = self._publish_image(image, t_start, t_end, {})
            if self.truth_source is not None:
                truth = self.truth_source(meta)
                if truth is not None:
                    self.publisher.publish(TRUTH_PREFIX + STREAM.encode(), {"seq": seq, **truth})

    def _cmd_set_laser(self, args: dict[str, Any]) -> dict[str, Any]:
        spots = args.get("spots")
        if not isinstance(spots, list):
            raise ProtocolError(
                "bad_args", f"set_laser: field 'spots' must be a list, got {spots!r}"
            )
        names = self.config.devices
        allowed = self.config.limits.max_laser_spots if names.laser_kind == "slm" else 1
        if len(spots) > allowed:
            raise ProtocolError(
                "out_of_limits",
                f"set_laser: field 'spots' has {len(spots)} spots, the allowed range is "
                f"[0, {allowed}] ({names.laser_kind} laser)",
            )
        wanted = [self._checked_spot(i, spot) for i, spot in enumerate(spots)]
        if not wanted:
            return self._cmd_laser_off(args)
        if self.laser_device is None:
            device = names.slm if names.laser_kind == "slm" else names.laser
            raise ProtocolError(
                "device_error",
                f"set_laser: this configuration has no {names.laser_kind} device {device!r} "
                f"(driver.devices)",
            )
        if names.laser_kind == "galvo":
            x, y, p = wanted[0]
            # Move first, then power: the spot never lights up at the previous position.
            self.core.setProperty(names.laser, names.laser_x_property, x)
            self.core.setProperty(names.laser, names.laser_y_property, y)
            self.core.setProperty(names.laser, names.laser_power_property, p)
            self.laser = [LaserState(x, y, p)]
        else:
            image, applied = self._slm_pattern(wanted)
            self.core.setSLMImage(names.slm, image)
            self.core.displaySLMImage(names.slm)
            self.laser = applied
        self.watchdog_tripped = False
        return self._applied(args)

    def _checked_spot(self, index: int, spot: Any) -> tuple[float, float, float]:
        where = f"spots[{index}]"
        if not isinstance(spot, dict):
            raise ProtocolError("bad_args", f"set_laser: field '{where}' must be a map")
        x = number_arg("set_laser", spot, "x_um", where)
        y = number_arg("set_laser", spot, "y_um", where)
        p = number_arg("set_laser", spot, "power_mw", where)
        check_within("set_laser", f"{where}.x_um", x, self.laser_x_range, "um")
        check_within("set_laser", f"{where}.y_um", y, self.laser_y_range, "um")
        ceiling = self.config.limits.max_laser_power_mw
        if self.config.devices.laser_kind == "slm":
            ceiling = min(ceiling, self.config.devices.slm_max_power_mw)
        check_within("set_laser", f"{where}.power_mw", p, (0.0, ceiling), "mW")
        return x, y, p

    def _slm_pattern(
        self, spots: list[tuple[float, float, float]]
    ) -> tuple[np.ndarray, list[LaserState]]:
        """Draw spots into an SLM image; report them as quantised to its pixels and levels."""
        names = self.config.devices
        height, width = self._slm_shape
        image = np.zeros((height, width), dtype=np.uint8)
        applied: list[LaserState] = []
        x0, y0 = names.slm_origin_um
        for i, (x, y, p) in enumerate(spots):
            col = round((x - x0) / names.slm_pixel_um)
            row = round((y - y0) / names.slm_pixel_um)
            if not (0 <= row < height and 0 <= col < width):
                raise ProtocolError(
                    "out_of_limits",
                    f"set_laser: field 'spots[{i}]' at ({x:g}, {y:g}) um is outside the SLM "
                    f"pattern area",
                )
            if image[row, col]:
                raise ProtocolError(
                    "bad_args", f"set_laser: field 'spots[{i}]' falls on an SLM pixel already used"
                )
            level = round(p / names.slm_max_power_mw * 255)
            if level == 0:
                continue
            image[row, col] = level
            applied.append(
                LaserState(
                    x0 + col * names.slm_pixel_um,
                    y0 + row * names.slm_pixel_um,
                    level / 255 * names.slm_max_power_mw,
                )
            )
        return image, applied

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
        x = number_arg("move_stage", args, "x_um")
        y = number_arg("move_stage", args, "y_um")
        check_within("move_stage", "x_um", x, self.config.limits.stage_x_um, "um")
        check_within("move_stage", "y_um", y, self.config.limits.stage_y_um, "um")
        self.core.setXYPosition(x, y)
        self._forget_positions()
        if args.get("wait") is True:  # blocks the stream while moving: opt-in only
            self.core.waitForDevice(self.core.getXYStageDevice())
        return {"stage_um": [x, y]}

    def _cmd_set_exposure(self, args: dict[str, Any]) -> dict[str, Any]:
        exposure = number_arg("set_exposure", args, "exposure_ms")
        check_within("set_exposure", "exposure_ms", exposure, self.config.limits.exposure_ms, "ms")
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
        z = number_arg("move_z", args, "z_um")
        check_within("move_z", "z_um", z, self.config.limits.z_um, "um")
        if not self.core.getFocusDevice():
            raise ProtocolError("device_error", "move_z: this configuration has no focus device")
        self.core.setPosition(z)
        self._forget_positions()
        if args.get("wait") is True:
            self.core.waitForDevice(self.core.getFocusDevice())
        return {"z_um": z}

    def _cmd_set_property(self, args: dict[str, Any]) -> dict[str, Any]:
        """Any device property, within its own limits; light sources only via set_laser."""
        device, prop, value = args.get("device"), args.get("property"), args.get("value")
        if not isinstance(device, str) or device not in self.core.getLoadedDevices():
            raise ProtocolError(
                "bad_args", f"set_property: field 'device' = {device!r} is not a loaded device"
            )
        if device in {self.config.devices.laser, self.config.devices.slm}:
            raise ProtocolError(
                "out_of_limits",
                f"set_property: device {device!r} is the laser; use set_laser, which enforces "
                f"the power and position limits",
            )
        if not isinstance(prop, str) or not self.core.hasProperty(device, prop):
            raise ProtocolError(
                "bad_args",
                f"set_property: field 'property' = {prop!r} is not a property of {device}",
            )
        if self.core.isPropertyReadOnly(device, prop):
            raise ProtocolError("bad_args", f"set_property: {device}.{prop} is read-only")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ProtocolError(
                "bad_args", f"set_property: field 'value' = {value!r} is not a value"
            )
        allowed = self.core.getAllowedPropertyValues(device, prop)
        if allowed and str(value) not in allowed:
            raise ProtocolError(
                "out_of_limits",
                f"set_property: {device}.{prop} = {value!r} is not one of {list(allowed)}",
            )
        if self.core.hasPropertyLimits(device, prop):
            lo = self.core.getPropertyLowerLimit(device, prop)
            hi = self.core.getPropertyUpperLimit(device, prop)
            number = number_arg("set_property", args, "value")
            check_within("set_property", f"{device}.{prop}", number, (lo, hi), "")
        camera = device == self.core.getCameraDevice()
        self._camera_paused(camera, lambda: self.core.setProperty(device, prop, value))
        return {"value": self.core.getProperty(device, prop)}

    def _cmd_set_config(self, args: dict[str, Any]) -> dict[str, Any]:
        group, preset = args.get("group"), args.get("preset")
        groups = list(self.core.getAvailableConfigGroups())
        if group not in groups:
            raise ProtocolError(
                "bad_args", f"set_config: field 'group' = {group!r} is not one of {groups}"
            )
        presets = list(self.core.getAvailableConfigs(group))
        if preset not in presets:
            raise ProtocolError(
                "bad_args", f"set_config: field 'preset' = {preset!r} is not one of {presets}"
            )
        devices = {setting[0] for setting in self.core.getConfigData(group, preset)}
        camera = self.core.getCameraDevice() in devices
        self._camera_paused(camera, lambda: self.core.setConfig(group, preset))
        return {"group": group, "preset": preset}

    def _cmd_set_shutter(self, args: dict[str, Any]) -> dict[str, Any]:
        state = args.get("open")
        if not isinstance(state, bool):
            raise ProtocolError(
                "bad_args", f"set_shutter: field 'open' must be true or false, got {state!r}"
            )
        if not self.core.getShutterDevice():
            raise ProtocolError("device_error", "set_shutter: this configuration has no shutter")
        self.core.setShutterOpen(state)
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
        """Show an 8-bit image on an SLM; on the laser SLM only within the laser limits."""
        device = args.get("device") or self.core.getSLMDevice()
        if not isinstance(device, str) or device not in self.core.getLoadedDevices():
            raise ProtocolError(
                "bad_args", f"set_slm_image: field 'device' = {device!r} is not a loaded device"
            )
        image = self._slm_image_arg("set_slm_image", "image", device, args.get("image"))
        light = self._check_slm_light("set_slm_image", "image", device, image)
        self.core.setSLMImage(device, image)
        self.core.displaySLMImage(device)
        if light is not None:
            self.laser = light
            self.watchdog_tripped = False
        return {"device": device, "lit_pixels": int(np.count_nonzero(image))}

    def _slm_image_arg(self, cmd: str, field: str, device: str, raw: Any) -> np.ndarray:
        try:
            shape = (self.core.getSLMHeight(device), self.core.getSLMWidth(device))
        except Exception:
            raise ProtocolError("bad_args", f"{cmd}: device {device!r} is not an SLM") from None
        try:
            image = np.asarray(raw)
        except (TypeError, ValueError):
            image = np.zeros(0)
        if image.shape != shape or not np.issubdtype(image.dtype, np.integer):
            raise ProtocolError(
                "bad_args",
                f"{cmd}: field '{field}' must be a {shape[0]}x{shape[1]} array of integers "
                f"0-255 for {device}",
            )
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field '{field}' values must be in the allowed range [0, 255]",
            )
        return image.astype(np.uint8)

    def _check_slm_light(
        self, cmd: str, field: str, device: str, image: np.ndarray
    ) -> list[LaserState] | None:
        """The spots an image on the laser SLM lights, refused beyond the limits."""
        names = self.config.devices
        if names.laser_kind != "slm" or device != names.slm:
            return None
        rows, cols = np.nonzero(image)
        if len(rows) > self.config.limits.max_laser_spots:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field '{field}' lights {len(rows)} pixels, the allowed range is "
                f"[0, {self.config.limits.max_laser_spots}] (limits.max_laser_spots)",
            )
        x0, y0 = names.slm_origin_um
        spots = []
        for row, col in zip(rows, cols, strict=True):
            spot = {
                "x_um": x0 + col * names.slm_pixel_um,
                "y_um": y0 + row * names.slm_pixel_um,
                "power_mw": image[row, col] / 255 * names.slm_max_power_mw,
            }
            x, y, p = self._checked_spot(len(spots), spot)
            spots.append(LaserState(x, y, p))
        return spots

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
            self.events = EventSession(self.core, on_frame=self._publish_event_frame)
            self._events_light = False
        self._events_light = self._events_light or any(lights)
        if any(lights):
            self.watchdog_tripped = False
        return self.events.submit(events)

    def _check_event(self, i: int, event: Any, cmd: str = "submit_events") -> bool:
        """Limits on every event, as on the matching command; True if it lights the laser."""
        where = f"events[{i}]"
        limits = self.config.limits
        if event.x_pos is not None:
            check_within(cmd, f"{where}.x_pos", event.x_pos, limits.stage_x_um, "um")
        if event.y_pos is not None:
            check_within(cmd, f"{where}.y_pos", event.y_pos, limits.stage_y_um, "um")
        if event.z_pos is not None:
            check_within(cmd, f"{where}.z_pos", event.z_pos, limits.z_um, "um")
        if event.exposure is not None:
            check_within(cmd, f"{where}.exposure", event.exposure, limits.exposure_ms, "ms")
        if event.channel is not None:
            group, preset = event.channel.group, event.channel.config
            if group not in self.core.getAvailableConfigGroups() or preset not in (
                self.core.getAvailableConfigs(group)
            ):
                raise ProtocolError(
                    "bad_args", f"{cmd}: field '{where}.channel' = {group}/{preset} is not a preset"
                )
        lasers = {self.config.devices.laser, self.config.devices.slm}
        loaded = set(self.core.getLoadedDevices()) if event.properties else set()
        for device, prop, _value in event.properties or []:
            if device in lasers:
                raise ProtocolError(
                    "out_of_limits",
                    f"{cmd}: field '{where}.properties' sets the laser {device!r}; use set_laser",
                )
            if device not in loaded or not self.core.hasProperty(device, prop):
                raise ProtocolError(
                    "bad_args", f"{cmd}: field '{where}.properties' has no {device}.{prop}"
                )
        if event.slm_image is None:
            return False
        device = event.slm_image.device or self.core.getSLMDevice()
        image = self._slm_image_arg(cmd, f"{where}.slm_image.data", device, event.slm_image.data)
        return bool(self._check_slm_light(cmd, f"{where}.slm_image.data", device, image))

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
        if self.actuators_live():
            self.safe_state("event hook overran")

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
            "laser_kind": self.config.devices.laser_kind,
            "limits": self.config.limits.model_dump(),
        }

    # --- state ----------------------------------------------------------------

    def safe_state(self, reason: str) -> None:
        """All light off through the devices themselves (galvo power 0, SLM blank)."""
        names = self.config.devices
        if self.events is not None and self._events_light:
            self.events.stop(cancel=True)  # queued events would light the laser again
        if self.laser_device is None:
            self.laser = []
            return
        try:
            if names.laser_kind == "galvo":
                self.core.setProperty(names.laser, names.laser_power_property, 0.0)
            else:
                self.core.setSLMImage(names.slm, np.zeros(self._slm_shape, dtype=np.uint8))
                self.core.displaySLMImage(names.slm)
        except Exception:  # keep trying to be safe even if the device misbehaves
            log.exception("could not switch the laser off (%s)", reason)
            raise
        self.laser = []

    def _laser_list(self) -> list[dict[str, float]]:
        return [{"x_um": s.x_um, "y_um": s.y_um, "power_mw": s.power_mw} for s in self.laser]

    def state(self) -> dict[str, Any]:
        return {
            "exposure_ms": self.core.getExposure(),
            "pixel_size_um": self._pixel_size_um(),
            "field_um": list(self.field_um),
            "laser": self._laser_list(),
            **self._positions(),
            "watchdog_tripped": self.watchdog_tripped,
        }

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
