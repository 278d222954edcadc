"""The feedback trap's report: how tightly the particle was held, then how the loop ran.

Reads the feedback runner's records: `events-<phase>.jsonl` (steps with detections,
laser and latency), `truth-<phase>.jsonl` when the twin published ground truth,
`events-training.jsonl` when a detector was trained on the live stream, summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from agent.records.evaluate import (
    MATCH_RADIUS_UM,
    controlled_track,
    detection_errors_um,
    rms_distance,
)
from agent.records.plots import save_figure
from agent.records.report_sections import (
    calibration_html,
    detected_track,
    plot_learning_curve,
    trap_calibration,
)
from agent.records.reports.page import PlanReport, Section
from agent.records.reports.run_data import RunData

PHASE_LABELS = {"feedback": "feedback on", "free": "laser off (free diffusion)"}
PHASE_COLORS = {"feedback": "tab:blue", "free": "tab:orange"}
NO_TRUTH = "no ground truth (truth-<phase>.jsonl)"


def _step_times_s(steps: list[dict[str, Any]]) -> np.ndarray:
    """Exposure end of each step, seconds from the phase's first step."""
    t = np.array([s.get("t_exp_end_ns", 0) for s in steps], dtype=float) / 1e9
    return t - t[0] if len(t) else t


def _truth_times_s(truth: list[dict[str, Any]]) -> np.ndarray:
    t = np.array([r.get("t_s", i) for i, r in enumerate(truth)], dtype=float)
    return t - t[0] if len(t) else t


def _label(phase: str) -> str:
    return PHASE_LABELS.get(phase, phase)


def _color(phase: str) -> str:
    return PHASE_COLORS.get(phase, "tab:gray")


def _latencies_ms(steps: list[dict[str, Any]]) -> list[float]:
    return [float(s["latency_ms"]) for s in steps if s.get("latency_ms") is not None]


def plot_trajectories(run: RunData, path: Path) -> str | None:
    """True trajectory per phase (one panel each) with the target; None without truth."""
    target = run.target_um()
    phases = [p for p in run.phases if p in run.truth]
    if not phases or target is None:
        return None
    fig, axes = plt.subplots(1, len(phases), figsize=(5.2 * len(phases), 4.8), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        track = controlled_track(run.truth[phase], target)
        ax.plot(track[:, 0], track[:, 1], lw=0.8, color=_color(phase), label="true position")
        ax.plot(*track[0], "o", color="k", ms=4, label="start")
        ax.plot(*target, "r+", ms=14, mew=2, label="target")
        ax.set(xlabel="x (µm)", ylabel="y (µm)", title=f"true trajectory: {_label(phase)}")
        ax.set_aspect("equal", adjustable="datalim")
        ax.invert_yaxis()  # image convention: y grows downwards
        ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)
    return path.name


