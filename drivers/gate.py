"""The Micro-Manager node family's actuation gate: one limits check before any hardware call.

Every command that can put light on the sample, move hardware or change acquisition
(set_laser, SLM images, device properties, config presets, XY/Z, exposure, MDA events
from the command or an event hook) is checked here, by one object, against the config's
limits and the devices' own property limits. Nothing here touches an actuator: the
node applies what the gate returned, so a refused command changes nothing.

Light is judged on the sample as a whole (galvo spot plus SLM spots, through
`drivers.light`), on every laser kind: an SLM image on a galvo config lights the sample
too. Properties are writable only from the config's allow-list.

Exposures are also bounded by the watchdog where the C++ MMCore would make it wait: it
runs one call at a time per device adapter module, so a shutter in the camera's module
closes only when a snap ends. There the longest exposure is the one whose snap (the
stream's frame in flight, then the snap itself) still ends within `watchdog_ms`
(`shared_module_exposure_ms`); the node says so in one line when it starts.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from pymmcore_plus import CMMCorePlus, DeviceType

from drivers.config import DriverConfig
from drivers.light import LaserState, LightLimits, SlmCalibration, slm_image_spots
from drivers.node import check_within, number_arg
from drivers.protocol import ProtocolError

log = logging.getLogger(__name__)

SlmLight = tuple[np.ndarray, list[LaserState]]
# Beyond the exposures, what a snap holds the module for: readout, transfer, scheduling.
SHARED_MODULE_MARGIN_MS = 50.0


def camera_module_shutters(core: CMMCorePlus) -> tuple[str, list[str]]:
    """The camera's C++ adapter module and the loaded shutters in it ('' and [] where
    none: Python devices (UniMMCore) lock per device, so they never wait on a snap)."""
    camera = core.getCameraDevice()
    is_python = getattr(core, "isPyDevice", lambda _label: False)
    if not camera or is_python(camera):
        return "", []
    try:
        module = core.getDeviceLibrary(camera)
        shutters = [
            label
            for label in core.getLoadedDevicesOfType(DeviceType.Shutter)
            if not is_python(label) and core.getDeviceLibrary(label) == module
        ]
    except Exception:  # a core that cannot say (a remote backend): assume separate modules
        return "", []
    return module, shutters


def shared_module_exposure_ms(core: CMMCorePlus, watchdog_ms: float) -> float:
    """The longest exposure whose snap blocks the camera module for under watchdog_ms:
    a frame in flight plus the snap, each exposure + readout, plus a margin."""
    readout = 0.0
    camera = core.getCameraDevice()
    if core.hasProperty(camera, "ReadoutTime"):  # ms, where the camera says (DemoCamera)
        try:
            readout = max(float(core.getProperty(camera, "ReadoutTime")), 0.0)
        except ValueError:
            readout = 0.0
    return (watchdog_ms - SHARED_MODULE_MARGIN_MS) / 2.0 - readout


class MicroscopeGate:
    """Limits for one Micro-Manager core; every check raises a one-line ProtocolError."""

    def __init__(self, core: CMMCorePlus, config: DriverConfig, field_um: tuple[float, float]):
        self.core = core
        self.config = config
        self.limits = config.limits
        self.names = config.devices
        self.light = LightLimits.from_config(config.limits, config.devices, field_um)
        self.slm_calibration = SlmCalibration.from_devices(config.devices)
        self.light_devices = frozenset({self.names.laser, self.names.slm})
        self.exposure_ms, self.exposure_reason = self._exposure_range()

    def _exposure_range(self) -> tuple[tuple[float, float], str]:
        """limits.exposure_ms, capped where a shutter waits on the camera's snaps."""
        lo, hi = self.limits.exposure_ms
        module, shutters = camera_module_shutters(self.core)
        if not shutters:
            return (lo, hi), ""
        watchdog = self.config.watchdog_ms
        cap = shared_module_exposure_ms(self.core, watchdog)
        reason = (
            f"shutter {shutters[0]!r} is in the camera's adapter module {module}, which MMCore "
            f"runs one call at a time: exposures up to {cap:g} ms keep a snap short enough "
            f"for watchdog_ms = {watchdog} to close it"
        )
        if cap < lo or cap < self.config.exposure_ms:
            raise ValueError(
                f"driver.exposure_ms: {reason}; the allowed range is [{lo:g}, {cap:g}] ms "
                f"(raise driver.watchdog_ms or use a shutter in another module)"
            )
        if cap >= hi:
            return (lo, hi), ""
        log.warning("driver: %s (limits.exposure_ms %g ms lowered to %g ms)", reason, hi, cap)
        return (lo, cap), reason

    def check_exposure(self, cmd: str, field: str, value: float) -> None:
        """An exposure within limits.exposure_ms and the watchdog's cap, saying which."""
        try:
            check_within(cmd, field, value, self.exposure_ms, "ms")
        except ProtocolError as exc:
            if self.exposure_reason and value > self.exposure_ms[1]:
                raise ProtocolError(exc.code, f"{exc} ({self.exposure_reason})") from None
            raise

    # --- light --------------------------------------------------------------------

    def laser_spots(self, cmd: str, raw: Any) -> list[LaserState]:
        """set_laser's `spots`: each a finite x_um, y_um, power_mw within the limits."""
        if not isinstance(raw, list):
            raise ProtocolError("bad_args", f"{cmd}: field 'spots' must be a list, got {raw!r}")
        if len(raw) > self.light.spots:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field 'spots' has {len(raw)} spots, the allowed range is "
                f"[0, {self.light.spots}] ({self.names.laser_kind} laser)",
            )
        spots = []
        for i, spot in enumerate(raw):
            where = f"spots[{i}]"
            if not isinstance(spot, dict):
                raise ProtocolError("bad_args", f"{cmd}: field '{where}' must be a map")
            x = number_arg(cmd, spot, "x_um", where)
            y = number_arg(cmd, spot, "y_um", where)
            p = number_arg(cmd, spot, "power_mw", where)
            check_within(cmd, f"{where}.x_um", x, self.light.x_um, "um")
            check_within(cmd, f"{where}.y_um", y, self.light.y_um, "um")
            check_within(cmd, f"{where}.power_mw", p, (0.0, self.light.spot_mw), "mW")
            spots.append(LaserState(x, y, p))
        return spots

    def check_light(self, cmd: str, field: str, spots: list[LaserState]) -> None:
        """The whole light on the sample after a change, against every light limit."""
        self.light.check(cmd, field, spots)

    def slm_image(self, cmd: str, field: str, device: Any, raw: Any) -> SlmLight:
        """An 8-bit image for `device`, and the spots it would put on the sample."""
        if not isinstance(device, str) or device not in self.core.getLoadedDevices():
            raise ProtocolError(
                "bad_args", f"{cmd}: field 'device' = {device!r} is not a loaded device"
            )
        try:
            shape = (self.core.getSLMHeight(device), self.core.getSLMWidth(device))
        except Exception:
            raise ProtocolError("bad_args", f"{cmd}: device {device!r} is not an SLM") from None
        if device != self.names.slm:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: SLM {device!r} has no calibration (driver.devices.slm is "
                f"{self.names.slm!r}); its light cannot be checked",
            )
        image = _integer_image(cmd, field, raw, shape, device)
        return image, slm_image_spots(image, self.slm_calibration)

    # --- motion and acquisition ------------------------------------------------------

    def stage(self, cmd: str, args: dict[str, Any]) -> tuple[float, float]:
        x = number_arg(cmd, args, "x_um")
        y = number_arg(cmd, args, "y_um")
        check_within(cmd, "x_um", x, self.limits.stage_x_um, "um")
        check_within(cmd, "y_um", y, self.limits.stage_y_um, "um")
        return x, y

    def z(self, cmd: str, args: dict[str, Any]) -> float:
        z = number_arg(cmd, args, "z_um")
        check_within(cmd, "z_um", z, self.limits.z_um, "um")
        return z

    def exposure(self, cmd: str, args: dict[str, Any], name: str = "exposure_ms") -> float:
        exposure = number_arg(cmd, args, name)
        self.check_exposure(cmd, name, exposure)
        return exposure

    def wait_flag(self, cmd: str, args: dict[str, Any]) -> bool:
        wait = args.get("wait", False)
        if not isinstance(wait, bool):
            raise ProtocolError("bad_args", f"{cmd}: field 'wait' must be true or false")
        return wait

    def shutter(self, cmd: str, args: dict[str, Any]) -> bool:
        state = args.get("open")
        if not isinstance(state, bool):
            raise ProtocolError(
                "bad_args", f"{cmd}: field 'open' must be true or false, got {state!r}"
            )
        return state

    def property_value(self, cmd: str, where: str, device: Any, prop: Any, value: Any) -> Any:
        """A value for a writable property: allow-listed, within the rule and the device's
        own limits and allowed values (and the exposure limits for the camera)."""
        if not isinstance(device, str) or device not in self.core.getLoadedDevices():
            raise ProtocolError(
                "bad_args", f"{cmd}: field '{where}device' = {device!r} is not a loaded device"
            )
        if device in self.light_devices:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: device {device!r} is a light source; use set_laser or set_slm_image, "
                f"which enforce the light limits",
            )
        if not isinstance(prop, str) or not self.core.hasProperty(device, prop):
            raise ProtocolError(
                "bad_args",
                f"{cmd}: field '{where}property' = {prop!r} is not a property of {device}",
            )
        key = f"{device}.{prop}"
        rule = self.limits.properties.get(key)
        if rule is None:
            allowed = sorted(self.limits.properties)
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: property {key} is not writable (limits.properties allows {allowed})",
            )
        if self.core.isPropertyReadOnly(device, prop):
            raise ProtocolError("bad_args", f"{cmd}: {key} is read-only")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ProtocolError(
                "bad_args", f"{cmd}: field '{where}value' = {value!r} must be a number or text"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(
                "bad_args", f"{cmd}: field '{where}value' = {value!r} must be finite"
            )
        if isinstance(rule, list):
            if str(value) not in rule:
                raise ProtocolError(
                    "out_of_limits",
                    f"{cmd}: {key} = {value!r} is not one of {rule} (limits.properties)",
                )
        else:
            number = _numeric(cmd, key, value)
            check_within(cmd, key, number, rule, "")
            value = number
        device_allowed = self.core.getAllowedPropertyValues(device, prop)
        if (
            device_allowed
            and str(value) not in device_allowed
            and _text(value) not in (device_allowed)
        ):
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: {key} = {value!r} is not one of {list(device_allowed)}",
            )
        if self.core.hasPropertyLimits(device, prop):
            lo = self.core.getPropertyLowerLimit(device, prop)
            hi = self.core.getPropertyUpperLimit(device, prop)
            check_within(cmd, f"{key} (device limits)", _numeric(cmd, key, value), (lo, hi), "")
        if device == self.core.getCameraDevice() and prop == "Exposure":
            self.check_exposure(cmd, key, _numeric(cmd, key, value))
        return value

    def preset(self, cmd: str, where: str, group: Any, preset: Any) -> bool:
        """An allow-listed config group's preset; True if it touches the camera.

        Each of its settings passes the property rules that exist for it; none may set
        a light source (that would bypass the light limits)."""
        if group not in self.limits.config_groups:
            raise ProtocolError(
                "out_of_limits",
                f"{cmd}: field '{where}group' = {group!r} is not an allowed config group "
                f"(limits.config_groups: {self.limits.config_groups})",
            )
        groups = list(self.core.getAvailableConfigGroups())
        if group not in groups:
            raise ProtocolError(
                "bad_args", f"{cmd}: field '{where}group' = {group!r} is not one of {groups}"
            )
        presets = list(self.core.getAvailableConfigs(group))
        if preset not in presets:
            raise ProtocolError(
                "bad_args", f"{cmd}: field '{where}preset' = {preset!r} is not one of {presets}"
            )
        camera = False
        for device, prop, value in self.core.getConfigData(group, preset):
            if device in self.light_devices:
                raise ProtocolError(
                    "out_of_limits",
                    f"{cmd}: preset {group}/{preset} sets the light source {device}.{prop}",
                )
            if f"{device}.{prop}" in self.limits.properties:
                self.property_value(cmd, where, device, prop, value)
            camera = camera or device == self.core.getCameraDevice()
        return camera

    def event(self, cmd: str, i: int, event: Any, galvo: list[LaserState]) -> SlmLight | None:
        """One MDA event, as its command would be checked; its SLM light, if any."""
        where = f"events[{i}]"
        limits = self.limits
        for name, value, rng in (
            ("x_pos", event.x_pos, limits.stage_x_um),
            ("y_pos", event.y_pos, limits.stage_y_um),
            ("z_pos", event.z_pos, limits.z_um),
            ("exposure", event.exposure, None),
        ):
            if value is not None:
                if not math.isfinite(value):
                    raise ProtocolError("bad_args", f"{cmd}: field '{where}.{name}' must be finite")
                if rng is None:
                    self.check_exposure(cmd, f"{where}.{name}", value)
                else:
                    check_within(cmd, f"{where}.{name}", value, rng, "um")
        if event.channel is not None:
            self.preset(cmd, f"{where}.channel.", event.channel.group, event.channel.config)
        for device, prop, value in event.properties or []:
            self.property_value(cmd, f"{where}.properties.", device, prop, value)
        if event.slm_image is None:
            return None
        device = event.slm_image.device or self.core.getSLMDevice()
        field = f"{where}.slm_image.data"
        image, spots = self.slm_image(cmd, field, device, event.slm_image.data)
        self.check_light(cmd, field, galvo + spots)
        return image, spots


def _integer_image(cmd: str, field: str, raw: Any, shape: tuple[int, int], device: str) -> Any:
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
            "out_of_limits", f"{cmd}: field '{field}' values must be in the allowed range [0, 255]"
        )
    return image.astype(np.uint8)


def _numeric(cmd: str, key: str, value: Any) -> float:
    """A finite number from a property value (Micro-Manager also passes numbers as text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ProtocolError("bad_args", f"{cmd}: {key} = {value!r} must be a number") from None
    if not math.isfinite(number):
        raise ProtocolError("bad_args", f"{cmd}: {key} = {value!r} must be finite")
    return number


def _text(value: Any) -> str:
    """Micro-Manager's text for a number (an integral float without its '.0')."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
