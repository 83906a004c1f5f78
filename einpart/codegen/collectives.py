"""Collectives in the generated code: reshard moves, reductions, and merged reductions.

What plan_stmt prescribes for a statement (operand moves, the reduction, the result
move) is written out here, and nowhere else: a block's reductions that
layout.collective_groups merges are emitted in layout.merged_schedule order as one
psum / pmax on a tuple; finish() stores a value in its statement's dtype (an int8
store rounds and saturates) and applies the result move.
A mixin of StepProgram (program.py), whose state it uses:
`w`, `ns`, `vals`, `idx`, `mesh`, `types`, `merge`, `grouped`, `partial`, `uses_pmax`.
"""
from __future__ import annotations

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import collective_groups, merged_schedule, parts, plan_stmt, ref_layout, stmt_split, type_layout
from .code import DTYPE_CODE, Val, axes_code, one_line

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


class CollectiveEmitter:
    """Moves, reductions and the merged schedule of a block."""

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
            self.w(f"# one {item.kind} for {one_line(', '.join(item.members))}")
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
