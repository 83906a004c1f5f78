"""The einsum-cascade IR: frozen dataclasses, compared structurally.

A graph is sizes, named indices, declared tensors (param / input / state),
statements and outputs. Every statement defines one tensor: its left-hand
side names the tensor's axes by index, and its right-hand side is one of a
small set of operations (Compute, Take, Write, Rope, Repeat). Spans record
where each node came from for error messages; they never take part in
equality, so `parse(print(g)) == g` compares meaning, not layout.

Annotations written by passes live in two places: mesh axes on a tensor's
axes (`f@x`, the layout) and `attrs`, a sorted tuple of key/value pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Union

DTYPES = ("f32", "f64", "bf16", "f16", "i8", "i32")
FLOAT_DTYPES = ("f32", "f64", "bf16", "f16")
INT_DTYPES = ("i8", "i32")
UNARY_FUNCS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "gelu", "relu", "abs")
REDUCERS = ("sum", "max", "mean")
TENSOR_KINDS = ("param", "input", "state")
RESERVED = frozenset(
    {"size", "index", "param", "input", "state", "output", "take", "write", "rope", "repeat",
     "yield", "position", "causal", "sum", "max", "mean", "pos", "mesh"} | set(UNARY_FUNCS)
)


@dataclass(frozen=True)
class Span:
    """Where a node was written: file name and 1-based line/column."""
    file: str
    line: int
    col: int
    end_line: int = 0
    end_col: int = 0


NO_SPAN = Span("<generated>", 0, 0)


def _span() -> Span:
    return field(default=NO_SPAN, compare=False, repr=False)


# ---------------------------------------------------------------- attributes
@dataclass(frozen=True)
class Sym:
    """A bare identifier used as an attribute value (`init=ones`)."""
    name: str


@dataclass(frozen=True)
class Term:
    """A call-shaped attribute value (`psum(x)`, `normal(0.02)`)."""
    fn: str
    args: tuple


AttrValue = Union[int, float, str, Sym, Term, tuple]
Attrs = tuple  # tuple[tuple[str, AttrValue], ...], sorted by key


def make_attrs(items: dict | Attrs | None = None, **kw) -> Attrs:
    d = dict(items or ())
    d.update(kw)
    return tuple(sorted(d.items()))


def attr(attrs: Attrs, key: str, default=None):
    for k, v in attrs:
        if k == key:
            return v
    return default


# --------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class SizeLit:
    value: int


@dataclass(frozen=True)
class SizeRef:
    name: str
    span: Span = _span()


@dataclass(frozen=True)
class SizeBin:
    op: str  # "*" or "/"
    lhs: "SizeExpr"
    rhs: "SizeExpr"


SizeExpr = Union[SizeLit, SizeRef, SizeBin]


@dataclass(frozen=True)
class SizeDecl:
    name: str
    expr: SizeExpr
    span: Span = _span()


@dataclass(frozen=True)
class IndexDecl:
    name: str
    size: str
    span: Span = _span()


# ------------------------------------------------------------------- tensors
@dataclass(frozen=True)
class Axis:
    """One axis of a tensor: the index naming it and the mesh axes it is split over."""
    index: str
    mesh: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorType:
    axes: tuple[Axis, ...]
    dtype: str = "f32"

    @property
    def indices(self) -> tuple[str, ...]:
        return tuple(a.index for a in self.axes)

    def unsharded(self) -> "TensorType":
        return TensorType(tuple(Axis(a.index) for a in self.axes), self.dtype)


def tensor_type(indices, dtype: str = "f32") -> TensorType:
    return TensorType(tuple(Axis(i) for i in indices), dtype)


@dataclass(frozen=True)
class Decl:
    """A tensor given from outside: a parameter, a program input, or state (the KV cache)."""
    kind: str
    name: str
    type: TensorType
    attrs: Attrs = ()
    span: Span = _span()


# --------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Ref:
    """A tensor read with its axes named by indices (positional, as in einsum)."""
    name: str
    indices: tuple[str, ...]
    span: Span = _span()


@dataclass(frozen=True)
class Const:
    value: float


@dataclass(frozen=True)
class Unary:
    fn: str  # one of UNARY_FUNCS, or "neg"
    x: "Expr"


@dataclass(frozen=True)
class Binary:
    op: str  # + - * /
    lhs: "Expr"
    rhs: "Expr"


@dataclass(frozen=True)
class Causal:
    """0 where cached position s may be seen by query t (s <= pos + t), else -1e30."""
    t: str
    s: str
    span: Span = _span()


@dataclass(frozen=True)
class SizeVal:
    """The value of a size as a scalar (`rsqrt(K)`), so constants follow --set."""
    name: str
    span: Span = _span()


Expr = Union[Ref, Const, SizeVal, Unary, Binary, Causal]
NEG_INF = -1e30  # finite, so a fully masked shard stays NaN-free


def expr_refs(e: Expr) -> Iterator[Ref]:
    if isinstance(e, Ref):
        yield e
    elif isinstance(e, Unary):
        yield from expr_refs(e.x)
    elif isinstance(e, Binary):
        yield from expr_refs(e.lhs)
        yield from expr_refs(e.rhs)


def expr_leaves(e: Expr) -> Iterator[Expr]:
    """The leaves of an expression: refs, constants, size values, causal masks."""
    if isinstance(e, Unary):
        yield from expr_leaves(e.x)
    elif isinstance(e, Binary):
        yield from expr_leaves(e.lhs)
        yield from expr_leaves(e.rhs)
    else:
        yield e


def has_causal(e: Expr) -> bool:
    """Whether an expression depends on positions through causal(t, s)."""
    return any(isinstance(x, Causal) for x in expr_leaves(e))


def expr_indices(e: Expr) -> tuple[str, ...]:
    """Indices an expression ranges over, in first-seen order."""
    seen: dict[str, None] = {}

    def walk(x):
        if isinstance(x, Ref):
            seen.update(dict.fromkeys(x.indices))
        elif isinstance(x, Causal):
            seen.update(dict.fromkeys((x.t, x.s)))
        elif isinstance(x, Unary):
            walk(x.x)
        elif isinstance(x, Binary):
            walk(x.lhs)
            walk(x.rhs)

    walk(e)
    return tuple(seen)


def product_factors(e: Expr) -> list[Expr] | None:
    """The factors of a pure product of refs and constants, else None."""
    if isinstance(e, (Ref, Const, SizeVal)):
        return [e]
    if isinstance(e, Binary) and e.op == "*":
        left, right = product_factors(e.lhs), product_factors(e.rhs)
        if left is not None and right is not None:
            return left + right
    return None


# ---------------------------------------------------------------- operations
@dataclass(frozen=True)
class Compute:
    """Evaluate `expr` over all its indices, then reduce those absent from the output.

    reduce is None for a map (every index kept), else "sum" / "max" / "mean".
    A sum over a pure product of refs is a contraction and prints as einsum.
    """
    expr: Expr
    reduce: str | None = None


@dataclass(frozen=True)
class Position:
    """The absolute position of query index t: pos + t."""
    index: str
    span: Span = _span()


@dataclass(frozen=True)
class Take:
    """Embedding gather: the table axis absent from the output is looked up by ids."""
    table: Ref
    ids: Union[Ref, Position]


@dataclass(frozen=True)
class Write:
    """KV-cache write: cache[.., pos + t, ..] = new[.., t, ..]; the result is the next state."""
    cache: Ref
    new: Ref


@dataclass(frozen=True)
class Rope:
    """Rotary embedding over pair index `pair` (half-split), at positions pos + `at`."""
    x: Ref
    at: str
    pair: str
    theta: float = 10000.0


@dataclass(frozen=True)
class Repeat:
    """The layer stack: run `body` once per value of `index`, carrying one tensor.

    Declarations inside `body` are stacked: each gains `index` as a leading axis.
    """
    index: str
    carry: str
    init: str
    body: "Block"
    result: str
    span: Span = _span()


Op = Union[Compute, Take, Write, Rope, Repeat]


@dataclass(frozen=True)
class Statement:
    name: str
    type: TensorType
    op: Op
    attrs: Attrs = ()
    span: Span = _span()


@dataclass(frozen=True)
class Block:
    decls: tuple[Decl, ...] = ()
    stmts: tuple[Statement, ...] = ()


@dataclass(frozen=True)
class Graph:
    sizes: tuple[SizeDecl, ...]
    indices: tuple[IndexDecl, ...]
    body: Block
    outputs: tuple[str, ...]
    mesh: tuple[tuple[str, int], ...] = ()   # named mesh axes and sizes, set by the shard pass
    source: str = field(default="<spec>", compare=False)
    text: str = field(default="", compare=False, repr=False)

    # -- lookups ---------------------------------------------------------
    def index_size_names(self) -> dict[str, str]:
        return {i.name: i.size for i in self.indices}

    def blocks(self) -> Iterator[tuple[Block, Repeat | None]]:
        """The top-level block and every repeat body, with the repeat that owns it."""
        def walk(block, owner):
            yield block, owner
            for s in block.stmts:
                if isinstance(s.op, Repeat):
                    yield from walk(s.op.body, s.op)
        yield from walk(self.body, None)

    def all_decls(self) -> Iterator[tuple[Decl, Repeat | None]]:
        for block, owner in self.blocks():
            for d in block.decls:
                yield d, owner

    def all_stmts(self) -> Iterator[tuple[Statement, Repeat | None]]:
        for block, owner in self.blocks():
            for s in block.stmts:
                yield s, owner

    def decl(self, name: str) -> Decl | None:
        for d, _ in self.all_decls():
            if d.name == name:
                return d
        return None

    def stmt(self, name: str) -> Statement | None:
        for s, _ in self.all_stmts():
            if s.name == name:
                return s
        return None

    def types(self) -> dict[str, TensorType]:
        """The (per-layer) type of every named tensor, carries included."""
        out: dict[str, TensorType] = {}
        for d, _ in self.all_decls():
            out[d.name] = d.type
        for s, _ in self.all_stmts():
            out[s.name] = s.type
            if isinstance(s.op, Repeat):
                out[s.op.carry] = s.type
        return out

    def with_body(self, body: Block) -> "Graph":
        return replace(self, body=body)


def map_blocks(graph: Graph, fn) -> Graph:
    """Rebuild the graph with fn(block, owner_repeat) applied to every block, innermost first."""
    def walk(block: Block, owner):
        stmts = []
        for s in block.stmts:
            if isinstance(s.op, Repeat):
                s = replace(s, op=replace(s.op, body=walk(s.op.body, s.op)))
            stmts.append(s)
        return fn(replace(block, stmts=tuple(stmts)), owner)
    return graph.with_body(walk(graph.body, None))
