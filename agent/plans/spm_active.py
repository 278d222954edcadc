"""`scopeloop run` for kind `spm-active`: autonomous SPM experiments over protocol v1.

Workflows (``workflow``):

- ``inverse`` (DKL): scan the sample, then let an active learner pick where to take
  switching spectra so as to find the highest-reward places (reward from the config).
- ``sparse``: the same loop with a position GP reducing uncertainty, to reconstruct
  the reward/property map from as few spectra as possible.
- ``forward``: segment domain walls in the scan with the U-Net ensemble and take
  spectra on the detected walls, unless the ensemble disagrees (out of distribution).

Every step writes the model's prediction and uncertainty maps (``maps/step-NNNN.npz``)
and an event; on a twin, whose node publishes its truth topic, the summary scores the
run against truth (agent/records/evaluate.py); a recorded grid or a real instrument
has no truth and those scores are left out.
The instrument is whatever SPM driver node `driver` names (twin, replay, a real
Nanonis controller, or a node already running), reached only by its endpoints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from rich.console import Console

from agent.config import ConfigError, load_model_config
from agent.engine.run import RunEngine
from agent.plans.spm_session import SpmSession, spm_driver
from agent.records.evaluate import (
    TruthRecorder,
    spm_scan_truth,
    spm_tip_on_wall,
    spm_true_loops,
)
from drivers.spm_host import SpmHostConfig
from policies.active.grid import CandidateGrid, detrend_plane, pfm_channels, robust_normalise
from policies.active.learners import ActivePolicyConfig, make_learner
from policies.active.register import locate
from policies.active.reward import parse_reward
from policies.active.segment import pick_wall_points

if TYPE_CHECKING:
    from agent.engine.telemetry import RunTelemetry

EVENTS_NAME = "events-spm.jsonl"
MAPS_DIR = "maps"
FORWARD_NAME = "forward.npz"


class SpectrumSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bias_v: float = Field(10.0, gt=0.0, le=10.0)  # triangle 0 -> +bias -> -bias -> 0
    points: int = Field(64, ge=8, le=4096)


class ForwardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Trained (and OOD-calibrated) on first use if missing; None: <runs_dir>/spm-segmenter.pt
    checkpoint: Path | None = None
    scan_pixels: int = Field(96, ge=16, le=1024)
    # Frame disagreement above which to refuse; None: the checkpoint's calibrated value.
    ood_threshold: float | None = Field(None, gt=0.0, le=1.0)
    wall_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_separation_px: float = Field(3.0, ge=0.0, le=100.0)
    # Drift correction: before every `register_every` spectra, re-scan a small window
    # around them and match it to the segmentation scan (policies.active.register).
    drift_correction: bool = True
    register_every: int = Field(10, ge=1, le=10_000)
    register_window_px: int = Field(24, ge=8, le=256)
    register_pad_px: int = Field(6, ge=1, le=64)  # largest drift searched, scan pixels
    min_match: float = Field(0.3, ge=0.0, le=1.0)  # NCC below this: keep the last offset


class SpmActiveConfig(BaseModel):
    """A `spm-active` experiment; `--set policy.kind=...` etc. override any field."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["spm-active"] = "spm-active"
    name: str = Field("spm-active", min_length=1, max_length=80, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    runs_dir: str = "runs"
    workflow: Literal["inverse", "sparse", "forward"] = "inverse"
    grid: int = Field(50, ge=4, le=256)  # candidate grid side (and DKL scan pixels)
    # Named as the instrument or the recorded file names them; None: every image channel
    # of a twin or recorded grid (a real controller needs them named).
    scan_channels: list[str] | None = Field(
        default_factory=lambda: ["Amplitude", "Phase", "Height"]
    )
    reward: str = "area"
    driver: SpmHostConfig = SpmHostConfig()
    spectrum: SpectrumSettings = SpectrumSettings()
    policy: ActivePolicyConfig = ActivePolicyConfig()
    forward: ForwardSettings = ForwardSettings()

    @model_validator(mode="after")
    def _one_seed(self) -> SpmActiveConfig:
        """The run's seed is the twin's sample seed (a single knob)."""
        if self.driver.seed != self.seed:
            self.driver = self.driver.model_copy(update={"seed": self.seed})
        return self

    @field_validator("reward")
    @classmethod
    def _reward_parses(cls, v: str) -> str:
        parse_reward(v)  # ValueError: one line naming the refused token
        return v

    @field_validator("scan_channels")
    @classmethod
    def _channels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct channel names")
        return v


def load_spm_config(path: Path, overrides: list[str]) -> SpmActiveConfig:
    """Read, override and validate; ConfigError with one line per problem."""
    config = load_model_config(path, overrides, SpmActiveConfig)
    replay, attached = config.driver.replay, config.driver.connect is not None
    if config.driver.source == "replay" and replay is None and not attached:
        raise ConfigError("config error: driver.replay: required with driver.source=replay")
    if config.driver.source == "nanonis" and config.driver.limits is None and not attached:
        raise ConfigError(
            "config error: driver.limits: required with driver.source=nanonis (the "
            "controller's safe x_um, y_um and bias_v ranges)"
        )
    if config.driver.source == "twin" and replay is not None:
        config.driver.source = "replay"
    if replay is not None and not Path(replay).is_file():
        raise ConfigError(f"config error: driver.replay: file {replay} does not exist")
    return config


def structure_channels(images: dict[str, np.ndarray]) -> np.ndarray:
    """(C, H, W) normalised structure channels from whatever the scan returned."""
    if {"Amplitude", "Phase", "Height"} <= set(images):
        return pfm_channels(images["Amplitude"], images["Phase"], images["Height"])
    out = []
    for name, img in images.items():
        img = detrend_plane(img) if name in ("Height", "Z") else img
        out.append(robust_normalise(img))
    return np.stack(out)


def _save_maps(
    run_dir: Path,
    step: int,
    grid: CandidateGrid,
    pred: tuple[np.ndarray, np.ndarray] | None,
    measured: list[int],
    values: list[float],
    image: np.ndarray,
) -> None:
    folder = run_dir / MAPS_DIR
    folder.mkdir(exist_ok=True)
    nan = np.full(grid.shape, np.nan)
    mean, std = (grid.to_map(pred[0]), grid.to_map(pred[1])) if pred else (nan, nan)
    np.savez_compressed(
        folder / f"step-{step:04d}.npz",
        mean=mean,
        std=std,
        measured=np.asarray(measured, dtype=np.int64),
        values=np.asarray(values, dtype=np.float64),
        image=image,
        shape=np.asarray(grid.shape),
    )


def score_against_truth(
    truth: np.ndarray, measured: list[int], pred: tuple[np.ndarray, np.ndarray] | None
) -> dict[str, float]:
    """top1pct_found (fraction of the top-1% true cells measured) and reward_rmse."""
    ok = np.isfinite(truth)
    k = max(1, round(0.01 * int(ok.sum())))
    top = set(np.argsort(np.where(ok, truth, -np.inf))[-k:].tolist())
    out = {"top1pct_found": len(top & set(measured)) / k}
    if pred is not None:
        err = pred[0][ok] - truth[ok]
        rmse = float(np.sqrt(np.mean(err**2)))
        out["reward_rmse"] = rmse
        out["reward_nrmse"] = rmse / max(float(truth[ok].std()), 1e-12)
    else:
        out["reward_rmse"] = out["reward_nrmse"] = float("nan")
    return out


# Not truth-<phase>.jsonl: those hold the feedback trap's particle records.
TRUTH_NAME = "spm-truth.jsonl"


def truth_recorder(ctx: zmq.Context, spm: SpmSession, run_dir: Path) -> TruthRecorder | None:
    """Evaluation's subscriber to the node's truth topic (a twin's), live before the
    first measurement; None for a node without one (a recorded grid, a real controller)."""
    if not spm.link.truth:
        return None
    recorder = TruthRecorder(ctx, spm.link.stream_endpoint, run_dir / TRUTH_NAME, spm.link.keys)
    recorder.start()
    recorder.connected.wait(10.0)
    return recorder


def _truth_rewards(
    config: SpmActiveConfig,
    loops: tuple[np.ndarray, np.ndarray],
    grid: CandidateGrid,
    extent_um: tuple[float, float],
) -> np.ndarray | None:
    """The true reward at every candidate, from the twin's published loop map over the
    whole sample (the cell under each candidate); None if the map has holes."""
    reward = parse_reward(config.reward)
    v, spectra = loops
    rows, cols = spectra.shape[:2]
    j = np.clip((grid.xy_um[:, 0] / extent_um[0] * cols).astype(int), 0, cols - 1)
    i = np.clip((grid.xy_um[:, 1] / extent_um[1] * rows).astype(int), 0, rows - 1)
    cells = spectra[i, j]
    if not np.all(np.isfinite(cells)):
        return None
    return np.array([reward.of_spectrum(v, s) for s in cells])


def _publish_step(
    telemetry: RunTelemetry | None,
    step: int,
    grid: CandidateGrid,
    extent: tuple[float, float],
    image: np.ndarray,
    pred: tuple[np.ndarray, np.ndarray] | None,
    learner: Any,
    values: list[float],
    decision_s: float,
) -> None:
    """The scan with the measured points, the model's maps and the step's metrics."""
    if telemetry is None:
        return
    measured = grid.xy_um[learner.measured] if learner.measured else np.zeros((0, 2))
    ex, ey = extent
    telemetry.frame(image, step, ex / image.shape[-1], detections_um=measured[-64:])
    if pred is not None:
        layers = {"mean": grid.to_map(pred[0]), "std": grid.to_map(pred[1])}
        telemetry.map(str(learner.__class__.__name__), layers, [0.0, ex, 0.0, ey], measured)
    finite = [v for v in values if np.isfinite(v)]
    telemetry.metrics(
        {
            "reward": max(finite) if finite else None,
            "measured": float(len(learner.measured)),
            "decision (s)": decision_s,
        }
    )
    telemetry.event(f"step {step}: {len(learner.measured)} measured")


def run_active(
    config: SpmActiveConfig,
    spm: SpmSession,
    run: RunEngine,
    console: Console,
    truth: TruthRecorder | None = None,
) -> dict[str, Any]:
    """Inverse (DKL) or sparse-sampling loop: propose -> spectra -> observe -> log maps.

    Each step goes to the dashboard, which may pause or stop the run between steps (a
    stop ends the loop; the session's close makes the tip safe)."""
    run_dir, events, telemetry = run.run_dir, run.events, run.telemetry
    reward = parse_reward(config.reward)
    images = spm.scan(config.grid, spm.channels)
    struct = structure_channels(images)
    grid = CandidateGrid.over(
        (config.grid, config.grid), (0.0, 0.0), spm.extent_um, struct, config.policy.patch
    )
    learner = make_learner(config.policy, grid, config.seed)
    events.write(
        "start",
        workflow=config.workflow,
        policy=config.policy.kind,
        grid=grid.shape,
        extent_um=list(spm.extent_um),  # the report's scale: um per map cell
    )
    step, decisions, fits = 0, [], []
    spm_time = 0.0
    model_based = config.policy.kind in ("dkl", "gp")
    while not learner.done and run.checkpoint():
        t0 = time.perf_counter()
        batch = learner.propose()
        decision_s = time.perf_counter() - t0
        if not batch:
            break
        spm.ensure_engaged()
        t1 = time.perf_counter()
        values = []
        for i in batch:
            curves = spm.spectrum(*grid.xy_um[i], config.spectrum.bias_v, config.spectrum.points)
            values.append(reward.of_spectrum(curves[0], curves[1]))
        spm_time += time.perf_counter() - t1
        learner.observe(batch, values)
        final = learner.done
        pred = learner.predict() if (model_based or final) else None
        _save_maps(run_dir, step, grid, pred, learner.measured, learner.values, struct[0])
        _publish_step(
            telemetry, step, grid, spm.extent_um, struct[0], pred, learner, values, decision_s
        )
        decisions.append(decision_s)
        fits.append(learner.last_fit_s)
        events.write(
            "step",
            step=step,
            measured=len(learner.measured),
            batch=batch,
            rewards=[None if not np.isfinite(v) else v for v in values],
            decision_s=decision_s,
            fit_s=learner.last_fit_s,
        )
        step += 1
        console.print(
            f"step {step}: {len(learner.measured)}/{config.policy.budget} measured, "
            f"decision {decision_s:.2f} s"
        )
    pred = learner.predict()
    finite = [v for v in learner.values if np.isfinite(v)]
    summary: dict[str, Any] = {
        "measured": len(learner.measured),
        "grid_points": grid.size,
        "steps": step,
        "best_reward": max(finite) if finite else float("nan"),
        "mean_decision_s": float(np.mean(decisions)) if decisions else 0.0,
        "max_decision_s": float(np.max(decisions)) if decisions else 0.0,
        "spectroscopy_wall_s": spm_time,
    }
    loops = spm_true_loops(truth.stop()) if truth is not None else None
    true_reward = _truth_rewards(config, loops, grid, spm.extent_um) if loops else None
    if true_reward is not None:
        summary.update(score_against_truth(true_reward, learner.measured, pred))
        np.savez_compressed(run_dir / "truth-reward.npz", reward=grid.to_map(true_reward))
    return summary


def run_forward(
    config: SpmActiveConfig,
    spm: SpmSession,
    run: RunEngine,
    console: Console,
    truth: TruthRecorder | None = None,
) -> dict[str, Any]:
    """Segment walls in a live scan; spectra on confident wall points unless OOD; the
    dashboard may pause or stop it between spectra."""
    run_dir, events = run.run_dir, run.events
    from agent.training.spm_segmenter import load_or_train_segmenter

    fwd = config.forward
    checkpoint = fwd.checkpoint or Path(config.runs_dir) / "spm-segmenter.pt"
    segmenter = load_or_train_segmenter(checkpoint, console)
    n = fwd.scan_pixels
    # Walls as scanned: spectra switch the live sample and move its walls, so the truth
    # is the twin's unperturbed sample, seen with the scanner's drift (driver side).
    images = spm.scan(n, spm.channels)
    scan_seq = spm.last_scan_seq
    struct = structure_channels(images)
    t0 = time.perf_counter()
    prob, spread = segmenter.predict(struct)
    decision = segmenter.check(struct, prob, spread, fwd.ood_threshold)
    score, ood = decision.score, decision.flagged
    points = (
        []
        if ood
        else pick_wall_points(
            prob, spread, config.policy.budget, fwd.min_separation_px, fwd.wall_threshold
        )
    )
    decision_s = time.perf_counter() - t0
    events.write(
        "segment",
        uncertainty=score,
        ood=ood,
        ood_reasons=decision.reasons,
        ood_score_threshold=decision.score_threshold,
        points=len(points),
        decision_s=decision_s,
        extent_um=list(spm.extent_um),  # the report's scale: um per scan pixel
    )
    ex, ey = spm.extent_um
    points = sorted(points)  # row by row: short tip travel, neighbours share a registration
    reward = parse_reward(config.reward)
    values, offsets = [], []
    aims: list[tuple[int, tuple[float, float]]] = []  # (spectrum seq, node xy) for truth
    aims_raw: list[tuple[int, tuple[float, float]]] = []
    offset = (0.0, 0.0)
    for k, (r, c) in enumerate(points):
        if not run.checkpoint():
            break
        if fwd.drift_correction and k % fwd.register_every == 0:
            group = np.asarray(points[k : k + fwd.register_every], dtype=float)
            found = register_drift(spm, struct, group.mean(0), fwd, spm.channels)
            if found is not None:
                offset = found
            offsets.append(offset)
            events.write("register", index=k, offset_px=list(offset))
        x = float(np.clip((c - offset[1] + 0.5) * ex / n, 0.0, ex * (1 - 1e-6)))
        y = float(np.clip((r - offset[0] + 0.5) * ey / n, 0.0, ey * (1 - 1e-6)))
        spm.ensure_engaged()
        curves = spm.spectrum(x, y, config.spectrum.bias_v, config.spectrum.points)
        values.append(reward.of_spectrum(curves[0], curves[1]))
        seq = spm.last_spectrum_seq
        aims.append((seq, spm.to_node_xy(x, y)))
        aims_raw.append((seq, spm.to_node_xy((c + 0.5) * ex / n, (r + 0.5) * ey / n)))
        events.write("spectrum", index=k, x_um=x, y_um=y, reward=values[-1])
    if ood:
        why = "; ".join(decision.reasons[:3])
        console.print(f"frame flagged out of distribution ({why}): no spectra")
    summary: dict[str, Any] = {
        "measured": len(points),
        "grid_points": n * n,
        "ood_flagged": bool(ood),
        "uncertainty": score,
        "ood_reasons": decision.reasons,
        "decision_s": decision_s,
    }
    records = truth.stop() if truth is not None else []
    scanned = spm_scan_truth(records, scan_seq)
    truth_mask = scanned[0] if scanned is not None else None
    if truth_mask is not None:
        summary.update(forward_scores(truth_mask, prob, points))
        for key, aimed in (("", aims), ("_uncorrected", aims_raw)):
            hits = spm_tip_on_wall(records, scan_seq, aimed) if aimed else None
            if hits is not None:
                summary[f"tip_on_wall_fraction{key}"] = float(np.mean(hits))
    if offsets:
        summary["drift_offset_px_max"] = float(np.max(np.hypot(*np.asarray(offsets).T)))
        summary["registrations"] = len(offsets)
    np.savez_compressed(
        run_dir / FORWARD_NAME,
        image=struct[0],
        prob=prob,
        spread=spread,
        points=np.asarray(points, dtype=np.int64).reshape(-1, 2),
        values=np.asarray(values),
        truth=truth_mask if truth_mask is not None else np.zeros((0, 0), bool),
    )
    return summary


def register_drift(
    spm: SpmSession,
    reference: np.ndarray,
    centre_rc: np.ndarray,
    fwd: ForwardSettings,
    channels: list[str],
) -> tuple[float, float] | None:
    """(dy, dx) scan pixels the sample moved since `reference`, near centre_rc; None if unsure.

    Re-scans a small window (same pixel size as the reference) and matches it inside the
    reference padded by `register_pad_px`; content at reference pixel p is now at p - d.
    """
    _, n, _ = reference.shape
    pad = fwd.register_pad_px
    size = min(fwd.register_window_px, n - 2 * pad)
    if size < 8:
        return None
    lo, hi = pad, n - pad - size
    r0 = int(np.clip(round(float(centre_rc[0]) - size / 2), lo, hi))
    c0 = int(np.clip(round(float(centre_rc[1]) - size / 2), lo, hi))
    ex, ey = spm.extent_um
    window = (c0 * ex / n, r0 * ey / n, size * ex / n, size * ey / n)
    struct = structure_channels(spm.scan_window(window, size, size, channels))
    ch = 1 if struct.shape[0] > 1 else 0
    ref = reference[ch, r0 - pad : r0 + size + pad, c0 - pad : c0 + size + pad]
    dy, dx, score = locate(struct[ch], ref, pad)
    return (dy, dx) if score >= fwd.min_match else None


def forward_scores(
    truth: np.ndarray, prob: np.ndarray, points: list[tuple[int, int]], tol_px: int = 1
) -> dict[str, float]:
    """Walls measured (true wall segments with a spectrum within tol), false positives."""
    from scipy import ndimage

    labels, count = ndimage.label(truth, structure=np.ones((3, 3)))
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    big = {k + 1 for k, s in enumerate(np.atleast_1d(sizes)) if s >= 5}
    near = ndimage.binary_dilation(truth, iterations=tol_px)
    grown = ndimage.grey_dilation(labels, size=(2 * tol_px + 1, 2 * tol_px + 1))
    hit = {int(grown[r, c]) for r, c in points} & big
    on = [bool(near[r, c]) for r, c in points]
    pred = prob >= 0.5
    tp = float((pred & truth).sum())
    return {
        "walls_measured_fraction": len(hit) / max(len(big), 1),
        "false_positive_rate": 1.0 - float(np.mean(on)) if on else float("nan"),
        "segmentation_precision": tp / max(float(pred.sum()), 1.0),
        "segmentation_recall": tp / max(float(truth.sum()), 1.0),
    }


def run_spm_active(config_path: Path, overrides: list[str], console: Console) -> dict[str, Any]:
    """Entry point for RUN_KINDS['spm-active']."""
    config = load_spm_config(config_path, overrides)
    ctx = zmq.Context()
    try:
        with (
            RunEngine(config, EVENTS_NAME) as run,
            spm_driver(config.driver, ctx, config.scan_channels) as spm,
        ):
            run.phase(config.workflow)
            truth = truth_recorder(ctx, spm, run.run_dir)
            try:
                if config.workflow == "forward":
                    result = run_forward(config, spm, run, console, truth)
                else:
                    result = run_active(config, spm, run, console, truth)
            finally:
                if truth is not None:
                    truth.stop()  # idempotent: the plan read its records already
    finally:
        ctx.term()
    head = {"name": config.name, "kind": config.kind, "workflow": config.workflow}
    return run.finish({**head, "policy": config.policy.kind, "seed": config.seed, **result})
