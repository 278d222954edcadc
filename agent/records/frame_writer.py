"""Frame recording off the loop's path: a writer process fed over a local socket.

A loop that acts on every frame within milliseconds must not wait for a disk, nor for
the Python lock: tensorstore holds the GIL through parts of each append (measured: a
writer thread in the loop's process raised the loop's p99 wake-up lateness from 1.7
to 4.6 ms, and opening the store stalled it for 0.7 s). So `BackgroundFrameWriter`
starts `python -m agent.records.frame_writer` (a `FrameRecorder`) and hands it
each frame over a ZeroMQ PUSH socket in a private 0700 ipc directory: `offer` is a
non-blocking send of a copy of the frame and its metadata. When
the writer falls behind by more than `max_queued_bytes`, the send fails at once and the
frame is counted in `dropped` instead of making the loop wait. The writer runs in the
idle scheduling class (`SCHED_IDLE`, where the OS has it; else nice 19): it gets only
CPU time nothing else wants, so it cannot delay the loop even on a busy machine (each
tensorstore append costs ~3 ms, mostly growing the array). `close` sends the end,
waits for the writer to write what is queued, and reads its counts back. A writer
whose run was killed writes what reached it, closes the recording and exits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from agent.records.frame_recording import FrameRecorder, json_default
from drivers.auth import private_dir

CLOSE = b"close"
CLOSE_TIMEOUT_S = 120.0  # a long backlog on a slow disk still gets written
WRITER_NICE = 19
ORPHAN_CHECK_MS = 500  # the loop's process comes first on a busy machine


class BackgroundFrameWriter:
    """Frames to `path` (OME-Zarr) through a writer process; the caller never waits."""

    def __init__(self, path: Path, max_queued_bytes: int, pixel_size_um: float | None = None):
        self.path = Path(path)
        self.max_queued_bytes = int(max_queued_bytes)
        self.dropped = 0
        self.offered = 0
        self._result: dict[str, Any] = {}
        self._dir = private_dir("sl-frames-")
        self._endpoint = f"ipc://{self._dir / 'frames.sock'}"
        pixel = "" if pixel_size_um is None else str(float(pixel_size_um))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent.records.frame_writer", str(self.path), self._endpoint]
            + ([pixel] if pixel else []),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        _yield_cpu(idle=True, pid=self._proc.pid)  # its start-up (imports) too, not just its work
        # its own I/O thread: pushing frames to a slow writer never delays the driver link
        self._ctx = zmq.Context()
        self._socket: zmq.Socket | None = None  # sized by the first frame

    def _connect(self, frame_bytes: int) -> zmq.Socket | None:
        """The PUSH socket, its queue `max_queued_bytes` deep in frames of this size
        (half on each side of the socket); None when not even one frame fits."""
        frames = self.max_queued_bytes // max(frame_bytes, 1)
        if frames < 1:
            return None
        socket = self._ctx.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, frames)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self._endpoint)
        return socket

    def offer(self, frame: np.ndarray, metadata: dict[str, Any]) -> bool:
        """Hand one frame to the writer; False (and counted) when it is too far behind."""
        self.offered += 1
        if self._socket is None:
            self._socket = self._connect(int(frame.nbytes))
            if self._socket is None:
                self.dropped += 1
                return False
        header = {**metadata, "_shape": list(frame.shape), "_dtype": str(frame.dtype)}
        payload = json.dumps(header, separators=(",", ":"), default=json_default).encode()
        try:
            # copied here (a memcpy, ~10 us for 256x256 uint16): a zero-copy send would
            # wake pyzmq's buffer-release thread for every frame, a GIL holder at random
            self._socket.send_multipart(
                [payload, np.ascontiguousarray(frame)], flags=zmq.NOBLOCK, copy=True
            )
        except zmq.Again:
            self.dropped += 1
            return False
        return True

    def close(self) -> None:
        """Write what is queued, stop the writer, keep its counts (idempotent)."""
        if self._result:
            return
        if self._socket is None:  # no frame ever: the writer still needs its end
            self._socket = self._ctx.socket(zmq.PUSH)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self._endpoint)
        self._socket.setsockopt(zmq.SNDTIMEO, int(CLOSE_TIMEOUT_S * 1000))
        try:
            self._socket.send_multipart([CLOSE])
        except zmq.Again:
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
            "frames_record_error": self._result.get("error"),
            "frames_pixel_size_um": self._result.get("pixel_size_um"),
        }


def serve(path: Path, endpoint: str, pixel_size_um: float | None) -> dict[str, Any]:
    """The writer process: frames from `endpoint` into `path` until the close message."""
    recorder = FrameRecorder(path, pixel_size_um)
    ctx = zmq.Context()
    socket = ctx.socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 2)  # the queue (bytes-bounded) is the sender's
    socket.bind(endpoint)
    failed, error = 0, None
    parent = os.getppid()
    try:
        while True:
            if not socket.poll(ORPHAN_CHECK_MS):
                if os.getppid() != parent:  # the run was killed: keep what came, close
                    break
                continue
            parts = socket.recv_multipart(copy=False)
            if len(parts) == 1 and parts[0].bytes == CLOSE:
                _yield_cpu(idle=False)  # the run is over: write the backlog at full speed
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
        "failed": failed,
        "error": error,
        "pixel_size_um": recorder.pixel_size_um,
    }


def _yield_cpu(idle: bool, pid: int = 0) -> None:
    """Into (or out of) the idle scheduling class, before any writer thread starts
    (`pid`: this process, or the writer the loop's process has just started)."""
    policy = getattr(os, "SCHED_IDLE" if idle else "SCHED_OTHER", None)
    try:
        if policy is not None:
            os.sched_setscheduler(pid, policy, os.sched_param(0))
        elif idle and pid == 0:
            os.nice(WRITER_NICE)
    except OSError:  # not allowed here: the loop still never waits, frames may drop
        if idle and pid == 0:
            os.nice(WRITER_NICE)


if __name__ == "__main__":
    _yield_cpu(idle=True)
    folder_path, address, *pixel_arg = sys.argv[1:]
    result = serve(Path(folder_path), address, float(pixel_arg[0]) if pixel_arg else None)
    print(json.dumps(result), flush=True)
