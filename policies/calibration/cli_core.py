"""What `scopeloop calibrate` does, minus the terminal: read a trajectory, run estimators.

Files hold positions in um. CSV: columns x[, y], with a header naming them (``x``,
``y``, any case; a time column ``t``/``time``/``time_s`` in seconds is read and checked
against ``--dt``; other columns ignored) or without one (first column x, second y).
NPY: a 1-D array (x) or an (n, >=1) array (columns x[, y]). MAT (scipy.io.loadmat):
variables ``x`` [and ``y``] if present, else ``xy`` or ``positions`` (n, >=1), else the
file's only numeric array. Errors are ValueError with a message naming the option or
column, ready to print on one line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .advice import (
    diagnose,
    drag_check,
    identifiability_warning,
    recommend,
    refuse_untrapped,
    summary,
    weak_trap_warning,
)
from .bayes import bayes_ou
from .doublewell import exact_double_well, forma_double_well
from .dragcheck import drag_check_line, model_fit
from .dragfree import (
    DragFreePosterior,
    drag_free_posterior,
    known_noise_posterior,
    posterior_estimates,
    profile_estimate,
)
from .harmonic import autocorrelation_fit, equipartition, forma, ou_mle, power_spectrum_fit
from .physics import WATER_VISCOSITY_PA_S, faxen_lateral_factor, physics
from .rotational import exact_rotational, forma_rotational
from .switching import estimate_switching
from .types import Estimate

MODELS = ("harmonic", "rotational", "double-well", "switching")
RECOMMENDED = {
    "harmonic": "bayes_ou",
    "rotational": "exact_mle",
    "double-well": "exact_mle",
    "switching": "switching_mle",
}
MIN_POINTS = 20
DRAG_MODES = ("fit", "stokes")
DEFAULTS: dict[str, Any] = {
    "dt": None,
    "temperature_k": 300.0,
    "radius_um": 0.1,
    "viscosity_pa_s": WATER_VISCOSITY_PA_S,
    "surface_distance_um": None,
    "drag": "fit",
    "exposure_s": 0.0,
    "noise_um": None,
    "k_min": 0.01,
    "k_max": 1e6,
    "checkpoint": None,
}
TIME_COLUMNS = ("t", "time", "time_s")
DT_RTOL = 0.01  # a --dt further than this from the time column's step is refused


def _columns_from_array(arr: np.ndarray, source: str) -> dict[str, np.ndarray]:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{source}: positions must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(float)
    if arr.ndim == 1:
        return {"x": arr}
    if arr.ndim == 2 and arr.shape[1] > arr.shape[0] and arr.shape[0] <= 2:
        arr = arr.T  # a MATLAB row-vector layout (2, n)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"{source}: expected a 1-D or (n, columns) array, got {arr.shape}")
    out = {"x": arr[:, 0]}
    if arr.shape[1] > 1:
        out["y"] = arr[:, 1]
    return out


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: the file is empty")

    def numeric(row: list[str]) -> bool:
        try:
            [float(c) for c in row]
            return True
        except ValueError:
            return False

    header = None if numeric(rows[0]) else [c.strip().lower() for c in rows[0]]
    body = rows[1:] if header is not None else rows
    if header is not None:
        if "x" not in header:
            raise ValueError(f"{path}: column x missing from the header {rows[0]}")
        idx = {"x": header.index("x")}
        if "y" in header:
            idx["y"] = header.index("y")
        for name in TIME_COLUMNS:
            if name in header:
                idx["t"] = header.index(name)
                break
    else:
        idx = {"x": 0} if len(rows[0]) < 2 else {"x": 0, "y": 1}
    out: dict[str, np.ndarray] = {}
    for name, j in idx.items():
        vals = []
        for line, row in enumerate(body, start=2 if header is not None else 1):
            try:
                vals.append(float(row[j]))
            except (ValueError, IndexError):
                raise ValueError(
                    f"{path}: column {name}, line {line}: not a number ({row!r})"
                ) from None
        out[name] = np.array(vals)
    return out


def _read_mat(path: Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    data = {k: v for k, v in loadmat(str(path)).items() if not k.startswith("__")}
    if "x" in data:
        out = {"x": np.ravel(np.asarray(data["x"], dtype=float))}
        for name in ("y", *TIME_COLUMNS):
            if name in data:
                out["t" if name in TIME_COLUMNS else name] = np.ravel(
                    np.asarray(data[name], dtype=float)
                )
        return out
    for name in ("xy", "positions"):
        if name in data:
            return _columns_from_array(data[name], f"{path} variable {name}")
    arrays = [k for k, v in data.items() if isinstance(v, np.ndarray) and v.dtype.kind in "fiu"]
    if len(arrays) == 1:
        return _columns_from_array(data[arrays[0]], f"{path} variable {arrays[0]}")
    raise ValueError(
        f"{path}: no variable x, xy or positions, and not exactly one numeric array "
        f"(found {sorted(data)})"
    )


def load_trajectory(path: str | Path) -> dict[str, np.ndarray]:
    """Columns ``x`` [and ``y``] (um) from a .csv, .npy or .mat file, checked finite."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"TRAJ: file {p} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            cols = _read_csv(p)
        elif suffix == ".npy":
            cols = _columns_from_array(np.load(p, allow_pickle=False), str(p))
        elif suffix == ".mat":
            cols = _read_mat(p)
        else:
            raise ValueError(f"TRAJ: {p} must end in .csv, .npy or .mat")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"TRAJ: cannot read {p} ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        msg = str(exc)
        if msg.startswith(("TRAJ", str(p))):
            raise
        raise ValueError(f"TRAJ: cannot read {p} ({msg})") from None
    for name in ("y", "t"):
        if name in cols and cols[name].size != cols["x"].size:
            raise ValueError(f"{p}: columns x and {name} differ in length")
    for name, col in cols.items():
        if col.size < MIN_POINTS:
            raise ValueError(f"{p}: column {name} has {col.size} points, need >= {MIN_POINTS}")
        bad = np.nonzero(~np.isfinite(col))[0]
        if bad.size:
            raise ValueError(f"{p}: column {name} has NaN/inf at row {int(bad[0])}")
    return cols


