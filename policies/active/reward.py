"""Scalar rewards over one spectrum: named loop features and a safe expression over them.

The operator writes the reward in the config (``area``, ``coercive_width_v``, or an
expression such as ``area * (imprint_v < 0.5)``... only arithmetic, comparisons and a
few functions). The text is parsed with ``ast`` and only whitelisted nodes and names
are accepted, so a config can never run arbitrary code; a refusal is one line naming
the offending token and what is allowed.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Features computed from every spectrum; names usable in a reward expression.
FEATURE_NAMES: tuple[str, ...] = (
    "area",
    "vc_pos_v",
    "vc_neg_v",
    "coercive_width_v",
    "imprint_v",
    "remanent",
    "saturation",
    "amplitude",
)

_FUNCTIONS: dict[str, Callable[..., float]] = {
    "abs": abs,
    "min": min,
    "max": max,
    "sqrt": lambda x: math.sqrt(max(x, 0.0)),
    "log": lambda x: math.log(max(x, 1e-300)),
    "exp": lambda x: math.exp(min(x, 700.0)),
    "tanh": math.tanh,
}
_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: lambda a, b: a / b if b != 0 else math.copysign(math.inf, a) if a else math.nan,
    ast.Pow: lambda a, b: float(abs(a) ** b) if a >= 0 or float(b).is_integer() else math.nan,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_COMPARE: dict[type, Callable[[float, float], bool]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
MAX_EXPRESSION_CHARS = 300


def spectrum_features(waveform: np.ndarray, response: np.ndarray) -> dict[str, float]:
    """Loop area, coercive biases, imprint, remanence and saturation of one loop.

    Area is |closed integral of R dV| (the waveform is closed back to its start), so a
    linear electrostatic background adds nothing; coercive biases are where each branch
    crosses the loop's mid response; NaN where a loop has no crossing.
    """
    v = np.asarray(waveform, dtype=float).ravel()
    r = np.asarray(response, dtype=float).ravel()
    if v.shape != r.shape or v.size < 4:
        raise ValueError(f"spectrum: response shape {r.shape} does not match waveform {v.shape}")
    vc, rc = np.append(v, v[0]), np.append(r, r[0])
    dv = np.diff(vc)
    area = float(abs(np.sum(0.5 * (rc[1:] + rc[:-1]) * dv)))
    mid = 0.5 * (float(r.max()) + float(r.min()))

    def crossing(rising: bool) -> float:
        a, b = rc[:-1] - mid, rc[1:] - mid
        sel = (dv > 0) & (a < 0) & (b >= 0) if rising else (dv < 0) & (a > 0) & (b <= 0)
        k = np.nonzero(sel & (a != b))[0]
        return float(np.mean(vc[k] + dv[k] * a[k] / (a[k] - b[k]))) if k.size else math.nan

    def at_zero(rising: bool) -> float:
        lo, hi = np.minimum(vc[:-1], vc[1:]), np.maximum(vc[:-1], vc[1:])
        sel = (dv > 0 if rising else dv < 0) & (lo <= 0.0) & (hi >= 0.0) & (hi > lo)
        k = np.nonzero(sel)[0]
        if not k.size:
            return math.nan
        f = -vc[k] / dv[k]
        return float(np.mean(rc[k] + f * (rc[k + 1] - rc[k])))

    vp, vn = crossing(True), crossing(False)
    return {
        "area": area,
        "vc_pos_v": vp,
        "vc_neg_v": vn,
        "coercive_width_v": vp - vn,
        "imprint_v": 0.5 * (vp + vn),
        "remanent": 0.5 * (at_zero(False) - at_zero(True)),
        "saturation": 0.5 * (float(r.max()) - float(r.min())),
        "amplitude": float(np.max(np.abs(r))),
    }


def _check(node: ast.AST, text: str) -> None:
    """Refuse every node that is not arithmetic over allowed names, numbers and calls."""
    allowed = ", ".join(FEATURE_NAMES)
    if isinstance(node, ast.Expression):
        _check(node.body, text)
    elif isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError(f"reward: constant {node.value!r} is not a number")
    elif isinstance(node, ast.Name):
        if node.id not in FEATURE_NAMES:
            raise ValueError(f"reward: name {node.id!r} is not allowed (features: {allowed})")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise ValueError(f"reward: operator {type(node.op).__name__} is not allowed")
        _check(node.left, text)
        _check(node.right, text)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise ValueError(f"reward: operator {type(node.op).__name__} is not allowed")
        _check(node.operand, text)
    elif isinstance(node, ast.Compare):
        if any(type(op) not in _COMPARE for op in node.ops):
            raise ValueError("reward: only <, <=, >, >= comparisons are allowed")
        for child in (node.left, *node.comparators):
            _check(child, text)
    elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords:
            shown = name or ast.unparse(node.func)
            raise ValueError(
                f"reward: call {shown!r} is not allowed (functions: {', '.join(_FUNCTIONS)})"
            )
        for arg in node.args:
            _check(arg, text)
    else:
        raise ValueError(f"reward: {type(node).__name__} ({ast.unparse(node)!r}) is not allowed")


def _eval(node: ast.AST, env: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, env))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, env)
            if not _COMPARE[type(op)](left, right):
                return 0.0
            left = right
        return 1.0
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(_FUNCTIONS[node.func.id](*(_eval(a, env) for a in node.args)))


@dataclass(frozen=True)
class Reward:
    """A parsed, checked reward expression; call it with a spectrum's features."""

    text: str
    tree: ast.Expression

    def __call__(self, features: dict[str, float]) -> float:
        try:
            value = _eval(self.tree.body, features)
        except (OverflowError, ValueError, ZeroDivisionError):
            return math.nan
        return float(value)

    def of_spectrum(self, waveform: np.ndarray, response: np.ndarray) -> float:
        """Reward of one measured loop (NaN when a needed feature is undefined)."""
        return self(spectrum_features(waveform, response))


def parse_reward(text: str) -> Reward:
    """Parse and whitelist-check a reward expression; one-line ValueError when refused."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("reward: must be a non-empty expression over spectrum features")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"reward: expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(
            f"reward: not a valid expression ({exc.msg} at column {exc.offset})"
        ) from None
    _check(tree, text)
    return Reward(text=text.strip(), tree=tree)
