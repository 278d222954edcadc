"""A sweep's outputs: one row per point (`points.csv`), one per setting with the mean and
a 95 % t-interval of every metric over its seeds (`settings.csv`), both in `sweep.json`,
a plot per metric and `index.html` linking every run's own report."""

from __future__ import annotations

import csv
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from agent.records.plots import save_figure
from agent.sweep.grid import PointResult


def mean_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """Mean and its 95 % Student-t interval (None with fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, None, None
    mean = float(np.mean(values))
    if n < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def put_mean_interval(metrics: dict[str, Any], name: str, values: list[float]) -> None:
    """A bench's seed-study figure: `name` (mean over seeds) and `name_ci95_low/high`
    (95 % Student-t interval; NaN, null in --json, with one seed)."""
    mean, low, high = mean_interval(values)
    metrics[name] = mean
    metrics[f"{name}_ci95_low"] = math.nan if low is None else low
    metrics[f"{name}_ci95_high"] = math.nan if high is None else high


def summarize_settings(results: list[PointResult]) -> list[dict[str, Any]]:
    """Per setting (label), in first-seen order: counts and each metric's mean/interval."""
    groups: dict[str, list[PointResult]] = {}
    for result in results:
        groups.setdefault(result["label"], []).append(result)
    rows = []
    for label, members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        names = sorted({k for m in ok for k in m["metrics"]})
        metrics = {}
        for name in names:
            mean, low, high = mean_interval(
                [m["metrics"][name] for m in ok if name in m["metrics"]]
            )
            metrics[name] = {"mean": mean, "ci95": [low, high]}
        rows.append(
            {
                "label": label,
                "setting": members[0]["setting"],
                "runs": len(members),
                "failed": len(members) - len(ok),
                "metrics": metrics,
            }
        )
    return rows


def write_outputs(sweep_dir: Path, results: list[PointResult]) -> dict[str, Path]:
    results = sorted(results, key=lambda r: (r["label"], r["seed"]))
    settings = summarize_settings(results)
    paths = {
        "points_csv": sweep_dir / "points.csv",
        "settings_csv": sweep_dir / "settings.csv",
        "json": sweep_dir / "sweep.json",
        "html": sweep_dir / "index.html",
    }
    metric_names = sorted({k for r in results for k in r["metrics"]})
    with paths["points_csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["setting", "seed", "status", "error", "run_dir", *metric_names])
        for r in results:
            writer.writerow(
                [
                    r["label"],
                    r["seed"],
                    r["status"],
                    r["error"] or "",
                    r["run_dir"] or "",
                    *(r["metrics"].get(name, "") for name in metric_names),
                ]
            )
    with paths["settings_csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        header = ["setting", "runs", "failed"]
        for name in metric_names:
            header += [f"{name}_mean", f"{name}_ci95_low", f"{name}_ci95_high"]
        writer.writerow(header)
        for row in settings:
            cells: list[Any] = [row["label"], row["runs"], row["failed"]]
            for name in metric_names:
                m = row["metrics"].get(name)
                cells += [m["mean"], m["ci95"][0], m["ci95"][1]] if m else ["", "", ""]
            writer.writerow(cells)
    paths["json"].write_text(json.dumps({"settings": settings, "points": results}, indent=1))
    plots = plot_metrics(sweep_dir / "plots", settings, metric_names)
    paths["html"].write_text(render_html(sweep_dir, settings, results, plots))
    return paths


def plot_metrics(folder: Path, settings: list[dict[str, Any]], names: list[str]) -> list[Path]:
    """One errorbar plot per metric: mean and 95 % interval per setting."""
    import matplotlib.pyplot as plt  # agent.records.plots has chosen the Agg backend

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        rows = [(s["label"], s["metrics"][name]) for s in settings if name in s["metrics"]]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.2))
        x = np.arange(len(rows))
        means = np.array([m["mean"] for _, m in rows])
        low = np.array(
            [m["mean"] - (m["ci95"][0] if m["ci95"][0] is not None else m["mean"]) for _, m in rows]
        )
        high = np.array(
            [(m["ci95"][1] if m["ci95"][1] is not None else m["mean"]) - m["mean"] for _, m in rows]
        )
        ax.errorbar(x, means, yerr=[low, high], fmt="o", capsize=4)
        ax.set_xticks(x, [label for label, _ in rows], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(name)
        ax.set_title(f"{name}: mean and 95 % interval over seeds", fontsize=9)
        path = folder / f"{name}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def render_html(
    sweep_dir: Path, settings: list[dict[str, Any]], results: list[PointResult], plots: list[Path]
) -> str:
    def fmt(m: dict[str, Any] | None) -> str:
        if not m:
            return ""
        low, high = m["ci95"]
        interval = f" [{low:.4g}, {high:.4g}]" if low is not None else ""
        return f"{m['mean']:.4g}{interval}"

    names = sorted({k for s in settings for k in s["metrics"]})
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{html.escape(s['label'])}</td><td>{s['runs']}</td><td>{s['failed']}</td>"
        + "".join(f"<td>{fmt(s['metrics'].get(n))}</td>" for n in names)
        + "</tr>"
        for s in settings
    )
    points = []
    for r in results:
        link = ""
        if r["run_dir"]:
            report = Path(r["run_dir"]) / "report.html"
            target = report if report.exists() else Path(r["run_dir"])
            link = f'<a href="{html.escape(os.path.relpath(target, sweep_dir))}">report</a>'
        error = html.escape(r["error"] or "")
        points.append(
            f"<tr><td>{html.escape(r['label'])}</td><td>{r['seed']}</td>"
            f"<td>{r['status']}</td><td>{link}</td><td>{error}</td></tr>"
        )
    images = "".join(
        f'<img src="{html.escape(os.path.relpath(p, sweep_dir))}" alt="{html.escape(p.stem)}">'
        for p in plots
    )
    return (
        "<!doctype html><meta charset=utf-8><title>scopeloop sweep</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        "img{max-width:45%;margin:4px}</style>"
        f"<h1>Sweep: {len(settings)} settings, {len(results)} runs</h1>"
        "<h2>Per setting: mean [95 % interval] over seeds</h2>"
        f"<table><tr><th>setting</th><th>runs</th><th>failed</th>{head}</tr>{rows}</table>"
        f"<h2>Metrics</h2>{images}"
        "<h2>Runs</h2><table><tr><th>setting</th><th>seed</th><th>status</th><th>report</th>"
        f"<th>error</th></tr>{''.join(points)}</table>"
    )
