"""Offline replay: feed a run's recorded observations back through a policy.

When the run recorded its frames (`frames.ome.zarr`, see `agent/records/frame_recording.py`),
`replay_frames` re-runs the detector over every recorded frame and reports how the
detections change against the recorded ones; `replay_run` does that for a run that
has frames but no policy phase, and alongside the policy replay for a run that has
both (a feedback trap records every frame its loop acts on, tagged with the phase).
For the policy, replay rebuilds each step's
`Observation` from the event log (detections, track ids, target, sequence number,
exposure) and asks a policy what it would have commanded, clipped to the driver's
limits exactly as the live loop does. It reports how often
and how far the laser command would have changed and, when the run has ground
truth, the recorded detections' error. With the recorded policy config the replayed
decisions match the recorded ones.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ValidationError

from agent.config import ExperimentConfig
from agent.detection.detect import DetectorConfig, ParticleDetector
from agent.detection.detectors import Detector, DetectorSettings, build_detector
from agent.engine.safety import LaserLimits
from agent.plans.feedback_trap import DEEP_CHECKPOINT
from agent.records.evaluate import MATCH_RADIUS_UM, detection_errors_um
from agent.records.frame_recording import FRAMES_NAME, read_recording, recording_exists
from agent.records.recorder import write_json
from agent.records.report import RunData, load_run
from policies import registry
from policies.contract import Action, LaserSpot, Observation, Policy
from policies.feedback import LaserOffConfig

SPOT_TOLERANCE_UM = 0.1
POWER_TOLERANCE = 0.05  # relative
ROUNDING_UM = 1e-3  # recorded detections are rounded to 1e-4 um
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def build_policy(config: BaseModel) -> Policy:
    """Any registered policy (the registry `scopeloop run` uses)."""
    return registry.make_policy(config)


def _recorded_config(run: RunData) -> ExperimentConfig | None:
    if run.config_text is None:
        return None
    try:
        return ExperimentConfig.model_validate(yaml.safe_load(run.config_text) or {})
    except (ValidationError, yaml.YAMLError) as exc:
        raise ValueError(f"{run.run_dir / 'config.yaml'}: not a valid config ({exc})") from None


def _policy_config(policy: Any) -> BaseModel:
    """A policy config model from a model or a plain mapping (validated)."""
    try:
        return registry.parse_policy_config(policy)
    except ValueError as exc:
        raise ValueError(f"replay: invalid policy config ({exc})") from None


def _spots(wire: list[dict[str, Any]] | None) -> tuple[LaserSpot, ...]:
    return tuple(
        LaserSpot(float(s["x_um"]), float(s["y_um"]), float(s["power_mw"])) for s in wire or []
    )


def _wire(spots: tuple[LaserSpot, ...]) -> list[dict[str, float]]:
    return [{"x_um": s.x_um, "y_um": s.y_um, "power_mw": s.power_mw} for s in spots]


def _detections(step: dict[str, Any]) -> np.ndarray:
    """Recorded detections; the tracked one restored to full precision from `info`."""
    found = np.asarray(step.get("detections_um") or [], dtype=float).reshape(-1, 2)
    info = step.get("info") or {}
    if len(found) and "x_um" in info and "y_um" in info:
        exact = np.array([info["x_um"], info["y_um"]], dtype=float)
        distances = np.hypot(*(found - exact).T)
        best = int(np.argmin(distances))
        if distances[best] < ROUNDING_UM:
            found[best] = exact
    return found


def observations(run: RunData, phase: str) -> list[tuple[dict[str, Any], Observation]]:
    """(step event, rebuilt observation) for every recorded step of a phase."""
    start = run.start(phase) or {}
    state = start.get("driver_state") or {}
    field_um = tuple(float(v) for v in state.get("field_um", (0.0, 0.0)))
    exposure_s = float(state.get("exposure_ms", 0.0)) / 1000.0
    laser: list[dict[str, Any]] | None = state.get("laser")
    pairs = []
    for step in run.steps(phase):
        obs = Observation.from_wire(
            step["seq"],
            step.get("t_exp_end_ns", 0),
            exposure_s,
            _detections(step),
            step["target_um"],
            laser,
            field_um,
            step.get("track_ids"),
            temperature_k=state.get("temperature_k"),  # the sample's, as the driver said
        )
        pairs.append((step, obs))
        laser = step.get("laser")  # what the next frame was lit with (approximately)
    return pairs


def compare(
    recorded: tuple[LaserSpot, ...], replayed: tuple[LaserSpot, ...]
) -> tuple[bool, float | None]:
    """(differs, largest spot displacement in um or None when the spot counts differ)."""
    if len(recorded) != len(replayed):
        return True, None
    if not recorded:
        return False, 0.0
    moved = max(
        float(np.hypot(a.x_um - b.x_um, a.y_um - b.y_um))
        for a, b in zip(recorded, replayed, strict=True)
    )
    power = any(
        abs(a.power_mw - b.power_mw) > POWER_TOLERANCE * max(abs(a.power_mw), abs(b.power_mw))
        for a, b in zip(recorded, replayed, strict=True)
    )
    return moved > SPOT_TOLERANCE_UM or power, moved


def _default_name(policy_config: BaseModel, recorded: bool) -> str:
    if recorded:
        return "recorded"
    digest = hashlib.sha1(
        json.dumps(policy_config.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()[:8]
    return f"{getattr(policy_config, 'kind', 'policy')}-{digest}"


def _has_policy_phases(run_dir: Path, phase: str) -> bool:
    """A feedback-trap run (its config's `kind`, the default): phases of policy steps.
    Other plans that record frames (smart acquisition) replay their frames only; a run
    without its config.yaml is told by whether the phase's step log exists."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return (run_dir / f"events-{phase}.jsonl").is_file()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not a valid config ({exc})") from None
    return isinstance(raw, dict) and raw.get("kind", "feedback-trap") == "feedback-trap"


def replay_run(
    run_dir: Path,
    detector: DetectorSettings | None = None,
    policy: BaseModel | dict[str, Any] | None = None,
    *,
    phase: str = "feedback",
    name: str | None = None,
    max_examples: int = 10,
) -> dict[str, Any]:
    """Re-run a policy on a run's recorded observations; write `replay-<name>.json`.

    `policy`: any registered policy config (or a mapping validated as one);
    None replays the recorded policy (the run's config.yaml; laser off for "free").
    `detector`: recorded in the result only: frames are not logged, so the recorded
    detections are reused. Raises ValueError naming the path for a bad run directory.
    """
    run_dir = Path(run_dir)
    frames = run_dir / FRAMES_NAME
    if recording_exists(frames) and not _has_policy_phases(run_dir, phase):
        return replay_frames(run_dir, name=name)
    run = load_run(run_dir)
    if phase not in run.phases:
        raise ValueError(
            f"{run_dir}: no events-{phase}.jsonl (phases: {', '.join(run.phases) or 'none'})"
        )
    steps_events = run.steps(phase)
    if not steps_events:
        raise ValueError(f"{run_dir}: events-{phase}.jsonl holds no step events")
    recorded_config = _recorded_config(run)
    if policy is None:
        if phase == "free":
            policy_config: BaseModel = LaserOffConfig()
        elif recorded_config is None:
            raise ValueError(f"{run_dir}: no config.yaml to take the recorded policy from")
        else:
            policy_config = recorded_config.policy
    else:
        policy_config = _policy_config(policy)
    name = name or _default_name(policy_config, policy is None)
    if not _NAME.match(name):
        raise ValueError(f"replay name {name!r}: use letters, digits, '_', '.', '-'")

    start = run.start(phase)
    limits = LaserLimits.from_driver_state(start["driver_state"]) if start else None
    agent = build_policy(policy_config)
    agent.reset()
    differing = 0
    displacements: list[float] = []
    power_changes: list[float] = []
    examples: list[dict[str, Any]] = []
    session = 0
    for step, obs in observations(run, phase):
        if step.get("session", 0) != session:  # the driver came back: the loop reset too
            session = step.get("session", 0)
            agent.reset()
        action = agent.act(obs)
        clipped = False
        if limits is not None:
            action, clipped = limits.clip(action)
        recorded = _spots(step.get("laser"))
        differs, moved = compare(recorded, action.laser)
        if moved is not None and recorded:
            displacements.append(moved)
        power_changes.append(
            sum(s.power_mw for s in action.laser) - sum(s.power_mw for s in recorded)
        )
        if differs:
            differing += 1
            if len(examples) < max_examples:
                examples.append(_example(step, action, clipped, moved))

    detection = None
    if phase in run.truth:
        errors, unmatched = detection_errors_um(steps_events, run.truth[phase])
        detection = {
            "matched": len(errors),
            "unmatched": unmatched,
            "match_radius_um": MATCH_RADIUS_UM,
            "rmse_um": float(np.sqrt(np.mean(np.square(errors)))) if len(errors) else None,
            "median_um": float(np.median(errors)) if len(errors) else None,
        }
    n = len(steps_events)
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "phase": phase,
        "name": name,
        "policy": policy_config.model_dump(mode="json"),
        "policy_source": "recorded" if policy is None else "given",
        "detector": (detector or (recorded_config.agent.detector if recorded_config else None)),
        "detector_replayed": False,
        "note": "frames are not recorded: the recorded detections are reused, only the policy "
        "is re-run",
        "tolerances": {"spot_um": SPOT_TOLERANCE_UM, "power_relative": POWER_TOLERANCE},
        "steps": n,
        "steps_differing": differing,
        "fraction_differing": differing / n,
        "mean_spot_displacement_um": float(np.mean(displacements)) if displacements else None,
        "max_spot_displacement_um": float(np.max(displacements)) if displacements else None,
        "mean_power_change_mw": float(np.mean(power_changes)),
        "detection_error": detection,
        "examples": examples,
        "cut_short": run.end_note(),
    }
    if isinstance(result["detector"], BaseModel):
        result["detector"] = result["detector"].model_dump(mode="json")
    if recording_exists(frames):  # the photons too: re-detect the phase's recorded frames
        frames_result = replay_frames(run_dir, phase=phase, max_examples=max_examples)
        result["frames_replay"] = frames_result
        result["note"] = "the policy re-runs on the recorded detections; detection re-runs on "
        result["note"] += f"the recorded frames ({frames_result['output']})"
    path = run_dir / f"replay-{name}.json"
    result["output"] = str(path)
    write_json(path, result)
    return result


