"""Smart acquisition: screen a stage grid at low dose, revisit only what holds objects.

The agent drives the driver node over protocol v1 with event-driven acquisition
(`submit_events`): one low-exposure, low-intensity frame per grid position; detection
on each; then high-exposure time-lapse frames only at positions where objects were
found, as many as the light-dose budget allows (dose per frame = exposure x
illumination intensity, in ms at full intensity). Every frame is recorded to OME-Zarr
with the decision that asked for it. The summary compares frames and dose with imaging
every position at high quality, and the detections with the twin's truth.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from scipy.optimize import linear_sum_assignment

from agent.config import dump_config, load_model_config
from agent.detect import DetectorConfig, ParticleDetector
from agent.frame_recording import FRAMES_NAME, FrameRecorder
from agent.recorder import EventLog, new_run_dir, write_json
from drivers.config import DriverConfig, Limits
from drivers.field_devices import build_field_core
from drivers.mmcore_node import DriverNode
from drivers.protocol import FRAME_PREFIX, Frame, decode_frame, now_ns
from drivers.transport import CommandClient
from simulators.sparse_field import SparseFieldConfig

LAMP = ("Lamp", "intensity")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridConfig(Strict):
    """Stage positions: nx x ny views, `step_um` apart (None: one view width)."""

    origin_um: tuple[float, float] = (64.0, 64.0)  # centre of the first view
    nx: int = Field(8, ge=1, le=1000)
    ny: int = Field(8, ge=1, le=1000)
    step_um: float | None = Field(None, gt=0.0, le=100_000.0)


class Illumination(Strict):
    exposure_ms: float = Field(gt=0.0, le=10_000.0)
    intensity: float = Field(gt=0.0, le=1.0)

    @property
    def dose(self) -> float:
        return self.exposure_ms * self.intensity


class RevisitConfig(Illumination):
    timepoints: int = Field(3, ge=1, le=10_000)
    interval_ms: float = Field(200.0, ge=0.0, le=3_600_000.0)
    max_positions: int = Field(1000, ge=1, le=1_000_000)


class SmartAcquisitionConfig(Strict):
    kind: Literal["smart-acquisition"] = "smart-acquisition"
    name: str = Field("smart-acquisition", pattern=r"^[A-Za-z0-9_.-]+$")
    runs_dir: str = "runs"
    seed: int = Field(0, ge=0)
    field: SparseFieldConfig = SparseFieldConfig()
    grid: GridConfig = GridConfig()
    screen: Illumination = Illumination(exposure_ms=2.0, intensity=0.25)
    revisit: RevisitConfig = RevisitConfig(exposure_ms=20.0, intensity=1.0)
    # Total light dose allowed (ms at full intensity); None: no limit beyond the plan.
    dose_budget: float | None = Field(None, gt=0.0, le=1e9)
    min_objects: int = Field(1, ge=1, le=10_000)  # detections that make a position worth it
    detector: DetectorConfig = DetectorConfig()
    match_radius_um: float = Field(2.0, gt=0.0, le=1000.0)
    record_frames: bool = True
    timeout_s: float = Field(120.0, gt=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _screen_below_revisit(self) -> SmartAcquisitionConfig:
        if self.screen.dose >= self.revisit.dose:
            raise ValueError(
                f"screen: dose {self.screen.dose:g} must be below revisit dose "
                f"{self.revisit.dose:g} (exposure_ms x intensity)"
            )
        return self


def load_smart_config(path: Path, overrides: list[str]) -> SmartAcquisitionConfig:
    return load_model_config(path, overrides, SmartAcquisitionConfig)


def run_smart_acquisition(
    config_path: Path, overrides: list[str], console: Console
) -> dict[str, Any]:
    """The `smart-acquisition` run kind."""
    config = load_smart_config(config_path, overrides)
    run_dir = new_run_dir(config.runs_dir, config.name)
    dump_config(config, run_dir / "config.yaml")
    summary = SmartAcquisition(config, run_dir).run()
    write_json(run_dir / "summary.json", summary)
    console.print(
        f"smart acquisition: {summary['frames_total']} frames (all-high: "
        f"{summary['frames_all_high']}), dose {summary['dose_used']:.1f} vs "
        f"{summary['dose_all_high']:.1f} ({100 * summary['dose_saved_fraction']:.0f}% saved); "
        f"objects found {summary['objects_found']}/{summary['objects_in_grid']}; "
        f"run dir {run_dir}",
        markup=False,
        highlight=False,
    )
    return summary


class SmartAcquisition:
    """One run on the sparse-field twin behind a DriverNode."""

    def __init__(self, config: SmartAcquisitionConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        field = config.field
        step = config.grid.step_um or field.view_um[0]
        ox, oy = config.grid.origin_um
        self.positions = [
            (ox + i * step, oy + j * step)
            for j in range(config.grid.ny)
            for i in range(config.grid.nx)
        ]
        self.detector = ParticleDetector(config.detector)

    # --- plumbing ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        folder = Path(tempfile.mkdtemp(prefix="sl-smart-"))
        ctx = zmq.Context()
        core, rig = build_field_core(cfg.field, cfg.seed, cfg.screen.exposure_ms)
        driver = DriverConfig(
            kind="mmcore",
            stream_endpoint=f"ipc://{folder}/stream",
            command_endpoint=f"ipc://{folder}/command",
            exposure_ms=cfg.screen.exposure_ms,
            watchdog_ms=60_000,
            stream_hwm=10_000,
            limits=Limits(properties={f"{LAMP[0]}.{LAMP[1]}": (0.0, 1.0)}),  # the gate's allow-list
        )
        node = DriverNode(core, driver, ctx=ctx, field_um=cfg.field.view_um)
        thread = threading.Thread(target=node.serve, daemon=True)
        thread.start()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, FRAME_PREFIX)
        sub.connect(node.endpoints[0])
        client = CommandClient(ctx, node.endpoints[1], timeout_ms=10_000)
        recorder = FrameRecorder(self.run_dir / FRAMES_NAME) if cfg.record_frames else None
        log = EventLog(self.run_dir / "events-smart.jsonl")
        try:
            self._frames_before_events(sub)
            summary = self._acquire(client, sub, recorder, log, rig.field)
        finally:
            log.close()
            if recorder is not None:
                recorder.close()
            node.stop.set()
            thread.join(10)
            client.close()
            sub.close()
            ctx.term()
            shutil.rmtree(folder, ignore_errors=True)
        summary["run_dir"] = str(self.run_dir)
        summary["frames_recorded"] = recorder.count if recorder is not None else 0
        return summary

    def _frames_before_events(self, sub: zmq.Socket) -> None:
        """Wait for the continuous stream: the subscription is live (no slow joiner)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sub.poll(100):
                sub.recv_multipart()
                return
        raise RuntimeError("smart acquisition: the driver node sent no frame within 10 s")

    def _collect(self, sub: zmq.Socket, ids: set[int]) -> list[Frame]:
        """Frames of the given event ids (continuous live frames are ignored)."""
        frames: list[Frame] = []
        deadline = time.monotonic() + self.config.timeout_s
        while ids and time.monotonic() < deadline:
            if not sub.poll(100):
                continue
            frame = decode_frame(sub.recv_multipart(copy=False))
            event = frame.header.state.get("event")
            if event is not None and event["id"] in ids:
                ids.discard(event["id"])
                frames.append(frame)
        if ids:
            raise RuntimeError(f"smart acquisition: {len(ids)} event frames never arrived")
        return frames

    def _event(
        self, k: int, light: Illumination, index: dict[str, int], metadata: dict[str, Any]
    ) -> dict[str, Any]:
        x, y = self.positions[k]
        return {
            "x_pos": x,
            "y_pos": y,
            "exposure": light.exposure_ms,
            "properties": [[LAMP[0], LAMP[1], light.intensity]],
            "index": index,
            "metadata": metadata,
        }

    def _detect_um(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """Detections in stage coordinates (um) and their scores."""
        px, scores = self.detector.detect_with_scores(np.asarray(frame.data))
        field = self.config.field
        event = frame.header.state["event"]
        stage = np.array([event["x_pos"], event["y_pos"]], dtype=float)
        centre = np.array([field.width_px, field.height_px]) / 2
        xy = (np.asarray(px, dtype=float).reshape(-1, 2) + 0.5 - centre) * field.pixel_um
        return xy + stage, np.asarray(scores, dtype=float)

    # --- the experiment ------------------------------------------------------------------

    def _acquire(
        self,
        client: CommandClient,
        sub: zmq.Socket,
        recorder: FrameRecorder | None,
        log: EventLog,
        field: Any,
    ) -> dict[str, Any]:
        cfg = self.config
        n = len(self.positions)
        screen_events = [
            self._event(k, cfg.screen, {"p": k}, {"reason": "screen", "position": k})
            for k in range(n)
        ]
        ids = client.call("submit_events", {"events": screen_events}).result["ids"]
        screen = self._collect(sub, set(ids))
        screen.sort(key=lambda f: f.header.state["event"]["id"])
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for frame in screen:
            k = int(frame.header.state["event"]["metadata"]["position"])
            xy, scores = self._detect_um(frame)
            found[k] = (xy, scores)
            self._record(recorder, log, frame, cfg.screen, xy, f"screen of grid position {k}")

        # Decide: positions with objects, best first, within the dose budget.
        candidates = [k for k in range(n) if len(found[k][0]) >= cfg.min_objects]
        candidates.sort(key=lambda k: -float(found[k][1].max()))
        dose_screen = n * cfg.screen.dose
        per_position = cfg.revisit.timepoints * cfg.revisit.dose
        budget_left = None if cfg.dose_budget is None else cfg.dose_budget - dose_screen
        chosen: list[int] = []
        for k in candidates[: cfg.revisit.max_positions]:
            if budget_left is not None and per_position * (len(chosen) + 1) > budget_left:
                break
            chosen.append(k)
        skipped_budget = len(candidates[: cfg.revisit.max_positions]) - len(chosen)
        log.write(
            "decision",
            candidates=candidates,
            chosen=chosen,
            skipped_for_budget=skipped_budget,
            dose_screen=dose_screen,
        )

        revisit: list[Frame] = []
        if chosen:
            t0 = now_ns() + 50_000_000
            events = []
            for t in range(cfg.revisit.timepoints):
                for i, k in enumerate(chosen):
                    why = (
                        f"screen found {len(found[k][0])} objects at grid position {k} "
                        f"(best score {float(found[k][1].max()):.1f})"
                    )
                    event = self._event(
                        k,
                        cfg.revisit,
                        {"p": k, "t": t},
                        {"reason": "revisit", "position": k, "timepoint": t, "decision": why},
                    )
                    if i == 0:
                        event["t_start_ns"] = t0 + int(t * cfg.revisit.interval_ms * 1e6)
                    events.append(event)
            ids = client.call("submit_events", {"events": events}).result["ids"]
            revisit = self._collect(sub, set(ids))
            revisit.sort(key=lambda f: f.header.state["event"]["id"])
        first_look: dict[int, np.ndarray] = {}
        start_errors = []
        for frame in revisit:
            meta = frame.header.state["event"]["metadata"]
            xy, _scores = self._detect_um(frame)
            if meta["timepoint"] == 0:
                first_look[int(meta["position"])] = xy
            if frame.header.state["event"].get("start_error_ms") is not None:
                start_errors.append(frame.header.state["event"]["start_error_ms"])
            self._record(recorder, log, frame, cfg.revisit, xy, meta["decision"])
        client.call("stop_events")
        return self._summary(field, found, chosen, first_look, len(revisit), start_errors)

    def _record(
        self,
        recorder: FrameRecorder | None,
        log: EventLog,
        frame: Frame,
        light: Illumination,
        detections_um: np.ndarray,
        decision: str,
    ) -> None:
        event = frame.header.state["event"]
        meta = {
            "seq": frame.header.seq,
            "event_id": event["id"],
            "event_index": event["index"],
            "reason": event["metadata"]["reason"],
            "decision": decision,
            "stage_um": [event["x_pos"], event["y_pos"]],
            "pixel_size_um": self.config.field.pixel_um,
            "exposure_ms": light.exposure_ms,
            "intensity": light.intensity,
            "dose": light.dose,
            "t_exp_start_ns": frame.header.t_exposure_start_ns,
            "start_error_ms": event.get("start_error_ms"),
            "detections_um": np.round(detections_um, 4).tolist(),
        }
        log.write("frame", **meta)
        if recorder is not None:
            recorder.append(np.asarray(frame.data), meta)

    def _summary(
        self,
        field: Any,
        found: dict[int, tuple[np.ndarray, np.ndarray]],
        chosen: list[int],
        first_look: dict[int, np.ndarray],
        n_revisit: int,
        start_errors: list[float],
    ) -> dict[str, Any]:
        cfg = self.config
        n = len(self.positions)
        margin = cfg.field.object_sigma_um  # an object cut by the view edge barely shows
        truth_tiles = {k for k, p in enumerate(self.positions) if len(field.in_view(p, margin))}
        in_grid = sorted({int(i) for p in self.positions for i in field.in_view(p, margin)})
        flagged = set(chosen)
        detections = [first_look[k] for k in chosen if k in first_look]
        all_found = np.concatenate(detections) if detections else np.zeros((0, 2))
        truth_xy = field.objects_um[in_grid] if in_grid else np.zeros((0, 2))
        matched = _match(all_found, truth_xy, cfg.match_radius_um)
        frames_total = n + n_revisit
        frames_all = n * cfg.revisit.timepoints
        dose_used = n * cfg.screen.dose + n_revisit * cfg.revisit.dose
        dose_all = frames_all * cfg.revisit.dose
        return {
            "positions": n,
            "positions_with_objects_truth": len(truth_tiles),
            "positions_revisited": len(chosen),
            "positions_revisited_with_objects": len(flagged & truth_tiles),
            "positions_with_objects_missed": len(truth_tiles - flagged),
            "frames_screen": n,
            "frames_revisit": n_revisit,
            "frames_total": frames_total,
            "frames_all_high": frames_all,
            "frames_saved": frames_all - frames_total,
            "frames_saved_fraction": (frames_all - frames_total) / frames_all,
            "dose_used": dose_used,
            "dose_all_high": dose_all,
            "dose_saved": dose_all - dose_used,
            "dose_saved_fraction": (dose_all - dose_used) / dose_all,
            "dose_budget": cfg.dose_budget,
            "objects_in_grid": len(in_grid),
            "objects_found": matched,
            "object_recall": matched / len(in_grid) if in_grid else None,
            "detections_revisit_t0": len(all_found),
            "detection_precision": matched / len(all_found) if len(all_found) else None,
            "match_radius_um": cfg.match_radius_um,
            "timing_error_p99_ms": float(np.percentile(np.abs(start_errors), 99))
            if start_errors
            else None,
        }


def _match(found: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """One-to-one matches within `radius` (Hungarian on distances)."""
    if not len(found) or not len(truth):
        return 0
    d = np.hypot(*(found[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    rows, cols = linear_sum_assignment(np.where(d <= radius, d, 1e9))
    return int(np.sum(d[rows, cols] <= radius))
