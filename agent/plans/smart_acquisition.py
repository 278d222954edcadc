"""Smart acquisition: screen a stage grid at low dose, revisit only what holds objects.

The agent drives a driver node over protocol v1, by endpoint: the sparse-field twin
(`driver.kind: sparse-field`, the default), Micro-Manager's demo adapters or a user's
config (`kind: mmcore`), or a node already running (`driver.connect`), with event-driven acquisition
(`submit_events`): one low-exposure, low-intensity frame per grid position; detection
on each; then high-exposure time-lapse frames only at positions where objects were
found, as many as the light-dose budget allows (dose per frame = exposure x
illumination intensity, in ms at full intensity). Every frame is recorded to OME-Zarr
with the decision that asked for it, through the run engine's writer in its lossless
mode: frames are few and each cost the sample light, so the plan waits for the disk
rather than drop one. The summary compares frames and dose with imaging
every position at high quality, and, on a twin, the detections with the truth the
driver publishes on its truth topic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from scipy.optimize import linear_sum_assignment

from agent.config import ConfigError, load_model_config
from agent.detection.detect import DetectorConfig, ParticleDetector
from agent.engine.link import DriverLink, driver_for
from agent.engine.run import RunEngine
from agent.records.evaluate import TruthRecorder
from agent.records.frame_writer import BackgroundFrameWriter
from agent.records.recorder import EventLog
from drivers.config import DriverConfig
from drivers.protocol import FRAME_PREFIX, Frame, decode_frame, now_ns
from drivers.transport import DEFAULT_FRAME_MAX_BYTES, CommandClient, raw_subscriber

EVENTS_NAME = "events-smart.jsonl"
# Commands the plan sends: a node without them (an SPM node) is refused before anything moves.
NEEDS = {"submit_events", "stop_events", "get_state"}
TRUTH_WAIT_S = 5.0
DRIVER_DEFAULTS = {"kind": "sparse-field", "watchdog_ms": 60_000, "stream_hwm": 10_000}


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
    # The instrument: the sparse-field twin unless the config says otherwise.
    driver: DriverConfig = DriverConfig(**DRIVER_DEFAULTS)  # type: ignore[arg-type]
    # Illumination intensity (device, property), set per event; None: no such device
    # (a camera-only rig or the demo adapters), then both intensities must be 1.
    lamp: tuple[str, str] | None = ("Lamp", "intensity")
    grid: GridConfig = GridConfig()
    screen: Illumination = Illumination(exposure_ms=2.0, intensity=0.25)
    revisit: RevisitConfig = RevisitConfig(exposure_ms=20.0, intensity=1.0)
    # Total light dose allowed (ms at full intensity); None: no limit beyond the plan.
    dose_budget: float | None = Field(None, gt=0.0, le=1e9)
    min_objects: int = Field(1, ge=1, le=10_000)  # detections that make a position worth it
    detector: DetectorConfig = DetectorConfig()
    match_radius_um: float = Field(2.0, gt=0.0, le=1000.0)
    record_frames: bool = True
    # How far the frame writer may fall behind before the plan waits for it (lossless).
    record_queue_mb: float = Field(64.0, gt=0.0, le=65_536.0)
    timeout_s: float = Field(120.0, gt=0.0, le=86_400.0)

    @model_validator(mode="before")
    @classmethod
    def _smart_driver_defaults(cls, data: Any) -> Any:
        """Driver fields the YAML leaves out take the plan's defaults (not the feedback
        trap's) and the run's seed, so `seed=` reseeds the twin's sample too."""
        if isinstance(data, dict) and isinstance(data.get("driver", {}), dict):
            seed = {"seed": data["seed"]} if "seed" in data else {}
            data = {**data, "driver": {**DRIVER_DEFAULTS, **seed, **data.get("driver", {})}}
        return data

    @model_validator(mode="after")
    def _lamp_or_full_intensity(self) -> SmartAcquisitionConfig:
        if self.lamp is None and (self.screen.intensity, self.revisit.intensity) != (1.0, 1.0):
            raise ValueError(
                "lamp: none set, so screen.intensity and revisit.intensity must be 1 "
                "(the dose is then exposure only)"
            )
        return self

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
    with RunEngine(config, EVENTS_NAME) as run:
        summary = SmartAcquisition(config, run).run()
    summary = run.finish(summary)
    run_dir = run.run_dir
    found = (
        f"objects found {summary['objects_found']}/{summary['objects_in_grid']}; "
        if summary["objects_in_grid"] is not None
        else ""
    )
    console.print(
        f"smart acquisition: {summary['frames_total']} frames (all-high: "
        f"{summary['frames_all_high']}), dose {summary['dose_used']:.1f} vs "
        f"{summary['dose_all_high']:.1f} ({100 * summary['dose_saved_fraction']:.0f}% saved); "
        f"{found}run dir {run_dir}",
        markup=False,
        highlight=False,
    )
    return summary


