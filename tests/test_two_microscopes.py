"""Two microscopes from one agent host: two driver nodes in their own processes, each
with its own key directory (as two microscope PCs would have), both on 127.0.0.1 over
CURVE-authenticated tcp; one sweep drives both, and a client without keys drives neither."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
import zmq

from agent.config import ConfigError
from agent.engine.link import attach
from drivers.auth import allow_client, create_key_pair

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "twin-feedback-trap.yaml"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def two_scopes(tmp_path: Path) -> Iterator[list[dict[str, str]]]:
    """Two `scopeloop driver serve` processes, each allowing only the lab agent's key;
    yields what the agent host needs per scope: endpoint and key files."""
    agent_public, agent_secret = create_key_pair(tmp_path / "agent-host", "lab-agent")
    scopes, procs, logs = [], [], []
    for name, (command_port, stream_port) in zip(
        ("scope-a", "scope-b"), [_free_ports(2), _free_ports(2)], strict=True
    ):
        home = tmp_path / name  # this microscope PC's own key directory
        node_public, node_secret = create_key_pair(home / "keys", name)
        allow_client(agent_public, home / "allowed")
        command = f"tcp://127.0.0.1:{command_port}"
        sets = [
            f"driver.command_endpoint={command}",
            f"driver.stream_endpoint=tcp://127.0.0.1:{stream_port}",
            f"driver.auth.secret_key={node_secret}",
            f"driver.auth.allowed_clients_dir={home / 'allowed'}",
            "driver.watchdog_ms=60000",
        ]
        log = (tmp_path / f"{name}.log").open("w")
        args = [sys.executable, "-m", "agent.cli", "driver", "serve", str(CONFIG)]
        for item in sets:
            args += ["--set", item]
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        logs.append(log)
        scopes.append(
            {
                "driver.connect": command,
                "driver.client_auth.secret_key": str(agent_secret),
                "driver.client_auth.server_public_key": str(node_public),
            }
        )
    try:
        yield scopes
    finally:
        for proc, log in zip(procs, logs, strict=True):
            proc.terminate()
            proc.wait(10)
            log.close()


def test_one_sweep_drives_two_curve_authenticated_microscopes(
    tmp_path: Path, two_scopes: list[dict[str, str]]
) -> None:
    from agent.engine.link import client_keys
    from drivers.config import ClientAuth

    ctx = zmq.Context.instance()
    for scope in two_scopes:  # up and authenticated (the nodes take seconds to import)
        auth = ClientAuth(
            secret_key=scope["driver.client_auth.secret_key"],
            server_public_key=scope["driver.client_auth.server_public_key"],
        )
        link = attach(ctx, scope["driver.connect"], timeout_s=60.0, keys=client_keys(auth))
        assert link.stream_endpoint.startswith("tcp://127.0.0.1:") and link.keys is not None
    # Without keys, a node never answers: named as unreachable, and nothing moved.
    with pytest.raises(ConfigError, match=r"driver\.connect: no driver node answered"):
        attach(ctx, two_scopes[0]["driver.connect"], timeout_s=2.0)

    listed = tmp_path / "scopes.yaml"
    listed.write_text(yaml.safe_dump(two_scopes))
    out = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "sweep",
            str(CONFIG),
            "--settings",
            str(listed),
            "--set",
            "duration_s=1.5",
            "--set",
            "compare_free_diffusion=false",
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert sorted(p["setting"]["driver.connect"] for p in points) == sorted(
        s["driver.connect"] for s in two_scopes
    )
    for point in points:
        assert point["status"] == "ok", point["error"]
        assert point["metrics"]["frames_received"] > 0 and point["metrics"]["steps"] > 0
        snapshot = yaml.safe_load((Path(point["run_dir"]) / "config.yaml").read_text())
        assert snapshot["driver"]["connect"] == point["setting"]["driver.connect"]