def _example(
    step: dict[str, Any], action: Action, clipped: bool, moved: float | None
) -> dict[str, Any]:
    return {
        "seq": step["seq"],
        "recorded": step.get("laser") or [],
        "replayed": _wire(action.laser),
        "replayed_clipped": clipped,
        "spot_displacement_um": moved,
        "recorded_info": step.get("info") or {},
        "replayed_info": dict(action.info),
    }


DETECTION_TOLERANCE_UM = 0.05


def _recorded_detector(run_dir: Path) -> tuple[Detector, dict[str, Any]]:
    """The detector the run used (its config.yaml: a plan's `detector`, or the feedback
    trap's `agent.detector`, a trained one from the run's checkpoint), and its config."""
    path = run_dir / "config.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    agent = raw.get("agent")
    field = "agent.detector" if isinstance(agent, dict) and "detector" in agent else "detector"
    try:
        if field == "agent.detector":
            settings = DetectorSettings.model_validate(agent["detector"] or {})
            detector = build_detector(settings, run_dir / DEEP_CHECKPOINT)
            return detector, settings.model_dump(mode="json")
        config = DetectorConfig.model_validate(raw.get("detector") or {})
    except ValidationError as exc:
        raise ValueError(f"{path}: {field}: {exc.errors()[0]['msg']}") from None
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return ParticleDetector(config), config.model_dump(mode="json")


