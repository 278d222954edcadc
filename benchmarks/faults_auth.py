"""Fault figures for authentication and bounded messages, against a twin driver node in
its own process (`scopeloop driver serve`, as deployed) on CURVE tcp://127.0.0.1.

- `unauthenticated_accepted`: commands answered or handled, frames delivered and run
  control requests obeyed for clients with no key or with a key not on the allow-list
  (driver command + stream sockets, a run's CURVE control socket). Must be 0. Counted
  from the node's own `commands_handled` and laser state (read by an allowed client)
  as well as from what the intruders received.
- `rss_growth_mb_oversized`: growth of the driver's resident memory while an allowed
  client sent it 200 MB messages (`rss_growth_mb_quiet_window`: over as long without).

`benchmarks.faults` calls `measure(quick, log)`; run this file to print its JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import zmq

from agent.engine.telemetry import RunTelemetry, send_control
from drivers.auth import (
    ClientKeys,
    allow_client,
    create_key_pair,
    load_client_keys,
    load_server_keys,
    secure_client,
)
from drivers.config import ClientAuth, ServerAuth
from drivers.transport import CommandClient, CommandTimeout, StreamSubscriber

Log = Callable[[str], None]
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "twin-feedback-trap.yaml"
OVERSIZED_BYTES = 200 * 2**20
RING_MB = 16  # the twin camera's frames are 128 KB: 128 of them
SET_LASER = {"spots": [{"x_um": 5.0, "y_um": 5.0, "power_mw": 1.0}]}


class Keyring:
    """A node key pair, one allowed client and one client nobody allowed."""

    def __init__(self, folder: Path) -> None:
        self.node_public, node_secret = create_key_pair(folder / "keys", "node")
        agent_public, agent_secret = create_key_pair(folder / "keys", "agent")
        _, stranger_secret = create_key_pair(folder / "strangers", "stranger")
        allowed = folder / "allowed"
        allow_client(agent_public, allowed)
        self.server = ServerAuth(secret_key=str(node_secret), allowed_clients_dir=str(allowed))
        self.agent = self._client(agent_secret)
        self.stranger = self._client(stranger_secret)

    def _client(self, secret: Path) -> ClientKeys:
        auth = ClientAuth(secret_key=str(secret), server_public_key=str(self.node_public))
        keys = load_client_keys(auth)
        assert keys is not None
        return keys


def _start_driver(ring: Keyring, log_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """`scopeloop driver serve` on CURVE tcp://127.0.0.1; its process and endpoints."""
    assert ring.server.secret_key and ring.server.allowed_clients_dir
    command = [
        sys.executable, "-m", "agent.cli", "driver", "serve", str(CONFIG),
        "--set", "driver.stream_endpoint=tcp://127.0.0.1:*",
        "--set", "driver.command_endpoint=tcp://127.0.0.1:*",
        "--set", f"driver.auth.secret_key={ring.server.secret_key}",
        "--set", f"driver.auth.allowed_clients_dir={ring.server.allowed_clients_dir}",
        "--set", "driver.watchdog_ms=60000",
    ]  # fmt: skip
    # UniMMCore's frame ring is a fixed arena (1 GB by default) whose pages the twin touches
    # for the first minutes, a few MB/s; a small one keeps the driver's RSS flat, so what
    # the oversized messages add is not hidden in it.
    env = {**os.environ, "UNICORE_SEQUENCE_BUFFER_MB": str(RING_MB)}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        match = re.search(r"driver ready: stream=(\S+) command=(\S+)", log_path.read_text())
        if match:
            return proc, match.group(1), match.group(2)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"driver did not start: {log_path.read_text()[-500:]}")


def _intruder_commands(ctx: zmq.Context, endpoint: str, keys: ClientKeys | None, n: int) -> int:
    """Replies an intruder got to n actuating commands (each waits briefly)."""
    client = CommandClient(ctx, endpoint, timeout_ms=50, keys=keys)
    answered = 0
    try:
        for i in range(n):
            cmd, args = ("set_laser", SET_LASER) if i % 2 == 0 else ("move_stage", {"x_um": 50})
            try:
                client.call(cmd, args)
                answered += 1
            except CommandTimeout:
                pass
            except Exception:  # an error reply is still an answer from the node
                answered += 1
    finally:
        client.close()
    return answered


def _intruder_frames(ctx: zmq.Context, endpoint: str, keys: ClientKeys | None, s: float) -> int:
    sub = StreamSubscriber(ctx, endpoint, keys=keys)
    got = 0
    deadline = time.monotonic() + s
    try:
        while time.monotonic() < deadline:
            if sub.recv_newest(timeout_ms=50) is not None or sub.messages:
                got += 1
                sub.take_messages()
    finally:
        sub.close()
    return got


