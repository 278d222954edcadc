"""Transport bench: protocol v1 against raw pyzmq zero-copy, same machine, same run.

- throughput: frames/s delivered for 512x512 and 2048x2048 uint16, our PUB/SUB
  stream (headers, sequence numbers, zero-copy buffers) vs raw PUSH/PULL;
- round trip: frame published -> command received back at the driver, our
  stream + ROUTER/DEALER vs raw PUSH/PUSH, p50/p99;
- memory: 512x512 at 100 fps for 60 s; resident-memory growth of both ends;
- encryption: our stream over plain tcp:// against the same over CURVE-authenticated
  tcp:// (keys made for the run, drivers/auth.py), interleaved; `curve_ratio_*` is
  the share of plain-tcp throughput left with CURVE.
Sender and receiver run in separate processes, as driver and agent do.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from drivers.auth import (
    allow_client,
    create_key_pair,
    load_client_keys,
    load_server_keys,
)
from drivers.config import ClientAuth, ServerAuth
from drivers.protocol import now_ns
from drivers.transport import CommandServer, StreamPublisher, connect_client

Log = Callable[[str], None]
SIZES = {"512": (512, 512), "2048": (2048, 2048)}
WINDOW = 16  # frames in flight in the throughput test, below the stream high-water mark


def _frame(shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4096, size=shape, dtype=np.uint16)


# --- sender processes --------------------------------------------------------


def _ours_sender(
    stream: str,
    command: str,
    shape: tuple[int, int],
    mode: str,
    n: int,
    rate_hz: float,
    duration_s: float,
    auth: ServerAuth | None,
    out: Any,
) -> None:
    """Publish up to n frames within duration_s: paced at rate_hz, or as fast as possible."""
    ctx = zmq.Context()
    keys = load_server_keys(auth)
    pub = StreamPublisher(ctx, stream, keys=keys)
    server = CommandServer(ctx, command, keys=keys)
    frame = _frame(shape)
    rss: list[tuple[float, float]] = []
    rtts: list[float] = []
    out.put({"stream": pub.endpoint, "command": server.endpoint})
    _wait_go(server)
    t_start = time.perf_counter()
    sent = acked = 0
    for i in range(n):
        if mode == "rtt":
            t0 = now_ns()
            pub.publish_frame("camera", frame, t0, t0, {"i": i})
            got = _await_command(server, 2000)
            if got is not None:
                server.reply(got, _ok_reply(got))
                rtts.append((now_ns() - t0) / 1e6)
        else:
            if not rate_hz:  # throughput: a credit window keeps the stream lossless
                acked = _await_credit(server, sent, acked)
            pub.publish_frame("camera", frame, 0, 0, {"i": i})
            if rate_hz:
                _pace(t_start, i + 1, rate_hz, rss)
        sent += 1
        if duration_s and time.perf_counter() - t_start > duration_s:
            break
    out.put({"rtts": rtts, "rss": rss, "sent": sent, "elapsed": time.perf_counter() - t_start})
    time.sleep(0.2)
    pub.close()
    server.close()
    ctx.term()


def _raw_sender(
    stream: str, back: str, shape: tuple[int, int], mode: str, n: int, out: Any
) -> None:
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(stream)
    pull = ctx.socket(zmq.PULL)
    pull.bind(back)
    frame = _frame(shape)
    rtts: list[float] = []
    out.put({"stream": stream, "command": back})
    pull.recv()  # go
    t_start = time.perf_counter()
    for _ in range(n):
        t0 = now_ns()
        push.send(frame, copy=False)
        if mode == "rtt":
            pull.recv()
            rtts.append((now_ns() - t0) / 1e6)
    out.put({"rtts": rtts, "rss": [], "sent": n, "elapsed": time.perf_counter() - t_start})
    pull.poll(60_000)  # the receiver's "done": closing earlier would drop queued frames
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()


def _pace(t_start: float, i: int, rate_hz: float, rss: list[tuple[float, float]]) -> None:
    if i % int(rate_hz) == 0:
        rss.append((time.perf_counter() - t_start, psutil.Process().memory_info().rss / 2**20))
    delay = t_start + i / rate_hz - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _await_credit(server: CommandServer, sent: int, acked: int) -> int:
    """Block while WINDOW frames are unacknowledged; return the newest acknowledged count."""
    while True:
        timeout = 1000 if sent - acked >= WINDOW else 0
        incoming = server.poll(timeout_ms=timeout)
        for item in incoming:
            if item.request is not None and item.request.cmd == "ack":
                acked = max(acked, int(item.request.args.get("received", 0)))
        if sent - acked < WINDOW or not incoming:
            return acked


def _wait_go(server: CommandServer) -> None:
    got = _await_command(server, 30_000)
    if got is not None:
        server.reply(got, _ok_reply(got))


def _await_command(server: CommandServer, timeout_ms: int) -> Any:
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        for incoming in server.poll(timeout_ms=50):
            return incoming
    return None


def _ok_reply(incoming: Any) -> Any:
    from drivers.protocol import Reply

    return Reply(
        incoming.request.id if incoming.request else None,
        True,
        {},
        t_received_ns=incoming.t_received_ns,
        t_done_ns=now_ns(),
    )


# --- receiving side ------------------------------------------------------------


def _endpoints(folder: Path, tag: str) -> tuple[str, str]:
    return f"ipc://{folder}/{tag}-a", f"ipc://{folder}/{tag}-b"


def _start(target: Callable[..., None], *args: Any) -> tuple[Any, Any, dict[str, str]]:
    """The sender process, its result queue, and the endpoints it bound."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, out), daemon=True)
    proc.start()
    ready = out.get(timeout=60)
    if not isinstance(ready, dict):
        raise RuntimeError("bench sender did not start")
    return proc, out, ready


