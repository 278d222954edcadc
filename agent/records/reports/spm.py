"""The SPM active-learning report (workflows inverse and sparse): what was found for the
spectra spent, then the maps, the measured points in order, and how the model learned.

Reads `events-spm.jsonl` (`start` with the scan extent, one `step` per batch), every
step's maps (`maps/step-NNNN.npz`: prediction, uncertainty, measured cells in order and
their rewards, the structure scan), `truth-reward.npz` when the driver side knew the true
reward (twin or replay grid), and the config snapshot. The forward workflow has its own
layout (`spm_forward`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from agent.records.plots import add_scale_bar, save_figure
from agent.records.reports.page import PlanReport
from agent.records.reports.run_data import RunData

PHASE = "spm"
TOP_FRACTIONS = (0.01, 0.05)  # top-k as a fraction of the grid; 1 % is the summary's


class SpmRecords:
    """Every step's maps and the run's scale, as the run wrote them."""

    def __init__(self, run: RunData) -> None:
        self.run = run
        folder = run.run_dir / "maps"
        self.maps: list[dict[str, np.ndarray]] = []
        for path in sorted(folder.glob("step-*.npz")) if folder.is_dir() else []:
            with np.load(path) as data:
                self.maps.append({k: np.asarray(data[k]) for k in data.files})
        start = run.start(PHASE) or {}
        extent = start.get("extent_um")
        self.extent_um: tuple[float, float] | None = (
            (float(extent[0]), float(extent[1])) if extent else None
        )
        truth = run.run_dir / "truth-reward.npz"
        self.truth: np.ndarray | None = None
        if truth.is_file():
            with np.load(truth) as data:
                self.truth = np.asarray(data["reward"], dtype=float)
        self.reward_name = str(run.config.get("reward", "reward"))
        self.budget = (run.config.get("policy") or {}).get("budget")

    @property
    def last(self) -> dict[str, np.ndarray]:
        return self.maps[-1]

    @property
    def shape(self) -> tuple[int, int]:
        h, w = (int(v) for v in self.last["shape"])
        return h, w

    def extent(self) -> tuple[float, float, float, float]:
        """imshow extent: µm when the run recorded its scan size, else map cells."""
        h, w = self.shape
        ex, ey = self.extent_um or (float(w), float(h))
        return (0.0, ex, 0.0, ey)

    @property
    def unit(self) -> str:
        return "µm" if self.extent_um else "cell"

    def measured_xy(self) -> np.ndarray:
        """(N, 2) centres of the measured cells in order, in the extent's units."""
        h, w = self.shape
        rows, cols = np.divmod(self.last["measured"].astype(int), w)
        _, ex, _, ey = self.extent()
        return np.column_stack([(cols + 0.5) * ex / w, (rows + 0.5) * ey / h])

    def final_prediction(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The last step's (mean, std) maps that hold a prediction (model-free policies
        predict only at the end)."""
        for maps in reversed(self.maps):
            if np.isfinite(maps["mean"]).any():
                return maps["mean"], maps["std"]
        return None

    def top_k(self, fraction: float) -> tuple[int, set[int]]:
        """(k, flat indices of the top-k true cells), as the summary's scoring counts it."""
        assert self.truth is not None
        flat = self.truth.ravel()
        ok = np.isfinite(flat)
        k = max(1, round(fraction * int(ok.sum())))
        return k, set(np.argsort(np.where(ok, flat, -np.inf))[-k:].tolist())


def _decorate(ax: Any, records: SpmRecords, title: str) -> str | None:
    ax.set(title=title, xlabel=f"x ({records.unit})", ylabel=f"y ({records.unit})")
    if records.extent_um is None:
        return None
    return add_scale_bar(ax, records.extent_um[0])


