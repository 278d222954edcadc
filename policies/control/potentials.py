"""Virtual potentials a feedback trap imposes: U(x, y, t) in units of kT, and its gradient.

Why kT units: the drift the controller asks for is -D grad(U / kT), so the particle's
mobility is the only physics needed, and a potential written in kT means the same
thing at any temperature. Coordinates are relative to the potential's centre (um),
t is seconds since the policy's first frame. User expressions are parsed into a
whitelisted arithmetic tree (no names, attributes or calls beyond the listed maths),
so a config can never run code.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Field2 = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def energy_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        raise NotImplementedError

    def gradient_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        """(..., 2) gradient of U/kT (1/um); central differences unless overridden.
        `kt` (fN*um) converts the fN/um stiffnesses of the built-in shapes."""
        h = 1e-4
        gx = (self.energy_kt(x + h, y, t, kt) - self.energy_kt(x - h, y, t, kt)) / (2 * h)
        gy = (self.energy_kt(x, y + h, t, kt) - self.energy_kt(x, y - h, t, kt)) / (2 * h)
        return np.stack([gx, gy], axis=-1)


class Harmonic(_Spec):
    """U = k r^2 / 2 (k in fN/um; k_y defaults to k)."""

    kind: Literal["harmonic"] = "harmonic"
    stiffness_fn_per_um: float = Field(5.0, gt=0.0, le=1e6)
    stiffness_y_fn_per_um: float | None = Field(None, gt=0.0, le=1e6)

    def _k(self, t: float) -> tuple[float, float]:
        k = self.stiffness_fn_per_um
        return k, self.stiffness_y_fn_per_um or k

    def energy_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        kx, ky = self._k(t)
        return 0.5 * (kx * np.asarray(x) ** 2 + ky * np.asarray(y) ** 2) / kt

    def gradient_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        kx, ky = self._k(t)
        return np.stack([kx * np.asarray(x), ky * np.asarray(y)], axis=-1) / kt


class DoubleWell(_Spec):
    """U = E_b ((x/L)^2 - 1)^2 + k_y y^2 / 2: wells at x = +-L, barrier E_b (in kT) at 0."""

    kind: Literal["double-well"] = "double-well"
    barrier_kt: float = Field(3.0, gt=0.0, le=1000.0)
    half_distance_um: float = Field(1.0, gt=0.0, le=1000.0)
    transverse_stiffness_fn_per_um: float = Field(5.0, gt=0.0, le=1e6)

    def energy_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        u = (np.asarray(x) / self.half_distance_um) ** 2 - 1.0
        return (
            self.barrier_kt * u**2
            + 0.5 * self.transverse_stiffness_fn_per_um * (np.asarray(y) ** 2) / kt
        )

    def gradient_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        x = np.asarray(x)
        big_l = self.half_distance_um
        gx = 4.0 * self.barrier_kt * ((x / big_l) ** 2 - 1.0) * x / big_l**2
        gy = self.transverse_stiffness_fn_per_um * np.asarray(y) / kt
        return np.stack([gx, gy], axis=-1)


class MovingTrap(Harmonic):
    """Harmonic trap whose centre moves: on a circle (radius, period) or at a constant velocity."""

    kind: Literal["moving"] = "moving"  # type: ignore[assignment]
    motion: Literal["circle", "line"] = "circle"
    radius_um: float = Field(2.0, ge=0.0, le=1e4)
    period_s: float = Field(10.0, gt=0.0, le=1e6)
    velocity_um_s: tuple[float, float] = (0.5, 0.0)

    def centre(self, t: float) -> tuple[float, float]:
        if self.motion == "line":
            return self.velocity_um_s[0] * t, self.velocity_um_s[1] * t
        w = 2.0 * math.pi / self.period_s
        return self.radius_um * math.cos(w * t), self.radius_um * math.sin(w * t)

    def energy_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        cx, cy = self.centre(t)
        return super().energy_kt(np.asarray(x) - cx, np.asarray(y) - cy, t, kt)

    def gradient_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        cx, cy = self.centre(t)
        return super().gradient_kt(np.asarray(x) - cx, np.asarray(y) - cy, t, kt)


class StiffnessProtocol(Harmonic):
    """Time-dependent harmonic trap: square-wave switching k_low <-> k_high, or a linear ramp
    from k_low to k_high over `period_s` (then held)."""

    kind: Literal["protocol"] = "protocol"  # type: ignore[assignment]
    protocol: Literal["switching", "ramp"] = "switching"
    k_low_fn_per_um: float = Field(2.0, gt=0.0, le=1e6)
    k_high_fn_per_um: float = Field(10.0, gt=0.0, le=1e6)
    period_s: float = Field(4.0, gt=0.0, le=1e6)

    def stiffness(self, t: float) -> float:
        lo, hi = self.k_low_fn_per_um, self.k_high_fn_per_um
        if self.protocol == "ramp":
            return lo + (hi - lo) * min(max(t / self.period_s, 0.0), 1.0)
        return lo if (t % self.period_s) < self.period_s / 2.0 else hi

    def _k(self, t: float) -> tuple[float, float]:
        k = self.stiffness(t)
        return k, k


_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "sin": np.sin, "cos": np.cos, "tan": np.tan, "exp": np.exp, "log": np.log,
    "sqrt": np.sqrt, "tanh": np.tanh, "cosh": np.cosh, "sinh": np.sinh, "abs": np.abs,
    "arctan2": np.arctan2, "minimum": np.minimum, "maximum": np.maximum,
}  # fmt: skip
_CONSTS = {"pi": math.pi, "e": math.e}
_BINOPS = {
    ast.Add: np.add, ast.Sub: np.subtract, ast.Mult: np.multiply,
    ast.Div: np.divide, ast.Pow: np.power,
}  # fmt: skip
_VARS = ("x", "y", "t")


def compile_expression(text: str, params: dict[str, float]) -> Field2:
    """Turn e.g. "a*(x**2-1)**2 + 0.5*y**2" into f(x, y, t); ValueError on anything else."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not a valid expression ({exc.msg})") from None
    known = set(_VARS) | set(_CONSTS) | set(params)

    def build(node: ast.AST) -> Callable[[dict[str, object]], object]:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            value = float(node.value)
            return lambda env: value
        if isinstance(node, ast.Name):
            if node.id not in known:
                raise ValueError(f"unknown name {node.id!r} (use x, y, t, pi, e or a param)")
            name = node.id
            return lambda env: env[name]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            op, left, right = _BINOPS[type(node.op)], build(node.left), build(node.right)
            return lambda env: op(left(env), right(env))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner = build(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return lambda env: sign * inner(env)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and not node.keywords
        ):
            fn, args = _FUNCS[node.func.id], [build(a) for a in node.args]
            return lambda env: fn(*(a(env) for a in args))
        raise ValueError(f"{type(node).__name__} is not allowed in a potential expression")

    body = build(tree)
    base = {**_CONSTS, **{k: float(v) for k, v in params.items()}}

    def evaluate(x: np.ndarray, y: np.ndarray, t: float) -> np.ndarray:
        with np.errstate(all="ignore"):
            out = body({**base, "x": np.asarray(x, float), "y": np.asarray(y, float), "t": t})
        return np.broadcast_to(np.asarray(out, dtype=float), np.broadcast(x, y).shape)

    return evaluate


class Expression(_Spec):
    """U/kT given as an arithmetic expression in x, y (um, from the centre), t (s) and params."""

    kind: Literal["expression"] = "expression"
    expression: str = Field(..., min_length=1, max_length=2000)
    params: dict[str, float] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _names(cls, params: dict[str, float]) -> dict[str, float]:
        for name in params:
            if not name.isidentifier() or name in _VARS or name in _CONSTS or name in _FUNCS:
                raise ValueError(f"param name {name!r} is reserved or not an identifier")
        return params

    _fn: Field2 | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _compile(self) -> Expression:
        fn = compile_expression(self.expression, self.params)
        probe = fn(np.array([0.0, 0.5]), np.array([0.0, -0.5]), 0.0)
        if not np.all(np.isfinite(probe)):
            raise ValueError("expression is not finite near the centre (x, y = 0, +-0.5)")
        self._fn = fn
        return self

    def energy_kt(self, x: np.ndarray, y: np.ndarray, t: float, kt: float) -> np.ndarray:
        assert self._fn is not None  # set by the validator
        return self._fn(x, y, t)  # already in kT


PotentialSpec = Annotated[
    Harmonic | DoubleWell | MovingTrap | StiffnessProtocol | Expression,
    Field(discriminator="kind"),
]
