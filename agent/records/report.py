"""Run report: `report.html` plus PNG plots for any finished run directory.

Reads only what the runner wrote (`summary.json`, `config.yaml`, `events-<phase>.jsonl`,
`truth-<phase>.jsonl`); every optional file that is missing turns its section into a
note saying what is missing, so a crashed run or a run without ground truth still gets
a report. A run whose records stop early (killed: a log never closed, no summary; or
ended by a fault the summary names) says so at the top (`RunData.end_note`). The HTML
is self-contained apart from the PNGs next to it (relative paths).
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from agent.records.evaluate import MATCH_RADIUS_UM, controlled_track, detection_errors_um
from agent.records.frame_recording import FRAMES_NAME, read_recording, recording_exists
from agent.records.plots import save_figure
from agent.records.recorder import read_events, read_log
from agent.records.report_sections import calibration_html, plot_learning_curve, trap_calibration

PHASE_ORDER = ("feedback", "free")
PHASE_LABELS = {"feedback": "feedback on", "free": "laser off (free diffusion)"}
PHASE_COLORS = {"feedback": "tab:blue", "free": "tab:orange"}
REPORT_NAME = "report.html"


class RunData:
    """Everything a report or replay reads from one run directory."""

    def __init__(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        event_files = sorted(run_dir.glob("events-*.jsonl")) if run_dir.is_dir() else []
        phase_files = [p for p in event_files if p.stem != "events-training"]
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file() and not phase_files:
            raise ValueError(
                f"{run_dir} is not a run directory (no summary.json, no events-*.jsonl)"
            )
        self.summary: dict[str, Any] | None = None
        if summary_path.is_file():
            try:
                self.summary = json.loads(summary_path.read_text())
            except json.JSONDecodeError:
                self.summary = None
        config_path = run_dir / "config.yaml"
        self.config_text = config_path.read_text() if config_path.is_file() else None
        names = [p.stem.removeprefix("events-") for p in phase_files]
        names.sort(key=lambda n: (PHASE_ORDER.index(n) if n in PHASE_ORDER else 99, n))
        logs = {n: read_log(run_dir / f"events-{n}.jsonl") for n in names}
        self.events: dict[str, list[dict[str, Any]]] = {n: log.events for n, log in logs.items()}
        self.closed: dict[str, bool] = {n: log.closed for n, log in logs.items()}
        self.truth: dict[str, list[dict[str, Any]]] = {}
        for n in names:
            path = run_dir / f"truth-{n}.jsonl"
            records = read_events(path) if path.is_file() else []
            if records:
                self.truth[n] = records

    def end_note(self) -> str | None:
        """One line on why this run's records stop early; None for a run that finished."""
        reasons = [] if self.summary is not None else ["no summary.json"]
        for name, closed in self.closed.items():
            if not closed:
                reasons.append(f"events-{name}.jsonl never closed{_last_record(self.events[name])}")
        frames = self.run_dir / FRAMES_NAME
        if recording_exists(frames):
            recording = read_recording(frames)
            if not recording.complete:
                reasons.append(recording.describe())
        if reasons:
            return "cut short: " + "; ".join(reasons)
        reason = (self.summary or {}).get("end_reason")
        if reason and reason != "finished":
            return f"ended early: {reason}"
        return None

    @property
    def phases(self) -> list[str]:
        return list(self.events)

    def steps(self, phase: str) -> list[dict[str, Any]]:
        return [e for e in self.events.get(phase, []) if e.get("kind") == "step"]

    def start(self, phase: str) -> dict[str, Any] | None:
        return next((e for e in self.events.get(phase, []) if e.get("kind") == "start"), None)

    def target_um(self) -> tuple[float, float] | None:
        for phase in self.phases:
            start = self.start(phase)
            if start and start.get("target_um"):
                return (float(start["target_um"][0]), float(start["target_um"][1]))
        if self.summary and self.summary.get("target_um"):
            return (float(self.summary["target_um"][0]), float(self.summary["target_um"][1]))
        return None


