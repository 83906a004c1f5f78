"""Annotated IR -> a readable Python module of jax.shard_map programs.

`generate_source(graph, layers="scan"|"unroll")` returns the text of a module with

- PARAM_SPECS / PREPARED_SPECS / STEP_PARAM_SPECS / STATE_SPECS / INPUT_SPECS /
  OUTPUT_SPECS: the PartitionSpec of every weight (as given; as prepared at
  load time; as the steps read them), state tensor (KV cache), input, output;
- `prepare(params)`: the spec's param-only statements (weight preparation:
  int8 quantisation, folded norm gains, pooled heads), run once at load time;
- `prefill(params, state, inputs, pos)` and `decode(...)`: shard_map bodies
  over local blocks, one statement of the IR after another, with exactly the
  collectives einpart.ir.layout.plan_stmt prescribes (operand moves, the
  reduction, the result move; reductions layout.collective_groups merges
  run as one psum / pmax on a tuple), positions offset by the shard's place on
  the mesh; decode is the same graph at T=1 (query splits dropped; a
  two-phase plan of the shard pass gives each program its own splits);
- `programs(mesh)`: the three wrapped in jax.shard_map.

Semantics mirror einpart.ir.interpret op by op. Every identifier comes from
a Namespace (names.py): spec names are validated and mangled, never pasted.
Elementwise arithmetic, norms and softmax run in float32; values are stored
in their statement's dtype (an int8 store rounds and saturates);
contractions are jnp.einsum(..., preferred_element_type=F32), at full
float32 precision for float32 inputs and in the low dtype for bf16 ones.

Two moves are not plan_stmt's: a state's next value goes back to its
declared layout (so the cache keeps one layout from step to step), and a
repeat's init / yielded value is resharded into the carry's layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import (collective_groups, merged_schedule, parts, plan_stmt, ref_layout, reshard,
                         stmt_split, type_layout)
from ..ir.model import step_axes
from ..ir.printer import format_attrs, format_op, format_type
from ..ir.analysis import param_only
from ..ir.verify import index_sizes, resolve_sizes, stmt_inputs, verify
from .names import Namespace, check_identifier, docstring_text, literal, number
from .plans import specialize

LAYER_MODES = ("scan", "unroll")
DTYPE_CODE = {"f32": "F32", "f64": "jnp.float64", "bf16": "jnp.bfloat16", "f16": "jnp.float16",
              "i8": "jnp.int8", "i32": "jnp.int32"}
LOW = ("bf16", "f16", "i8", "f64")  # converted to F32 before arithmetic
UNARY_CODE = {
    "exp": "jnp.exp", "log": "jnp.log", "sqrt": "jnp.sqrt", "rsqrt": "lax.rsqrt", "tanh": "jnp.tanh",
    "sigmoid": "jax.nn.sigmoid", "silu": "jax.nn.silu", "relu": "jax.nn.relu", "abs": "jnp.abs",
}
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# lax.pmax has no derivative; a max reduced across shards calls this one instead, so the
# generated programs compose with jax.grad. Its tangent is that of jnp.max: the tangent at
# the maximum, split evenly between shards that tie. Emitted only in modules that use it.
PMAX_HELPER = [
    "@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))",
    "def pmax(x, axis_name):",
    '    """lax.pmax with a derivative (the tangent at the maximum; ties share it evenly)."""',
    "    return lax.pmax(x, axis_name)",
    "",
    "",
    "@pmax.defjvp",
    "def pmax_jvp(axis_name, primals, tangents):",
    "    (x,), (dx,) = primals, tangents",
    "    out = lax.pmax(x, axis_name)",
    "    hit = jax.tree.map(lambda a, o: (a == o).astype(a.dtype), x, out)",
    "    share = lax.psum(jax.tree.map(lambda d, h: d * h, dx, hit), axis_name)",
    "    return out, jax.tree.map(lambda s, c: s / c, share, lax.psum(hit, axis_name))",
]


# ------------------------------------------------------------------ helpers
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


def _tuple(xs) -> str:
    xs = list(xs)
    return "(" + ", ".join(str(x) for x in xs) + ("," if len(xs) == 1 else "") + ")"


def positional_layout(typ: g.TensorType, indices: tuple[str, ...]) -> dict:
    """A type's layout with its axes renamed, by position, to `indices`."""
    return {i: a.mesh for i, a in zip(indices, typ.axes)}


