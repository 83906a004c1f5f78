"""The text of generated code: dtype and function names, mesh axes, PartitionSpecs, tuples.

Every emitter builds its lines from these, so one spelling of a PartitionSpec or a
tuple holds across the module; `Val` is what an emitter knows of a tensor's local
block (its variable, axis order, layout, dtype), `Writer` the indented lines of one
function. Names come from names.py (validated, mangled), never from spec text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import graph as g
from .names import literal

DTYPE_CODE = {"f32": "F32", "f64": "jnp.float64", "bf16": "jnp.bfloat16", "f16": "jnp.float16",
              "i8": "jnp.int8", "i32": "jnp.int32"}
LOW = ("bf16", "f16", "i8", "f64")  # converted to F32 before arithmetic
UNARY_CODE = {
    "exp": "jnp.exp", "log": "jnp.log", "sqrt": "jnp.sqrt", "rsqrt": "lax.rsqrt", "tanh": "jnp.tanh",
    "sigmoid": "jax.nn.sigmoid", "silu": "jax.nn.silu", "relu": "jax.nn.relu", "abs": "jnp.abs",
}
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def axes_code(axes: tuple[str, ...]) -> str:
    """Mesh axes as a collective's axis_name: 'x' or ('x', 'y')."""
    if len(axes) == 1:
        return literal(axes[0], "mesh axis")
    return "(" + ", ".join(literal(a, "mesh axis") for a in axes) + ")"


def spec_code(layout: dict, indices: tuple[str, ...], lead: int = 0) -> str:
    """A PartitionSpec: P(None, 'x', ('y', 'z')); `lead` unsplit axes first (the layer axis)."""
    items = ["None"] * lead
    for i in indices:
        axes = tuple(layout.get(i, ()))
        items.append("None" if not axes else axes_code(axes))
    while items and items[-1] == "None":
        items.pop()
    return "P(" + ", ".join(items) + ")"


def tuple_code(xs) -> str:
    """A Python tuple literal of already-rendered items: (a,) for one."""
    xs = list(xs)
    return "(" + ", ".join(str(x) for x in xs) + ("," if len(xs) == 1 else "") + ")"


def positional_layout(typ: g.TensorType, indices: tuple[str, ...]) -> dict:
    """A type's layout with its axes renamed, by position, to `indices`."""
    return {i: a.mesh for i, a in zip(indices, typ.axes)}


def one_line(text: str) -> str:
    """Text for a one-line comment or docstring: whitespace runs collapsed."""
    return " ".join(text.split())


@dataclass
class Val:
    """A tensor's local block in the generated code."""
    var: str
    indices: tuple[str, ...]       # index per axis (the tensor's type order, or a ref's names)
    layout: dict                   # index -> mesh axes
    dtype: str


@dataclass
class Writer:
    """The lines of one generated function, indented `depth` levels."""
    lines: list = field(default_factory=list)
    depth: int = 0

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")
