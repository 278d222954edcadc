"""The SPM forward workflow's report: spectra on the domain walls a U-Net ensemble found
in a live scan (or none, when the ensemble disagreed: out of distribution).

Reads `forward.npz` (the structure scan, wall probability, ensemble spread, the wall
points chosen in scan pixels, their rewards, and the true wall mask where the driver
side knew it), `events-spm.jsonl` (`segment` with the scan extent and the OOD decision,
one `spectrum` per spectrum where the tip was sent after drift correction, `register`
offsets) and summary.json's truth scores when the run finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from agent.records.plots import add_scale_bar, save_figure
from agent.records.reports.page import PlanReport
from agent.records.reports.run_data import RunData
from agent.records.reports.spm import PHASE

FORWARD_NAME = "forward.npz"  # agent.plans.spm_active.FORWARD_NAME (records never import plans)
MIN_WALL_PX = 5  # wall segments smaller than this are not counted (as the plan scores)


class ForwardRecords:
    def __init__(self, run: RunData) -> None:
        self.run = run
        path = run.run_dir / FORWARD_NAME
        self.maps: dict[str, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as data:
                self.maps = {k: np.asarray(data[k]) for k in data.files}
        segments = run.records(PHASE, "segment")
        self.segment: dict[str, Any] = segments[-1] if segments else {}
        self.spectra = run.records(PHASE, "spectrum")
        self.registrations = run.records(PHASE, "register")
        extent = self.segment.get("extent_um")
        self.extent_um = (float(extent[0]), float(extent[1])) if extent else None
        self.budget = (run.config.get("policy") or {}).get("budget")

    @property
    def pixels(self) -> int:
        return int(self.maps["image"].shape[-1]) if self.maps else 0

    @property
    def unit(self) -> str:
        return "µm" if self.extent_um else "px"

    def extent(self) -> tuple[float, float, float, float]:
        ex, ey = self.extent_um or (float(self.pixels), float(self.pixels))
        return (0.0, ex, 0.0, ey)

    def aimed_xy(self) -> np.ndarray:
        """Centres of the chosen wall pixels (before drift correction), extent units."""
        points = self.maps.get("points", np.zeros((0, 2))).reshape(-1, 2).astype(float)
        _, ex, _, ey = self.extent()
        n = max(self.pixels, 1)
        return np.column_stack([(points[:, 1] + 0.5) * ex / n, (points[:, 0] + 0.5) * ey / n])

    def sent_xy(self) -> np.ndarray:
        """Where the tip was sent for each spectrum, in order (µm; drift corrected)."""
        return np.array([[s["x_um"], s["y_um"]] for s in self.spectra], float).reshape(-1, 2)

    def truth(self) -> np.ndarray | None:
        mask = self.maps.get("truth")
        return mask.astype(bool) if mask is not None and mask.size else None

    def walls_found(self) -> np.ndarray | None:
        """Fraction of true wall segments with a chosen point within 1 px, after each point."""
        from scipy import ndimage

        mask = self.truth()
        if mask is None:
            return None
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.atleast_1d(ndimage.sum(np.ones_like(labels), labels, np.arange(1, count + 1)))
        big = {k + 1 for k, size in enumerate(sizes) if size >= MIN_WALL_PX}
        grown = ndimage.grey_dilation(labels, size=(3, 3))
        hit: set[int] = set()
        out = []
        for r, c in self.maps["points"].reshape(-1, 2).astype(int):
            hit |= {int(grown[r, c])} & big
            out.append(len(hit) / max(len(big), 1))
        return np.asarray(out)


def plot_maps(records: ForwardRecords, path: Path) -> tuple[str, str | None]:
    panels = [
        ("structure scan (normalised)", records.maps["image"], "gray", "a.u."),
        ("wall probability (ensemble mean)", records.maps["prob"], "viridis", "probability"),
        ("uncertainty (ensemble spread)", records.maps["spread"], "magma", "SD"),
    ]
    truth = records.truth()
    if truth is not None:
        panels.append(("true walls (as scanned)", truth.astype(float), "gray", "wall"))
    aimed = records.aimed_xy()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9), squeeze=False)
    label = None
    for ax, (title, image, cmap, unit) in zip(axes[0], panels, strict=True):
        im = ax.imshow(image, origin="lower", cmap=cmap, extent=records.extent())
        ax.scatter(*aimed.T, s=8, c="red", marker="x", linewidths=0.7)
        ax.set(title=title, xlabel=f"x ({records.unit})", ylabel=f"y ({records.unit})")
        if records.extent_um is not None:
            label = add_scale_bar(ax, records.extent_um[0])
        fig.colorbar(im, ax=ax, shrink=0.8, label=unit)
    save_figure(fig, path)
    return path.name, label


def plot_order(records: ForwardRecords, path: Path) -> str | None:
    xy = records.sent_xy()
    if not len(xy):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    ax.imshow(records.maps["image"], origin="lower", cmap="gray", extent=records.extent())
    ax.plot(*xy.T, lw=0.6, color="white", alpha=0.7)
    points = ax.scatter(*xy.T, s=18, c=np.arange(1, len(xy) + 1), cmap="plasma", zorder=3)
    fig.colorbar(points, ax=ax, shrink=0.85, label="spectrum number")
    ax.set(title=f"{len(xy)} spectra in the order taken", xlabel="x (µm)", ylabel="y (µm)")
    if records.extent_um is not None:
        add_scale_bar(ax, records.extent_um[0])
    save_figure(fig, path)
    return path.name


def plot_progress(records: ForwardRecords, path: Path) -> str | None:
    """Reward per spectrum; true walls measured and the drift correction, per spectrum."""
    if not records.spectra:
        return None
    found = records.walls_found()
    rows = 1 + (found is not None) + bool(records.registrations)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.6 * rows + 0.6), sharex=True, squeeze=False)
    n = np.arange(1, len(records.spectra) + 1)
    rewards = [
        float(s["reward"]) if s.get("reward") is not None else np.nan for s in records.spectra
    ]
    reward_name = records.run.config.get("reward", "reward")
    axes[0, 0].plot(n, rewards, ".-", lw=0.6, ms=5)
    axes[0, 0].set(ylabel=f"reward ({reward_name})", title="spectra on detected walls")
    row = 1
    if found is not None:
        ax = axes[row, 0]
        ax.step(np.arange(1, len(found) + 1), found, where="post")
        if records.budget:
            ax.axvline(float(records.budget), color="k", ls="--", lw=0.8, label="budget")
            ax.legend(fontsize=8)
        ax.set(ylabel="true walls measured", ylim=(-0.02, 1.02))
        row += 1
    if records.registrations:
        px_um = (records.extent_um[0] / records.pixels) if records.extent_um else 1.0
        unit = "nm" if records.extent_um else "px"
        scale = 1000.0 * px_um if records.extent_um else 1.0
        index = [int(r["index"]) + 1 for r in records.registrations]
        offsets = np.array([r["offset_px"] for r in records.registrations], float) * scale
        ax = axes[row, 0]
        ax.plot(index, offsets[:, 1], "o-", ms=3, label="x")
        ax.plot(index, offsets[:, 0], "s-", ms=3, label="y")
        ax.set(ylabel=f"drift corrected ({unit})")
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("spectra taken")
    save_figure(fig, path)
    return path.name


def headline(records: ForwardRecords, cut_short: bool) -> str:
    seg = records.segment
    if seg.get("ood"):
        reasons = "; ".join(seg.get("ood_reasons") or [])[:200]
        return (
            f"Scan flagged out of distribution (ensemble disagreement {seg['uncertainty']:.3g}, "
            f"threshold {seg.get('ood_score_threshold', float('nan')):.3g}): no spectra taken"
            + (f" ({reasons})." if reasons else ".")
        )
    n = len(records.spectra)
    if n == 0:
        return f"No confident wall point in the {records.pixels}-pixel scan: no spectra taken."
    text = f"Took {n} spectra on detected domain walls" + (" so far" if cut_short else "")
    found = records.walls_found()
    if found is not None and len(found):
        text += f"; {100 * found[min(n, len(found)) - 1]:.0f} % of the true wall segments measured"
    on_wall = (records.run.summary or {}).get("tip_on_wall_fraction")
    if isinstance(on_wall, float) and np.isfinite(on_wall):
        text += f"; the tip was on a wall for {100 * on_wall:.0f} % of them"
    return text + "."


def build(run: RunData) -> PlanReport:
    records = ForwardRecords(run)
    if not records.maps:
        why = "the run stopped before segmenting its scan (no forward.npz)"
        report = PlanReport(f"No wall map: {why}.")
        report.left_out.append("Maps, spectra in order, reward per spectrum (no forward.npz)")
        return report
    report = PlanReport(headline(records, run.end_note() is not None))
    out = run.run_dir
    scale = (
        f"Axes in µm over the {records.extent_um[0]:g} x {records.extent_um[1]:g} µm scan"
        if records.extent_um
        else "Axes in scan pixels (this run did not record its scan size)"
    )
    image, bar = plot_maps(records, out / "report-spm-forward-maps.png")
    bar_text = f"; scale bar {bar}" if bar else ""
    caption = f"{scale}{bar_text}. Red crosses: wall points chosen for spectra."
    report.figure("Maps: scan, wall probability, uncertainty", image, caption, "")
    image = plot_order(records, out / "report-spm-forward-order.png")
    caption = f"{scale}{bar_text}. Where the tip was sent, after drift correction."
    report.figure("Measured points in order", image, caption, "no spectrum taken")
    image = plot_progress(records, out / "report-spm-forward-progress.png")
    report.figure(
        "Reward and walls measured against spectra",
        image,
        "True walls measured: the share of the true wall segments with a spectrum within one "
        "scan pixel, against spectra spent (the budget dashed).",
        "no spectrum taken",
    )
    return report