@dataclass(frozen=True)
class Link:
    """How the bench's sender and receiver talk: ipc, plain tcp, or CURVE tcp."""

    name: str
    server: ServerAuth | None = None
    client: ClientAuth | None = None


def _curve_link(folder: Path) -> Link:
    """Key pairs for this run: the sender is the server, the receiver an allowed client."""
    node_public, node_secret = create_key_pair(folder / "keys", "node")
    agent_public, agent_secret = create_key_pair(folder / "keys", "agent")
    allow_client(agent_public, folder / "allowed")
    return Link(
        "curve",
        ServerAuth(secret_key=str(node_secret), allowed_clients_dir=str(folder / "allowed")),
        ClientAuth(secret_key=str(agent_secret), server_public_key=str(node_public)),
    )


def _ours(
    folder: Path,
    shape: tuple[int, int],
    mode: str,
    n: int,
    rate_hz: float = 0.0,
    duration_s: float = 0.0,
    link: Link = Link("ipc"),
) -> dict[str, Any]:
    if link.name == "ipc":
        stream, command = _endpoints(folder, f"ours-{mode}-{shape[0]}")
    else:
        stream = command = "tcp://127.0.0.1:*"
    proc, out, bound = _start(
        _ours_sender, stream, command, shape, mode, n, rate_hz, duration_s, link.server
    )
    ctx = zmq.Context()
    driver = connect_client(
        ctx,
        bound["stream"],
        bound["command"],
        load_client_keys(link.client),
        timeout_ms=2000,
        max_frame_bytes=int(np.prod(shape)) * 2,
    )
    sub, client = driver.stream, driver.commands
    time.sleep(0.3)  # let the subscription propagate before the first frame
    client.call("go")
    received, rss = 0, []
    t_first = t_last = None
    deadline = time.perf_counter() + duration_s * 1.5 + 30.0
    next_rss = 0.0
    while time.perf_counter() < deadline:
        frame = sub.recv_newest(timeout_ms=500)
        if frame is None:
            if received and not proc.is_alive():
                break
            continue
        now = time.perf_counter()
        t_first = t_first or now
        t_last = now
        received = sub.stats.received
        if mode == "rtt" or not rate_hz:  # the paced soak runs without credits
            client.send("ack", {"received": received}, reply=False)
        if mode == "rtt" and received >= n:
            break
        if mode == "stream" and now - (t_first or now) >= next_rss:
            rss.append((now - t_first, psutil.Process().memory_info().rss / 2**20))
            next_rss += 1.0
        if received >= n:
            break
    result = out.get(timeout=60)
    proc.join(10)
    sub.close()
    client.close()
    ctx.term()
    span = (t_last or 0) - (t_first or 0)
    return {
        **result,
        "received": received,
        "fps": (received - 1) / span if span > 0 else 0.0,
        "rss_receiver": rss,
    }


def _raw(folder: Path, shape: tuple[int, int], mode: str, n: int) -> dict[str, Any]:
    stream, back = _endpoints(folder, f"raw-{mode}-{shape[0]}")
    proc, out, _ = _start(_raw_sender, stream, back, shape, mode, n)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVTIMEO, 30_000)  # a lost sender raises instead of hanging
    pull.connect(stream)
    push = ctx.socket(zmq.PUSH)
    push.connect(back)
    push.send(b"go")
    t_first = t_last = 0.0
    for i in range(n):
        msg = pull.recv(copy=False)
        np.frombuffer(msg.buffer, dtype=np.uint16)  # same view the protocol makes
        if i == 0:
            t_first = time.perf_counter()
        t_last = time.perf_counter()
        if mode == "rtt":
            push.send(b"ack")
    push.send(b"done")
    result = out.get(timeout=60)
    proc.join(10)
    pull.close(linger=0)
    push.close(linger=0)
    ctx.term()
    span = t_last - t_first
    return {**result, "received": n, "fps": (n - 1) / span if span > 0 else 0.0}


