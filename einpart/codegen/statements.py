"""One IR statement as local-block code: einsums, elementwise expressions, take, rope.

Semantics mirror einpart.ir.interpret op by op: elementwise arithmetic, norms and
softmax run in float32; contractions are jnp.einsum(..., preferred_element_type=F32),
at full float32 precision for float32 inputs and in the low dtype for bf16 ones.
Positions under a split index are offset by the shard's place on the mesh. A mixin
of StepProgram (program.py); collectives come from CollectiveEmitter, writes and
repeats from LayerEmitter.
"""
from __future__ import annotations

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import parts, plan_stmt, stmt_split
from ..ir.printer import format_attrs, format_op, format_type
from .code import DTYPE_CODE, LETTERS, LOW, UNARY_CODE, axes_code, one_line, tuple_code
from .names import number


class StatementEmitter:
    """Statements, expressions and the index arithmetic (local sizes, offsets, positions) they need."""

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

    def transpose(self, code: str, have: tuple, want: tuple) -> str:
        if have == want:
            return code
        return f"jnp.transpose({code}, {tuple_code(have.index(i) for i in want)})"

    def align(self, code: str, have: tuple, want: tuple) -> str:
        """Transpose `have` axes into the order of `want`, inserting size-1 axes."""
        kept = tuple(i for i in want if i in have)
        code = self.transpose(code, have, kept)
        if len(kept) == len(want):
            return code
        return f"{code}[{', '.join(':' if i in have else 'None' for i in want)}]"

    def f32(self, code: str, dtype: str) -> str:
        return f"{code}.astype(F32)" if dtype in LOW else code

    def stmt(self, s: g.Statement) -> None:
        op = s.op
        head = f"{s.name}{format_type(s.type)} = " + (
            f"repeat {op.index} ({op.carry} = {op.init})" if isinstance(op, g.Repeat) else format_op(op, ""))
        self.w(f"# {one_line(head + format_attrs(tuple((k, v) for k, v in s.attrs if k == 'split')))}")
        if isinstance(op, g.Repeat):
            return self.repeat(s, op)
        if s.name in self.fused:            # a softmax-attention chain, as one call (attention.py)
            chain, impl = self.fused[s.name]
            if s.name == chain.out:
                return self.attention(s, chain, impl)
            return self.w(f"# (in the fused attention call of {one_line(chain.out)} below)")
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
            in_low = low is not None and weight and not comm.reduce and s.name not in self.graph.outputs
            if self.int8_product(s, factors, vals, args, out, low or "f32", low if in_low else "f32"):
                computed = low if in_low else "f32"      # int8_matmul.py: the Pallas GEMV kernel
            elif in_low:
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
                code = f"{fn}({code}, axis={tuple_code(red)})"
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
