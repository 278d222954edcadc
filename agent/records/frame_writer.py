"""Frame recording off the plan's path: a writer process fed over a local socket.

A loop that acts on every frame within milliseconds must not wait for a disk, nor for
the Python lock: tensorstore holds the GIL through parts of each append (measured: a
writer thread in the loop's process raised the loop's p99 wake-up lateness from 1.7
to 4.6 ms, and opening the store stalled it for 0.7 s). So `BackgroundFrameWriter`
starts `python -m agent.records.frame_writer` (a `FrameRecorder`) and hands it
each frame over a ZeroMQ PUSH socket in a private 0700 ipc directory: `offer` sends a
copy of the frame and its metadata. The run engine owns the one writer of a run
(`RunEngine.frame_writer`), and the plan picks what happens when the writer falls
more than `max_queued_bytes` behind:

- `lossless=False` (a loop that acts on every frame, the feedback trap): the send
  fails at once and the frame is counted in `dropped` instead of making the loop
  wait. The writer runs in the idle scheduling class (`SCHED_IDLE`, where the OS has
  it; else nice 19): it gets only CPU time nothing else wants, so it cannot delay the
  loop even on a busy machine (each tensorstore append costs ~3 ms, mostly growing the
  array).
- `lossless=True` (a plan whose every frame is precious and rare: smart acquisition):
  `offer` waits for room instead (the time is counted in `frames_wait_s`), and the
  writer runs at normal priority so the queue stays short. Only a writer that died
  makes a frame go unrecorded, and that is counted and named.

The writer says `ready` once it has imported its libraries and bound its socket, and
the constructor waits for that (up to `READY_TIMEOUT_S`): its start-up (a second of
imports) then runs before the plan's first step, not beside it (measured: a recording
round's first steps had p99 8.4 ms against 3.6 ms later on).

`close` moves every writer thread out of the idle class (a busy machine may never
give the idle class the time to drain the backlog), sends the end, waits for the
writer to write what is queued, and reads its counts back. A writer whose run was
killed writes what reached it, closes the recording and exits. Whenever its queue
is empty the writer waits for its chunks and lists them in the sidecar
(`agent.records.frame_recording`: the sidecar only ever names frames whose pixels
are on disk), so after a kill the frames missing are only those still queued or in
flight, never one the sidecar claims.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent.records.frame_recording import FrameRecorder, json_default
from drivers.auth import private_dir

CLOSE = b"close"
CLOSE_TIMEOUT_S = 120.0  # a long backlog on a slow disk still gets written
WRITER_NICE = 19
READY_TIMEOUT_S = 60.0  # imports on a slow, busy machine; past it the run goes on
ORPHAN_CHECK_MS = 500  # the loop's process comes first on a busy machine
LOSSLESS_POLL_MS = 100  # a lossless offer waiting for room checks the writer is alive


class BackgroundFrameWriter:
    """Frames to `path` (OME-Zarr) through a writer process; the caller never waits."""

    def __init__(
        self,
        path: Path,
        max_queued_bytes: int,
        pixel_size_um: float | None = None,
        lossless: bool = False,
    ):
        self.path = Path(path)
        self.max_queued_bytes = int(max_queued_bytes)
        self.lossless = lossless
        self.dropped = 0
        self.offered = 0
        self.wait_s = 0.0  # time lossless offers spent waiting for room
        self._error: str | None = None
        self._result: dict[str, Any] = {}
        self._dir = private_dir("sl-frames-")
        self._endpoint = f"ipc://{self._dir / 'frames.sock'}"
        pixel = "-" if pixel_size_um is None else str(float(pixel_size_um))
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.records.frame_writer",
                str(self.path),
                self._endpoint,
                pixel,
                "normal" if lossless else "idle",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        if not lossless:  # its start-up (imports) too, not just its work
            _yield_cpu(self._proc.pid)
        # its own I/O thread: pushing frames to a slow writer never delays the driver link
        self._ctx = zmq.Context()
        self._socket: zmq.Socket | None = None  # sized by the first frame
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        """Block until the writer has started (its `ready` line), died, or timed out:
        either of the last two is reported by `close`, as a writer that fails later is."""
        stdout = self._proc.stdout
        if stdout is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT_S
        while self._proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], 0.1)
            if ready:
                stdout.readline()  # "ready" (or EOF: the writer died; close says so)
                return

    def _connect(self, frame_bytes: int) -> zmq.Socket | None:
        """The PUSH socket, its queue `max_queued_bytes` deep in frames of this size
        (half on each side of the socket); None when not even one frame fits (a
        lossless writer queues one frame at least)."""
        frames = self.max_queued_bytes // max(frame_bytes, 1)
        if self.lossless:
            frames = max(frames, 1)
        if frames < 1:
            return None
        socket = self._ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, frames)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._endpoint)
        return socket

    def offer(self, frame: np.ndarray, metadata: dict[str, Any]) -> bool:
        """Hand one frame to the writer; False (and counted) when it is too far behind
        (lossless: only when the writer is gone)."""
        self.offered += 1
        if self._socket is None:
            self._socket = self._connect(int(frame.nbytes))
            if self._socket is None:
                self.dropped += 1
                return False
        header = {**metadata, "_shape": list(frame.shape), "_dtype": str(frame.dtype)}
        payload = json.dumps(header, separators=(",", ":"), default=json_default).encode()
        # copied here (a memcpy, ~10 us for 256x256 uint16): a zero-copy send would
        # wake pyzmq's buffer-release thread for every frame, a GIL holder at random
        parts = [payload, np.ascontiguousarray(frame)]
        try:
            self._socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            if not (self.lossless and self._send_when_room(self._socket, parts)):
                self.dropped += 1
                return False
        return True

    def _send_when_room(self, socket: zmq.Socket, parts: list[Any]) -> bool:
        """Lossless: wait for the writer to take the frame; False once it has died."""
        start = time.perf_counter()
        try:
            if self._send_while_writer_lives(socket, parts, deadline=None):
                return True
            self._error = f"frame writer exited with code {self._proc.returncode} mid-run"
            return False
        finally:
            self.wait_s += time.perf_counter() - start

    def _send_while_writer_lives(
        self, socket: zmq.Socket, parts: list[Any], deadline: float | None
    ) -> bool:
        """Send once there is room; False if the writer exits (or the deadline passes)."""
        while self._proc.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            if socket.poll(LOSSLESS_POLL_MS, zmq.POLLOUT):
                with contextlib.suppress(zmq.Again):  # polled writable, still full: again
                    socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
                    return True
        return False

    def close(self) -> None:
        """Write what is queued, stop the writer, keep its counts (idempotent)."""
        if self._result:
            return
        if self._socket is None:  # no frame ever: the writer still needs its end
            self._socket = self._ctx.socket(zmq.PUSH)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self._endpoint)
        if not self.lossless:  # the run is over: write the backlog at full speed
            _leave_idle_class(self._proc.pid)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        if not self._send_while_writer_lives(self._socket, [CLOSE], deadline):
            self._proc.kill()
        try:
            out, _ = self._proc.communicate(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self._socket.close()
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        self._result = (
            json.loads(lines[-1])
            if lines
            else {
                "written": 0,
                "failed": 0,
                "error": f"frame writer exited with code {self._proc.returncode} without a word",
            }
        )

    @property
    def written(self) -> int:
        return int(self._result.get("written", 0))

    def stats(self) -> dict[str, Any]:
        """What the summary says about the recording (final once closed)."""
        written = self.written
        return {
            "frames_recorded": written,
            "frames_not_recorded": self.offered - written if self._result else self.dropped,
            "frames_dropped_behind": self.dropped,
            "frames_record_error": self._result.get("error") or self._error,
            "frames_pixel_size_um": self._result.get("pixel_size_um"),
            "frames_lossless": self.lossless,
            "frames_wait_s": round(self.wait_s, 3),
        }


def serve(path: Path, endpoint: str, pixel_size_um: float | None) -> dict[str, Any]:
    """The writer process: frames from `endpoint` into `path` until the close message."""
    recorder = FrameRecorder(path, pixel_size_um)
    ctx = zmq.Context()
    socket = ctx.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 2)  # the queue (bytes-bounded) is the sender's
    socket.bind(endpoint)
    import ome_writers  # noqa: F401  (imported now, before `ready`, not at the first frame)

    print("ready", flush=True)
    failed, error = 0, None
    parent = os.getppid()
    try:
        while True:
            if not socket.poll(0):
                recorder.flush()  # nothing queued: list every frame whose chunk is written
                if not socket.poll(ORPHAN_CHECK_MS):
                    if os.getppid() != parent:  # the run was killed: keep what came, close
                        break
                    continue
            parts = socket.recv_multipart(copy=False)
            if len(parts) == 1 and parts[0].bytes == CLOSE:
                break
            header = json.loads(parts[0].bytes)
            shape, dtype = header.pop("_shape"), header.pop("_dtype")
            frame = np.frombuffer(parts[1].buffer, dtype=dtype).reshape(shape)
            try:
                recorder.append(frame, header)
            except (ValueError, OSError) as exc:
                failed, error = failed + 1, str(exc)
    finally:
        recorder.close()
        socket.close()
        ctx.term()
    return {
        "written": recorder.count,
        "failed": failed + recorder.failed,
        "error": error or recorder.error,
        "pixel_size_um": recorder.pixel_size_um,
    }


def _yield_cpu(pid: int = 0) -> None:
    """Into the idle scheduling class, before any writer thread starts (`pid`: this
    process, or the writer the loop's process has just started; nice 19 where the OS
    has no idle class, which only a process can ask for itself)."""
    policy = getattr(os, "SCHED_IDLE", None)
    try:
        if policy is not None:
            os.sched_setscheduler(pid, policy, os.sched_param(0))
            return
    except OSError:  # not allowed here: the loop still never waits, frames may drop
        pass
    if pid == 0:
        os.nice(WRITER_NICE)


def _leave_idle_class(pid: int) -> None:
    """Every thread of the writer back to normal priority, so its backlog is written at
    close even on a machine busy enough to starve the idle class (measured: three busy
    processes on two cores kept an idle writer from draining for the 120 s timeout)."""
    policy = getattr(os, "SCHED_OTHER", None)
    tasks = Path(f"/proc/{pid}/task")
    if policy is None or not tasks.is_dir():
        return  # not Linux: nice 19 still runs, only slower
    for task in tasks.iterdir():
        with contextlib.suppress(OSError, ValueError):  # a thread that just ended
            os.sched_setscheduler(int(task.name), policy, os.sched_param(0))


if __name__ == "__main__":
    folder_path, address, pixel_arg, priority = sys.argv[1:]
    if priority == "idle":
        _yield_cpu()
    result = serve(Path(folder_path), address, None if pixel_arg == "-" else float(pixel_arg))
    print(json.dumps(result), flush=True)
