"""CURVE on tcp:// driver endpoints: key files, config errors, refused binds, and clients
without a key or with an unlisted key getting nothing through (127.0.0.1 only)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from drivers.auth import (
    ClientKeys,
    allow_client,
    check_bind,
    create_key_pair,
    list_keys,
    load_client_keys,
    load_server_keys,
    secure_client,
)
from drivers.config import ClientAuth, DriverConfig, ServerAuth
from drivers.mmcore_node import DriverNode
from drivers.protocol import HEARTBEAT_TOPIC
from drivers.serve import build_node
from drivers.transport import (
    CommandClient,
    CommandError,
    CommandTimeout,
    StreamPublisher,
    StreamSubscriber,
    connect_client,
)

ROOT = Path(__file__).resolve().parents[1]
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def keyring(tmp_path: Path) -> dict[str, Path]:
    """A node key pair, an allowed client, and a client nobody allowed."""
    keys = tmp_path / "keys"
    node_public, node_secret = create_key_pair(keys, "node")
    agent_public, agent_secret = create_key_pair(keys, "agent")
    _, stranger_secret = create_key_pair(tmp_path / "other", "stranger")
    allowed = tmp_path / "allowed"
    allow_client(agent_public, allowed)
    return {
        "node_public": node_public,
        "node_secret": node_secret,
        "agent_secret": agent_secret,
        "stranger_secret": stranger_secret,
        "allowed": allowed,
    }


def _client_keys(ring: dict[str, Path], who: str) -> ClientKeys:
    auth = ClientAuth(secret_key=str(ring[who]), server_public_key=str(ring["node_public"]))
    keys = load_client_keys(auth)
    assert keys is not None
    return keys


def _refused_handshake(
    ctx: zmq.Context, kind: int, endpoint: str, keys: ClientKeys | None, timeout_s: float = 10.0
) -> bool:
    """Whether a client socket set up as the transport does it (secure_client) is told no
    by the server; the monitor is attached before connecting, so no event is missed."""
    sock = ctx.socket(kind)
    monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        secure_client(sock, endpoint, keys)
        sock.connect(endpoint)
        if not monitor.poll(int(timeout_s * 1000)):
            return False
        return recv_monitor_message(monitor)["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close(linger=0)


# --- key files and config errors ---------------------------------------------------------


def test_key_pairs_are_private_listed_and_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    public, secret = create_key_pair(folder, "scope1")
    assert _mode(folder) == 0o700 and _mode(secret) == 0o600
    assert not _mode(public) & 0o022
    listed = list_keys(folder)
    assert [(k.name, k.has_secret) for k in listed] == [("scope1", True)]
    assert len(listed[0].public_key) == 40  # Z85 of 32 bytes
    with pytest.raises(ValueError, match="already exists"):
        create_key_pair(folder, "scope1")
    with pytest.raises(ValueError, match="NAME"):
        create_key_pair(folder, "../escape")


def test_allowing_a_secret_file_is_refused(keyring: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="holds a secret key"):
        allow_client(keyring["agent_secret"], keyring["allowed"])
    assert [p.name for p in keyring["allowed"].iterdir()] == ["agent.key"]


@pytest.mark.parametrize(
    ("auth", "field"),
    [
        (ServerAuth(secret_key="/nonexistent/node.key_secret", allowed_clients_dir="/tmp"),
         "driver.auth.secret_key"),
        (ServerAuth(secret_key="NODE_PUBLIC", allowed_clients_dir="/tmp"),
         "driver.auth.secret_key"),
        (ServerAuth(secret_key="NODE_SECRET"), "driver.auth.allowed_clients_dir"),
        (ServerAuth(secret_key="NODE_SECRET", allowed_clients_dir="/nonexistent/dir"),
         "driver.auth.allowed_clients_dir"),
    ],
)  # fmt: skip
def test_a_missing_or_wrong_server_key_names_its_field(
    keyring: dict[str, Path], auth: ServerAuth, field: str
) -> None:
    names = {"NODE_PUBLIC": keyring["node_public"], "NODE_SECRET": keyring["node_secret"]}
    if auth.secret_key in names:
        auth = auth.model_copy(update={"secret_key": str(names[auth.secret_key])})
    with pytest.raises(ValueError) as err:
        load_server_keys(auth)
    message = str(err.value)
    assert message.startswith(f"{field}:") and "\n" not in message


def test_a_missing_client_key_names_its_field(keyring: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=r"^driver\.client_auth\.server_public_key:"):
        load_client_keys(ClientAuth(secret_key=str(keyring["agent_secret"])))
    with pytest.raises(ValueError, match=r"^driver\.client_auth\.secret_key:.*does not exist"):
        load_client_keys(ClientAuth(secret_key="/no/such.key_secret", server_public_key="x"))


# --- binds --------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:*", "tcp://[::]:*", "tcp://eth0:*"])
def test_a_node_refuses_a_non_loopback_bind_without_keys(endpoint: str) -> None:
    config = DriverConfig(stream_endpoint=endpoint, command_endpoint="tcp://127.0.0.1:*")
    with pytest.raises(ValueError) as err:
        build_node(config, zmq.Context.instance())
    message = str(err.value)
    assert endpoint in message and "driver.stream_endpoint" in message and "\n" not in message


def test_driver_serve_refuses_0000_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "driver", "serve",
         str(ROOT / "configs" / "twin-feedback-trap.yaml"),
         "--set", "driver.command_endpoint=tcp://0.0.0.0:5999"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tcp://0.0.0.0:5999" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_ipc_endpoints_need_a_private_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ValueError, match="0700"):
        check_bind(f"ipc://{shared}/cmd", None, "driver.command_endpoint")
    with pytest.raises(ValueError, match="private directory"):
        check_bind("ipc://@abstract", None)
    shared.chmod(0o700)
    check_bind(f"ipc://{shared}/cmd", None)


def test_auto_endpoints_live_in_a_0700_directory() -> None:
    from drivers.serve import resolve_endpoints

    config = resolve_endpoints(DriverConfig())
    endpoints = (config.stream_endpoint, config.command_endpoint)
    (folder,) = {Path(endpoint[len("ipc://") :]).parent for endpoint in endpoints}
    assert _mode(folder) == 0o700 and folder.stat().st_uid == os.getuid()
    folder.rmdir()


# --- CURVE: who gets in -------------------------------------------------------------------


@pytest.fixture
def curve_node(
    keyring: dict[str, Path], run_node: Callable[[DriverNode], DriverNode]
) -> Iterator[DriverNode]:
    auth = ServerAuth(
        secret_key=str(keyring["node_secret"]), allowed_clients_dir=str(keyring["allowed"])
    )
    config = DriverConfig(
        stream_endpoint="tcp://127.0.0.1:*", command_endpoint="tcp://127.0.0.1:*", auth=auth
    )
    yield run_node(build_node(config, zmq.Context()))


def test_an_allowed_client_commands_and_receives_frames_over_curve(
    curve_node: DriverNode, keyring: dict[str, Path]
) -> None:
    ctx = zmq.Context()
    stream, command = curve_node.endpoints
    client = connect_client(ctx, stream, command, _client_keys(keyring, "agent_secret"), 5000)
    try:
        assert "laser" in client.commands.call("get_state").result
        deadline = time.monotonic() + 20
        frame = None
        while frame is None and time.monotonic() < deadline:
            frame = client.stream.recv_newest(timeout_ms=200)
        assert frame is not None and frame.data.size > 0
    finally:
        client.close()
        ctx.destroy(linger=0)


@pytest.mark.parametrize("who", [None, "stranger_secret"])
def test_clients_without_or_with_an_unlisted_key_get_nothing_through(
    curve_node: DriverNode, keyring: dict[str, Path], who: str | None
) -> None:
    ctx = zmq.Context()
    stream, command = curve_node.endpoints
    keys = _client_keys(keyring, who) if who else None
    intruder = CommandClient(ctx, command, timeout_ms=300, keys=keys)
    watcher = StreamSubscriber(ctx, stream, keys=keys)
    allowed_keys = _client_keys(keyring, "agent_secret")
    allowed = CommandClient(ctx, command, 5000, keys=allowed_keys)
    try:
        assert _refused_handshake(ctx, zmq.DEALER, command, keys)
        assert _refused_handshake(ctx, zmq.SUB, stream, keys)
        assert not _refused_handshake(ctx, zmq.DEALER, command, allowed_keys)
        with pytest.raises(CommandTimeout):
            intruder.call("set_laser", {"spots": [{"x_um": 5.0, "y_um": 5.0, "power_mw": 1.0}]})
        assert watcher.recv_newest(timeout_ms=300) is None and not watcher.messages
        state = allowed.call("get_state").result
        assert state["laser"] == [] and state["commands_handled"] == 0  # counted after replying
        assert state["commands_rejected"] == 0
    finally:
        for sock in (intruder, watcher, allowed):
            sock.close()
        ctx.destroy(linger=0)


# --- bounded messages -----------------------------------------------------------------------


def test_an_oversized_command_disconnects_its_sender_unread(
    curve_node: DriverNode, keyring: dict[str, Path], ipc_dir: Path
) -> None:
    from drivers.transport import COMMAND_MAX_BYTES

    ctx = zmq.Context()
    keys = _client_keys(keyring, "agent_secret")
    sender = CommandClient(ctx, curve_node.endpoints[1], timeout_ms=300, keys=keys)
    good = CommandClient(ctx, curve_node.endpoints[1], timeout_ms=5000, keys=keys)
    try:
        assert good.call("get_state").ok
        monitor = sender.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sender.socket.send(b"\x81" + bytes(2 * COMMAND_MAX_BYTES))
        assert monitor.poll(10_000), "the node kept a peer that sent an oversized command"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        sender.socket.disable_monitor()
        monitor.close()
        state = good.call("get_state").result
        assert state["commands_rejected"] == 0  # never read, so never even parsed
    finally:
        sender.close()
        good.close()
        ctx.destroy(linger=0)


def test_a_frame_larger_than_the_limit_never_reaches_the_subscriber(ipc_dir: Path) -> None:
    ctx = zmq.Context()
    pub = StreamPublisher(ctx, f"ipc://{ipc_dir}/s")
    sub = StreamSubscriber(ctx, pub.endpoint, max_frame_bytes=64 * 64 * 2)
    try:
        deadline = time.monotonic() + 5
        while not sub.messages:  # slow joiner
            assert time.monotonic() < deadline
            pub.publish(HEARTBEAT_TOPIC, {})
            sub.recv_newest(timeout_ms=20)
        monitor = sub.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        pub.publish_frame("camera", np.zeros((512, 512), np.uint16), 0, 0, {})
        assert monitor.poll(10_000)
        sub.socket.disable_monitor()
        monitor.close()
        assert sub.recv_newest(timeout_ms=100) is None
        assert sub.stats.received == 0
    finally:
        pub.close()
        sub.close()
        ctx.destroy(linger=0)


def test_largest_frame_follows_the_config() -> None:
    config = DriverConfig()
    camera = config.twin.camera
    assert config.largest_frame_bytes() >= camera.width_px * camera.height_px * 2
    assert DriverConfig(max_frame_bytes=4096).largest_frame_bytes() == 4096


def test_the_largest_legitimate_messages_still_pass_over_curve(
    keyring: dict[str, Path],
) -> None:
    """The limit is checked on CURVE's wire size: an exactly-largest frame and command
    must still arrive."""
    from drivers.protocol import Request
    from drivers.transport import COMMAND_MAX_BYTES, CommandServer

    ctx = zmq.Context()
    server_keys = load_server_keys(
        ServerAuth(
            secret_key=str(keyring["node_secret"]), allowed_clients_dir=str(keyring["allowed"])
        )
    )
    client_keys = _client_keys(keyring, "agent_secret")
    shape = (256, 256)
    pub = StreamPublisher(ctx, "tcp://127.0.0.1:*", keys=server_keys)
    sub = StreamSubscriber(ctx, pub.endpoint, keys=client_keys, max_frame_bytes=256 * 256 * 2)
    server = CommandServer(ctx, "tcp://127.0.0.1:*", keys=server_keys)
    client = CommandClient(ctx, server.endpoint, keys=client_keys)
    try:
        deadline = time.monotonic() + 10
        while not sub.messages:
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.publish(HEARTBEAT_TOPIC, {})
            sub.recv_newest(timeout_ms=20)
        pub.publish_frame("camera", np.ones(shape, np.uint16), 0, 0, {})
        frame = None
        while frame is None and time.monotonic() < deadline:
            frame = sub.recv_newest(timeout_ms=50)
        assert frame is not None and frame.data.shape == shape
        sizes = (
            Request(1, "get_state", {"pad": "x" * n}, 0).to_wire() for n in range(65_400, 65_536)
        )
        body = next(b for b in sizes if len(b) == COMMAND_MAX_BYTES)
        assert len(body) == COMMAND_MAX_BYTES
        client.socket.send(body)
        got = []
        while not got and time.monotonic() < deadline:
            got = server.poll(timeout_ms=50)
        assert got and got[0].request is not None and got[0].request.cmd == "get_state"
    finally:
        for sock in (pub, sub, server, client):
            sock.close()
        ctx.destroy(linger=0)


def test_an_slm_sized_command_buffer_passes_over_curve_and_a_larger_one_is_never_sent(
    keyring: dict[str, Path],
) -> None:
    """A 1920 x 1152 uint8 hologram (a common phase SLM) is exactly the command socket's
    buffer limit: it arrives whole over CURVE; one column more is refused before sending."""
    from drivers.transport import CommandServer

    ctx = zmq.Context()
    server_keys = load_server_keys(
        ServerAuth(
            secret_key=str(keyring["node_secret"]), allowed_clients_dir=str(keyring["allowed"])
        )
    )
    limit = 1152 * 1920
    server = CommandServer(ctx, "tcp://127.0.0.1:*", keys=server_keys, max_buffer_bytes=limit)
    keys = _client_keys(keyring, "agent_secret")
    client = CommandClient(ctx, server.endpoint, keys=keys, max_buffer_bytes=limit)
    try:
        image = np.random.default_rng(0).integers(0, 256, (1152, 1920), dtype=np.uint8)
        client.send("set_slm_image", {"image": image})
        got = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got = server.poll(timeout_ms=50)
        assert got and got[0].request is not None, got and got[0].error
        np.testing.assert_array_equal(got[0].request.args["image"], image)
        with pytest.raises(CommandError, match=rf"\[0, {limit}\] bytes"):
            client.send("set_slm_image", {"image": np.zeros((1152, 1921), np.uint8)})
    finally:
        client.close()
        server.close()
        ctx.destroy(linger=0)
