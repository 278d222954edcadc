"""Smart acquisition's report: the dose spent against imaging everything at high quality,
and a mosaic of the screened positions with what was detected and what was revisited.

Reads `events-smart.jsonl` (one `frame` record per frame, with its stage position,
pixel size, dose and detections; the `decision`), the frames in `frames.ome.zarr`
(with its metadata sidecar, so a killed run's frames still show), `objects-truth.jsonl`
when the twin published its objects, and the config snapshot (the planned grid and the
revisit's illumination, for the all-high-quality comparison).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from agent.records.frame_recording import FRAMES_NAME, read_recording, recording_exists
from agent.records.plots import add_scale_bar, save_figure
from agent.records.recorder import read_events
from agent.records.reports.page import PlanReport, Section, table
from agent.records.reports.run_data import RunData

PHASE = "smart"
MOSAIC_MAX_PX = 1600  # the mosaic's longer side, after block-averaging the frames
DOSE_UNIT = "ms at full intensity"
MAX_OUTLINES = 400  # tile outlines drawn (a larger grid is seen in its frames alone)


class SmartRecords:
    """The run's frames as it logged them, and the plan they were part of."""

    def __init__(self, run: RunData) -> None:
        self.run = run
        self.frames = run.records(PHASE, "frame")
        self.screen = [f for f in self.frames if f.get("reason") == "screen"]
        self.revisit = [f for f in self.frames if f.get("reason") == "revisit"]
        config = run.config
        grid = config.get("grid") or {}
        planned = int(grid.get("nx", 0)) * int(grid.get("ny", 0))
        self.positions_planned = planned or len({_position(f) for f in self.screen})
        revisit = config.get("revisit") or {}
        self.timepoints = int(revisit.get("timepoints", 1))
        if "exposure_ms" in revisit:
            self.revisit_dose = float(revisit["exposure_ms"]) * float(revisit.get("intensity", 1))
        else:
            self.revisit_dose = max((float(f["dose"]) for f in self.revisit), default=math.nan)
        self.budget = config.get("dose_budget")
        decisions = run.records(PHASE, "decision")
        self.chosen = [int(k) for k in decisions[-1]["chosen"]] if decisions else []

    @property
    def dose_used(self) -> float:
        return float(sum(float(f.get("dose", 0.0)) for f in self.frames))

    @property
    def dose_all_high(self) -> float:
        return self.positions_planned * self.timepoints * self.revisit_dose

    def revisited(self) -> dict[int, list[dict[str, Any]]]:
        """Revisit frames per grid position, in acquisition order."""
        out: dict[int, list[dict[str, Any]]] = {}
        for f in self.revisit:
            out.setdefault(_position(f), []).append(f)
        return out

    def truth_objects(self) -> np.ndarray | None:
        path = self.run.run_dir / "objects-truth.jsonl"
        records = read_events(path) if path.is_file() else []
        if not records:
            return None
        return np.asarray(records[-1]["objects_um"], dtype=float).reshape(-1, 2)


def _position(frame: dict[str, Any]) -> int:
    return int((frame.get("event_index") or {}).get("p", -1))


