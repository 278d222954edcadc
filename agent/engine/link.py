"""How a plan reaches its driver node: one it starts for its config, or one already
running that the config names (`driver.connect: tcp://host:port` or `ipc://path`).

Every plan connects through `attach`, which asks the node what it serves
(`get_capabilities`) before anything moves: a node that does not answer is named
within `PROBE_TIMEOUT_S`, and a plan the node cannot serve (an SPM plan on a camera
node) fails in one line. The CURVE keys of an authenticated endpoint pass through here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
import zmq

from agent.config import ConfigError
from drivers.auth import ClientKeys, load_client_keys
from drivers.config import ClientAuth, DriverConfig
from drivers.serve import resolve_endpoints
from drivers.transport import CommandClient, CommandError, CommandTimeout

PROBE_TIMEOUT_S = 5.0
START_TIMEOUT_S = 60.0
_ANY_HOST = {"0.0.0.0", "*", "[::]", "::"}


@dataclass(frozen=True)
class DriverLink:
    """Where a running driver node streams and takes commands, and what it serves."""

    stream_endpoint: str
    command_endpoint: str
    commands: frozenset[str]
    truth: bool = False  # the node hosts a twin that publishes ground truth
    keys: ClientKeys | None = None  # CURVE keys every socket to this node uses (tcp://)
    actuators: frozenset[str] = frozenset()  # what it can move or light: laser, xy_stage...

    def require(
        self,
        needed: set[str],
        plan: str,
        field: str = "driver",
        actuators: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        """Refuse, in one line naming the field, a node that lacks commands the plan uses
        or the actuators those commands need (a rig without a laser parses `set_laser`)."""
        missing = sorted(needed - self.commands)
        if missing:
            raise ConfigError(
                f"config error: {field}: the driver node at {self.command_endpoint} cannot "
                f"serve plan {plan!r}: it has no {', '.join(missing)} command "
                f"(it serves: {', '.join(sorted(self.commands))})"
            )
        require_actuators(self.actuators, actuators, plan, self.command_endpoint, field)


def require_actuators(
    have: Iterable[str], needed: Iterable[str], plan: str, endpoint: str, field: str = "driver"
) -> None:
    """Refuse, in one line, a node without the actuators a plan moves or lights: a rig
    without a laser still parses `set_laser`, so commands alone do not tell."""
    have = set(have)
    absent = sorted(set(needed) - have)
    if absent:
        raise ConfigError(
            f"config error: {field}: the driver node at {endpoint} cannot serve plan "
            f"{plan!r}: it has no {', '.join(absent)} (its actuators: "
            f"{', '.join(sorted(have)) or 'none'}; device names are in driver.devices)"
        )


def _reachable_stream(stream: str, command: str) -> str:
    """A node bound to every interface reports 0.0.0.0; reach it at the host we used."""
    if not stream.startswith("tcp://"):
        return stream
    host = urlsplit(stream).hostname or ""
    if host not in _ANY_HOST and f"[{host}]" not in _ANY_HOST:
        return stream
    port = urlsplit(stream).port
    return f"tcp://{urlsplit(command).hostname}:{port}"


def attach(
    ctx: zmq.Context,
    command_endpoint: str,
    field: str = "driver.connect",
    timeout_s: float = PROBE_TIMEOUT_S,
    keys: ClientKeys | None = None,
) -> DriverLink:
    """Ask the node at `command_endpoint` for its capabilities; ConfigError naming `field`
    if nothing answers within `timeout_s` (over CURVE with `keys`: a node that does not
    allow our key never answers, which reads the same)."""
    client = CommandClient(ctx, command_endpoint, timeout_ms=int(timeout_s * 1000), keys=keys)
    try:
        reply = client.call("get_capabilities").result
    except CommandTimeout:
        raise ConfigError(
            f"config error: {field}: no driver node answered at {command_endpoint} "
            f"within {timeout_s:g} s"
        ) from None
    except CommandError as exc:
        raise ConfigError(
            f"config error: {field}: {command_endpoint} is not a scopeloop driver node ({exc})"
        ) from None
    finally:
        client.close()
    return DriverLink(
        _reachable_stream(str(reply["stream_endpoint"]), command_endpoint),
        command_endpoint,
        frozenset(str(c) for c in reply.get("commands", [])),
        bool(reply.get("truth", False)),
        keys,
        frozenset(str(a) for a in reply.get("actuators", [])),
    )


def client_keys(auth: ClientAuth, field: str = "driver.client_auth") -> ClientKeys | None:
    """The agent's CURVE keys a config names (None: none); ConfigError naming the field."""
    try:
        return load_client_keys(auth, field)
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None


def _last_line(log: Path) -> str:
    """The driver's own last word (its one-line config error, or a traceback's last line)."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return "no log"
    return next((line for line in reversed(lines) if line), "no output")


def _wait_started(
    ctx: zmq.Context, driver: Any, endpoint: str, keys: ClientKeys | None = None
) -> DriverLink:
    """Probe a driver process we started until it answers (it may take seconds to import)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        code = driver.proc.poll()
        if code is not None:
            raise ConfigError(
                f"config error: driver: the driver process exited with code {code} before "
                f"serving: {_last_line(Path(driver.log_path)).removeprefix('config error: ')} "
                f"(log: {driver.log_path})"
            )
        try:
            return attach(ctx, endpoint, "driver", timeout_s=1.0, keys=keys)
        except ConfigError:
            if time.monotonic() > deadline:
                raise


FEEDBACK_NEEDS = {"set_laser", "laser_off", "get_state"}


class _NotOurProcess:
    def poll(self) -> None:
        return None


class AttachedDriver:
    """A driver node someone else runs: the plan uses it and leaves it running."""

    def __init__(self, link: DriverLink) -> None:
        self.link = link
        self.proc = _NotOurProcess()
        self.log_path = f"(attached at {link.command_endpoint}; its log is where it runs)"

    def stop(self) -> None:
        return None


def attach_configured(
    config: DriverConfig, needs: set[str], plan: str, ctx: zmq.Context | None = None
) -> tuple[DriverConfig, AttachedDriver]:
    """For a config with `driver.connect`: the node's endpoints filled in, and a handle
    that leaves it running, once the node said it can serve `plan`."""
    assert config.connect is not None
    keys = client_keys(config.client_auth)
    link = attach(ctx or zmq.Context.instance(), config.connect, keys=keys)
    link.require(needs, plan)
    endpoints = {"stream_endpoint": link.stream_endpoint, "command_endpoint": config.connect}
    return config.model_copy(update=endpoints), AttachedDriver(link)


@contextlib.contextmanager
def driver_for(
    config: DriverConfig, run_dir: Path, name: str, ctx: zmq.Context | None = None
) -> Iterator[DriverLink]:
    """The config's driver node for the duration of a plan: attached to when
    `config.connect` names one, else started as `scopeloop driver serve` (and stopped)."""
    ctx = ctx or zmq.Context.instance()
    if config.connect is not None:
        yield attach(ctx, config.connect, keys=client_keys(config.client_auth))
        return
    from agent.engine.driver_process import DriverProcess

    resolved = resolve_endpoints(config)
    path = run_dir / f"driver-{name}.yaml"
    path.write_text(yaml.safe_dump({"kind": "driver", "driver": resolved.model_dump(mode="json")}))
    driver = DriverProcess(path, run_dir / f"driver-{name}.log")
    try:
        yield _wait_started(ctx, driver, resolved.command_endpoint, client_keys(config.client_auth))
    finally:
        driver.stop()
