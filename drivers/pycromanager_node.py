"""Driver node for labs that run the Micro-Manager GUI: pycromanager behind protocol v1.

`pycromanager.Core()` is the GUI's core over its ZeroMQ bridge (Java backend, the
GUI's "Run server on port", 4827 by default), or an in-process pymmcore core after
`start_headless(..., python_backend=True)`. With `driver.pycromanager.attach` the node
uses the Micro-Manager already running (never starts a second one); else it starts the
headless Python backend on `mm_config`. Both speak snake_case; `CamelCore` maps the
camelCase MMCore names `DriverNode` uses, so every command, limit and error message is
the same code as the pymmcore-plus driver. Only
acquisition differs: frames come from one long-running pycromanager `Acquisition`
(live frames are one event at a time; `submit_events` adds MDAEvents converted to
pycromanager event dicts), handed to the node thread through a queue.
"""

from __future__ import annotations

import queue
import re
import socket
from typing import Any

import numpy as np
import zmq

from drivers.config import DriverConfig, PycromanagerSettings
from drivers.mda import TARGET_KEY, first_error, parse_events
from drivers.mmcore_node import DriverNode
from drivers.protocol import ProtocolError, now_ns

EVENT_AXIS = "scopeloop_event"
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


class CamelCore:
    """camelCase MMCore calls on pycromanager's snake_case core (Java or Python backend)."""

    def __init__(self, core: Any) -> None:
        self._core = core
        # snake_case spellings differ ("get_xy_stage_device"): match ignoring underscores
        self._names = {n.replace("_", "").lower(): n for n in dir(core) if not n.startswith("_")}

    def __getattr__(self, name: str) -> Any:
        snake = self._names.get(name.lower(), _CAMEL.sub("_", name).lower())
        return getattr(self._core, snake)

    def getImage(self) -> np.ndarray:
        image = self._core.get_image()
        if image.ndim == 1:  # pymmcore returns a flat buffer on some builds
            image = image.reshape(self._core.get_image_height(), self._core.get_image_width())
        return image


class PycromanagerNode(DriverNode):
    """DriverNode whose frames come from a pycromanager Acquisition."""

    def __init__(
        self,
        core: Any,
        config: DriverConfig,
        ctx: zmq.Context | None = None,
        field_um: tuple[float, float] | None = None,
        live: bool = True,
    ) -> None:
        super().__init__(CamelCore(core), config, ctx=ctx, field_um=field_um)
        self.live = live
        self._port = config.pycromanager.port  # a GUI's bridge (Java backend only)
        self._images: queue.SimpleQueue[tuple[np.ndarray, dict[str, Any], int]] = (
            queue.SimpleQueue()
        )
        self._acq: Any = None
        self._next_id = 0
        self._pending: dict[int, dict[str, Any]] = {}  # event id -> what the frame says
        self._live_in_flight = False
        self._acq_t0_ns = 0

    # --- acquisition ----------------------------------------------------------------

    def setup(self) -> None:
        from pycromanager import Acquisition

        self._acq_t0_ns = now_ns()
        self._acq = Acquisition(
            show_display=False, image_process_fn=self._on_image, port=self._port
        )

    def teardown(self) -> None:
        if self._acq is not None:
            self._acq.mark_finished()
            self._acq.await_completion()
            self._acq = None
        super().teardown()

    def _on_image(self, image: np.ndarray, metadata: dict[str, Any]) -> None:
        """Acquisition thread: hand the image to the node thread; store nothing."""
        self._images.put((np.asarray(image), dict(metadata), now_ns()))

    def pump(self) -> None:
        while True:
            try:
                image, metadata, t_received = self._images.get_nowait()
            except queue.Empty:
                break
            self._publish_pycro_frame(image, metadata, t_received)
        if self.live and not self._live_in_flight and not self._pending:
            self._live_in_flight = True
            self._submit({"axes": {EVENT_AXIS: -1}}, None)

    def _publish_pycro_frame(
        self, image: np.ndarray, metadata: dict[str, Any], t_received: int
    ) -> None:
        axes = metadata.get("Axes") or {}
        event_id = int(axes.get(EVENT_AXIS, -1))
        exposure_ns = int(float(metadata.get("Exposure", self.core.getExposure())) * 1e6)
        if event_id < 0:
            self._live_in_flight = False
            self._publish_image(image, t_received - exposure_ns, t_received, {})
            return
        info = self._pending.pop(event_id, {"id": event_id})
        target = info.get("t_target_ns")
        t_start = t_received - exposure_ns
        info["start_error_ms"] = None if target is None else (t_start - target) / 1e6
        self._publish_image(image, t_start, t_received, {"event": info})
        self.event_frames_published += 1

    def _submit(self, event: dict[str, Any], info: dict[str, Any] | None) -> int:
        event_id = -1 if info is None else self._next_id
        if info is not None:
            self._next_id += 1
            self._pending[event_id] = {**info, "id": event_id}
        event["axes"] = {**event.get("axes", {}), EVENT_AXIS: event_id}
        self._acq.acquire(event)
        return event_id

    # --- commands that differ from the pymmcore-plus driver ------------------------------

    def _cmd_snap(self, _args: dict[str, Any]) -> dict[str, Any]:
        """A one-off event: pycromanager's engine owns the camera."""
        event_id = self._submit({"axes": {}}, {"index": {}, "metadata": {"snap": True}})
        return {"event_id": event_id}

    def _cmd_submit_events(self, args: dict[str, Any]) -> dict[str, Any]:
        events = parse_events(args.get("events"), self._acq_t0_ns)
        for i, event in enumerate(events):
            if self._check_event(i, event):
                raise ProtocolError(
                    "bad_args",
                    f"submit_events: field 'events[{i}].slm_image' on the laser SLM is not "
                    f"supported by the pycromanager driver; use set_laser",
                )
        ids = []
        for event in events:
            wire: dict[str, Any] = {"axes": {str(k): v for k, v in event.index.items()}}
            x, y = event.x_pos, event.y_pos
            if (x is None) != (y is None):  # pycromanager moves XY only with both set
                here = self.core.getXYPosition()
                x, y = (here[0] if x is None else x), (here[1] if y is None else y)
            for key, value in (("x", x), ("y", y), ("z", event.z_pos)):
                if value is not None:
                    wire[key] = value
            if event.exposure is not None:
                wire["exposure"] = event.exposure
            if event.channel is not None:
                wire["config_group"] = [event.channel.group, event.channel.config]
            if event.properties:
                wire["properties"] = [list(p) for p in event.properties]
            target = event.metadata.get(TARGET_KEY)
            if isinstance(target, int):
                wire["min_start_time"] = max(0.0, (target - self._acq_t0_ns) / 1e9)
            metadata = {k: v for k, v in event.metadata.items() if k != TARGET_KEY}
            ids.append(
                self._submit(
                    wire,
                    {"index": dict(event.index), "metadata": metadata, "t_target_ns": target},
                )
            )
        return {"ids": ids, "t0_ns": self._acq_t0_ns}

    def _cmd_stop_events(self, _args: dict[str, Any]) -> dict[str, Any]:
        """Stop the running acquisition now: pycromanager's `abort` drops the events not
        yet run and ends the one in progress; a fresh acquisition then serves live frames
        and later events. Frames already taken are still published."""
        cancelled = sorted(self._pending)
        if cancelled:
            self._acq.abort()  # clears the queued events and asks the engine to stop
            self._acq.mark_finished()  # ends the event stream, or the engine waits on it
            self._acq.await_completion()
            if self.core.isSequenceRunning():  # a camera sequence the engine started
                self.core.stopSequenceAcquisition()
            self._pending.clear()
            self._live_in_flight = False
            self.setup()
        return {"running": False, "submitted": self._next_id, "cancelled": cancelled}

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "events_running": bool(self._pending),
            "backend": "pycromanager",
        }

    def _camera_paused(self, touches_camera: bool, change: Any) -> None:
        change()  # pycromanager's engine snaps per event: nothing to pause