class SmartAcquisition:
    """One run on whatever driver node the config names, over protocol v1 only."""

    def __init__(self, config: SmartAcquisitionConfig, run: RunEngine) -> None:
        self.config = config
        self.engine = run
        self.run_dir = run.run_dir
        self.positions: list[tuple[float, float]] = []
        self.pixel_um = 1.0
        self.chosen: list[int] = []
        self.first_look: dict[int, np.ndarray] = {}
        self.detector = ParticleDetector(config.detector)

    def _layout(self, state: dict[str, Any]) -> None:
        """Grid positions and pixel size from what the instrument reports; a lamp the
        driver does not let us set is refused here, before anything moves."""
        if self.config.lamp is not None:
            lamp = ".".join(self.config.lamp)
            allowed = state.get("limits", {}).get("properties", {})
            if lamp not in allowed:
                raise ConfigError(
                    f"config error: driver.limits.properties: the driver does not allow {lamp} "
                    f"(it allows {sorted(allowed) or 'none'}); allow it there, or set lamp: null"
                )
        self.pixel_um = float(state["pixel_size_um"])
        step = self.config.grid.step_um or float(state["field_um"][0])
        ox, oy = self.config.grid.origin_um
        grid = self.config.grid
        self.positions = [
            (ox + i * step, oy + j * step) for j in range(grid.ny) for i in range(grid.nx)
        ]

    # --- plumbing ----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        ctx = zmq.Context()
        try:
            with driver_for(self.config.driver, self.run_dir, "smart", ctx) as link:
                link.require(NEEDS, self.config.kind)
                summary = self._run_on(ctx, link)
        finally:
            ctx.term()
        return summary

    def _run_on(self, ctx: zmq.Context, link: DriverLink) -> dict[str, Any]:
        cfg = self.config
        sub = raw_subscriber(
            ctx, link.stream_endpoint, [FRAME_PREFIX], 100_000, link.keys, DEFAULT_FRAME_MAX_BYTES
        )
        truth = TruthRecorder(
            ctx, link.stream_endpoint, self.run_dir / "objects-truth.jsonl", link.keys
        )
        truth.start()
        client = CommandClient(ctx, link.command_endpoint, timeout_ms=10_000, keys=link.keys)
        recorder = (
            self.engine.frame_writer(cfg.record_queue_mb, lossless=True)
            if cfg.record_frames
            else None
        )
        log = self.engine.events
        try:
            self._layout(client.call("get_state").result)
            self._frames_before_events(sub)
            if link.truth:  # the twin's objects, before it moves, for the evaluation
                truth.received.wait(TRUTH_WAIT_S)
            summary = self._acquire(client, sub, recorder, log)
        finally:  # the engine closes the recording and puts its counts in the summary
            client.close()
            sub.close()
            records = truth.stop()
        summary.update(self._truth_scores(records[-1] if records else None, summary))
        return summary

    def _frames_before_events(self, sub: zmq.Socket) -> None:
        """Wait for the continuous stream: the subscription is live (no slow joiner)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sub.poll(100):
                sub.recv_multipart()
                return
        raise RuntimeError("smart acquisition: the driver node sent no frame within 10 s")

    def _collect(
        self, sub: zmq.Socket, ids: set[int], on_frame: Callable[[Frame], None]
    ) -> list[Frame]:
        """Frames of the given event ids (continuous live frames are ignored), each handed
        to `on_frame` as it arrives, so it goes to the recording at once."""
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
                on_frame(frame)
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
            "properties": [[*self.config.lamp, light.intensity]] if self.config.lamp else [],
            "index": index,
            "metadata": metadata,
        }

    def _detect_um(self, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
        """Detections in stage coordinates (um) and their scores."""
        image = np.asarray(frame.data)
        px, scores = self.detector.detect_with_scores(image)
        event = frame.header.state["event"]
        stage = np.array([event["x_pos"], event["y_pos"]], dtype=float)
        centre = np.array([image.shape[1], image.shape[0]]) / 2
        xy = (np.asarray(px, dtype=float).reshape(-1, 2) + 0.5 - centre) * self.pixel_um
        return xy + stage, np.asarray(scores, dtype=float)

    # --- the experiment ------------------------------------------------------------------

    def _acquire(
        self,
        client: CommandClient,
        sub: zmq.Socket,
        recorder: BackgroundFrameWriter | None,
        log: EventLog,
    ) -> dict[str, Any]:
        cfg = self.config
        n = len(self.positions)
        self.engine.phase("screen")
        screen_events = [
            self._event(k, cfg.screen, {"p": k}, {"reason": "screen", "position": k})
            for k in range(n)
        ]
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def on_screen(frame: Frame) -> None:
            k = int(frame.header.state["event"]["metadata"]["position"])
            xy, scores = self._detect_um(frame)
            found[k] = (xy, scores)
            self._record(recorder, log, frame, cfg.screen, xy, f"screen of grid position {k}")

        ids = client.call("submit_events", {"events": screen_events}).result["ids"]
        self._collect(sub, set(ids), on_screen)

        # Decide: positions with objects, best first, within the dose budget.
        candidates = [k for k in range(n) if len(found[k][0]) >= cfg.min_objects]
        candidates.sort(key=lambda k: -float(found[k][1].max(initial=0.0)))
        dose_screen = n * cfg.screen.dose
        per_position = cfg.revisit.timepoints * cfg.revisit.dose
        budget_left = None if cfg.dose_budget is None else cfg.dose_budget - dose_screen
        chosen: list[int] = []
        for k in candidates[: cfg.revisit.max_positions]:
            if budget_left is not None and per_position * (len(chosen) + 1) > budget_left:
                break
            chosen.append(k)
        skipped_budget = len(candidates[: cfg.revisit.max_positions]) - len(chosen)
        if chosen and not self.engine.checkpoint():  # stopped from the dashboard: no revisits
            log.write("stopped", before="revisit", positions_not_revisited=len(chosen))
            chosen = []
        log.write(
            "decision",
            candidates=candidates,
            chosen=chosen,
            skipped_for_budget=skipped_budget,
            dose_screen=dose_screen,
        )

        revisit: list[Frame] = []
        first_look: dict[int, np.ndarray] = {}
        start_errors = []

        def on_revisit(frame: Frame) -> None:
            meta = frame.header.state["event"]["metadata"]
            xy, _scores = self._detect_um(frame)
            if meta["timepoint"] == 0:
                first_look[int(meta["position"])] = xy
            if frame.header.state["event"].get("start_error_ms") is not None:
                start_errors.append(frame.header.state["event"]["start_error_ms"])
            self._record(recorder, log, frame, cfg.revisit, xy, meta["decision"])

        if chosen:
            self.engine.phase("revisit")
            t0 = now_ns() + 50_000_000
            events = []
            for t in range(cfg.revisit.timepoints):
                for i, k in enumerate(chosen):
                    why = (
                        f"screen found {len(found[k][0])} objects at grid position {k} "
                        f"(best score {float(found[k][1].max(initial=0.0)):.1f})"
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
            revisit = self._collect(sub, set(ids), on_revisit)
        client.call("stop_events")
        self.first_look = first_look
        self.chosen = chosen
        return self._summary(chosen, len(revisit), start_errors)

    def _record(
        self,
        recorder: BackgroundFrameWriter | None,
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
            "pixel_size_um": self.pixel_um,
            "exposure_ms": light.exposure_ms,
            "intensity": light.intensity,
            "dose": light.dose,
            "t_exp_start_ns": frame.header.t_exposure_start_ns,
            "start_error_ms": event.get("start_error_ms"),
            "detections_um": np.round(detections_um, 4).tolist(),
        }
        log.write("frame", **meta)
        image = np.asarray(frame.data)
        if recorder is not None:
            recorder.offer(image, meta)
        # the dashboard draws detections in the view's frame (um from its corner)
        corner = np.asarray(meta["stage_um"]) - np.array(image.shape[::-1]) * self.pixel_um / 2
        self.engine.telemetry.frame(
            image, frame.header.seq, self.pixel_um, detections_um - corner, info={"why": decision}
        )

    def _summary(
        self, chosen: list[int], n_revisit: int, start_errors: list[float]
    ) -> dict[str, Any]:
        cfg = self.config
        n = len(self.positions)
        frames_total = n + n_revisit
        frames_all = n * cfg.revisit.timepoints
        dose_used = n * cfg.screen.dose + n_revisit * cfg.revisit.dose
        dose_all = frames_all * cfg.revisit.dose
        return {
            "positions": n,
            "positions_revisited": len(chosen),
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
            "match_radius_um": cfg.match_radius_um,
            "timing_error_p99_ms": float(np.percentile(np.abs(start_errors), 99))
            if start_errors
            else None,
        }

    def _truth_scores(
        self, truth: dict[str, Any] | None, summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Recall and precision against the twin's objects (its truth topic); None on an
        instrument that publishes no truth."""
        keys = (
            "positions_with_objects_truth",
            "positions_revisited_with_objects",
            "positions_with_objects_missed",
            "objects_in_grid",
            "objects_found",
            "object_recall",
            "detections_revisit_t0",
            "detection_precision",
        )
        if truth is None:
            return dict.fromkeys(keys)
        objects = np.asarray(truth["objects_um"], dtype=float).reshape(-1, 2)
        half = np.asarray(truth["view_um"], dtype=float) / 2 - float(truth["object_sigma_um"])
        # an object cut by the view edge barely shows: only those a sigma inside count
        in_view = [
            np.flatnonzero(np.all(np.abs(objects - np.asarray(p)) < half, axis=1))
            for p in self.positions
        ]
        truth_tiles = {k for k, inside in enumerate(in_view) if len(inside)}
        in_grid = sorted({int(i) for inside in in_view for i in inside})
        flagged = set(self.chosen)
        detections = [self.first_look[k] for k in self.chosen if k in self.first_look]
        all_found = np.concatenate(detections) if detections else np.zeros((0, 2))
        matched = _match(all_found, objects[in_grid], self.config.match_radius_um)
        return {
            "positions_with_objects_truth": len(truth_tiles),
            "positions_revisited_with_objects": len(flagged & truth_tiles),
            "positions_with_objects_missed": len(truth_tiles - flagged),
            "objects_in_grid": len(in_grid),
            "objects_found": matched,
            "object_recall": matched / len(in_grid) if in_grid else None,
            "detections_revisit_t0": len(all_found),
            "detection_precision": matched / len(all_found) if len(all_found) else None,
        }


def _match(found: np.ndarray, truth: np.ndarray, radius: float) -> int:
    """One-to-one matches within `radius` (Hungarian on distances)."""
    if not len(found) or not len(truth):
        return 0
    d = np.hypot(*(found[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    rows, cols = linear_sum_assignment(np.where(d <= radius, d, 1e9))
    return int(np.sum(d[rows, cols] <= radius))
