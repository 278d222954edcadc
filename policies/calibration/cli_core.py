"""What `scopeloop calibrate` does, minus the terminal: read a trajectory, run estimators.

Files hold positions in um. CSV: columns x[, y], with a header naming them (``x``,
``y``, any case; other columns ignored) or without one (first column x, second y).
NPY: a 1-D array (x) or an (n, >=1) array (columns x[, y]). MAT (scipy.io.loadmat):
variables ``x`` [and ``y``] if present, else ``xy`` or ``positions`` (n, >=1), else the
file's only numeric array. Errors are ValueError with a message naming the option or
column, ready to print on one line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .bayes import bayes_ou
from .doublewell import exact_double_well, forma_double_well
from .harmonic import autocorrelation_fit, equipartition, forma, ou_mle, power_spectrum_fit
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
        if "y" in data:
            out["y"] = np.ravel(np.asarray(data["y"], dtype=float))
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
    if "y" in cols and cols["y"].size != cols["x"].size:
        raise ValueError(f"{p}: columns x and y differ in length")
    for name, col in cols.items():
        if col.size < MIN_POINTS:
            raise ValueError(f"{p}: column {name} has {col.size} points, need >= {MIN_POINTS}")
        bad = np.nonzero(~np.isfinite(col))[0]
        if bad.size:
            raise ValueError(f"{p}: column {name} has NaN/inf at row {int(bad[0])}")
    return cols


def _harmonic_methods(opts: dict[str, Any]) -> dict[str, Callable[[np.ndarray], Estimate]]:
    phys = {k: opts[k] for k in ("temperature_k", "radius_um")}
    dt, noise, exposure = opts["dt"], opts["noise_um"], opts["exposure_s"]
    methods: dict[str, Callable[[np.ndarray], Estimate]] = {
        "equipartition": partial(equipartition, dt=dt, noise_um=noise or 0.0, **phys),
        "autocorrelation": partial(autocorrelation_fit, dt=dt, **phys),
        "power_spectrum": partial(power_spectrum_fit, dt=dt, noise_um=noise, **phys),
        "forma": partial(forma, dt=dt, noise_um=noise or 0.0, **phys),
        "ou_mle": partial(ou_mle, dt=dt, noise_um=noise, exposure_s=exposure, **phys),
        "bayes_ou": partial(
            bayes_ou,
            dt=dt,
            noise_um=noise,
            exposure_s=exposure,
            k_min=opts["k_min"],
            k_max=opts["k_max"],
            **phys,
        ),
    }
    if opts.get("checkpoint"):
        from .learned import learned_estimate

        methods["learned"] = partial(learned_estimate, dt=dt, checkpoint=opts["checkpoint"], **phys)
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

    return {"value": clean(est.value), "stderr": clean(est.stderr), "unit": est.unit}


def calibrate(cols: dict[str, np.ndarray], model: str, method: str, **opts: Any) -> dict[str, Any]:
    """Run the chosen method(s); the JSON-ready result `{model, recommended, estimates}`."""
    if model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    names = method_names(model, bool(opts.get("checkpoint")))
    if method == "learned" and not opts.get("checkpoint"):
        raise ValueError("--method learned needs --checkpoint PATH (from `scopeloop train`)")
    if method != "all" and method not in names:
        raise ValueError(f"--method for --model {model} must be all or one of {', '.join(names)}")
    chosen = names if method == "all" else [method]
    if model == "rotational" and "y" not in cols:
        raise ValueError("--model rotational needs a y column (positions x, y)")
    phys = {k: opts[k] for k in ("temperature_k", "radius_um")}
    dt = opts["dt"]
    estimates: dict[str, dict[str, Any]] = {}
    for name in chosen:
        if model == "harmonic":
            fn = _harmonic_methods(opts)[name]
            params = {"k": fn(cols["x"])}
            if "y" in cols:
                params["k_y"] = fn(cols["y"])
        elif model == "rotational":
            xy = np.stack([cols["x"], cols["y"]], axis=1)
            if name == "exact_mle":
                k, w = exact_rotational(xy, dt, **phys)
            else:
                k, w = forma_rotational(xy, dt, exact=name == "forma_exact", **phys)
            params = {"k": k, "omega": w}
        elif model == "double-well":
            fn2 = exact_double_well if name == "exact_mle" else forma_double_well
            params = dict(fn2(cols["x"], dt, **phys))
        else:
            params = dict(estimate_switching(cols["x"], dt, **phys))
        estimates[name] = {p: _entry(e) for p, e in params.items()}
    rec = RECOMMENDED[model] if RECOMMENDED[model] in estimates else chosen[0]
    return {"model": model, "recommended": rec, "estimates": estimates}