def _comment(text: str) -> str:
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
    lines: list = field(default_factory=list)
    depth: int = 0

    def __call__(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")


@dataclass
class LayerState:
    """A state tensor of a repeat body, kept stacked over the layers and carried whole
    through the layer loop, so that a step writes its new rows into the one stacked
    buffer (one dynamic_update_slice at [layer, ..., pos, ...]) instead of slicing each
    layer's cache out and stacking all layers back (a copy of the whole cache per step)."""
    stacked: str                   # the stacked array as the loop carries it
    layer: str                     # code of the layer index
    block: str                     # this layer's block, when something reads it whole
    read: bool = False             # whether `block` has been emitted


# ------------------------------------------------------------------ one program
class _Program:
    def __init__(self, graph: g.Graph, name: str, layers: str, given: dict | None = None):
        self.graph = graph
        # weights passed in another layout than this program declares (a two-phase plan
        # whose phases lay a prepared weight out differently): moved when loaded
        self.given = {n: lay for n, lay in (given or {}).items()
                      if graph.decl(n) is not None and lay != type_layout(graph.decl(n).type)}
        self.name = name
        self.layers = layers
        self.mesh = dict(graph.mesh)
        self.sizes = resolve_sizes(graph)
        self.idx = index_sizes(graph, self.sizes)
        self.types = graph.types()
        self.ns = Namespace()
        self.w = Writer()
        self.vals: dict[str, Val] = {}
        self.next_state: dict[str, str] = {}
        self.merge = True                   # step programs merge reductions (layout.collective_groups)
        self.grouped: set = set()           # members of the block's merged groups
        self.partial: dict = {}             # member -> (local partial variable, what finishes it)
        self.uses_pmax = False              # emits pmax(): the module then defines it (PMAX_HELPER)
        # the low float dtype the spec stores its weights in (None: float32 products stay float32)
        self.float_storage = next((d.type.dtype for d, _ in graph.all_decls()
                                   if d.kind == "param" and d.type.dtype in ("bf16", "f16")), None)
        # inside a repeat body: state name -> LayerState (the stacked cache, updated in place)
        self.layer_state: dict[str, LayerState] = {}
        for d, _ in graph.all_decls():  # tensor variables first: stable names
            self.ns.tensor(d.name)
            if _ is not None:
                self.ns.tensor(d.name, "all")
        for s, _ in graph.all_stmts():
            self.ns.tensor(s.name)
            if isinstance(s.op, g.Repeat):
                self.ns.tensor(s.op.carry)

    def load(self, d: g.Decl, var: str) -> Val:
        """A declared tensor as this program reads it (moved if it is given in another layout)."""
        declared = type_layout(d.type)
        if d.name not in self.given:
            return Val(var, d.type.indices, declared, d.type.dtype)
        have = {i: tuple(self.given[d.name].get(i, ())) for i in d.type.indices}
        self.w(f"# {_comment(d.name)} is given as {spec_code(have, d.type.indices)}; this program reads it as "
               f"{spec_code(declared, d.type.indices)}")
        moved = self.moves(Val(var, d.type.indices, have, d.type.dtype), reshard(have, declared, d.type.indices))
        return Val(moved.var, d.type.indices, declared, d.type.dtype)

    # -- small emitters -----------------------------------------------------
    def local(self, indices, layout) -> tuple[int, ...]:
        return tuple(self.idx[i] // parts(tuple(layout.get(i, ())), self.mesh) for i in indices)

    def shape_note(self, indices, layout) -> str:
        return "[" + ", ".join(f"{i}={n}" for i, n in zip(indices, self.local(indices, layout))) + "]"

    def offset(self, index: str, split: dict) -> tuple[str | None, int]:
        """(code of the global offset of this shard's block of `index`, local size)."""
        axes = tuple(split.get(index, ()))
        n = self.idx[index] // parts(axes, self.mesh)
        if not axes:
            return None, n
        return f"lax.axis_index({axes_code(axes)}) * {n}", n

    def positions(self, index: str, split: dict, absolute: bool) -> str:
        off, n = self.offset(index, split)
        terms = (["pos"] if absolute else []) + ([off] if off else []) + [f"jnp.arange({n})"]
        return " + ".join(terms)

    def moves(self, val: Val, moves, hint: str | None = None, final: str | None = None) -> Val:
        """Emit reshard moves on a local block; returns the moved value (named `final` if given)."""
        var, layout = val.var, {i: tuple(a) for i, a in val.layout.items()}
        for n_move, c in enumerate(moves):
            last = n_move == len(moves) - 1
            new = final if (last and final) else self.ns.fresh((hint or val.var) + "_")
            if c.kind == "all_gather":
                p = val.indices.index(c.index)
                have = layout.get(c.index, ())
                assert have[len(have) - len(c.axes):] == c.axes, (have, c)
                layout[c.index] = have[:len(have) - len(c.axes)]
                self.w(f"{new} = lax.all_gather({var}, {axes_code(c.axes)}, axis={p}, tiled=True)")
            elif c.kind == "all_to_all":
                ps, pc = val.indices.index(c.index), val.indices.index(c.other)
                have = layout.get(c.other, ())
                assert have[-1:] == c.axes, (have, c)
                layout[c.other] = have[:-1]
                layout[c.index] = tuple(layout.get(c.index, ())) + c.axes
                self.w(f"{new} = lax.all_to_all({var}, {axes_code(c.axes)}, split_axis={ps}, "
                       f"concat_axis={pc}, tiled=True)")
            elif c.kind == "slice":
                p = val.indices.index(c.index)
                n = self.idx[c.index] // parts(layout.get(c.index, ()), self.mesh)
                m = n // parts(c.axes, self.mesh)
                layout[c.index] = tuple(layout.get(c.index, ())) + c.axes
                self.w(f"{new} = lax.dynamic_slice_in_dim({var}, lax.axis_index({axes_code(c.axes)}) * {m}, "
                       f"{m}, axis={p})")
            else:  # pragma: no cover
                raise EinpartError(f"codegen: unknown move {c.kind}")
            var = new
        return Val(var, val.indices, layout, val.dtype)

    def operands(self, comm) -> dict:
        out = {}
        for r, moves in comm.operands:
            src = self.vals[r.name]
            val = Val(src.var, r.indices, ref_layout(r, self.types[r.name]), src.dtype)
            out[(r.name, r.indices)] = self.moves(val, moves, src.var)
        return out

    def transpose(self, code: str, have: tuple, want: tuple) -> str:
        if have == want:
            return code
        return f"jnp.transpose({code}, {_tuple(have.index(i) for i in want)})"

    def align(self, code: str, have: tuple, want: tuple) -> str:
        """Transpose `have` axes into the order of `want`, inserting size-1 axes."""
        kept = tuple(i for i in want if i in have)
        code = self.transpose(code, have, kept)
        if len(kept) == len(want):
            return code
        return f"{code}[{', '.join(':' if i in have else 'None' for i in want)}]"

    def f32(self, code: str, dtype: str) -> str:
        return f"{code}.astype(F32)" if dtype in LOW else code

    def reduced(self, s, var: str, comm, out: tuple, tail) -> None:
        """The reduction then `tail` (what finishes the statement), or, for a member
        of a merged group, both kept until the group's one collective runs."""
        if s.name in self.grouped:
            self.partial[s.name] = (var, tail)
            return
        self.reduce(var, comm, out)
        tail()

    def block(self, stmts) -> None:
        """A block's statements, in layout.merged_schedule order: reductions that
        layout.collective_groups merges run as one collective on a tuple."""
        comms = {st.name: plan_stmt(st, self.types, stmt_split(st)) for st in stmts
                 if not isinstance(st.op, g.Repeat)}
        groups = collective_groups(stmts, comms) if self.merge else []
        self.grouped |= {m for gr in groups for m in gr.members}
        for kind, item in merged_schedule(stmts, groups):
            if kind == "stmt":
                self.stmt(item)
                continue
            parts_ = [self.partial.pop(m) for m in item.members]
            names = ", ".join(v for v, _ in parts_)
            fn = {"psum": "lax.psum", "pmax": "pmax"}[item.kind]     # pmax: the differentiable helper
            self.uses_pmax |= item.kind == "pmax"
            self.w(f"# one {item.kind} for {_comment(', '.join(item.members))}")
            self.w(f"{names} = {fn}(({names}), {axes_code(item.axes)})")
            for _, tail in parts_:
                tail()

    def reduce(self, var: str, comm, out: tuple) -> None:
        for c in comm.reduce:
            if c.kind == "psum":
                self.w(f"{var} = lax.psum({var}, {axes_code(c.axes)})")
            elif c.kind == "pmax":
                self.uses_pmax = True
                self.w(f"{var} = pmax({var}, {axes_code(c.axes)})")
            elif c.kind == "psum_scatter":
                self.w(f"{var} = lax.psum_scatter({var}, {axes_code(c.axes)}, "
                       f"scatter_dimension={out.index(c.index)}, tiled=True)")
            else:  # pragma: no cover
                raise EinpartError(f"codegen: unknown reduction {c.kind}")

    def finish(self, s: g.Statement, var: str, comm, computed_dtype: str = "f32") -> None:
        """Cast to the statement's dtype, apply the result moves, bind the value."""
        if s.type.dtype != computed_dtype:
            if s.type.dtype == "i8" and computed_dtype not in ("i8", "i32"):
                # an int8 store rounds to nearest and saturates (symmetric int8), as the interpreter does
                self.w(f"{var} = jnp.clip(jnp.rint({var}), -127, 127).astype(jnp.int8)")
            else:
                self.w(f"{var} = {var}.astype({DTYPE_CODE[s.type.dtype]})")
        natural = dict(comm.natural)
        val = Val(var, s.type.indices, natural, s.type.dtype)
        if comm.result:
            val = self.moves(val, comm.result, var, final=self.ns.tensor(s.name))
        self.vals[s.name] = Val(self.ns.tensor(s.name), s.type.indices, type_layout(s.type), s.type.dtype)

    # -- statements ---------------------------------------------------------
    def stmt(self, s: g.Statement) -> None:
        op = s.op
        head = f"{s.name}{format_type(s.type)} = " + (
            f"repeat {op.index} ({op.carry} = {op.init})" if isinstance(op, g.Repeat) else format_op(op, ""))
        self.w(f"# {_comment(head + format_attrs(tuple((k, v) for k, v in s.attrs if k == 'split')))}")
        if isinstance(op, g.Repeat):
            return self.repeat(s, op)
        split = stmt_split(s)
        comm = plan_stmt(s, self.types, split)
        if isinstance(op, g.Compute):
            self.compute(s, op, comm, split)
        elif isinstance(op, g.Take):
            self.take(s, op, comm, split)
        elif isinstance(op, g.Write):
            self.write(s, op, comm, split)
        elif isinstance(op, g.Rope):
            self.rope(s, op, comm, split)
        else:  # pragma: no cover
            raise EinpartError(f"codegen: unknown operation in '{s.name}'")

    def compute(self, s, op: g.Compute, comm, split) -> None:
        ops = self.operands(comm)
        out = s.type.indices
        var = self.ns.tensor(s.name)
        computed = "f32"
        factors = g.product_factors(op.expr)
        if (op.reduce == "sum" and factors is not None and len(factors) > 1
                and all(isinstance(f, g.Ref) for f in factors)):
            axes = g.expr_indices(op.expr)
            if len(axes) > len(LETTERS):
                raise EinpartError(f"'{s.name}': too many indices for one einsum")
            letter = {i: LETTERS[n] for n, i in enumerate(axes)}
            spec = ",".join("".join(letter[i] for i in f.indices) for f in factors)
            spec += "->" + "".join(letter[i] for i in out)
            vals = [ops[(f.name, f.indices)] for f in factors]
            low = next((v.dtype for v in vals if v.dtype in ("bf16", "f16")), None)
            if low is None and any(v.dtype == "i8" for v in vals):
                # int8 weights are exact in bf16: in a spec whose weights are stored in a low
                # float dtype the product runs there too (not as a float32 HIGHEST product)
                low = self.float_storage
            args = []
            for v in vals:
                if low is not None and v.dtype != low:     # a low-precision product: every input in it
                    args.append(f"{v.var}.astype({DTYPE_CODE[low]})")
                elif low is None and v.dtype != "f32":
                    args.append(f"{v.var}.astype(F32)")
                else:
                    args.append(v.var)
            # float32 products at full float32 precision (GPUs would use TF32);
            # low-precision ones accumulate in float32; a product with a weight returns in the
            # low dtype (unless partial sums still cross devices, or it is an output): XLA on GPU turns a bf16 x bf16 -> f32 matrix-
            # vector product (decode, batch 1) into f32 copies of the weights (measured on an
            # H200: 19.2 ms/token for Llama-8B unrolled, against 7.1 ms with bf16 results)
            weight = any((d := self.graph.decl(f.name)) is not None and d.kind == "param" for f in factors)
            if low is not None and weight and not comm.reduce and s.name not in self.graph.outputs:
                computed = low
                self.w(f"{var} = jnp.einsum({spec!r}, {', '.join(args)}, "
                       f"preferred_element_type={DTYPE_CODE[low]})")
            else:
                prec = "" if low is not None else ", precision=HIGHEST"
                self.w(f"{var} = jnp.einsum({spec!r}, {', '.join(args)}, preferred_element_type=F32{prec})")
        else:
            axes = g.expr_indices(op.expr)
            masks = {}
            for leaf in g.expr_leaves(op.expr):
                if isinstance(leaf, g.Causal) and (leaf.t, leaf.s) not in masks:
                    masks[(leaf.t, leaf.s)] = self.causal(leaf, split)
            code = self.expr(op.expr, axes, ops, masks)
            if isinstance(op.expr, g.Binary):
                code = code[1:-1]       # the outermost parentheses
            if not axes:
                code = f"jnp.asarray({code}, F32)"
            if op.reduce is not None:
                red = tuple(n for n, i in enumerate(axes) if i not in out)
                fn = {"sum": "jnp.sum", "mean": "jnp.sum", "max": "jnp.max"}[op.reduce]
                code = f"{fn}({code}, axis={_tuple(red)})"
                axes = tuple(i for i in axes if i in out)
            self.w(f"{var} = {self.transpose(code, axes, out)}")

        def tail():
            if op.reduce == "mean":
                count = 1
                for i in g.expr_indices(op.expr):
                    if i not in out:
                        count *= self.idx[i]
                self.w(f"{var} = {var} / {number(count)}")
            self.finish(s, var, comm, computed)
        self.reduced(s, var, comm, out, tail)

    def causal(self, leaf: g.Causal, split) -> str:
        mask = self.ns.fresh(f"mask_{leaf.t}_{leaf.s}")
        q = self.positions(leaf.t, split, absolute=True)
        k = self.positions(leaf.s, split, absolute=False)
        self.w(f"{mask} = jnp.where(({k})[None, :] <= ({q})[:, None], 0.0, NEG_INF).astype(F32)"
               f"  # [{leaf.t}, {leaf.s}]")
        return mask

    def expr(self, e, axes, ops, masks) -> str:
        if isinstance(e, g.Ref):
            v = ops[(e.name, e.indices)]
            return self.align(self.f32(v.var, v.dtype), e.indices, axes)
        if isinstance(e, g.Const):
            return number(e.value)
        if isinstance(e, g.SizeVal):
            return number(self.sizes[e.name])
        if isinstance(e, g.Causal):
            return self.align(masks[(e.t, e.s)], (e.t, e.s), axes)
        if isinstance(e, g.Unary):
            x = self.expr(e.x, axes, ops, masks)
            if e.fn == "neg":
                return f"(-{x})"
            if isinstance(e.x, g.Binary):
                x = x[1:-1]             # a call's parentheses suffice
            if e.fn == "gelu":
                return f"jax.nn.gelu({x}, approximate=True)"
            if e.fn not in UNARY_CODE:
                raise EinpartError(f"codegen: unknown function {e.fn}")
            return f"{UNARY_CODE[e.fn]}({x})"
        if isinstance(e, g.Binary):
            if e.op not in "+-*/" or len(e.op) != 1:
                raise EinpartError(f"codegen: unknown operator {e.op!r}")
            return f"({self.expr(e.lhs, axes, ops, masks)} {e.op} {self.expr(e.rhs, axes, ops, masks)})"
        raise EinpartError(f"codegen: unknown expression {type(e).__name__}")

    def take(self, s, op: g.Take, comm, split) -> None:
        ops = self.operands(comm)
        out = s.type.indices
        var = self.ns.tensor(s.name)
        table = ops[(op.table.name, op.table.indices)]
        looked = next(i for i in op.table.indices if i not in out)
        ax = op.table.indices.index(looked)
        if isinstance(op.ids, g.Position):
            ids_axes = (op.ids.index,)
            ids = self.ns.fresh(f"pos_{op.ids.index}")
            self.w(f"{ids} = {self.positions(op.ids.index, split, absolute=True)}")
        else:
            ids_axes = op.ids.indices
            ids = ops[(op.ids.name, op.ids.indices)].var
        have = op.table.indices[:ax] + ids_axes + op.table.indices[ax + 1:]
        off, n = self.offset(looked, split)
        if off is None:
            self.w(f"{var} = jnp.take({table.var}, {ids}, axis={ax}, mode='clip')")
        else:
            lid, hit = self.ns.fresh(f"ids_{looked}"), self.ns.fresh(f"hit_{looked}")
            self.w(f"{lid} = {ids} - {off}  # ids of the rows this shard holds")
            self.w(f"{hit} = ({lid} >= 0) & ({lid} < {n})")
            self.w(f"{var} = jnp.take({table.var}, jnp.clip({lid}, 0, {n - 1}), axis={ax})")
            self.w(f"{var} = jnp.where({self.align(hit, ids_axes, have)}, {var}, 0)")
        if have != out:
            self.w(f"{var} = {self.transpose(var, have, out)}")
        self.reduced(s, var, comm, out, lambda: self.finish(s, var, comm, table.dtype))

    def read_layer_state(self, name: str) -> None:
        """Emit the slice of this layer's block of a stacked state (once)."""
        st = self.layer_state[name]
        if not st.read:
            self.w(f"{st.block} = lax.dynamic_index_in_dim({st.stacked}, {st.layer}, 0, keepdims=False)")
            st.read = True

    def write(self, s, op: g.Write, comm, split) -> None:
        stacked = self.layer_state.get(op.cache.name)
        if stacked is not None:
            if self.write_in_place(s, op, comm, split, stacked):
                return
            self.read_layer_state(op.cache.name)
        ops = self.operands(comm)
        var = self.ns.tensor(s.name)
        cache = ops[(op.cache.name, op.cache.indices)]
        new = ops[(op.new.name, op.new.indices)]
        s_idx = next(i for i in op.cache.indices if i not in op.new.indices)
        t_idx = next(i for i in op.new.indices if i not in op.cache.indices)
        order = tuple(t_idx if i == s_idx else i for i in op.cache.indices)
        sp = op.cache.indices.index(s_idx)
        upd = self.transpose(new.var, op.new.indices, order)
        if new.dtype != cache.dtype:
            upd = f"{upd}.astype({DTYPE_CODE[cache.dtype]})"
        off, n = self.offset(s_idx, split)
        n_t = self.idx[t_idx]
        written = self.ns.tensor(op.cache.name, "new")
        if off is None:
            self.w(f"{written} = lax.dynamic_update_slice_in_dim({cache.var}, {upd}, pos, axis={sp})")
        else:
            rel, ok = self.ns.fresh(f"rel_{s_idx}"), self.ns.fresh(f"ok_{s_idx}")
            self.w(f"{rel} = {off} + jnp.arange({n}) - pos  # written row of each cached position here")
            self.w(f"{ok} = ({rel} >= 0) & ({rel} < {n_t})")
            self.w(f"{written} = jnp.where({self.align(ok, (s_idx,), op.cache.indices)}, "
                   f"jnp.take({upd}, jnp.clip({rel}, 0, {n_t - 1}), axis={sp}), {cache.var})")
        # the next state, moved into its declared layout (not one of plan_stmt's moves:
        # the state keeps the layout of its declaration from step to step)
        decl = self.graph.decl(op.cache.name)
        natural = {i: tuple(split.get(i, ())) for i in op.cache.indices}
        want = ref_layout(op.cache, decl.type)
        st = Val(written, op.cache.indices, natural, cache.dtype)
        nxt = self.moves(st, reshard(natural, want, op.cache.indices)).var
        if stacked is not None:       # this layer's new block back into the stacked state
            new = self.ns.fresh(f"{stacked.stacked}_")
            self.w(f"{new} = lax.dynamic_update_index_in_dim({stacked.stacked}, {nxt}, {stacked.layer}, 0)")
            nxt = new
        self.next_state[op.cache.name] = nxt
        self.w(f"{var} = {self.transpose(written, op.cache.indices, s.type.indices)}")
        self.finish(s, var, comm, cache.dtype)

    def write_in_place(self, s, op: g.Write, comm, split, stacked: LayerState) -> bool:
        """The common case of a stacked state's write: the cache is read in its declared
        layout, its position index is not split and the result keeps that layout. Then the
        new rows go straight into the stacked buffer, and this layer's block is read from
        it; False (nothing emitted) otherwise."""
        s_idx = next(i for i in op.cache.indices if i not in op.new.indices)
        decl = self.graph.decl(op.cache.name)
        natural = {i: tuple(split.get(i, ())) for i in op.cache.indices}
        want = ref_layout(op.cache, decl.type)
        cache_moves = [m for r, m in comm.operands if r.name == op.cache.name]
        if split.get(s_idx) or any(cache_moves) or reshard(natural, want, op.cache.indices):
            return False
        ops = self.operands(comm)
        var = self.ns.tensor(s.name)
        new = ops[(op.new.name, op.new.indices)]
        t_idx = next(i for i in op.new.indices if i not in op.cache.indices)
        order = tuple(t_idx if i == s_idx else i for i in op.cache.indices)
        upd = self.transpose(new.var, op.new.indices, order)
        dtype = decl.type.dtype
        if new.dtype != dtype:
            upd = f"{upd}.astype({DTYPE_CODE[dtype]})"
        start = ", ".join([stacked.layer] + ["pos" if i == s_idx else "0" for i in op.cache.indices])
        nxt = self.ns.fresh(f"{stacked.stacked}_")
        self.w(f"{nxt} = lax.dynamic_update_slice({stacked.stacked}, {upd}[None], ({start}))"
               f"  # in place: layer {stacked.layer}, position pos")
        written = self.ns.tensor(op.cache.name, "new")
        self.w(f"{written} = lax.dynamic_index_in_dim({nxt}, {stacked.layer}, 0, keepdims=False)")
        self.next_state[op.cache.name] = nxt
        self.w(f"{var} = {self.transpose(written, op.cache.indices, s.type.indices)}")
        self.finish(s, var, comm, dtype)
        return True

    def rope(self, s, op: g.Rope, comm, split) -> None:
        ops = self.operands(comm)
        var = self.ns.tensor(s.name)
        x = ops[(op.x.name, op.x.indices)]
        axes = op.x.indices
        n_pair = self.idx[op.pair]
        half = n_pair // 2
        kp = axes.index(op.pair)
        ang, cos, sin = self.ns.fresh(f"ang_{op.at}"), self.ns.fresh("cos"), self.ns.fresh("sin")
        x32 = self.f32(x.var, x.dtype)
        self.w(f"{ang} = ({self.positions(op.at, split, absolute=True)}).astype(F32)[:, None] * "
               f"({number(op.theta)} ** (jnp.arange({half}, dtype=F32) * {number(-2.0 / n_pair)}))[None, :]")
        self.w(f"{cos} = jnp.concatenate([jnp.cos({ang})] * 2, axis=1)  # [{op.at}, {op.pair}]")
        self.w(f"{sin} = jnp.concatenate([jnp.sin({ang})] * 2, axis=1)")
        lo, hi = self.ns.fresh("lo"), self.ns.fresh("hi")
        self.w(f"{lo}, {hi} = jnp.split({x32}, 2, axis={kp})")
        self.w(f"{var} = {x32} * {self.align(cos, (op.at, op.pair), axes)} + "
               f"jnp.concatenate([-{hi}, {lo}], axis={kp}) * {self.align(sin, (op.at, op.pair), axes)}")
        if axes != s.type.indices:
            self.w(f"{var} = {self.transpose(var, axes, s.type.indices)}")
        self.finish(s, var, comm)

    # -- the layer stack ------------------------------------------------------
    def repeat(self, s: g.Statement, op: g.Repeat) -> None:
        carry_layout = type_layout(s.type)
        init = self.vals[op.init]
        init_layout = positional_layout(self.types[op.init], s.type.indices)
        moved = self.moves(Val(init.var, s.type.indices, init_layout, init.dtype),
                           reshard(init_layout, carry_layout, s.type.indices))
        if any(isinstance(st.op, g.Repeat) for st in op.body.stmts):
            raise EinpartError(f"'{s.name}': nested repeat blocks are not supported by codegen")
        decls = op.body.decls
        states = [d for d in decls if d.kind == "state"]
        params = [d for d in decls if d.kind != "state"]
        fn = self.ns.fresh(f"layer_{s.name}")
        xs = self.ns.fresh("xs")
        carry = self.ns.tensor(op.carry)
        layer = self.ns.fresh(f"i_{op.index}")
        stacked = [self.ns.tensor(d.name, "all") for d in params]
        state_all = [self.ns.tensor(d.name, "all") for d in states]
        pack = self.ns.fresh("carry")
        self.w(f"def {fn}({pack}, {xs}):")
        self.w.depth += 1
        self.w(f'"""One layer ({_comment(op.index)} = {layer}): {_comment(s.name)} carries {_comment(op.carry)} '
               f'{_comment(self.shape_note(s.type.indices, carry_layout))}'
               + (" and the stacked state, written in place." if states else ".") + '"""')
        self.w(f"{carry}, {_tuple(state_all)} = {pack}")
        names = [self.ns.tensor(d.name) for d in params]
        self.w(f"{layer}, {_tuple(names)} = {xs}")
        outer_vals, outer_states = dict(self.vals), self.layer_state
        for d, name in zip(params, names):
            self.vals[d.name] = self.load(d, name)
        self.layer_state = {}
        read_whole = set()      # states some statement other than their write reads
        for st in op.body.stmts:
            if not isinstance(st.op, g.Write):
                read_whole |= stmt_inputs(st)
        for d, all_var in zip(states, state_all):
            block = self.ns.tensor(d.name)
            self.layer_state[d.name] = LayerState(all_var, layer, block)
            self.vals[d.name] = Val(block, d.type.indices, type_layout(d.type), d.type.dtype)
            self.next_state[d.name] = all_var      # a state this layer never writes stays as it is
            if d.name in read_whole:
                self.read_layer_state(d.name)
        self.vals[op.carry] = Val(carry, s.type.indices, carry_layout, s.type.dtype)
        self.block(op.body.stmts)
        res = self.vals[op.result]
        res_layout = positional_layout(self.types[op.result], s.type.indices)
        back = self.moves(Val(res.var, s.type.indices, res_layout, res.dtype),
                          reshard(res_layout, carry_layout, s.type.indices))
        nxt = [self.next_state[d.name] for d in states]
        self.w(f"return ({back.var}, {_tuple(nxt)}), None")
        self.w.depth -= 1
        self.vals, self.layer_state = outer_vals, outer_states
        news = [self.ns.tensor(d.name, "next") for d in states]
        out = self.ns.tensor(s.name)
        n_layers = self.idx[op.index]
        if self.layers == "scan":
            self.w(f"({out}, {_tuple(news)}), _ = lax.scan({fn}, ({moved.var}, {_tuple(state_all)}), "
                   f"(jnp.arange({n_layers}, dtype=jnp.int32), {_tuple(stacked)}))")
        else:
            i = self.ns.fresh("i")
            self.w(f"{out}, {_tuple(news)} = {moved.var}, {_tuple(state_all)}")
            self.w(f"for {i} in range({n_layers}):   # unrolled: static layer indices")
            sliced = _tuple(f"{v}[{i}]" for v in stacked)
            self.w(f"    ({out}, {_tuple(news)}), _ = {fn}(({out}, {_tuple(news)}), ({i}, {sliced}))")
        for d, v in zip(states, news):
            self.next_state[d.name] = v
        self.vals[s.name] = Val(out, s.type.indices, carry_layout, s.type.dtype)

    # -- the function -------------------------------------------------------
    def emit(self) -> list[str]:
        w = self.w
        graph = self.graph
        ax = step_axes(graph)
        q_size = self.idx[ax.query]
        w(f"def {self.name}(params, state, inputs, pos):")
        w.depth += 1
        w(f'"""The {self.name} step (T={q_size}): one shard_map body over local blocks. pos is the position '
          f'of the first token."""')
        w("# global sizes: " + ", ".join(f"{i.name}={self.idx[i.name]}" for i in graph.indices))
        for d, owner in graph.all_decls():
            src = {"param": "params", "state": "state", "input": "inputs"}[d.kind]
            var = self.ns.tensor(d.name, "all") if owner is not None else self.ns.tensor(d.name)
            local = self.local(d.type.indices, self.given.get(d.name, type_layout(d.type)))
            if owner is not None:
                local = (self.idx[owner.index],) + local
            note = f"{d.kind} {d.name}{format_type(d.type)}" + (f" x {owner.index}" if owner is not None else "")
            w(f"{var} = {src}[{literal(d.name, 'tensor name')}]  # {_comment(note)}: local {local}")
            if owner is None:
                self.vals[d.name] = self.load(d, var)
        self.block(graph.body.stmts)
        outs = ", ".join(f"{literal(n, 'tensor name')}: {self.vals[n].var}" for n in graph.outputs)
        states = [d for d, _ in graph.all_decls() if d.kind == "state"]
        nxt = ", ".join(f"{literal(d.name, 'tensor name')}: {self.next_state[d.name]}" for d in states)
        w(f"return {{{outs}}}, {{{nxt}}}")
        w.depth -= 1
        return w.lines


class _Prepare(_Program):
    """`prepare(params)`: the param-only statements (weight preparation: int8
    quantisation, folded gains, pooled heads), run once at load time; inside a
    repeat block they run per layer over the stacked weights."""

    def __init__(self, graph: g.Graph, outputs: tuple[str, ...], layers: str):
        super().__init__(graph, "prepare", layers)
        self.merge = False                  # run once at load time: not worth merging
        self.prepared = param_only(graph)   # computed here
        self.outputs = outputs              # handed to the step programs

    def emit(self) -> list[str]:
        w = self.w
        graph = self.graph
        w("def prepare(params):")
        w.depth += 1
        w('"""Weight preparation (param-only statements), run once at load time: params -> prepared."""')
        out: dict[str, str] = {}
        for d, owner in graph.all_decls():
            if d.kind != "param":
                continue
            var = self.ns.tensor(d.name, "all") if owner is not None else self.ns.tensor(d.name)
            w(f"{var} = params[{literal(d.name, 'tensor name')}]")
            if owner is None:
                self.vals[d.name] = Val(var, d.type.indices, type_layout(d.type), d.type.dtype)
        for s in graph.body.stmts:
            if s.name in self.prepared:
                self.stmt(s)
                out[s.name] = self.vals[s.name].var
            elif isinstance(s.op, g.Repeat):
                out.update(self.prepare_layers(s, s.op))
        w("return {" + ", ".join(f"{literal(n, 'tensor name')}: {out[n]}" for n in self.outputs) + "}")
        w.depth -= 1
        return w.lines

    def prepare_layers(self, s: g.Statement, op: g.Repeat) -> dict[str, str]:
        body = [st for st in op.body.stmts if st.name in self.prepared]
        if not body:
            return {}
        params = [d for d in op.body.decls if d.kind == "param"]
        fn, xs = self.ns.fresh(f"prepare_{s.name}"), self.ns.fresh("xs")
        self.w(f"def {fn}(carry, {xs}):")
        self.w.depth += 1
        names = [self.ns.tensor(d.name) for d in params]
        self.w(f"{_tuple(names) if len(names) != 1 else names[0] + ','} = {xs}" if names else f"del {xs}")
        outer = dict(self.vals)
        for d, name in zip(params, names):
            self.vals[d.name] = Val(name, d.type.indices, type_layout(d.type), d.type.dtype)
        for st in body:
            self.stmt(st)
        body = [st for st in body if st.name in self.outputs]
        results = [self.vals[st.name].var for st in body]
        self.w(f"return carry, {_tuple(results)}")
        self.w.depth -= 1
        self.vals = outer
        stacked = [self.ns.tensor(d.name, "all") for d in params]
        outs = [self.ns.tensor(st.name, "all") for st in body]
        ys = self.ns.fresh("ys")
        self.w(f"_, {ys} = lax.scan({fn}, None, {_tuple(stacked)})")
        self.w(f"{_tuple(outs) if len(outs) != 1 else outs[0] + ','} = {ys}")
        return {st.name: v for st, v in zip(body, outs)}


def split_prepare(graph: g.Graph) -> tuple[g.Graph, tuple[str, ...]]:
    """The graph the step programs run: every param-only statement (weight preparation)
    becomes a parameter of its own type and layout (`{prepared=load}`), computed once by
    `prepare`; parameters only preparation reads are dropped. Also the prepared names."""
    prepared = param_only(graph)
    if not prepared:
        return graph, ()

    def fn(block: g.Block, owner) -> g.Block:
        new = tuple(g.Decl("param", s.name, s.type, g.make_attrs(prepared=g.Sym("load")))
                    for s in block.stmts if s.name in prepared)
        return replace(block, decls=block.decls + new,
                       stmts=tuple(s for s in block.stmts if s.name not in prepared))

    step = g.map_blocks(graph, fn)
    read = set()
    for s, _ in step.all_stmts():
        read |= stmt_inputs(s)

    def drop(block: g.Block, owner) -> g.Block:   # weights no step statement reads stay behind
        return replace(block, decls=tuple(d for d in block.decls if d.kind != "param" or d.name in read))

    order = tuple(s.name for s, _ in graph.all_stmts() if s.name in prepared and s.name in read)
    return verify(g.map_blocks(step, drop)), order


# ------------------------------------------------------------------ the module
def decl_specs(graph: g.Graph, kind: str) -> dict[str, str]:
    out = {}
    for d, owner in graph.all_decls():
        if d.kind == kind:
            out[d.name] = spec_code(type_layout(d.type), d.type.indices, lead=1 if owner is not None else 0)
    return out


def phase_graph(graph: g.Graph, phase: str) -> g.Graph:
    """A two-phase plan of the shard pass (split_prefill / split_decode attributes)
    narrowed to one phase; any other graph as it is."""
    if any(g.attr(s.attrs, "split_decode") is not None for s, _ in graph.all_stmts()):
        from ..passes.shard import specialize as shard_specialize
        return shard_specialize(graph, phase)
    return graph


def program_graphs(graph: g.Graph, prefill_len: int | None = None, batch: int | None = None) -> dict[str, g.Graph]:
    """The graphs of the two programs: prefill at T=prefill_len (default: the spec's T),
    decode at T=1 (splits of the query index dropped); both at batch `batch`.
    A two-phase plan (the shard pass's) gives each program its own splits."""
    ax = step_axes(graph)
    names = graph.index_size_names()
    base: dict[str, int] = {}
    if batch is not None:
        base[names[ax.batch]] = int(batch)
    pre = dict(base)
    if prefill_len is not None:
        pre[names[ax.query]] = int(prefill_len)
    return {"prefill": specialize(phase_graph(graph, "prefill"), pre),
            "decode": specialize(phase_graph(graph, "decode"), dict(base, **{names[ax.query]: 1}),
                                 drop=(ax.query,))}


def generate_source(graph: g.Graph, layers: str = "scan", prefill_len: int | None = None,
                    batch: int | None = None) -> str:
    """The generated module's text for a planned graph (graph.mesh set, layouts and splits in the IR)."""
    if layers not in LAYER_MODES:
        raise EinpartError(f"layers must be one of {', '.join(LAYER_MODES)}, got '{layers}'")
    if not graph.mesh:
        raise EinpartError("the graph has no mesh: plan it first (e.g. the plan or shard pass)")
    for name, n in graph.mesh:
        check_identifier(name, "mesh axis")
        if not isinstance(n, int) or n <= 0:
            raise EinpartError(f"mesh axis {name} has a bad size {n!r}")
    full = program_graphs(graph, prefill_len, batch)
    progs, prepared = {}, ()
    for p, pg in full.items():
        progs[p], prepared = split_prepare(pg)
    raw_specs = decl_specs(full["prefill"], "param")
    pspecs = decl_specs(progs["prefill"], "param")
    sspecs = decl_specs(progs["prefill"], "state")
    other = decl_specs(progs["decode"], "state")
    for n in sorted(set(sspecs) | set(other)):
        if sspecs.get(n) != other.get(n):
            raise EinpartError(f"prefill and decode must share one cache layout: '{n}' is "
                               f"{sspecs.get(n, 'absent')} in prefill and {other.get(n, 'absent')} in decode")
    if set(pspecs) != set(decl_specs(progs["decode"], "param")):
        raise EinpartError("prefill and decode read different weights")
    given = {d.name: type_layout(d.type) for d, _ in progs["prefill"].all_decls() if d.kind == "param"}
    lines = [
        f'"""einpart: {docstring_text(graph.source.replace(chr(92), "/").split("/")[-1])} lowered to jax.shard_map.',
        "",
        f"mesh {', '.join(f'{n}={v}' for n, v in graph.mesh)}; layers={layers}; sizes "
        + ", ".join(f"{k}={v}" for k, v in resolve_sizes(progs["prefill"]).items())
        + "; decode: one query position.",
        "Generated code: do not edit. Every collective is one that",
        "einpart.ir.layout.plan_stmt prescribes for the statement above it.",
        '"""',
        "import jax",
        "import jax.numpy as jnp",
        "from jax import lax",
        "from jax.sharding import PartitionSpec as P",
        "",
        "F32 = jnp.float32",
        "HIGHEST = lax.Precision.HIGHEST",
        f"NEG_INF = {number(g.NEG_INF)}",
        "MESH = " + _tuple(f"({literal(n, 'mesh axis')}, {int(v)})" for n, v in graph.mesh),
        "",
        "# the weights as given (a file, or random init); prepare() turns them into STEP_PARAM_SPECS",
        "PARAM_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {sp}," for n, sp in raw_specs.items()],
        "}",
        "PREPARED_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {pspecs[n]}," for n in prepared],
        "}",
        "# what prefill and decode read: weights as given, or prepared at load time",
        "STEP_PARAM_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {sp}," for n, sp in pspecs.items()],
        "}",
        "STATE_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {sp}," for n, sp in sspecs.items()],
        "}",
    ]
    for key, kind in (("INPUT_SPECS", "input"), ("INPUT_SHAPES", None), ("OUTPUT_SPECS", "output")):
        lines.append(f"{key} = {{")
        for p, pg in progs.items():
            idx = index_sizes(pg)
            if kind == "input":
                items = decl_specs(pg, "input")
            elif kind is None:
                items = {d.name: _tuple(idx[i] for i in d.type.indices)
                         for d in pg.body.decls if d.kind == "input"}
            else:
                types = pg.types()
                items = {n: spec_code(type_layout(types[n]), types[n].indices) for n in pg.outputs}
            lines.append(f"    {literal(p)}: {{" + ", ".join(f"{literal(n, 'tensor name')}: {v}"
                                                         for n, v in items.items()) + "},")
        lines.append("}")
    emitters = [_Prepare(full["prefill"], prepared, layers)] + [_Program(pg, p, layers, given)
                                                                  for p, pg in progs.items()]
    bodies = [e.emit() for e in emitters]
    if any(e.uses_pmax for e in emitters):
        lines[lines.index("import jax")] = "import functools\n\nimport jax"
        lines += ["", ""] + PMAX_HELPER
    for body in bodies:
        lines += ["", ""] + body
    lines += [
        "", "",
        "def programs(mesh):",
        '    """shard_map functions over `mesh`: prepare (params -> prepared), prefill and decode '
        '((step params, state, inputs, pos) -> (outputs, next state))."""',
        "    return {",
        "        'prepare': jax.shard_map(prepare, mesh=mesh, in_specs=(PARAM_SPECS,), out_specs=PREPARED_SPECS, "
        "check_vma=False),",
        "        'prefill': jax.shard_map(prefill, mesh=mesh, in_specs=(STEP_PARAM_SPECS, STATE_SPECS, "
        "INPUT_SPECS['prefill'], P()), out_specs=(OUTPUT_SPECS['prefill'], STATE_SPECS), check_vma=False),",
        "        'decode': jax.shard_map(decode, mesh=mesh, in_specs=(STEP_PARAM_SPECS, STATE_SPECS, "
        "INPUT_SPECS['decode'], P()), out_specs=(OUTPUT_SPECS['decode'], STATE_SPECS), check_vma=False),",
        "    }",
    ]
    return "\n".join(lines) + "\n"
