"""Weight preparation: param-only statements split out of the steps, run once at load time.

split_prepare turns every param-only statement (int8 quantisation, folded norm gains,
pooled heads) into a parameter of the step programs; PrepareProgram emits
`prepare(params)`, which computes them (per layer over the stacked weights inside a
repeat block) without merging reductions, as it runs once.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir import graph as g
from ..ir.analysis import param_only
from ..ir.layout import type_layout
from ..ir.verify import stmt_inputs, verify
from .code import Val, tuple_code
from .names import literal
from .program import StepProgram


class PrepareProgram(StepProgram):
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
        self.w(f"{tuple_code(names) if len(names) != 1 else names[0] + ','} = {xs}" if names else f"del {xs}")
        outer = dict(self.vals)
        for d, name in zip(params, names):
            self.vals[d.name] = Val(name, d.type.indices, type_layout(d.type), d.type.dtype)
        for st in body:
            self.stmt(st)
        body = [st for st in body if st.name in self.outputs]
        results = [self.vals[st.name].var for st in body]
        self.w(f"return carry, {tuple_code(results)}")
        self.w.depth -= 1
        self.vals = outer
        stacked = [self.ns.tensor(d.name, "all") for d in params]
        outs = [self.ns.tensor(st.name, "all") for st in body]
        ys = self.ns.fresh("ys")
        self.w(f"_, {ys} = lax.scan({fn}, None, {tuple_code(stacked)})")
        self.w(f"{tuple_code(outs) if len(outs) != 1 else outs[0] + ','} = {ys}")
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
