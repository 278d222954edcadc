"""Report sections beyond the trajectory plots: the trap's calibration and learning curves.

Kept apart from `agent.records.reports.feedback` (which lays out the trap's sections) so
each piece has one job.
The trap calibration reads the controlled particle's positions around the target in the
feedback phase (ground truth when the run has it, else the detections the loop acted
on) and states the effective stiffness per axis with the live loop's own estimator
(`policies.calibration.online.LiveCalibration`, drag free, memory = the whole phase) at
the run's temperature (the driver's frame headers, else the twin's ground truth, else the
config, else 300 K, said so).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.records.evaluate import controlled_track

if TYPE_CHECKING:
    from agent.records.reports.run_data import RunData

TEMPERATURE_K = 300.0  # only when the run does not say
MIN_SAMPLES = 60


def detected_track(steps: list[dict[str, Any]], target: tuple[float, float]) -> np.ndarray:
    """Per step, the detection nearest the target (steps without detections dropped)."""
    out = []
    for step in steps:
        dets = np.asarray(step.get("detections_um") or [], float).reshape(-1, 2)
        if len(dets):
            out.append(dets[np.argmin(np.hypot(*(dets - np.asarray(target)).T))])
    return np.array(out).reshape(-1, 2)


def run_temperature_k(run: RunData, phase: str) -> tuple[float, str]:
    """(temperature, where it came from): the driver's header, truth records, config.yaml,
    then a default."""
    driver = (run.start(phase) or {}).get("driver_state") or {}
    if driver.get("temperature_k") is not None:
        return float(driver["temperature_k"]), f"driver: {driver.get('temperature_source')}"
    temps = [t for r in run.truth.get(phase, []) for t in r.get("temperatures_k") or []]
    if temps:
        return float(np.median(temps)), "twin ground truth"
    if run.config_text:
        import re

        found = re.findall(r"^\s*temperature_k:\s*([0-9.eE+-]+)", run.config_text, re.M)
        if found:
            return float(found[0]), "run config"
    return TEMPERATURE_K, "assumed (the run does not record it)"


def trap_calibration(run: RunData, phase: str = "feedback") -> dict[str, Any] | None:
    """Stiffness per axis of the trap the feedback made, or None without enough data."""
    from policies.calibration.online import LiveCalibration

    target = run.target_um()
    if target is None or phase not in run.phases:
        return None
    if phase in run.truth:
        track, source = controlled_track(run.truth[phase], target), "ground truth"
        t = np.array([r.get("t_s", i) for i, r in enumerate(run.truth[phase])], float)
    else:
        steps = run.steps(phase)
        track, source = detected_track(steps, target), "detections"
        t = np.array([s.get("t_exp_end_ns", 0) for s in steps], float) / 1e9
    if len(track) < MIN_SAMPLES or len(t) < 2:
        return None
    dt = float(np.median(np.diff(t))) if np.all(np.diff(t) > 0) else 0.0
    if not dt > 0:
        return None
    temperature, t_source = run_temperature_k(run, phase)
    live = LiveCalibration(temperature_k=temperature, half_life_frames=max(len(track), 5))
    est_all = live.update(track, np.arange(len(track)) * dt)
    if est_all is None:
        return None
    axes = {}
    for i, axis in enumerate("xy"):
        est = est_all.k[i]
        axes[axis] = {
            "k_fn_per_um": est.value,
            "stderr": est.stderr,
            "interval_95": est.interval,
            "diffusion_um2_s": est_all.diffusion[i].value,
            "offset_um": float(track[:, i].mean() - target[i]),
            "sd_um": float(track[:, i].std()),
        }
    return {
        "phase": phase,
        "source": source,
        "samples": len(track),
        "dt_s": dt,
        "axes": axes,
        "temperature_k": temperature,
        "temperature_source": t_source,
        "changes": est_all.changes,
    }


def calibration_html(result: dict[str, Any]) -> str:
    """The stiffness table of `trap_calibration`'s result, with how it was estimated."""
    rows = "".join(
        f"<tr><td>{axis}</td><td>{a['k_fn_per_um']:.3g} &plusmn; {a['stderr']:.2g} "
        f"[{a['interval_95'][0]:.3g}, {a['interval_95'][1]:.3g}]</td>"  # inf prints as inf
        f"<td>{a['offset_um']:+.3f}</td><td>{a['sd_um']:.3f}</td></tr>"
        for axis, a in result["axes"].items()
    )
    note = (
        f"Drag-free AR(1) estimate (the live loop's, k = kT / Var with 95 % interval; T = "
        f"{result['temperature_k']:g} K, {html.escape(result['temperature_source'])}) on "
        f"{result['samples']} positions from {html.escape(result['source'])}, "
        f"dt = {1000 * result['dt_s']:.1f} ms. The effective stiffness of the feedback "
        "trap includes the loop's delay and the localisation noise."
    )
    return (
        "<table><tr><th>axis</th><th>k (fN/µm)</th><th>mean offset (µm)</th>"
        f"<th>SD (µm)</th></tr>{rows}</table><p>{note}</p>"
    )


def plot_learning_curve(run_dir: Path, path: Path) -> str | None:
    """Loss vs training step of the detector trained on the live stream, if one was."""
    import matplotlib.pyplot as plt

    from agent.records.plots import save_figure
    from agent.records.recorder import read_events

    events_path = run_dir / "events-training.jsonl"
    if not events_path.is_file():
        return None
    losses = [e for e in read_events(events_path) if e.get("kind") == "detector_loss"]
    if not losses:
        return None
    loss = np.array([float(e["loss"]) for e in losses])
    raw = np.array([int(e.get("step", i)) for i, e in enumerate(losses)])
    # A restart begins again at step 0: continue its count after the previous attempt.
    restarts = np.concatenate([[0], np.cumsum(np.diff(raw) < 0)])
    ends = {r: raw[restarts == r].max() + 1 for r in np.unique(restarts)}
    offsets = np.cumsum([0, *[ends[r] for r in sorted(ends)][:-1]])
    step = raw + offsets[restarts]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.plot(step, loss, lw=0.8, color="tab:purple", alpha=0.5, label="loss")
    window = max(1, len(loss) // 40)
    if window > 1 and len(loss) > window:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(step[window - 1 :], smooth, lw=1.5, color="tab:purple", label="moving mean")
    finite = loss[np.isfinite(loss)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 30:
        ax.set_yscale("log")
    ax.set_xlabel("training step (restarts continue the count)")
    ax.set_ylabel("self-supervised loss")
    ax.set_title("Deep detector trained on the live stream")
    ax.legend(loc="upper right", fontsize=8)
    save_figure(fig, path)
    return path.name
