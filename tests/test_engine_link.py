"""Plans reach drivers by endpoint: started for the config, or attached to one running;
a node that cannot serve the plan, or an endpoint nobody answers, fails in one line."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from rich.console import Console

from agent.config import ConfigError
from agent.engine.link import attach
from agent.plans.smart_acquisition import run_smart_acquisition
from drivers.config import DriverConfig
from drivers.serve import build_node

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "twin-smart-acquisition.yaml"
SMALL = ["grid.nx=3", "grid.ny=3", "revisit.timepoints=1", "record_frames=false"]


@pytest.fixture
def field_node(tmp_path: Path) -> Iterator[str]:
    """A sparse-field driver node already running (as `scopeloop driver serve` would)."""
    config = DriverConfig(
        kind="sparse-field",
        stream_endpoint=f"ipc://{tmp_path}/stream",
        command_endpoint=f"ipc://{tmp_path}/command",
        watchdog_ms=60_000,
        stream_hwm=10_000,
        seed=3,
        limits={"properties": {"Lamp.intensity": (0.0, 1.0)}},  # the plan sets the lamp
    )
    config.field.n_objects = 10
    config.field.area_um = (640.0, 640.0)
    node = build_node(config, ctx=zmq.Context())
    thread = threading.Thread(target=node.serve, daemon=True)
    thread.start()
    yield config.command_endpoint
    node.stop.set()
    thread.join(10)


def test_capabilities_name_the_stream_and_commands(field_node: str) -> None:
    link = attach(zmq.Context.instance(), field_node)
    assert link.stream_endpoint.startswith("ipc://") and link.stream_endpoint.endswith("stream")
    assert {"submit_events", "move_stage", "get_capabilities"} <= link.commands
    with pytest.raises(ConfigError) as info:
        link.require({"scan", "spectrum"}, "spm-active")
    message = str(info.value)
    assert "\n" not in message and "driver" in message and "scan, spectrum" in message


def test_smart_acquisition_attaches_to_a_running_driver(tmp_path: Path, field_node: str) -> None:
    summary = run_smart_acquisition(
        CONFIG,
        [f"runs_dir={tmp_path}", f"driver.connect={field_node}", "grid.origin_um=[64, 64]", *SMALL],
        Console(quiet=True),
    )
    assert summary["positions"] == 9 and summary["frames_screen"] == 9
    # the attached twin's objects (10 over 640 um) reached evaluation on its truth topic
    assert summary["objects_in_grid"] is not None and summary["objects_in_grid"] <= 10
    assert not (Path(summary["run_dir"]) / "driver-smart.log").exists()  # none started


def test_smart_acquisition_runs_on_micro_manager_demo_adapters(tmp_path: Path) -> None:
    summary = run_smart_acquisition(
        CONFIG,
        [
            f"runs_dir={tmp_path}",
            "driver.kind=mmcore",
            "driver.mm_config=demo",
            "lamp=null",
            "screen.intensity=1",
            "revisit.intensity=1",
            "screen.exposure_ms=1",
            "revisit.exposure_ms=5",
            "grid.origin_um=[0, 0]",
            *SMALL,
        ],
        Console(quiet=True),
    )
    assert summary["frames_screen"] == 9
    assert summary["object_recall"] is None  # real adapters publish no truth


def test_unreachable_endpoint_is_named_within_five_seconds(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody"
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        run_smart_acquisition(
            CONFIG, [f"runs_dir={tmp_path}", f"driver.connect={endpoint}"], Console(quiet=True)
        )
    assert time.monotonic() - t0 < 10  # probe is 5 s; generous for a loaded machine
    message = str(info.value)
    assert "driver.connect" in message and endpoint in message and "\n" not in message


def test_bad_connect_endpoint_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        run_smart_acquisition(CONFIG, ["driver.connect=host:5555"], Console(quiet=True))
    assert "driver.connect" in str(info.value) and "\n" not in str(info.value)


def test_lamp_free_rig_needs_full_intensity() -> None:
    with pytest.raises(ConfigError, match="lamp"):
        run_smart_acquisition(CONFIG, ["lamp=null"], Console(quiet=True))


def test_feedback_trap_attaches_to_a_running_driver(tmp_path: Path) -> None:
    """A driver node started by hand; the run uses it and leaves it running."""
    from agent.config import load_config
    from agent.plans.feedback_trap import run_experiment

    config = DriverConfig(
        stream_endpoint=f"ipc://{tmp_path}/s", command_endpoint=f"ipc://{tmp_path}/c"
    )
    node = build_node(config, ctx=zmq.Context())
    thread = threading.Thread(target=node.serve, daemon=True)
    thread.start()
    try:
        experiment = load_config(
            Path(__file__).resolve().parents[1] / "configs" / "twin-feedback-trap.yaml",
            [
                f"runs_dir={tmp_path}",
                "duration_s=1.0",
                "compare_free_diffusion=false",
                f"driver.connect={config.command_endpoint}",
            ],
        )
        _run_dir, summary = run_experiment(experiment)
        assert summary["steps"] > 5 and summary["commands_failed"] == 0
        assert thread.is_alive()  # not ours to stop
    finally:
        node.stop.set()
        thread.join(10)


SPM_CONFIG = CONFIG.parent / "twin-spm-sparse.yaml"
SPM_SHORT = ["grid=8", "policy.kind=random", "policy.budget=6", "policy.initial=2"]


def test_spm_plan_on_a_camera_node_fails_in_one_line(tmp_path: Path, field_node: str) -> None:
    from agent.plans.spm_active import run_spm_active

    with pytest.raises(ConfigError) as info:
        run_spm_active(
            SPM_CONFIG,
            [f"runs_dir={tmp_path}", f"driver.connect={field_node}", *SPM_SHORT],
            Console(quiet=True),
        )
    message = str(info.value)
    assert "\n" not in message and "spm-active" in message and "scan" in message


def test_spm_plan_drives_a_nanonis_controller_by_host_and_port(tmp_path: Path) -> None:
    """The twin's Nanonis server stands in for a real controller at host:port: the run
    knows only the address and its limits, so there is no truth to score against."""
    from agent.plans.spm_active import run_spm_active
    from drivers.spm_twin_backend import serve_spm

    server = serve_spm(port=0, seed=2)
    host, port = server.address
    try:
        summary = run_spm_active(
            SPM_CONFIG,
            [
                f"runs_dir={tmp_path}",
                "driver.source=nanonis",
                f"driver.nanonis_host={host}",
                f"driver.nanonis_port={port}",
                "driver.limits={x_um: [-1.0, 1.0], y_um: [-1.0, 1.0]}",
                *SPM_SHORT,
            ],
            Console(quiet=True),
        )
    finally:
        server.stop()
    assert summary["measured"] == 6 and summary["grid_points"] == 64
    assert "top1pct_found" not in summary


def test_spm_plan_attaches_to_a_running_spm_node(tmp_path: Path) -> None:
    from agent.plans.spm_active import run_spm_active
    from drivers.spm_host import SpmHost, SpmHostConfig

    host = SpmHost(SpmHostConfig(seed=1))
    try:
        summary = run_spm_active(
            SPM_CONFIG,
            [f"runs_dir={tmp_path}", f"driver.connect={host.command_endpoint}", *SPM_SHORT],
            Console(quiet=True),
        )
        assert summary["measured"] == 6
        # a smart-acquisition plan refuses the same SPM node before anything moves
        with pytest.raises(ConfigError, match="smart-acquisition"):
            run_smart_acquisition(
                CONFIG,
                [f"runs_dir={tmp_path}", f"driver.connect={host.command_endpoint}"],
                Console(quiet=True),
            )
    finally:
        host.close()


def test_nanonis_source_needs_limits(tmp_path: Path) -> None:
    from agent.plans.spm_active import run_spm_active

    with pytest.raises(ConfigError, match=r"driver\.limits"):
        run_spm_active(SPM_CONFIG, ["driver.source=nanonis"], Console(quiet=True))


@pytest.mark.parametrize(
    ("config", "override", "field"),
    [
        ("twin-feedback-trap.yaml", "policy.kind=gp", "policy.kind"),  # an SPM policy
        ("twin-spm-sparse.yaml", "policy.kind=pid", "policy.kind"),  # a trap controller
        ("twin-smart-acquisition.yaml", "driver.kind=nanonis", "driver.kind"),
        ("twin-feedback-trap.yaml", "driver.connect=tcp://host", "driver.connect"),
    ],
)
def test_a_plan_refuses_what_it_cannot_use_in_one_line(
    config: str, override: str, field: str
) -> None:
    from typer.testing import CliRunner

    from agent.cli import app

    result = CliRunner().invoke(app, ["run", str(CONFIG.parent / config), "--set", override])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.output


def test_a_node_bound_to_every_interface_is_reached_at_the_host_we_dialled() -> None:
    from agent.engine.link import _reachable_stream

    assert _reachable_stream("tcp://0.0.0.0:5556", "tcp://scope-pc:5555") == ("tcp://scope-pc:5556")
    assert _reachable_stream("tcp://10.0.0.2:5556", "tcp://scope-pc:5555") == (
        "tcp://10.0.0.2:5556"
    )
    assert _reachable_stream("ipc:///tmp/s", "ipc:///tmp/c") == "ipc:///tmp/s"


def test_a_driver_that_cannot_start_is_reported_with_its_own_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.cfg"
    with pytest.raises(ConfigError) as info:
        run_smart_acquisition(
            CONFIG,
            [f"runs_dir={tmp_path}", "driver.kind=mmcore", f"driver.mm_config={missing}"],
            Console(quiet=True),
        )
    message = str(info.value)
    assert "\n" not in message and "driver.mm_config" in message and str(missing) in message


def test_smart_acquisition_attaches_over_tcp_to_a_driver_process(tmp_path: Path) -> None:
    """`scopeloop driver serve` started on its own (as on the microscope's PC), reached
    by its tcp command endpoint only."""
    import socket
    import subprocess
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    command, stream = (f"tcp://127.0.0.1:{p}" for p in ports)
    sets = [
        "--set",
        f"driver.command_endpoint={command}",
        "--set",
        f"driver.stream_endpoint={stream}",
        "--set",
        "driver.watchdog_ms=60000",
        "--set",
        "driver.stream_hwm=10000",
    ]
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "driver", "serve", str(CONFIG), *sets],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        link = attach(zmq.Context.instance(), command, timeout_s=30.0)
        assert link.stream_endpoint == stream and link.truth
        summary = run_smart_acquisition(
            CONFIG,
            [f"runs_dir={tmp_path}", f"driver.connect={command}", *SMALL],
            Console(quiet=True),
        )
        assert summary["frames_screen"] == 9 and summary["objects_in_grid"] is not None
        assert proc.poll() is None  # still serving: not ours to stop
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_every_plan_is_one_registry_line_whose_entry_and_loader_resolve() -> None:
    from agent.engine.experiments import PLANS, RUN_CONFIG_LOADERS, RUN_KINDS, resolve

    assert set(RUN_KINDS) == set(RUN_CONFIG_LOADERS) == set(PLANS)
    for kind in PLANS:
        assert callable(resolve(kind, RUN_KINDS)) and callable(resolve(kind, RUN_CONFIG_LOADERS))
    assert RUN_KINDS["feedback-trap"].startswith("agent.plans.feedback_trap:")