def _last_record(events: list[dict[str, Any]]) -> str:
    times = [float(e["wall_time"]) for e in events if isinstance(e.get("wall_time"), int | float)]
    if not times:
        return " (no record)"
    stamp = time.strftime("%H:%M:%S", time.localtime(times[-1])) + f".{times[-1] % 1:.3f}"[2:]
    return f" (last record at {stamp}, {times[-1] - times[0]:.2f} s after its first)"


DRIVER_FAULT_KINDS = ("driver_down", "driver_resumed", "driver_lost")


def _driver_faults_html(run: RunData) -> str:
    """The driver going down, coming back or lost, per phase (agent/engine/driver_faults.py)."""
    rows = []
    for phase in run.phases:
        events = run.events[phase]
        t0 = next((float(e["wall_time"]) for e in events if "wall_time" in e), 0.0)
        for e in events:
            if e.get("kind") in DRIVER_FAULT_KINDS:
                down = f"{e['down_ms']:.0f} ms" if "down_ms" in e else ""
                cells = (phase, f"{float(e['wall_time']) - t0:.2f} s", e["kind"], e["reason"], down)
                rows.append("".join(f"<td>{html.escape(str(c))}</td>" for c in cells))
    if not rows:
        return ""
    head = "".join(f"<th>{h}</th>" for h in ("phase", "at", "event", "reason", "down for"))
    body = "".join(f"<tr>{r}</tr>" for r in rows)
    return f"<h2>Driver faults</h2><table><tr>{head}</tr>{body}</table>"


def load_run(run_dir: Path) -> RunData:
    """Read a run directory; ValueError naming the path if it is not one."""
    return RunData(run_dir)


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
        ax.set(xlabel="x (um)", ylabel="y (um)", title=f"true trajectory: {_label(phase)}")
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
        ax.plot(
            _truth_times_s(run.truth[phase]),
            distance,
            lw=0.8,
            color=_color(phase),
            label=_label(phase),
        )
    ax.set(xlabel="time (s)", ylabel="true distance to target (um)", title="distance to target")
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
        ax.step(
            _step_times_s(steps),
            power,
            where="post",
            lw=0.8,
            color=_color(phase),
            label=_label(phase),
        )
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
        title=f"detection error ({len(nm)} matched, {unmatched} beyond {MATCH_RADIUS_UM:g} um)",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) < 200 else text[:197] + "..."
    return str(value)


def _summary_table(summary: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in summary.items()
    )
    return f"<table>{rows}</table>"


def _section(title: str, image: str | None, missing: str, caption: str = "") -> str:
    head = f"<h2>{html.escape(title)}</h2>"
    if image is None:
        return f'{head}<p class="missing">Not available: {html.escape(missing)}</p>'
    cap = f"<p>{html.escape(caption)}</p>" if caption else ""
    return f'{head}{cap}<img src="{html.escape(image)}" alt="{html.escape(title)}">'


CSS = """
body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f4f4f4;font-weight:normal}td{font-family:monospace}
img{max-width:100%;border:1px solid #ddd}.missing{color:#a33;font-style:italic}
pre{background:#f7f7f7;padding:1em;overflow:auto}
"""


