"""Run plots (PNG): the feedback trap's overview figure, and what every report's plots
share (writing a figure, a scale bar in physical units on an image)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.font_manager import FontProperties
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from agent.records.evaluate import controlled_track

PhaseData = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # (truth records, step events)


def plot_run(
    run_dir: Path,
    phases: dict[str, PhaseData],
    target_um: tuple[float, float],
    latencies_ms: list[float],
) -> list[str]:
    """Write `trap.png`; return the file names written."""
    fig, (ax_xy, ax_t, ax_lat) = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = {"feedback": "tab:blue", "free": "tab:orange"}
    for name, (truth, _steps) in phases.items():
        track = controlled_track(truth, target_um)
        if len(track) == 0:
            continue
        label = "feedback on" if name == "feedback" else "laser off (free diffusion)"
        color = colors.get(name, "gray")
        ax_xy.plot(track[:, 0], track[:, 1], lw=0.8, color=color, label=label)
        t = np.array([r["t_s"] for r in truth])
        ax_t.plot(
            t - t[0], np.hypot(*(track - np.asarray(target_um)).T), lw=0.8, color=color, label=label
        )
    ax_xy.plot(*target_um, "k+", ms=14, mew=2, label="target")
    ax_xy.set(xlabel="x (um)", ylabel="y (um)", title="true particle trajectory", aspect="equal")
    ax_xy.invert_yaxis()  # image convention: y grows downwards
    ax_xy.legend(fontsize=8, loc="best")
    ax_t.set(xlabel="time (s)", ylabel="distance to target (um)", title="distance to target")
    ax_t.legend(fontsize=8)
    if latencies_ms:
        ax_lat.hist(latencies_ms, bins=60, color="tab:green")
        p99 = float(np.percentile(latencies_ms, 99))
        ax_lat.axvline(p99, color="k", ls="--", lw=1, label=f"p99 {p99:.2f} ms")
        ax_lat.legend(fontsize=8)
    ax_lat.set(
        xlabel="frame published -> command applied (ms)", ylabel="steps", title="loop latency"
    )
    fig.tight_layout()
    name = "trap.png"
    fig.savefig(run_dir / name, dpi=110)
    plt.close(fig)
    return [name]


def save_figure(fig: Any, path: Path) -> None:
    """Lay out, write as PNG and close (figures are never shown: the Agg backend)."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def nice_length(span: float) -> float:
    """A 1, 2 or 5 x 10^n length no longer than a fifth of `span` (a scale bar's length)."""
    target = span / 5.0
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"scale bar: span must be a positive length (got {span})")
    decade = 10.0 ** math.floor(math.log10(target))
    return next(m * decade for m in (5.0, 2.0, 1.0) if m * decade <= target * (1 + 1e-9))


def length_label(length_um: float) -> str:
    """'500 nm', '20 µm', '2 mm': the unit that keeps the number readable."""
    if length_um < 1.0:
        return f"{length_um * 1000:g} nm"
    if length_um >= 1000.0:
        return f"{length_um / 1000:g} mm"
    return f"{length_um:g} µm"


def add_scale_bar(ax: Any, span_um: float, loc: str = "lower right") -> str:
    """Draw a scale bar on an image whose axes are in µm; return its label ('50 µm')."""
    length = nice_length(span_um)
    label = length_label(length)
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        label,
        loc,
        pad=0.3,
        sep=3,
        color="white",
        frameon=True,
        size_vertical=span_um / 150,
        fontproperties=FontProperties(size=9),
    )
    bar.patch.set(facecolor="black", alpha=0.55, edgecolor="none")
    ax.add_artist(bar)
    return label