def resolve_dt(cols: dict[str, np.ndarray], dt: float | None) -> float:
    """The frame interval: --dt, checked against the file's time column when it has one."""
    t = cols.get("t")
    if t is None:
        if dt is None:
            raise ValueError("--dt is required: the file has no time column (t, time or time_s)")
        return dt
    steps = np.diff(t)
    step = float(np.median(steps))
    if not step > 0.0:
        raise ValueError(f"time column: steps must be > 0 s, median is {step:g} s")
    spread = float(np.max(np.abs(steps - step)))
    if spread > 0.1 * step:
        raise ValueError(
            f"time column: irregular sampling (steps {steps.min():g} to {steps.max():g} s); "
            "resample to a fixed interval or split the record at the gaps"
        )
    if dt is not None and abs(dt / step - 1.0) > DT_RTOL:
        raise ValueError(
            f"--dt {dt:g} s contradicts the file's time column (step {step:g} s); "
            f"pass --dt {step:g} or drop --dt to use the time column"
        )
    return step if dt is None else dt


def check_record(x: np.ndarray, name: str) -> None:
    """Refuse a record no estimator can calibrate, saying what would be needed."""
    scale = max(float(np.max(np.abs(x))), 1e-300)
    if float(np.ptp(x)) <= 1e-12 * scale:
        raise ValueError(
            f"column {name} is constant ({x.size} equal values): a trapped particle's position "
            "fluctuates; check that the tracker wrote positions (um) to this column"
        )


Params = dict[str, Estimate]


def _stokes(opts: dict[str, Any]) -> dict[str, float]:
    """Physics keywords of the fixed-drag estimators; a wall's Faxen factor is folded
    into the viscosity (gamma is linear in it)."""
    visc = opts["viscosity_pa_s"]
    if opts.get("surface_distance_um") is not None:
        visc *= faxen_lateral_factor(opts["radius_um"], opts["surface_distance_um"])
    return {
        "temperature_k": opts["temperature_k"],
        "radius_um": opts["radius_um"],
        "viscosity_pa_s": visc,
    }


def _posterior(arr: np.ndarray, opts: dict[str, Any]) -> DragFreePosterior:
    common = {
        "temperature_k": opts["temperature_k"],
        "exposure_s": opts["exposure_s"],
        "k_min": opts["k_min"],
        "k_max": opts["k_max"],
    }
    noise = opts["noise_um"]
    if noise is None or noise == 0.0:
        return drag_free_posterior(arr, opts["dt"], noise_um=noise, **common)
    return known_noise_posterior(arr, opts["dt"], noise, **common)