def _growth(samples: list[tuple[float, float]], warmup_s: float) -> float:
    """RSS at the end minus RSS after warm-up (MB); allocator start-up is not a leak."""
    after = [mb for t, mb in samples if t >= warmup_s]
    return after[-1] - after[0] if len(after) >= 2 else 0.0


def _encryption_cost(folder: Path, rounds: int, burst_s: float, log: Log) -> dict[str, float]:
    """Our stream over plain tcp and over CURVE tcp, interleaved, median of each."""
    links = (Link("tcp"), _curve_link(folder))
    metrics: dict[str, float] = {}
    for key, shape in SIZES.items():
        fps: dict[str, list[float]] = {link.name: [] for link in links}
        for _ in range(rounds):
            for link in links:
                result = _ours(folder, shape, "stream", 10**9, duration_s=burst_s, link=link)
                fps[link.name].append(result["fps"])
        metrics[f"fps_tcp_{key}"] = float(np.median(fps["tcp"]))
        metrics[f"fps_curve_{key}"] = float(np.median(fps["curve"]))
        metrics[f"curve_ratio_{key}"] = metrics[f"fps_curve_{key}"] / metrics[f"fps_tcp_{key}"]
        log(
            f"{key}x{key} over tcp: plain {metrics[f'fps_tcp_{key}']:.0f} fps, CURVE "
            f"{metrics[f'fps_curve_{key}']:.0f} fps (ratio {metrics[f'curve_ratio_{key}']:.2f})"
        )
    return metrics


def run(quick: bool = False, log: Log = print) -> dict[str, float]:
    metrics: dict[str, float] = {}
    counts = {"512": 1500 if quick else 8000, "2048": 100 if quick else 600}
    burst_s = 0.5 if quick else 2.0
    with tempfile.TemporaryDirectory(prefix="slb-") as tmp:
        folder = Path(tmp)
        rounds = 1 if quick else 3
        for key, shape in SIZES.items():
            n = counts[key]
            # Interleave raw and ours, median of each: one noisy moment cannot decide the ratio.
            raw_fps, ours_fps = [], []
            for _ in range(rounds):
                raw_fps.append(_raw(folder, shape, "stream", n)["fps"])
                ours = _ours(folder, shape, "stream", 10**9, duration_s=burst_s)
                ours_fps.append(ours["fps"])
                log(
                    f"{key}x{key}: raw {raw_fps[-1]:.0f} fps, ours {ours_fps[-1]:.0f} fps "
                    f"({ours['received']} of {ours['sent']} published frames delivered)"
                )
            metrics[f"raw_fps_{key}"] = float(np.median(raw_fps))
            metrics[f"fps_{key}"] = float(np.median(ours_fps))
            metrics[f"throughput_ratio_{key}"] = metrics[f"fps_{key}"] / metrics[f"raw_fps_{key}"]
        metrics.update(_encryption_cost(folder, rounds, burst_s, log))
        n_rtt = 200 if quick else 2000
        raw = _raw(folder, SIZES["512"], "rtt", n_rtt)
        ours = _ours(folder, SIZES["512"], "rtt", n_rtt)
        metrics["raw_rtt_p50_ms"] = float(np.percentile(raw["rtts"], 50))
        metrics["raw_rtt_p99_ms"] = float(np.percentile(raw["rtts"], 99))
        metrics["rtt_p50_ms"] = float(np.percentile(ours["rtts"], 50))
        metrics["rtt_p99_ms"] = float(np.percentile(ours["rtts"], 99))
        log(
            f"round trip 512x512: raw p99 {metrics['raw_rtt_p99_ms']:.3f} ms, "
            f"ours p99 {metrics['rtt_p99_ms']:.3f} ms"
        )
        duration = 10.0 if quick else 60.0
        rate = 100.0
        soak = _ours(folder, SIZES["512"], "stream", int(duration * rate), rate, duration)
        warmup = 2.0 if quick else 5.0
        metrics["soak_s"] = duration
        metrics["soak_frames_delivered"] = float(soak["received"])
        metrics["rss_growth_publisher_mb"] = _growth(soak["rss"], warmup)
        metrics["rss_growth_subscriber_mb"] = _growth(soak["rss_receiver"], warmup)
        metrics["rss_growth_mb"] = max(
            metrics["rss_growth_publisher_mb"], metrics["rss_growth_subscriber_mb"]
        )
        log(
            f"soak {duration:.0f} s at {rate:.0f} fps: RSS growth {metrics['rss_growth_mb']:.2f} MB"
        )
    return metrics