def plot_distance(run: RunData, path: Path) -> str | None:
    target = run.target_um()
    phases = [p for p in run.phases if p in run.truth]
    if not phases or target is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for phase in phases:
        track = controlled_track(run.truth[phase], target)
        distance = np.hypot(*(track - np.asarray(target)).T)
        t = _truth_times_s(run.truth[phase])
        ax.plot(t, distance, lw=0.8, color=_color(phase), label=_label(phase))
    ax.set(xlabel="time (s)", ylabel="true distance to target (µm)", title="distance to target")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def plot_latency(latencies_ms: list[float], path: Path) -> str | None:
    if not latencies_ms:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(latencies_ms, bins=60, color="tab:green")
    p50 = float(np.percentile(latencies_ms, 50))
    p99 = float(np.percentile(latencies_ms, 99))
    ax.axvline(p50, color="k", ls="-", lw=1, label=f"p50 {p50:.2f} ms")
    ax.axvline(p99, color="k", ls="--", lw=1, label=f"p99 {p99:.2f} ms")
    ax.set(
        xlabel="frame published -> command applied (ms)",
        ylabel="steps",
        title=f"loop latency (feedback phase, {len(latencies_ms)} steps)",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def plot_detections(run: RunData, path: Path) -> str | None:
    phases = [p for p in run.phases if run.steps(p)]
    if not phases:
        return None
    fig, (ax_n, ax_skip) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for phase in phases:
        steps = run.steps(phase)
        t = _step_times_s(steps)
        count = [s.get("n_detections", len(s.get("detections_um") or [])) for s in steps]
        skipped = [s.get("skipped_total", 0) for s in steps]
        ax_n.step(t, count, where="post", lw=0.8, color=_color(phase), label=_label(phase))
        ax_skip.step(t, skipped, where="post", lw=0.8, color=_color(phase), label=_label(phase))
    ax_n.set(ylabel="detections per frame", title="detections and skipped frames")
    ax_n.legend(fontsize=8)
    ax_skip.set(xlabel="time (s)", ylabel="frames skipped (cumulative)")
    ax_n.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_skip.yaxis.set_major_locator(MaxNLocator(integer=True))
    save_figure(fig, path)
    return path.name


def plot_laser(run: RunData, path: Path) -> str | None:
    phases = [p for p in run.phases if run.steps(p)]
    if not phases:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for phase in phases:
        steps = run.steps(phase)
        power = [sum(float(s["power_mw"]) for s in step.get("laser") or []) for step in steps]
        t = _step_times_s(steps)
        ax.step(t, power, where="post", lw=0.8, color=_color(phase), label=_label(phase))
    ax.set(xlabel="time (s)", ylabel="commanded laser power (mW, all spots)", title="laser power")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def plot_detection_error(errors_um: np.ndarray, unmatched: int, path: Path) -> str | None:
    if len(errors_um) == 0:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    nm = errors_um * 1000.0
    ax.hist(nm, bins=50, color="tab:purple")
    rmse = float(np.sqrt(np.mean(np.square(nm))))
    ax.axvline(rmse, color="k", ls="--", lw=1, label=f"RMS {rmse:.1f} nm")
    ax.set(
        xlabel="detection error vs truth (nm)",
        ylabel="detections",
        title=f"detection error ({len(nm)} matched, {unmatched} beyond {MATCH_RADIUS_UM:g} µm)",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def headline(run: RunData, feedback: str | None) -> str:
    """How close to the target the particle was held, against free diffusion when run."""
    target = run.target_um()
    steps = run.steps(feedback) if feedback else []
    parts = []
    if target is not None and feedback in run.truth:
        rms = rms_distance(controlled_track(run.truth[feedback], target), target)
        part = f"Held the particle {1000 * rms:.0f} nm RMS from the target (true positions)"
        if "free" in run.truth and feedback != "free":
            free = rms_distance(controlled_track(run.truth["free"], target), target)
            part += f"; free diffusion {1000 * free:.0f} nm, ratio {rms / free:.2f}"
        parts.append(part)
    elif target is not None and steps:
        track = detected_track(steps, target)
        if len(track):
            rms = rms_distance(track, target)
            parts.append(f"Held the particle {1000 * rms:.0f} nm RMS from the target (detections)")
    latencies = _latencies_ms(steps)
    if latencies:
        parts.append(f"loop latency p99 {np.percentile(latencies, 99):.2f} ms")
    if steps:
        parts.append(f"{len(steps)} feedback steps")
    return ("; ".join(parts) or "No feedback step was recorded") + "."


def build(run: RunData) -> PlanReport:
    """Today's feedback-trap sections: trajectories, latency, detections, laser, calibration."""
    out = run.run_dir
    feedback = "feedback" if "feedback" in run.phases else (run.phases[0] if run.phases else None)
    report = PlanReport(headline(run, feedback))
    missing_truth = [p for p in run.phases if p not in run.truth]
    caption = (
        f"Positions in µm (stage frame). Phases without truth: {', '.join(missing_truth)}."
        if missing_truth
        else "Positions in µm (stage frame)."
    )
    no_truth = NO_TRUTH if run.target_um() is not None or not run.truth else "no target recorded"
    image = plot_trajectories(run, out / "report-trajectories.png")
    report.figure("True trajectories", image, caption, no_truth)
    image = plot_distance(run, out / "report-distance.png")
    report.figure("Distance to target", image, caption, no_truth)
    steps = run.steps(feedback) if feedback else []
    image = plot_latency(_latencies_ms(steps), out / "report-latency.png")
    report.figure("Loop latency", image, "Frame published to command applied.", "no latency")
    image = plot_detections(run, out / "report-detections.png")
    report.figure("Detections and skipped frames", image, "", "no step events")
    image = plot_laser(run, out / "report-laser.png")
    report.figure("Laser power", image, "All spots, in mW as commanded.", "no step events")
    title = f"Detection error vs truth ({feedback} phase)"
    if feedback and feedback in run.truth:
        errors, unmatched = detection_errors_um(steps, run.truth[feedback])
        image = plot_detection_error(errors, unmatched, out / "report-detection-error.png")
        report.figure(title, image, "", "no detection within the match radius of the truth")
    else:
        report.left_out.append(f"{title} ({NO_TRUTH})")
    calibration = trap_calibration(run, feedback or "feedback")
    title = f"Trap calibration ({feedback or 'feedback'} phase)"
    if calibration is not None:
        report.sections.append(Section(title, calibration_html(calibration)))
    else:
        report.left_out.append(f"{title} (too few positions of the controlled particle)")
    image = plot_learning_curve(out, out / "report-learning-curve.png")
    if image is not None:
        report.figure("Detector learning curve", image, "", "")
    return report