def _harmonic_methods(
    opts: dict[str, Any], post: DragFreePosterior
) -> dict[str, Callable[[np.ndarray], Params]]:
    """Every harmonic estimator as arr -> {param: Estimate}, drag fitted or fixed."""
    dt, noise, exposure = opts["dt"], opts["noise_um"], opts["exposure_s"]
    phys = _stokes(opts)
    free = opts["drag"] == "fit"

    def k_only(fn: Callable[..., Estimate], **kw: Any) -> Callable[[np.ndarray], Params]:
        return lambda arr: {"k": fn(arr, **kw)}

    methods: dict[str, Callable[[np.ndarray], Params]] = {
        "equipartition": k_only(equipartition, dt=dt, noise_um=noise or 0.0, **phys),
        "autocorrelation": k_only(autocorrelation_fit, dt=dt, free_drag=free, **phys),
        "power_spectrum": k_only(power_spectrum_fit, dt=dt, noise_um=noise, free_drag=free, **phys),
        "forma": k_only(forma, dt=dt, noise_um=noise or 0.0, free_drag=free, **phys),
    }
    if free:
        methods["ou_mle"] = lambda _arr: {"k": profile_estimate(post)}
        methods["bayes_ou"] = lambda _arr: posterior_estimates(post)
    else:
        methods["ou_mle"] = k_only(ou_mle, dt=dt, noise_um=noise, exposure_s=exposure, **phys)
        methods["bayes_ou"] = k_only(
            bayes_ou,
            dt=dt,
            noise_um=noise,
            exposure_s=exposure,
            k_min=opts["k_min"],
            k_max=opts["k_max"],
            **phys,
        )
    if opts.get("checkpoint"):
        from .learned import learned_estimate

        methods["learned"] = k_only(
            learned_estimate,
            dt=dt,
            checkpoint=opts["checkpoint"],
            center_um=opts.get("center_um"),
            **phys,
        )
    return methods


def method_names(model: str, with_checkpoint: bool) -> list[str]:
    if model == "harmonic":
        names = [
            "equipartition",
            "autocorrelation",
            "power_spectrum",
            "forma",
            "ou_mle",
            "bayes_ou",
        ]
        return [*names, "learned"] if with_checkpoint else names
    if model == "rotational":
        return ["forma", "forma_exact", "exact_mle"]
    if model == "double-well":
        return ["forma", "exact_mle"]
    return ["switching_mle"]


