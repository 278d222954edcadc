"""Fault bench, records and driver-fault part: what a SIGKILL or a dying driver leaves.

- `records_lost_ms_max`: a recording run (smart acquisition: event log + OME-Zarr
  frames) is SIGKILLed at random moments; for each kill, lost = kill time minus the
  wall time of the last record `scopeloop report` / `replay` can read, from the event
  log and from the recording (a frame counts only if its pixels match the checksum
  written with its metadata). The worst over all kills; goal <= 200 ms. It includes the
  gap between records, so it is an upper bound on what was really lost.
- `driver_restart_resumed`: the driver process is SIGKILLed under a running agent
  loop and started again on the same endpoints; true when the loop resumed (a
  `driver_resumed` event, then commands applied by the new driver).
- the feedback-trap loop latency with the old event log (buffered, flushed every
  0.5 s) against this one (one write() per record), run back to back: the ratio says
  what crash safety costs the loop.

`measure(quick, log)` returns the metrics; `python benchmarks/faults_records.py` prints
them as JSON. The machine may be loaded: timings are ratios within one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMART = ROOT / "configs" / "twin-smart-acquisition.yaml"
TRAP = ROOT / "configs" / "twin-feedback-trap.yaml"
# ~4 s of steady recording on an idle machine: 400 screen frames, then a time-lapse.
SMART_LONG = ["grid.nx=20", "grid.ny=20", "revisit.timepoints=20", "revisit.interval_ms=10"]
Log = Callable[[str], None]


class RestartableDriver:
    """`scopeloop driver serve` on fixed ipc endpoints, killable and restartable; `probe`
    follows the current process, as a supervisor restarting a node would."""

    def __init__(self, folder: Path, config: Path = TRAP) -> None:
        raw = yaml.safe_load(config.read_text())
        self.stream, self.command = f"ipc://{folder}/s", f"ipc://{folder}/c"
        raw["driver"].update(stream_endpoint=self.stream, command_endpoint=self.command)
        self.config_path = folder / "driver.yaml"
        self.config_path.write_text(yaml.safe_dump(raw))
        self.log_path = folder / "driver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "driver", "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def probe(self) -> str | None:
        code = None if self.proc is None else self.proc.poll()
        return None if code is None else f"driver process exited with code {code}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    """Poll until `condition` holds; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s:g} s")
        time.sleep(0.005)


def _records(path: Path) -> list[dict[str, Any]]:
    from agent.records.recorder import read_events

    return read_events(path) if path.is_file() else []


# --- records lost to a SIGKILL ------------------------------------------------------


def _kill_once(runs: Path, delay_s: float) -> dict[str, Any] | None:
    """One recording run killed `delay_s` after its first record; None if it ended first."""
    from agent.records.frame_recording import FRAMES_NAME, read_recording
    from agent.records.replay import replay_run
    from agent.records.report import load_run, write_report

    before = set(runs.glob("*"))
    overrides = [f"--set={item}" for item in (f"runs_dir={runs}", *SMART_LONG)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", str(SMART), *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # one process group: the run and the driver it started
    )
    try:

        def started() -> bool:
            new = set(runs.glob("*/events-smart.jsonl")) - {
                p / "events-smart.jsonl" for p in before
            }
            return bool(new) and next(iter(new)).stat().st_size > 0

        wait_for(lambda: started() or proc.poll() is not None, "the first record")
        time.sleep(delay_s)
        t_kill = time.time()
        proc.send_signal(signal.SIGKILL)  # the agent alone, as a crash would
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its driver, left running by the kill
    (run_dir,) = set(runs.glob("*")) - before
    if proc.returncode != -signal.SIGKILL or (run_dir / "summary.json").exists():
        return None
    run = load_run(run_dir)
    events = run.events.get("smart", [])
    lost_events = (t_kill - events[-1]["wall_time"]) * 1e3 if events else 0.0
    recording = read_recording(run_dir / FRAMES_NAME)
    first_frame = next((e for e in events if e["kind"] == "frame"), None)
    lost_frames = 0.0
    if recording.last_wall_time is not None:
        lost_frames = (t_kill - recording.last_wall_time) * 1e3
    elif first_frame is not None:  # frames were logged but none can be read back
        lost_frames = (t_kill - first_frame["wall_time"]) * 1e3
    note = run.end_note() or ""
    write_report(run_dir)
    replayed = replay_run(run_dir)
    return {
        "lost_ms": max(lost_events, lost_frames),
        "lost_ms_events": lost_events,
        "lost_ms_frames": lost_frames,
        "frames": len(recording),
        "frames_lost": recording.frames_lost,
        "flagged": note.startswith("cut short") and bool(replayed.get("cut_short")),
    }


