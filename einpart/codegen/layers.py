"""The layer loop (a repeat block) and state writes (the KV cache).

A repeat becomes lax.scan over the stacked weights, or an unrolled Python loop
(layers="unroll"). The loop carries each stacked state whole and, in the common case,
writes a step's new rows straight into it (one dynamic_update_slice at
[layer, ..., pos, ...]), so a donated cache is never copied per step. Two moves here
are not plan_stmt's: a state's next value goes back to its declared layout (the cache
keeps one layout from step to step), and a repeat's init / yielded value is resharded
into the carry's layout. A mixin of StepProgram (program.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import ref_layout, reshard, type_layout
from ..ir.verify import stmt_inputs
from .code import DTYPE_CODE, Val, one_line, positional_layout, tuple_code


@dataclass
class LayerState:
    """A state tensor of a repeat body, kept stacked over the layers and carried whole
    through the layer loop, so that a step writes its new rows into the one stacked
    buffer (one dynamic_update_slice at [layer, ..., pos, ...]) instead of slicing each
    layer's cache out and stacking all layers back (a copy of the whole cache per step).
    With per-layer storage (layers="unroll") `stacked` is a tuple of the layers' arrays
    and the layer index a Python int: a step writes into its layer's own buffer, and
    reading it needs no slice (XLA copies a slice of a stacked buffer that feeds a matmul)."""
    stacked: str                   # the stacked array (or tuple of layer arrays) the loop carries
    layer: str                     # code of the layer index
    block: str                     # this layer's block, when something reads it whole
    read: bool = False             # whether `block` has been emitted
    per_layer: bool = False        # `stacked` is a tuple of per-layer arrays


def _replaced(st: LayerState, new: str) -> str:
    """Code of the per-layer tuple with this layer's array replaced by `new`."""
    return f"{st.stacked}[:{st.layer}] + ({new},) + {st.stacked}[{st.layer} + 1:]"


class LayerEmitter:
    """Repeat blocks and writes into state tensors, stacked or not."""

    def read_layer_state(self, name: str) -> None:
        """Emit the slice of this layer's block of a stacked state (once)."""
        st = self.layer_state[name]
        if not st.read:
            if st.per_layer:
                self.w(f"{st.block} = {st.stacked}[{st.layer}]")
            else:
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
            if stacked.per_layer:
                self.w(f"{new} = {_replaced(stacked, nxt)}")
            else:
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
        starts = ["pos" if i == s_idx else "0" for i in op.cache.indices]
        nxt = self.ns.fresh(f"{stacked.stacked}_")
        written = self.ns.tensor(op.cache.name, "new")
        if stacked.per_layer:
            self.w(f"{written} = lax.dynamic_update_slice({stacked.stacked}[{stacked.layer}], {upd}, "
                   f"({', '.join(starts)},))  # in place: layer {stacked.layer}'s own buffer, position pos")
            self.w(f"{nxt} = {_replaced(stacked, written)}")
        else:
            start = ", ".join([stacked.layer] + starts)
            self.w(f"{nxt} = lax.dynamic_update_slice({stacked.stacked}, {upd}[None], ({start}))"
                   f"  # in place: layer {stacked.layer}, position pos")
            self.w(f"{written} = lax.dynamic_index_in_dim({nxt}, {stacked.layer}, 0, keepdims=False)")
        self.next_state[op.cache.name] = nxt
        self.w(f"{var} = {self.transpose(written, op.cache.indices, s.type.indices)}")
        self.finish(s, var, comm, dtype)
        return True

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
        self.w(f'"""One layer ({one_line(op.index)} = {layer}): {one_line(s.name)} carries {one_line(op.carry)} '
               f'{one_line(self.shape_note(s.type.indices, carry_layout))}'
               + (" and the stacked state, written in place." if states else ".") + '"""')
        self.w(f"{carry}, {tuple_code(state_all)} = {pack}")
        names = [self.ns.tensor(d.name) for d in params]
        self.w(f"{layer}, {tuple_code(names)} = {xs}")
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
            self.layer_state[d.name] = LayerState(all_var, layer, block, per_layer=self.per_layer)
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
        self.w(f"return ({back.var}, {tuple_code(nxt)}), None")
        self.w.depth -= 1
        self.vals, self.layer_state = outer_vals, outer_states
        news = [self.ns.tensor(d.name, "next") for d in states]
        out = self.ns.tensor(s.name)
        n_layers = self.idx[op.index]
        if self.layers == "scan":
            self.w(f"({out}, {tuple_code(news)}), _ = lax.scan({fn}, ({moved.var}, {tuple_code(state_all)}), "
                   f"(jnp.arange({n_layers}, dtype=jnp.int32), {tuple_code(stacked)}))")
        else:
            i = self.ns.fresh("i")
            self.w(f"{out}, {tuple_code(news)} = {moved.var}, {tuple_code(state_all)}")
            self.w(f"for {i} in range({n_layers}):   # unrolled: static layer indices")
            sliced = tuple_code(f"{v}[{i}]" for v in stacked)
            self.w(f"    ({out}, {tuple_code(news)}), _ = {fn}(({out}, {tuple_code(news)}), ({i}, {sliced}))")
        for d, v in zip(states, news):
            self.next_state[d.name] = v
        self.vals[s.name] = Val(out, s.type.indices, carry_layout, s.type.dtype)
