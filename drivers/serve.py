"""Start a driver node for a config and serve until told to stop (SIGINT/SIGTERM/shutdown)."""

from __future__ import annotations

import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import zmq
from pymmcore_plus import CMMCorePlus

from drivers.config import DriverConfig
from drivers.event_hooks import EventHook
from drivers.mda import first_error
from drivers.mmcore_node import DriverNode
from drivers.twin_devices import build_twin_core

if TYPE_CHECKING:
    from drivers.spm_config import SpmDriverConfig

log = logging.getLogger(__name__)


ConfigT = TypeVar("ConfigT", DriverConfig, "SpmDriverConfig")


def resolve_endpoints(config: ConfigT) -> ConfigT:
    """Replace "auto" endpoints with private ipc:// sockets (fastest on one host)."""
    if "auto" not in (config.stream_endpoint, config.command_endpoint):
        return config
    folder = Path(tempfile.mkdtemp(prefix="scopeloop-"))
    update = {}
    if config.stream_endpoint == "auto":
        update["stream_endpoint"] = f"ipc://{folder}/stream"
    if config.command_endpoint == "auto":
        update["command_endpoint"] = f"ipc://{folder}/command"
    return config.model_copy(update=update)


def load_mmcore(config: DriverConfig) -> CMMCorePlus:
    """A Micro-Manager core from the user's config file, or the offline demo adapters."""
    core = CMMCorePlus()
    if config.mm_config == "demo":
        core.loadSystemConfiguration()  # MMConfig_demo.cfg from the mm-test-adapters wheel
    else:
        path = Path(config.mm_config)
        if not path.is_file():
            raise ValueError(f"driver.mm_config: file {path} does not exist")
        try:
            core.loadSystemConfiguration(str(path))
        except Exception as exc:  # MMCore reports broken configs as generic errors
            raise ValueError(
                f"driver.mm_config: {path} could not be loaded ({first_error(exc)})"
            ) from None
    core.setExposure(config.exposure_ms)
    return core


def build_node(
    config: DriverConfig, ctx: zmq.Context | None = None, event_hook: EventHook | None = None
) -> DriverNode:
    """The driver node for `config.kind`: the particle twin, or any Micro-Manager config.

    `event_hook` (else the one `config.event_hook` names) answers each event frame."""
    if config.kind == "mmcore":
        return DriverNode(load_mmcore(config), config, ctx=ctx, event_hook=event_hook)
    if config.kind == "sparse-field":
        return _sparse_field_node(config, ctx, event_hook)
    if config.kind == "playback":
        from drivers.playback_devices import build_playback_core

        core, _rig, pixel_um = build_playback_core(
            config.playback, config.exposure_ms, config.devices
        )
        height, width = core.getImageHeight(), core.getImageWidth()
        return DriverNode(
            core,
            config,
            ctx=ctx,
            field_um=(width * pixel_um, height * pixel_um),
            event_hook=event_hook,
        )
    if config.kind == "pycromanager":
        from drivers.pycromanager_node import PycromanagerNode, pycromanager_core

        core = pycromanager_core(config)
        core.set_exposure(config.exposure_ms)
        return PycromanagerNode(core, config, ctx=ctx)
    core, rig = build_twin_core(config.twin, config.seed, config.exposure_ms, config.devices)

    def truth(meta: object) -> dict | None:
        index = getattr(meta, "get", lambda *_: None)("twin_frame")
        return rig.truth(int(index)) if index is not None else None

    return DriverNode(
        core,
        config,
        ctx=ctx,
        truth_source=truth,
        field_um=config.twin.camera.field_um,
        event_hook=event_hook,
        light_truth=rig.take_light_log,
        temperature=lambda: (config.twin.particles.temperature_k, "twin"),
    )


TRUTH_PERIOD_NS = 250_000_000


def _sparse_field_node(
    config: DriverConfig, ctx: zmq.Context | None, event_hook: EventHook | None
) -> DriverNode:
    """The sparse-field twin; its objects go out on the truth topic (twice a second, on
    live frames) for evaluation, never in a frame header."""
    from drivers.field_devices import build_field_core

    field = config.field
    core, rig = build_field_core(field, config.seed, config.exposure_ms)
    last_ns = [0]

    def truth(_meta: object) -> dict | None:
        t = time.monotonic_ns()
        if t - last_ns[0] < TRUTH_PERIOD_NS:
            return None
        last_ns[0] = t
        return {
            "objects_um": rig.field.objects_um.round(4).tolist(),
            "view_um": list(field.view_um),
            "object_sigma_um": field.object_sigma_um,
        }

    return DriverNode(
        core, config, ctx=ctx, truth_source=truth, field_um=field.view_um, event_hook=event_hook
    )


def serve(config: DriverConfig) -> None:
    config = resolve_endpoints(config)
    node = build_node(config)

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %s: stopping driver", signum)
        node.stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stream, command = node.endpoints
    print(f"driver ready: stream={stream} command={command}", flush=True)
    node.serve()