def records_lost(kills: int, log: Log, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    ended_first = 0
    with tempfile.TemporaryDirectory(prefix="sl-kill-") as folder:
        runs = Path(folder)
        while len(results) < kills and ended_first < kills:
            delay = rng.uniform(0.0, 2.5)
            result = _kill_once(runs, delay)
            if result is None:
                ended_first += 1
                log(f"kill at +{delay:.2f} s: the run had already ended, not counted")
                continue
            results.append(result)
            log(
                f"kill {len(results)} at +{delay:.2f} s: lost {result['lost_ms_events']:.1f} ms "
                f"of events, {result['lost_ms_frames']:.1f} ms of frames, "
                f"{result['frames']} frames readable ({result['frames_lost']} torn), "
                f"cut short flagged: {result['flagged']}"
            )
    lost = [r["lost_ms"] for r in results]
    return {
        "records_lost_ms_max": max(lost, default=float("nan")),
        "records_lost_ms_p50": float(np.median(lost)) if lost else float("nan"),
        "records_lost_ms_events_max": max((r["lost_ms_events"] for r in results), default=0.0),
        "records_lost_ms_frames_max": max((r["lost_ms_frames"] for r in results), default=0.0),
        "records_kills": len(results),
        "records_cut_short_flagged": sum(r["flagged"] for r in results),
        "records_frames_torn_max": max((r["frames_lost"] for r in results), default=0),
    }


# --- driver restarted under a running agent ---------------------------------------


def driver_restart(log: Log) -> dict[str, Any]:
    from agent.detection.detect import ParticleDetector
    from agent.engine.driver_faults import DriverFaults
    from agent.engine.frame_loop import LoopEndpoints
    from agent.plans.feedback_trap import feedback_loop
    from agent.records.recorder import EventLog
    from policies.feedback import ProportionalTrap, ProportionalTrapConfig

    with tempfile.TemporaryDirectory(prefix="sl-rs-") as folder:
        driver = RestartableDriver(Path(folder))
        events_path = Path(folder) / "events.jsonl"
        stop = threading.Event()
        outcome: list[Any] = []
        driver.start()
        try:
            with EventLog(events_path) as events:
                loop = feedback_loop(
                    LoopEndpoints(driver.stream, driver.command),
                    ParticleDetector(),
                    ProportionalTrap(ProportionalTrapConfig()),
                    events,
                    faults=DriverFaults(reconnect_s=60.0, silence_ms=3000, probe=driver.probe),
                )
                thread = threading.Thread(target=lambda: outcome.append(loop.run(600, stop, 90)))
                thread.start()

                def applied(session: int) -> int:
                    return sum(
                        e["kind"] == "step"
                        and e.get("session") == session
                        and e.get("latency_ms") is not None
                        for e in _records(events_path)
                    )

                resumed = False
                try:
                    wait_for(lambda: applied(0) >= 20, "20 steps before the kill")
                    driver.kill()
                    kinds = lambda: {e["kind"] for e in _records(events_path)}  # noqa: E731
                    wait_for(lambda: "driver_down" in kinds(), "the agent to see the driver go")
                    driver.start()
                    wait_for(lambda: applied(1) >= 10, "10 commands applied after the restart")
                    resumed = True
                except TimeoutError as exc:
                    log(f"driver restart: {exc}")
                finally:
                    stop.set()
                    thread.join(30)
        finally:
            driver.stop()
        records = _records(events_path)
    back = next((e for e in records if e["kind"] == "driver_resumed"), None)
    resumed = resumed and bool(outcome) and outcome[0].end_reason is None
    down_ms = float(back["down_ms"]) if back else float("nan")
    log(f"driver killed and restarted under the agent: resumed {resumed} (down {down_ms:.0f} ms)")
    return {"driver_restart_resumed": resumed, "driver_restart_down_ms": down_ms}


# --- what crash safety costs the loop ---------------------------------------------


class BufferedEventLog:
    """The event log before crash safety: buffered, flushed at most every 0.5 s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._last_flush = time.monotonic()
        self.count = 0

    def write(self, kind: str, **fields: Any) -> None:
        record = {"kind": kind, "wall_time": time.time(), **fields}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.count += 1
        if time.monotonic() - self._last_flush > 0.5:
            self._file.flush()
            self._last_flush = time.monotonic()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> BufferedEventLog:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _write_us(log_class: Any, path: Path, n: int) -> float:
    step = {"seq": 1, "detections_um": [[1.2345, 2.3456]] * 4, "laser": [], "latency_ms": 1.5}
    with log_class(path) as events:
        t0 = time.perf_counter()
        for i in range(n):
            events.write("step", i=i, **step)
        return (time.perf_counter() - t0) / n * 1e6


def loop_latency(quick: bool, log: Log) -> dict[str, float]:
    from agent.config import load_config
    from agent.plans import feedback_trap as runner
    from agent.records.recorder import EventLog

    rounds, duration = (2, 2.0) if quick else (4, 5.0)  # interleaved: load drifts
    latencies: dict[str, list[float]] = {"buffered": [], "unbuffered": []}
    with tempfile.TemporaryDirectory(prefix="sl-lat-") as folder:
        config = load_config(TRAP, [f"runs_dir={folder}", f"duration_s={duration}"])
        for r in range(rounds):
            for name, log_class in (("buffered", BufferedEventLog), ("unbuffered", EventLog)):
                run_dir = Path(folder) / f"{name}-{r}"
                run_dir.mkdir()
                runner.EventLog = log_class  # type: ignore[misc]
                try:
                    phase = runner.run_phase(
                        config, run_dir, "feedback", runner.make_policy(config)
                    )
                finally:
                    runner.EventLog = EventLog  # type: ignore[misc]
                latencies[name] += runner.step_latencies_ms(phase.steps)
        writes = {
            name: _write_us(cls, Path(folder) / f"w-{name}.jsonl", 2000 if quick else 20000)
            for name, cls in (("buffered", BufferedEventLog), ("unbuffered", EventLog))
        }
    p50 = {k: float(np.percentile(v, 50)) for k, v in latencies.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in latencies.items()}
    log(
        f"feedback loop latency p50/p99: buffered log {p50['buffered']:.2f}/{p99['buffered']:.2f}"
        f" ms, one write() per record {p50['unbuffered']:.2f}/{p99['unbuffered']:.2f} ms; "
        f"a record costs {writes['buffered']:.1f} vs {writes['unbuffered']:.1f} us"
    )
    return {
        "loop_latency_p50_ms_buffered_log": p50["buffered"],
        "loop_latency_p50_ms_crash_safe_log": p50["unbuffered"],
        "loop_latency_p50_ratio": p50["unbuffered"] / p50["buffered"],
        "loop_latency_p99_ratio": p99["unbuffered"] / p99["buffered"],
        "event_write_us_buffered": writes["buffered"],
        "event_write_us_crash_safe": writes["unbuffered"],
    }


def measure(quick: bool = False, log: Log = print) -> dict[str, Any]:
    """Records lost to SIGKILLs, driver restart resumed, and the loop latency cost."""
    metrics: dict[str, Any] = {}
    metrics.update(records_lost(10 if quick else 20, log))
    metrics.update(driver_restart(log))
    metrics.update(loop_latency(quick, log))
    return metrics


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(
        json.dumps(measure(quick="--full" not in sys.argv, log=lambda m: print(m, file=sys.stderr)))
    )