def _detections(frame: dict[str, Any]) -> np.ndarray:
    return np.asarray(frame.get("detections_um") or [], dtype=float).reshape(-1, 2)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (s // factor * factor for s in image.shape)
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


class ScreenFrames:
    """The recorded screen frame of each grid position (what a killed run kept), read one
    at a time: a real camera's grid need not fit in memory."""

    def __init__(self, run: RunData) -> None:
        path = run.run_dir / FRAMES_NAME
        self.recording = read_recording(path) if recording_exists(path) else None
        self.index: dict[int, int] = {}
        for i in range(len(self.recording) if self.recording is not None else 0):
            meta = self.recording.frame_metadata(i)
            if meta.get("reason") == "screen":
                self.index[_position(meta)] = i

    def shape(self) -> tuple[int, int] | None:
        if self.recording is None or not self.index:
            return None
        h, w = self.recording.frame(next(iter(self.index.values()))).shape[-2:]
        return int(h), int(w)

    def block_mean(self, position: int, factor: int) -> np.ndarray | None:
        if self.recording is None or position not in self.index:
            return None
        return _block_mean(self.recording.frame(self.index[position]).astype(np.float32), factor)


def plot_mosaic(records: SmartRecords, path: Path) -> tuple[str, str, bool] | None:
    """(file name, scale bar label, frames drawn); None without a screened position."""
    if not records.screen:
        return None
    screens = ScreenFrames(records.run)
    pixel_um = float(records.screen[0].get("pixel_size_um", 1.0))
    stages = np.array([f["stage_um"] for f in records.screen], dtype=float)
    shape = screens.shape()
    if shape is not None:
        view = np.array(shape[::-1], dtype=float) * pixel_um
    else:  # no frames recorded: tiles as far apart as the positions
        gaps = np.abs(np.diff(np.unique(stages[:, 0])))
        view = np.full(2, float(gaps.min()) if len(gaps) else 1.0)
    lo = stages.min(axis=0) - view / 2
    hi = stages.max(axis=0) + view / 2
    span = hi - lo
    factor = max(1, math.ceil(float(span.max()) / pixel_um / MOSAIC_MAX_PX))
    cell = pixel_um * factor
    canvas = np.full(np.ceil(span[::-1] / cell).astype(int) + 1, np.nan, dtype=np.float32)
    for frame in records.screen:
        small = screens.block_mean(_position(frame), factor)
        if small is None:
            continue
        corner = np.asarray(frame["stage_um"], dtype=float) - view / 2
        c0, r0 = np.round((corner - lo) / cell).astype(int)
        h, w = small.shape
        canvas[r0 : r0 + h, c0 : c0 + w] = small[: canvas.shape[0] - r0, : canvas.shape[1] - c0]
    fig, ax = plt.subplots(figsize=(10.5, 7.5 * min(1.6, max(0.4, span[1] / span[0]))))
    ax.set_facecolor("0.15")
    drawn = bool(np.isfinite(canvas).any())
    if drawn:
        vmin, vmax = np.nanpercentile(canvas, [1, 99.7])
        extent = (lo[0], lo[0] + canvas.shape[1] * cell, lo[1] + canvas.shape[0] * cell, lo[1])
        ax.imshow(canvas, cmap="gray", vmin=vmin, vmax=vmax, extent=extent, origin="upper")
    for stage in stages[:MAX_OUTLINES]:
        ax.add_patch(Rectangle(stage - view / 2, *view, fill=False, ec="0.5", lw=0.5))
    revisited = records.revisited()
    for frames in revisited.values():
        stage = np.asarray(frames[0]["stage_um"], dtype=float)
        ax.add_patch(Rectangle(stage - view / 2, *view, fill=False, ec="tab:orange", lw=2))
        ax.text(
            *(stage - view / 2 + view * 0.03),
            f"x{len(frames)}",
            color="tab:orange",
            va="top",
            ha="left",
            fontsize=9,
            weight="bold",
        )
    screen_dets = np.concatenate([_detections(f) for f in records.screen])
    ax.scatter(
        *screen_dets.T,
        s=60,
        facecolors="none",
        edgecolors="cyan",
        lw=1,
        label=f"detected at screen ({len(screen_dets)})",
    )
    firsts = [fs[0] for fs in revisited.values()]
    revisit_dets = np.concatenate([_detections(f) for f in firsts]) if firsts else np.zeros((0, 2))
    if len(revisit_dets):
        ax.scatter(
            *revisit_dets.T,
            s=40,
            marker="+",
            c="tab:orange",
            lw=1.2,
            label=f"detected at first revisit ({len(revisit_dets)})",
        )
    truth = records.truth_objects()
    if truth is not None:
        inside = np.all((truth >= lo) & (truth <= hi), axis=1)
        ax.scatter(
            *truth[inside].T,
            s=14,
            marker="x",
            c="red",
            lw=0.8,
            label=f"true objects ({int(inside.sum())}, twin truth)",
        )
    ax.plot([], [], color="tab:orange", lw=2, label=f"revisited ({len(revisited)} positions)")
    ax.set(xlim=(lo[0], hi[0]), ylim=(hi[1], lo[1]), xlabel="stage x (µm)", ylabel="stage y (µm)")
    ax.set_aspect("equal")
    ax.set_title(f"{len(records.screen)} screened positions ({pixel_um:g} µm/px)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    label = add_scale_bar(ax, float(span[0]))
    save_figure(fig, path)
    return path.name, label, drawn


def plot_dose(records: SmartRecords, path: Path) -> str | None:
    """Cumulative dose per frame against the all-high-quality total and the budget."""
    if not records.frames:
        return None
    dose = np.cumsum([float(f.get("dose", 0.0)) for f in records.frames])
    n = np.arange(1, len(dose) + 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    for reason, color in (("screen", "tab:blue"), ("revisit", "tab:orange")):
        mask = np.array([f.get("reason") == reason for f in records.frames])
        if mask.any():
            ax.plot(n[mask], dose[mask], ".", ms=4, color=color, label=f"{reason} frames")
    ax.plot(n, dose, lw=0.8, color="k", alpha=0.5)
    if math.isfinite(records.dose_all_high):
        ax.axhline(
            records.dose_all_high,
            color="tab:red",
            ls="--",
            lw=1,
            label=f"all {records.positions_planned} positions at high quality",
        )
    if records.budget is not None:
        ax.axhline(float(records.budget), color="tab:gray", ls=":", lw=1, label="dose budget")
    ax.set_yscale("log")
    ax.set(
        xlabel="frames in acquisition order",
        ylabel=f"cumulative dose ({DOSE_UNIT})",
        title="light dose spent",
    )
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path.name


def headline(records: SmartRecords, cut_short: bool) -> str:
    if not records.frames:
        return "No frame was acquired."
    used, all_high = records.dose_used, records.dose_all_high
    so_far = " so far" if cut_short else ""
    text = f"Dose spent{so_far}: {used:.4g} ({DOSE_UNIT})"
    if math.isfinite(all_high) and all_high > 0:
        text += (
            f", {100 * used / all_high:.1f} % of imaging all {records.positions_planned} "
            f"positions at high quality ({all_high:.4g}; {100 * (1 - used / all_high):.0f} % saved)"
        )
    screened = len({_position(f) for f in records.screen})
    text += f". Screened {screened} of {records.positions_planned} positions"
    text += f", revisited {len(records.revisited())}"
    summary = records.run.summary or {}
    if summary.get("objects_in_grid"):
        text += f"; found {summary['objects_found']} of {summary['objects_in_grid']} true objects"
    return text + "."


def _revisit_table(records: SmartRecords) -> str | None:
    revisited = records.revisited()
    if not revisited:
        return None
    screen = {_position(f): f for f in records.screen}
    rows = []
    for k, frames in revisited.items():
        x, y = frames[0]["stage_um"]
        rows.append(
            [
                k,
                f"{x:.1f}, {y:.1f}",
                len(_detections(screen.get(k, {}))),
                len(frames),
                len(_detections(frames[0])),
                frames[0].get("decision", ""),
            ]
        )
    head = [
        "position",
        "stage (µm)",
        "detected at screen",
        "revisit frames",
        "detected at first revisit",
        "why",
    ]
    return table(head, rows)


def build(run: RunData) -> PlanReport:
    records = SmartRecords(run)
    report = PlanReport(headline(records, run.end_note() is not None))
    mosaic = plot_mosaic(records, run.run_dir / "report-smart-mosaic.png")
    if mosaic is not None:
        tiles = (
            "Each position's low-dose screen frame at its stage position"
            if mosaic[2]
            else "Each screened position (no frame was recorded: tiles as wide as their spacing)"
        )
        truth = "; red x: the twin's true objects" if records.truth_objects() is not None else ""
        caption = (
            f"{tiles} (stage coordinates in µm; scale bar {mosaic[1]}). Cyan circles: objects "
            "detected at screen; orange squares: positions revisited at high dose (xN: frames "
            f"taken there), + their detections on the first revisit{truth}."
        )
        report.figure("Screened positions", mosaic[0], caption, "")
    else:
        report.left_out.append("Screened positions (no frame recorded)")
    image = plot_dose(records, run.run_dir / "report-smart-dose.png")
    caption = (
        f"Dose per frame = exposure (ms) x illumination intensity, summed in acquisition order "
        f"({DOSE_UNIT}); dashed: every position imaged with the revisit's "
        f"{records.timepoints} high-quality frames."
    )
    report.figure("Dose spent", image, caption, "no frame recorded")
    revisits = _revisit_table(records)
    if revisits is not None:
        report.sections.append(Section("Revisited positions", revisits))
    else:
        report.left_out.append("Revisited positions (none revisited)")
    return report
