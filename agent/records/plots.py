"""Run plots (PNG): true trajectories with and without feedback, distance to target, latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

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