def start_python_backend(mm_config: str) -> Any:
    """pycromanager's in-process pymmcore core on `mm_config` (\"demo\": mm-test-adapters)."""
    from pathlib import Path

    from pycromanager import Core, start_headless
    from pymmcore_plus import find_micromanager

    adapters = find_micromanager()
    if not adapters:
        raise ValueError("driver.mm_config: no Micro-Manager adapters found (mm-test-adapters)")
    config = str(Path(adapters) / "MMConfig_demo.cfg") if mm_config == "demo" else mm_config
    if not Path(config).is_file():
        raise ValueError(f"driver.mm_config: file {config} does not exist")
    try:
        start_headless(adapters, config, python_backend=True)
    except Exception as exc:
        raise ValueError(
            f"driver.mm_config: {config} could not be loaded ({first_error(exc)})"
        ) from None
    return Core()


def pycromanager_core(config: DriverConfig) -> Any:
    """The core a pycromanager node drives: the running Micro-Manager it attaches to
    (`driver.pycromanager.attach`), else a headless Python backend started on mm_config."""
    if config.pycromanager.attach:
        return attach_running(config.pycromanager)
    return start_python_backend(config.mm_config)


def attach_running(settings: PycromanagerSettings, timeout_s: float = 4.0) -> Any:
    """The core of a Micro-Manager already running: a headless backend in this process,
    or the GUI's ZMQ server on localhost:`port`. Nobody there: one line naming the port,
    within timeout_s (the socket is probed first: pyjavaz would wait and print)."""
    from mmpycorex import is_pymmcore_active
    from pycromanager import Core

    if is_pymmcore_active():
        return Core()
    port = settings.port
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout_s).close()
    except OSError as exc:
        raise ValueError(
            f"driver.pycromanager.port: no Micro-Manager answers on localhost:{port} "
            f"({exc.strerror or type(exc).__name__}); start it with Options > 'Run server "
            f"on port {port}' or set driver.pycromanager.port"
        ) from None
    try:
        return Core(port=port, timeout=int(timeout_s * 1000))
    except Exception as exc:
        raise ValueError(
            f"driver.pycromanager.port: localhost:{port} is not a Micro-Manager ZMQ server "
            f"({first_error(exc)})"
        ) from None