def plot_maps(records: SpmRecords, path: Path) -> tuple[str, str | None]:
    """Scan, measured, predicted, uncertainty (and true) reward maps; (file, scale bar)."""
    h, w = records.shape
    last = records.last
    measured_map = np.full(h * w, np.nan)
    measured_map[last["measured"].astype(int)] = last["values"]
    panels = [("structure scan (normalised)", last["image"], "gray", "a.u.")]
    panels.append(("measured reward", measured_map.reshape(h, w), "viridis", records.reward_name))
    prediction = records.final_prediction()
    if prediction is not None:
        panels.append(("predicted reward", prediction[0], "viridis", records.reward_name))
        panels.append(("uncertainty (posterior SD)", prediction[1], "magma", records.reward_name))
    if records.truth is not None:
        panels.append(("true reward", records.truth, "viridis", records.reward_name))
    xy = records.measured_xy()
    rewards = [p[1] for p in panels if p[2] == "viridis" and np.isfinite(p[1]).any()]
    low, high = (np.nanmin(rewards), np.nanmax(rewards)) if rewards else (None, None)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.9 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    label = None
    for ax, (title, image, cmap, unit) in zip(axes.flat, panels, strict=False):
        shared = {"vmin": low, "vmax": high} if cmap == "viridis" else {}
        im = ax.imshow(image, origin="lower", cmap=cmap, extent=records.extent(), **shared)
        if title != "measured reward":
            ax.scatter(*xy.T, s=5, c="red", marker="x", linewidths=0.6)
        label = _decorate(ax, records, title)
        fig.colorbar(im, ax=ax, shrink=0.8, label=unit)
    save_figure(fig, path)
    return path.name, label


def plot_order(records: SpmRecords, path: Path) -> tuple[str, float]:
    """The measured points over the scan, joined in the order they were measured;
    (file, tip travel between them in the extent's units)."""
    xy = records.measured_xy()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    ax.imshow(records.last["image"], origin="lower", cmap="gray", extent=records.extent())
    ax.plot(*xy.T, lw=0.6, color="white", alpha=0.7)
    points = ax.scatter(*xy.T, s=18, c=np.arange(1, len(xy) + 1), cmap="plasma", zorder=3)
    if len(xy):
        ax.plot(*xy[0], "o", ms=9, mfc="none", mec="cyan", mew=1.5, label="first")
        ax.legend(fontsize=8, loc="upper right")
    fig.colorbar(points, ax=ax, shrink=0.85, label="measurement number")
    _decorate(ax, records, f"{len(xy)} spectra in the order taken")
    save_figure(fig, path)
    return path.name, float(np.sum(np.hypot(*np.diff(xy, axis=0).T))) if len(xy) > 1 else 0.0


def model_errors(records: SpmRecords) -> dict[str, list[tuple[int, float]]]:
    """Per step (measurements so far, normalised RMSE): against the true map where known,
    and always the error predicting the next batch before it was measured."""
    out: dict[str, list[tuple[int, float]]] = {"truth": [], "next": []}
    values = records.last["values"]
    spread = float(np.nanstd(values)) if len(values) > 1 else math.nan
    for step, maps in enumerate(records.maps):
        n = len(maps["measured"])
        mean = maps["mean"].ravel()
        if records.truth is not None and np.isfinite(mean).any():
            ok = np.isfinite(records.truth.ravel()) & np.isfinite(mean)
            err = mean[ok] - records.truth.ravel()[ok]
            scale = max(float(np.std(records.truth.ravel()[ok])), 1e-12)
            out["truth"].append((n, float(np.sqrt(np.mean(err**2))) / scale))
        if step + 1 < len(records.maps) and np.isfinite(mean).any() and spread > 0:
            following = records.maps[step + 1]
            batch = following["measured"][n:].astype(int)
            got = following["values"][n:]
            ok = np.isfinite(got) & np.isfinite(mean[batch])
            if ok.any():
                err = float(np.sqrt(np.mean((mean[batch][ok] - got[ok]) ** 2)))
                out["next"].append((len(following["measured"]), err / spread))
    return out


def plot_progress(records: SpmRecords, path: Path) -> str:
    """Reward of every spectrum and the best so far; the model's error, against steps."""
    values = records.last["values"]
    n = np.arange(1, len(values) + 1)
    errors = model_errors(records)
    rows = 2 if errors["truth"] or errors["next"] else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.8 * rows + 0.6), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot(n, values, ".", ms=5, color="tab:blue", label="each spectrum")
    best = np.fmax.accumulate(np.where(np.isfinite(values), values, -np.inf))
    ax.step(n, np.where(np.isfinite(best), best, np.nan), where="post", color="k", label="best")
    if records.truth is not None and np.isfinite(records.truth).any():
        ax.axhline(np.nanmax(records.truth), color="tab:red", ls="--", lw=1, label="true best")
    ax.set(ylabel=f"reward ({records.reward_name})", title="reward and model error")
    ax.legend(fontsize=8)
    if rows == 2:
        ax = axes[1, 0]
        if errors["truth"]:
            ax.plot(*zip(*errors["truth"], strict=True), "o-", ms=3, label="map vs truth")
        if errors["next"]:
            ax.plot(*zip(*errors["next"], strict=True), "s-", ms=3, label="next batch, unseen")
        ax.set(ylabel="model error (RMSE / SD)")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("spectra measured (steps in batches)")
    save_figure(fig, path)
    return path.name