def _entry(est: Estimate) -> dict[str, Any]:
    def clean(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    interval = None if est.interval is None else [clean(v) for v in est.interval]
    return {
        "value": clean(est.value),
        "stderr": clean(est.stderr),
        "interval_95": interval,
        "unit": est.unit,
    }


def _harmonic(
    cols: dict[str, np.ndarray], chosen: list[str], opts: dict[str, Any]
) -> tuple[dict[str, Params], list[str], dict[str, Any], str]:
    """Estimates, warnings, diagnostics and the recommendation's reason, per column."""
    estimates: dict[str, Params] = {name: {} for name in chosen}
    warnings: list[str] = []
    diagnostics: dict[str, Any] = {}
    reason = ""
    phys = _stokes(opts)
    for col in [c for c in ("x", "y") if c in cols]:
        arr = cols[col]
        check_record(arr, col)
        post = _posterior(arr, opts)
        diag = diagnose(post, opts["dt"], opts["exposure_s"])
        refuse_untrapped(post, diag, col)
        diagnostics[col] = summary(diag)
        suffix = "" if col == "x" else f"_{col}"
        if col == "x":
            reason = recommend(opts["drag"], diag)[1]
        note = identifiability_warning(diag) if opts["drag"] == "fit" else None
        if opts["drag"] == "stokes":
            kt, gamma = physics(phys["temperature_k"], phys["radius_um"], phys["viscosity_pa_s"])
            note = drag_check(post, kt / gamma, _stokes_words(opts))
        for text in (weak_trap_warning(post, diag), note):
            if text:
                warnings.append(f"column {col}: {text}")
        methods = _harmonic_methods(opts, post)
        for name in chosen:
            for param, est in methods[name](arr).items():
                estimates[name][f"{param}{suffix}"] = est
    return estimates, warnings, diagnostics, reason


def _stokes_words(opts: dict[str, Any]) -> str:
    wall = opts.get("surface_distance_um")
    where = "bulk" if wall is None else f"{wall:g} um from the surface (Faxen)"
    return (
        f"the Stokes drag (radius {opts['radius_um'] * 1e3:g} nm, "
        f"{opts['viscosity_pa_s'] * 1e3:g} mPa s, {opts['temperature_k']:g} K, {where})"
    )


def calibrate(cols: dict[str, np.ndarray], model: str, method: str, **opts: Any) -> dict[str, Any]:
    """Run the chosen method(s); the JSON-ready result.

    ``{model, drag, recommended, reason, warnings, diagnostics, estimates}``; every
    estimate has value, stderr and a 95 % interval. ``opts``: dt (or None with a time
    column), temperature_k, radius_um, viscosity_pa_s, surface_distance_um, drag
    (fit|stokes), exposure_s, noise_um, k_min, k_max, checkpoint.
    """
    if model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    opts = {**DEFAULTS, **opts}
    if opts["drag"] not in DRAG_MODES:
        raise ValueError(f"--drag must be one of {', '.join(DRAG_MODES)}, got {opts['drag']!r}")
    opts["dt"] = resolve_dt(cols, opts.get("dt"))
    names = method_names(model, bool(opts.get("checkpoint")))
    if method == "learned" and not opts.get("checkpoint"):
        raise ValueError("--method learned needs --checkpoint PATH (from `scopeloop train`)")
    if method != "all" and method not in names:
        raise ValueError(f"--method for --model {model} must be all or one of {', '.join(names)}")
    chosen = names if method == "all" else [method]
    if model == "rotational" and "y" not in cols:
        raise ValueError("--model rotational needs a y column (positions x, y)")
    warnings: list[str] = []
    diagnostics: dict[str, Any] = {}
    reason = ""
    if model == "harmonic":
        estimates, warnings, diagnostics, reason = _harmonic(cols, chosen, opts)
    else:
        for col in [c for c in ("x", "y") if c in cols]:
            check_record(cols[col], col)
        estimates = {name: _other_model(cols, model, name, opts) for name in chosen}
        if opts["drag"] == "stokes":
            note = _other_drag_check(cols, model, opts)
            warnings += [note] if note else []
    rec = RECOMMENDED[model] if RECOMMENDED[model] in estimates else chosen[0]
    if rec != RECOMMENDED[model]:
        reason = (
            f"{rec}: the only method run (--method); the data-chosen one is {RECOMMENDED[model]}"
        )
    elif not reason:
        reason = f"{rec}: exact likelihood of the {model} model"
    return {
        "model": model,
        "drag": opts["drag"],
        "recommended": rec,
        "reason": reason,
        "warnings": warnings,
        "diagnostics": diagnostics,
        "estimates": {n: {p: _entry(e) for p, e in ps.items()} for n, ps in estimates.items()},
    }


def _other_drag_check(cols: dict[str, np.ndarray], model: str, opts: dict[str, Any]) -> str | None:
    """The fixed (Stokes) drag against the D the data accept under the model's own fit."""
    phys = _stokes(opts)
    kt, gamma = physics(phys["temperature_k"], phys["radius_um"], phys["viscosity_pa_s"])
    data = model_fit(model, cols, opts["dt"], opts["exposure_s"], opts["temperature_k"])
    check = None if data is None else data.check(kt / gamma)
    return drag_check_line(check, _stokes_words(opts), model)


def _other_model(
    cols: dict[str, np.ndarray], model: str, name: str, opts: dict[str, Any]
) -> Params:
    phys = _stokes(opts)
    free = opts["drag"] == "fit"
    dt = opts["dt"]
    if model == "rotational":
        xy = np.stack([cols["x"], cols["y"]], axis=1)
        if name == "exact_mle":
            k, w = exact_rotational(xy, dt, free_drag=free, **phys)
        else:
            k, w = forma_rotational(xy, dt, exact=name == "forma_exact", free_drag=free, **phys)
        return {"k": k, "omega": w}
    if model == "double-well":
        fn = exact_double_well if name == "exact_mle" else forma_double_well
        return dict(fn(cols["x"], dt, free_drag=free, **phys))
    return dict(estimate_switching(cols["x"], dt, free_drag=free, **phys))