def _control_accepted(ring: Keyring, ctx: zmq.Context, attempts: int) -> int:
    """pause/stop obeyed by a run's CURVE control socket from keyless / unlisted clients."""
    tcp = "tcp://127.0.0.1:*"
    tm = RunTelemetry("faults", ctx, tcp, tcp, keys=load_server_keys(ring.server))
    tm.set_state("running")
    accepted: list[str] = []
    done = threading.Event()

    def intrude() -> None:
        try:
            for i in range(attempts):
                keys = None if i % 2 == 0 else ring.stranger
                with contextlib.suppress(TimeoutError):
                    send_control(tm.endpoints.control, ("pause", "stop")[i % 2], 50, ctx, keys)
        finally:
            done.set()

    thread = threading.Thread(target=intrude)
    thread.start()
    try:
        while not done.is_set():
            accepted += tm.poll_control()
            time.sleep(0.005)
        thread.join()
        accepted += tm.poll_control()
        if tm.state != "running":
            accepted.append(tm.state)
    finally:
        tm.close()
    return len(accepted)


def _seen(state: dict[str, Any]) -> int:
    """Commands the node read and acted on or refused (either way, it let them in)."""
    return int(state["commands_handled"]) + int(state["commands_rejected"])


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _oversized(
    ctx: zmq.Context, endpoint: str, ring: Keyring, pid: int, count: int, log: Log
) -> dict[str, float]:
    """Driver RSS growth over a window with `count` 200 MB messages, and over a window as
    long without them (what the node grows by anyway)."""
    blob = bytes(OVERSIZED_BYTES)
    probe = CommandClient(ctx, endpoint, timeout_ms=10_000, keys=ring.agent)
    try:
        probe.call("get_state")
        time.sleep(2.0)  # start-up allocations of the streaming node
        t0, before = time.monotonic(), _rss_mb(pid)
        kept = sum(not _send_oversized(endpoint, ring.agent, blob) for _ in range(count))
        time.sleep(1.0)
        window_s, raw = time.monotonic() - t0, _rss_mb(pid) - before
        quiet_start = _rss_mb(pid)
        time.sleep(window_s)
        quiet = _rss_mb(pid) - quiet_start
        alive = probe.call("get_state").ok
    finally:
        probe.close()
    log(
        f"{count} x {OVERSIZED_BYTES / 2**20:.0f} MB messages: driver RSS +{raw:.1f} MB in "
        f"{window_s:.1f} s, +{quiet:.1f} MB in as long without them; node answering: {alive}"
    )
    return {
        "rss_growth_mb_oversized": raw,
        "rss_growth_mb_quiet_window": quiet,
        "oversized_window_s": window_s,
        "oversized_messages": float(count),
        "oversized_senders_not_dropped": float(kept),
        "node_alive_after_oversized": float(alive),
    }


def _send_oversized(endpoint: str, keys: ClientKeys, blob: bytes) -> bool:
    """One oversized message from an allowed client; whether the node hung up on it."""
    sender = zmq.Context()  # a fresh peer each time: the node dropped the last one
    sock = sender.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        secure_client(sock, endpoint, keys)
        sock.connect(endpoint)
        sock.send(blob, copy=False)
        return bool(monitor.poll(20_000))
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close(linger=0)
        sender.term()


def measure(quick: bool, log: Log = print) -> dict[str, Any]:
    n_commands = 40 if quick else 400
    listen_s = 1.0 if quick else 3.0
    with tempfile.TemporaryDirectory(prefix="slf-") as tmp:
        folder = Path(tmp)
        ring = Keyring(folder)
        proc, stream, command = _start_driver(ring, folder / "driver.log")
        ctx = zmq.Context()
        try:
            allowed = CommandClient(ctx, command, timeout_ms=10_000, keys=ring.agent)
            handled_before = _seen(allowed.call("get_state").result)
            replies = frames = 0
            for keys in (None, ring.stranger):
                replies += _intruder_commands(ctx, command, keys, n_commands)
                frames += _intruder_frames(ctx, stream, keys, listen_s)
            state = allowed.call("get_state").result
            handled = _seen(state) - handled_before - 1  # our own get_state
            laser_on = int(bool(state["laser"]))
            control = _control_accepted(ring, ctx, 20 if quick else 100)
            allowed.close()
            log(
                f"intruders: {2 * n_commands} commands -> {replies} replies, {handled} handled; "
                f"{frames} stream messages; {control} control requests obeyed; laser on: "
                f"{bool(laser_on)}"
            )
            metrics: dict[str, Any] = {
                "unauthenticated_accepted": replies + max(handled, 0) + frames + control + laser_on,
                "unauthenticated_commands_sent": 2 * n_commands,
                "unauthenticated_replies": replies,
                "unauthenticated_handled": handled,
                "unauthenticated_frames": frames,
                "unauthenticated_control_accepted": control,
            }
            metrics.update(_oversized(ctx, command, ring, proc.pid, 3 if quick else 10, log))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            ctx.destroy(linger=0)
    return metrics


if __name__ == "__main__":
    quick = "--full" not in sys.argv
    metrics = measure(quick, lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({"bench": "faults_auth", "metrics": metrics}))