def plot_top_k(records: SpmRecords, path: Path) -> str | None:
    """Fraction of the true top-k cells measured against spectra spent; None without truth."""
    if records.truth is None:
        return None
    measured = records.last["measured"].astype(int)
    n = np.arange(1, len(measured) + 1)
    cells = int(np.isfinite(records.truth).sum())
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for fraction in TOP_FRACTIONS:
        k, top = records.top_k(fraction)
        found = np.cumsum([int(i in top) for i in measured]) / k
        ax.step(n, found, where="post", label=f"top {100 * fraction:g} % (k = {k})")
    ax.plot(n, np.minimum(n / cells, 1.0), ":", color="gray", label="random sampling (expected)")
    if records.budget:
        ax.axvline(float(records.budget), color="k", lw=0.8, ls="--", label="budget")
    ax.set(xlabel="spectra measured", ylabel="fraction of top-k found", ylim=(-0.02, 1.02))
    ax.set_title(f"top-k true cells found ({cells} cells)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def headline(records: SpmRecords, cut_short: bool) -> str:
    last = records.last
    measured, cells = len(last["measured"]), int(np.prod(records.shape))
    spent = f"{measured} spectra ({100 * measured / cells:.0f} % of {cells} cells)"
    spent += " so far" if cut_short else ""
    values = last["values"]
    if records.truth is not None:
        k, top = records.top_k(TOP_FRACTIONS[0])
        found = len(top & set(last["measured"].astype(int).tolist()))
        text = f"Found {found} of the top-{k} true cells (top 1 %) with {spent}"
        errors = model_errors(records)["truth"]
        if errors:
            text += f"; the model's map is off by {errors[-1][1]:.2f} SD of the true reward"
        return text + "."
    if not np.isfinite(values).any():
        return f"No finite reward in {spent}."
    best = int(np.nanargmax(values))
    x, y = records.measured_xy()[best]
    where = f"({x:.3g}, {y:.3g}) {records.unit}"
    return f"Best reward {values[best]:.4g} ({records.reward_name}) at {where}, after {spent}."


def build(run: RunData) -> PlanReport:
    if str(run.config.get("workflow") or (run.summary or {}).get("workflow")) == "forward":
        from agent.records.reports import spm_forward

        return spm_forward.build(run)
    records = SpmRecords(run)
    if not records.maps:
        return PlanReport(
            "No step finished: no spectrum was taken.",
            left_out=["Maps, measured points, reward and model error (no maps/step-NNNN.npz)"],
        )
    report = PlanReport(headline(records, run.end_note() is not None))
    out = run.run_dir
    scale = (
        f"Axes in µm over the {records.extent_um[0]:g} x {records.extent_um[1]:g} µm scan"
        if records.extent_um
        else "Axes in map cells (this run did not record its scan size)"
    )
    image, bar = plot_maps(records, out / "report-spm-maps.png")
    bar_text = f"; scale bar {bar}" if bar else ""
    report.figure(
        "Maps: measured, predicted, uncertainty",
        image,
        f"{scale}{bar_text}. After step {len(records.maps)}; red crosses: measured cells; "
        "the reward maps share one colour scale. Every step's maps are in maps/step-NNNN.npz.",
        "",
    )
    image, travel = plot_order(records, out / "report-spm-order.png")
    report.figure(
        "Measured points in order",
        image,
        f"{scale}{bar_text}. Tip travel between spectra: {travel:.3g} {records.unit}.",
        "",
    )
    image = plot_progress(records, out / "report-spm-progress.png")
    report.figure(
        "Reward and model error against steps",
        image,
        "Model error: the predicted map against the true reward, and each step's prediction "
        "of the next batch before it was measured, both as RMSE over the SD of the reward.",
        "",
    )
    image = plot_top_k(records, out / "report-spm-topk.png")
    report.figure(
        "Top-k found against budget",
        image,
        "The share of the truly best cells the run measured, against spectra spent.",
        "no true reward map (truth-reward.npz): a real instrument",
    )
    return report
