"""Helpers shared by the model rewrites (defer-norm, int8, multiquery).

The rewrites edit a graph by name: replace one statement by a few, add
weight-preparation statements to a block, rename indices inside
expressions. `GraphInfo` gathers the facts they all need (who defines and
who reads each tensor, which block it lives in, which tensors are
parameters or computed from parameters only), and `edit_graph` applies the
edits in one walk, so a pass never rebuilds blocks by hand.

Weight preparation is expressed in the graph itself, as statements computed
from parameters only (`einpart.ir.analysis.param_only`): the interpreter
evaluates them every step (that defines their meaning), the runtime once at
load time. `stored_weights` lists what a step then really reads: parameters
and param-only results used by per-step statements, with their stacked
shapes and dtypes, which is what the planner must count as weight memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.analysis import param_only
from ..ir.shapes import DTYPE_BYTES
from ..ir.verify import index_sizes, resolve_sizes, stmt_inputs

TOP = ""  # the block key of the top-level block; a repeat body's key is its statement's name


# ------------------------------------------------------------ expressions
def rename_expr(e: g.Expr, mapping: dict[str, str]) -> g.Expr:
    """Rename indices (simultaneously) in every read and mask of an expression."""
    if isinstance(e, g.Ref):
        return replace(e, indices=tuple(mapping.get(i, i) for i in e.indices))
    if isinstance(e, g.Causal):
        return replace(e, t=mapping.get(e.t, e.t), s=mapping.get(e.s, e.s))
    if isinstance(e, g.Unary):
        return replace(e, x=rename_expr(e.x, mapping))
    if isinstance(e, g.Binary):
        return replace(e, lhs=rename_expr(e.lhs, mapping), rhs=rename_expr(e.rhs, mapping))
    return e


def map_refs(e: g.Expr, fn) -> g.Expr:
    """Rebuild an expression with fn(ref) -> Expr applied to every tensor read."""
    if isinstance(e, g.Ref):
        return fn(e)
    if isinstance(e, g.Unary):
        return replace(e, x=map_refs(e.x, fn))
    if isinstance(e, g.Binary):
        return replace(e, lhs=map_refs(e.lhs, fn), rhs=map_refs(e.rhs, fn))
    return e


def product(factors, start: g.Expr | None = None) -> g.Expr | None:
    """Left-nested product of expressions (None for the empty product)."""
    out = start
    for f in factors:
        out = f if out is None else g.Binary("*", out, f)
    return out


def is_contraction(s: g.Statement) -> bool:
    """A sum over a pure product of tensor reads (constants allowed): an einsum."""
    if not isinstance(s.op, g.Compute) or s.op.reduce != "sum":
        return False
    factors = g.product_factors(s.op.expr)
    return factors is not None and any(isinstance(f, g.Ref) for f in factors)


def contracted(s: g.Statement) -> tuple[str, ...]:
    """Indices a compute statement reduces (in first-seen order)."""
    out = set(s.type.indices)
    return tuple(i for i in g.expr_indices(s.op.expr) if i not in out)


def axes_like(typ: g.TensorType, indices, dtype: str = "f32") -> g.TensorType:
    """A type over `indices`, keeping the layout of axes that `typ` already has."""
    have = {a.index: a for a in typ.axes}
    return g.TensorType(tuple(have.get(i, g.Axis(i)) for i in indices), dtype)


# ------------------------------------------------------------ graph facts
@dataclass
class GraphInfo:
    """Who defines and reads what, and where; recomputed after each edit round."""
    graph: g.Graph
    types: dict = field(init=False)
    defs: dict = field(init=False)           # statement name -> Statement
    decls: dict = field(init=False)          # declared name -> Decl
    block_of: dict = field(init=False)       # tensor name -> block key
    readers: dict = field(init=False)        # tensor name -> [statement names reading it]
    params: set = field(init=False)
    weights: set = field(init=False)         # params and param-only statements
    names: set = field(init=False)           # every name in use (tensors, sizes, indices)
    index_size: dict = field(init=False)     # index -> its size's name
    extent: dict = field(init=False)         # index -> its extent

    def __post_init__(self):
        gr = self.graph
        self.types = gr.types()
        self.defs, self.decls, self.block_of, self.readers = {}, {}, {}, {}

        def walk(block: g.Block, key: str):
            for d in block.decls:
                self.decls[d.name] = d
                self.block_of[d.name] = key
            for s in block.stmts:
                self.defs[s.name] = s
                self.block_of[s.name] = key
                if isinstance(s.op, g.Repeat):
                    self.block_of[s.op.carry] = s.name
                    self.readers.setdefault(s.op.init, []).append(s.name)
                    walk(s.op.body, s.name)
                else:
                    for n in sorted(stmt_inputs(s)):
                        self.readers.setdefault(n, []).append(s.name)

        walk(gr.body, TOP)
        self.params = {n for n, d in self.decls.items() if d.kind == "param"}
        self.weights = self.params | param_only(gr)
        self.names = set(self.types) | {s.name for s in gr.sizes} | {i.name for i in gr.indices} | set(g.RESERVED)
        self.index_size = gr.index_size_names()
        self.extent = index_sizes(gr, resolve_sizes(gr))

    def is_weight_expr(self, e: g.Expr) -> bool:
        """Computed from parameters alone (so it can be prepared at load time)."""
        return not g.has_causal(e) and all(r.name in self.weights for r in g.expr_refs(e))

    def step_readers(self, name: str) -> list[str]:
        """Statements that read `name` every step (not weight preparation)."""
        return [r for r in self.readers.get(name, []) if r not in self.weights]

    def dtype(self, name: str) -> str:
        return self.types[name].dtype

    def home_block(self, e: g.Expr, default: str) -> str:
        """The block a statement computing `e` belongs in: the top level when it reads
        only top-level tensors (so a shared weight is not prepared once per layer)."""
        if all(self.block_of.get(r.name) == TOP for r in g.expr_refs(e)):
            return TOP
        return default


class Namer:
    """Fresh names that clash with nothing in the graph (nor with each other)."""

    def __init__(self, used):
        self.used = set(used)

    def __call__(self, base: str) -> str:
        name, n = base, 2
        while name in self.used:
            name, n = f"{base}{n}", n + 1
        self.used.add(name)
        return name


def edit_graph(graph: g.Graph, replace_stmt: dict[str, list[g.Statement]] | None = None,
               add: dict[str, list[g.Statement]] | None = None, decl_fn=None, stmt_fn=None) -> g.Graph:
    """Apply edits in one walk.

    replace_stmt: statement name -> the statements that take its place (same block);
    add: block key -> statements appended to that block (the verifier orders them);
    decl_fn(decl) -> decl and stmt_fn(stmt) -> stmt rewrite every remaining node.
    """
    replace_stmt, add = replace_stmt or {}, add or {}

    def walk(block: g.Block, key: str) -> g.Block:
        stmts: list[g.Statement] = []
        for s in block.stmts:
            if isinstance(s.op, g.Repeat):
                s = replace(s, op=replace(s.op, body=walk(s.op.body, s.name)))
            for t in replace_stmt.get(s.name, [s]):
                stmts.append(stmt_fn(t) if stmt_fn else t)
        stmts += [stmt_fn(t) if stmt_fn else t for t in add.get(key, [])]
        decls = tuple(decl_fn(d) if decl_fn else d for d in block.decls)
        return replace(block, decls=decls, stmts=tuple(stmts))

    return graph.with_body(walk(graph.body, TOP))


# ------------------------------------------------------------ weight memory
@dataclass(frozen=True)
class StoredWeight:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


def stored_weights(graph: g.Graph, sizes: dict[str, int] | None = None) -> dict[str, StoredWeight]:
    """The weights a step reads: parameters and param-only results used by per-step
    statements (a folded or quantised weight replaces the parameter it came from)."""
    info = GraphInfo(graph)
    idx = index_sizes(graph, sizes if sizes is not None else resolve_sizes(graph))
    repeat_index = {s.name: s.op.index for s in info.defs.values() if isinstance(s.op, g.Repeat)}
    out: dict[str, StoredWeight] = {}
    for name in sorted(info.weights):
        if not info.step_readers(name):
            continue
        typ = info.types[name]
        axes = typ.indices
        key = info.block_of[name]
        if key != TOP:
            axes = (repeat_index[key],) + axes
        out[name] = StoredWeight(name, tuple(idx[i] for i in axes), typ.dtype)
    return out


def weight_bytes(graph: g.Graph, sizes: dict[str, int] | None = None, float_dtype: str | None = None) -> int:
    """Bytes of stored_weights; float_dtype (e.g. "bf16") prices every float weight at
    that width, as if cast for the device."""
    total = 0
    for w in stored_weights(graph, sizes).values():
        dt = float_dtype if (float_dtype and w.dtype in g.FLOAT_DTYPES) else w.dtype
        total += replace(w, dtype=dt).nbytes
    return total


# ------------------------------------------------------------ pipelines
PLANNING_PASSES = ("shard", "plan")


def with_rewrites(pipeline: str | None, int8: bool = False, kv_groups: int | None = None) -> str:
    """The pipeline text with the CLI's rewrite flags put in their place: `--kv-groups G`
    first (multiquery{groups=G} changes the model's shapes, so everything after it,
    a folded gain or a quantised weight, is computed on the pooled heads), `--int8`
    last before planning (so it quantises the weights defer-norm folded gains into).
    A flag whose pass the pipeline already names is an error, not a second copy."""
    from .manager import _split_top
    parts = [p for p in _split_top(pipeline)] if pipeline and pipeline.strip() else []
    names = [p.split("{")[0].strip() for p in parts]
    if kv_groups is not None:
        if "multiquery" in names:
            raise EinpartError("--kv-groups: the pipeline already has a multiquery pass")
        parts.insert(0, f"multiquery{{groups={kv_groups}}}")
        names.insert(0, "multiquery")
    if int8:
        if "int8" in names:
            raise EinpartError("--int8: the pipeline already has an int8 pass")
        at = next((k for k, n in enumerate(names) if n in PLANNING_PASSES), len(parts))
        parts.insert(at, "int8")
    return ",".join(parts)


def planning_pass_last(pipeline: str) -> bool:
    """Whether the pipeline plans itself (ends with shard{...} or plan{...}); a planning
    pass anywhere else is an error (the rewrites after it would undo its layouts)."""
    from .manager import _split_top
    names = [p.split("{")[0].strip() for p in _split_top(pipeline)]
    where = [k for k, n in enumerate(names) if n in PLANNING_PASSES]
    if where and where[0] != len(names) - 1:
        raise EinpartError(f"pipeline '{pipeline}': the planning pass ({names[where[0]]}) must come last")
    return bool(where)