def _frame_detections_um(px: np.ndarray, frame: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Pixel detections in the recording's coordinates: um from the frame's corner plus
    `origin_um` (a frame-by-frame plan), else from the view centre at `stage_um`."""
    pixel = float(meta.get("pixel_size_um", 1.0))
    if "origin_um" in meta:
        return px * pixel + np.asarray(meta["origin_um"], dtype=float)
    stage = np.asarray(meta.get("stage_um") or (0.0, 0.0), dtype=float)
    centre = np.array([frame.shape[1], frame.shape[0]]) / 2
    return (px + 0.5 - centre) * pixel + stage


def replay_frames(
    run_dir: Path,
    detector: DetectorConfig | dict[str, Any] | None = None,
    *,
    name: str | None = None,
    phase: str | None = None,
    max_examples: int = 10,
) -> dict[str, Any]:
    """Re-run detection over a run's recorded frames; write `replay-<name>.json`.

    `detector`: None re-runs the recorded detector (results match the recording);
    another config shows what it would have found on the very same photons.
    `phase`: only the frames recorded in that phase (a feedback run's "feedback").
    """
    run_dir = Path(run_dir)
    if not recording_exists(run_dir / FRAMES_NAME):
        raise ValueError(f"{run_dir}: no {FRAMES_NAME} (the run did not record frames)")
    source = "recorded" if detector is None else "given"
    if detector is None:
        run_detector, described = _recorded_detector(run_dir)
    else:
        try:
            config = (
                detector
                if isinstance(detector, DetectorConfig)
                else DetectorConfig.model_validate(detector)
            )
        except ValidationError as exc:
            raise ValueError(f"replay: detector: {exc.errors()[0]['msg']}") from None
        run_detector, described = ParticleDetector(config), config.model_dump(mode="json")
    name = name or (
        "frames-recorded"
        if detector is None
        else "frames-"
        + hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:8]
    )
    if phase is not None:
        name = f"{name}-{phase}"
    if not _NAME.match(name):
        raise ValueError(f"replay name {name!r}: use letters, digits, '_', '.', '-'")
    recording = read_recording(run_dir / FRAMES_NAME)
    changed = n = 0
    recorded_total = replayed_total = 0
    displacements: list[float] = []
    examples: list[dict[str, Any]] = []
    for i in range(len(recording)):
        meta = recording.frame_metadata(i)
        if phase is not None and meta.get("phase") != phase:
            continue
        n += 1
        frame = recording.frame(i)
        px = np.asarray(run_detector(frame), dtype=float).reshape(-1, 2)
        replayed = _frame_detections_um(px, frame, meta)
        recorded = np.asarray(meta.get("detections_um") or [], dtype=float).reshape(-1, 2)
        recorded_total += len(recorded)
        replayed_total += len(replayed)
        moved = _largest_shift(recorded, replayed)
        differs = len(recorded) != len(replayed) or (moved or 0.0) > DETECTION_TOLERANCE_UM
        if moved is not None:
            displacements.append(moved)
        if differs:
            changed += 1
            if len(examples) < max_examples:
                examples.append(
                    {
                        "frame": i,
                        "seq": meta.get("seq"),
                        "reason": meta.get("reason"),
                        "decision": meta.get("decision"),
                        "recorded_um": recorded.round(3).tolist(),
                        "replayed_um": replayed.round(3).tolist(),
                    }
                )
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "kind": "frames",
        "name": name,
        "phase": phase,
        "pixel_size_um": recording.pixel_size_um,
        "detector": described,
        "detector_source": source,
        "detector_replayed": True,
        "frames": n,
        "frames_changed": changed,
        "fraction_changed": changed / n if n else 0.0,
        "detections_recorded": recorded_total,
        "detections_replayed": replayed_total,
        "max_detection_shift_um": float(np.max(displacements)) if displacements else None,
        "tolerance_um": DETECTION_TOLERANCE_UM,
        "examples": examples,
        "recording_complete": recording.complete,
        "frames_lost": recording.frames_lost,
        # The run's own note: a recording closed cleanly can still belong to a run that
        # was killed before its summary (the note then says so).
        "cut_short": load_run(run_dir).end_note(),
    }
    path = run_dir / f"replay-{name}.json"
    result["output"] = str(path)
    result["message"] = (
        f"re-ran detection on {n} recorded frames: {changed} changed, detections "
        f"{recorded_total} -> {replayed_total}; written to {path}"
        + (f" ({result['cut_short']})" if result["cut_short"] else "")
    )
    write_json(path, result)
    return result


def _largest_shift(recorded: np.ndarray, replayed: np.ndarray) -> float | None:
    """Largest nearest-neighbour shift between equal-sized detection sets (else None)."""
    if len(recorded) != len(replayed):
        return None
    if not len(recorded):
        return 0.0
    d = np.hypot(*(recorded[:, None, :] - replayed[None, :, :]).transpose(2, 0, 1))
    return float(np.max(np.min(d, axis=1)))
