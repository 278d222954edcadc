"""A run's control socket obeys only who may reach it: ipc in a private 0700 directory by
default, CURVE with an allow-list on tcp:// (refused without keys, even on loopback);
oversized control messages are dropped unread."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import zmq

from agent.engine.telemetry import RunTelemetry, read_telemetry_info, send_control
from drivers.auth import (
    ClientKeys,
    allow_client,
    create_key_pair,
    load_client_keys,
    load_server_keys,
)
from drivers.config import ClientAuth, ServerAuth
from drivers.transport import COMMAND_MAX_BYTES


def _control(
    tm: RunTelemetry, cmd: str, keys: ClientKeys | None = None, timeout_ms: int = 5000
) -> tuple[dict[str, Any] | Exception, list[str]]:
    """Send one control request from another thread while this one runs the loop's
    poll_control; the reply (or the error) and what the run accepted."""
    result: list[dict[str, Any] | Exception] = []

    def ask() -> None:
        try:
            result.append(send_control(tm.endpoints.control, cmd, timeout_ms, tm.ctx, keys))
        except TimeoutError as exc:
            result.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    accepted: list[str] = []
    while thread.is_alive():
        accepted += tm.poll_control()
        thread.join(0.01)
    accepted += tm.poll_control()
    return result[0], accepted


def test_default_endpoints_are_ipc_in_a_private_directory(
    zmq_ctx: zmq.Context, tmp_path: Path
) -> None:
    tm = RunTelemetry("private", zmq_ctx)
    try:
        tm.write_info(tmp_path)
        info = read_telemetry_info(tmp_path)
        assert info is not None
        folders = {Path(e[len("ipc://") :]).parent for e in (info.publish, info.control)}
        assert all(e.startswith("ipc://") for e in (info.publish, info.control))
        (folder,) = folders
        mode = stat.S_IMODE(folder.stat().st_mode)
        assert mode == 0o700 and folder.stat().st_uid == os.getuid()
        assert info.max_part_bytes >= 512 * 512 * 8
        reply, accepted = _control(tm, "pause")
        assert isinstance(reply, dict) and reply["ok"] and accepted == ["pause"]
    finally:
        tm.close()
    assert not folder.exists()


@pytest.mark.parametrize("which", ["publish_endpoint", "control_endpoint"])
def test_tcp_telemetry_without_keys_is_refused_even_on_loopback(
    zmq_ctx: zmq.Context, which: str
) -> None:
    with pytest.raises(ValueError, match="needs CURVE keys") as err:
        RunTelemetry("open", zmq_ctx, **{which: "tcp://127.0.0.1:*"})
    assert "tcp://127.0.0.1:*" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, object]:
    run_public, run_secret = create_key_pair(tmp_path / "keys", "run")
    dash_public, dash_secret = create_key_pair(tmp_path / "keys", "dashboard")
    _, stranger_secret = create_key_pair(tmp_path / "other", "stranger")
    allow_client(dash_public, tmp_path / "allowed")
    server = load_server_keys(
        ServerAuth(secret_key=str(run_secret), allowed_clients_dir=str(tmp_path / "allowed"))
    )

    def client(secret: Path) -> ClientKeys | None:
        auth = ClientAuth(secret_key=str(secret), server_public_key=str(run_public))
        return load_client_keys(auth, "dashboard.auth")

    return {"server": server, "dashboard": client(dash_secret), "stranger": client(stranger_secret)}


def test_curve_control_takes_pause_only_from_an_allowed_key(
    zmq_ctx: zmq.Context, keys: dict[str, object], tmp_path: Path
) -> None:
    tcp = "tcp://127.0.0.1:*"
    tm = RunTelemetry("curve", zmq_ctx, tcp, tcp, keys=keys["server"])  # type: ignore[arg-type]
    tm.write_info(tmp_path)
    tm.set_state("running")
    try:
        info = read_telemetry_info(tmp_path)
        assert info is not None and info.server_public_key is not None
        for who in (None, keys["stranger"]):
            reply, accepted = _control(tm, "stop", who, timeout_ms=300)  # type: ignore[arg-type]
            assert isinstance(reply, TimeoutError) and accepted == [] and tm.state == "running"
        reply, accepted = _control(tm, "pause", keys["dashboard"])  # type: ignore[arg-type]
        assert isinstance(reply, dict) and reply["state"] == "paused" and accepted == ["pause"]
    finally:
        tm.close()


def test_an_oversized_control_message_is_dropped_unread(zmq_ctx: zmq.Context) -> None:
    tm = RunTelemetry("big", zmq_ctx)
    sock = zmq_ctx.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(tm.endpoints.control)
        sock.send(bytes(2 * COMMAND_MAX_BYTES))
        assert monitor.poll(10_000), "the run kept a peer that sent an oversized message"
        assert tm.poll_control() == [] and tm.state == "starting"
        reply, _ = _control(tm, "status")  # still serving
        assert isinstance(reply, dict) and reply["ok"]
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close(linger=0)
        tm.close()