def plot_spm_maps(run_dir: Path, path: Path) -> str | None:
    """SPM active-learning maps: scan, prediction, uncertainty (+ truth), measured points.

    Reads the last `maps/step-NNNN.npz` the spm-active runner wrote (and
    `truth-reward.npz` when the true map is known); None when the run has none.
    """
    steps = sorted((run_dir / "maps").glob("step-*.npz")) if (run_dir / "maps").is_dir() else []
    if not steps:
        return None
    with np.load(steps[-1]) as data:
        maps = {k: np.asarray(data[k]) for k in data.files}
    h, w = (int(v) for v in maps["shape"])
    panels = [
        ("scan (structure channel 0)", maps["image"]),
        ("predicted reward", maps["mean"]),
        ("uncertainty (std)", maps["std"]),
    ]
    truth_path = run_dir / "truth-reward.npz"
    if truth_path.is_file():
        with np.load(truth_path) as data:
            panels.append(("true reward", np.asarray(data["reward"])))
    rows, cols = np.divmod(maps["measured"], w)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels, strict=True):
        im = ax.imshow(img, origin="lower", cmap="viridis", extent=(0, w, 0, h))
        ax.scatter(cols + 0.5, rows + 0.5, s=6, c="red", marker="x", linewidths=0.7)
        ax.set_title(f"{title} (step {len(steps)})")
        fig.colorbar(im, ax=ax, shrink=0.8)
    save_figure(fig, path)
    return path.name


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` and its PNG plots; return the HTML path.

    Raises ValueError (one line, naming the path) if `run_dir` is not a run directory.
    """
    run = load_run(Path(run_dir))
    out = run.run_dir
    feedback = "feedback" if "feedback" in run.phases else (run.phases[0] if run.phases else None)
    missing_truth = [p for p in run.phases if p not in run.truth]
    truth_note = (
        f"no ground-truth records (truth-<phase>.jsonl) for {', '.join(missing_truth)}"
        if missing_truth
        else ""
    )
    sections: list[str] = []
    no_truth = "no ground-truth records (truth-<phase>.jsonl) in this run"
    if run.target_um() is None and run.truth:
        no_truth = "no target recorded (no start event, no summary.json)"
    image = plot_trajectories(run, out / "report-trajectories.png")
    caption = f"Phases without truth: {truth_note}." if image and missing_truth else ""
    sections.append(_section("True trajectories", image, no_truth, caption))
    image = plot_distance(run, out / "report-distance.png")
    sections.append(_section("Distance to target", image, no_truth, caption))
    steps = run.steps(feedback) if feedback else []
    latencies = [float(s["latency_ms"]) for s in steps if s.get("latency_ms") is not None]
    image = plot_latency(latencies, out / "report-latency.png")
    sections.append(
        _section("Loop latency", image, "no step with a measured latency in the event log")
    )
    image = plot_detections(run, out / "report-detections.png")
    sections.append(_section("Detections and skipped frames", image, "no step events"))
    image = plot_laser(run, out / "report-laser.png")
    sections.append(_section("Laser power", image, "no step events"))
    if feedback and feedback in run.truth:
        errors, unmatched = detection_errors_um(steps, run.truth[feedback])
        image = plot_detection_error(errors, unmatched, out / "report-detection-error.png")
        why = "no detection within the match radius of a true particle"
    else:
        image, why = None, f"no ground-truth records for the {feedback or 'feedback'} phase"
    sections.append(_section(f"Detection error vs truth ({feedback} phase)", image, why))

    faults = _driver_faults_html(run)
    if faults:
        sections.append(faults)
    sections.append(f"<h2>Trap calibration ({feedback or 'feedback'} phase)</h2>")
    sections.append(calibration_html(trap_calibration(run, feedback or "feedback")))
    image = plot_learning_curve(out, out / "report-learning-curve.png")
    if image is not None:
        sections.append(_section("Detector learning curve", image, ""))

    image = plot_spm_maps(out, out / "report-spm-maps.png")
    if image is not None:
        sections.append(
            _section(
                "SPM prediction and uncertainty maps",
                image,
                "",
                "Last step's model prediction and uncertainty over the scan; red crosses: "
                "measured points. Every step's maps are in maps/step-NNNN.npz.",
            )
        )
    if run.summary is not None:
        summary_html = _summary_table(run.summary)
    else:
        summary_html = '<p class="missing">Not available: no summary.json (unfinished run?)</p>'
    if run.config_text is not None:
        config_html = (
            "<details><summary>config.yaml</summary>"
            f"<pre>{html.escape(run.config_text)}</pre></details>"
        )
    else:
        config_html = '<p class="missing">Not available: no config.yaml</p>'
    note = run.end_note()
    end_html = f'<p class="missing">{html.escape(note[0].upper() + note[1:])}</p>' if note else ""
    name = (run.summary or {}).get("name", out.name)
    phases = ", ".join(f"{p} ({len(run.steps(p))} steps)" for p in run.phases) or "none"
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>scopeloop run {html.escape(str(name))}</title><style>{CSS}</style></head>"
        f"<body><h1>Run {html.escape(str(name))}</h1>"
        f"<p>Directory: <code>{html.escape(str(out))}</code><br>Phases: {html.escape(phases)}</p>"
        f"{end_html}"
        f"<h2>Summary</h2>{summary_html}<h2>Configuration</h2>{config_html}"
        + "".join(sections)
        + "</body></html>\n"
    )
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    return path
