"""Small built-in passes: dead-code elimination and storage dtypes."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.verify import stmt_inputs
from .manager import Pass, register_pass


@register_pass("dce")
@dataclass(frozen=True)
class DeadCode(Pass):
    """Drop statements whose values reach no output and no state."""

    def apply(self, graph: g.Graph) -> g.Graph:
        def sweep(block: g.Block, needed: set[str]) -> g.Block:
            kept = []
            for s in reversed(block.stmts):
                is_write = isinstance(s.op, g.Write)
                if s.name in needed or is_write:
                    if isinstance(s.op, g.Repeat):
                        body = sweep(s.op.body, needed | {s.op.result})
                        s = replace(s, op=replace(s.op, body=body))
                    needed |= stmt_inputs(s)
                    kept.append(s)
            return replace(block, stmts=tuple(reversed(kept)))

        return graph.with_body(sweep(graph.body, set(graph.outputs)))


@register_pass("cast")
@dataclass(frozen=True)
class Cast(Pass):
    """Set the storage dtype of float parameters and state (bf16 on accelerators)."""
    dtype: str = "bf16"
    what: tuple[str, ...] = ("param", "state")

    def apply(self, graph: g.Graph) -> g.Graph:
        if self.dtype not in g.FLOAT_DTYPES:
            raise EinpartError(f"cast: dtype must be one of {', '.join(g.FLOAT_DTYPES)}, got '{self.dtype}'")
        bad = set(self.what) - {"param", "state"}
        if bad:
            raise EinpartError(f"cast: 'what' takes param and/or state, got {', '.join(sorted(bad))}")
        states = {d.name for d, _ in graph.all_decls() if d.kind == "state"}

        def fix(block: g.Block, owner) -> g.Block:
            decls = tuple(replace(d, type=replace(d.type, dtype=self.dtype))
                          if d.kind in self.what and d.type.dtype in g.FLOAT_DTYPES else d
                          for d in block.decls)
            stmts = []
            for s in block.stmts:
                # values written into a cast state, and the state they become, share its dtype
                if "state" in self.what and isinstance(s.op, g.Write) and s.op.cache.name in states:
                    s = replace(s, type=replace(s.type, dtype=self.dtype))
                stmts.append(s)
            return replace(block, decls=decls, stmts=tuple(stmts))

        out = g.map_blocks(graph, fix)
        if "state" not in self.what:
            return out
        # the value written must have the cache's dtype: round it where it is produced
        written = {s.op.new.name for s, _ in out.all_stmts() if isinstance(s.op, g.Write)}

        def fix_new(block: g.Block, owner) -> g.Block:
            return replace(block, stmts=tuple(replace(s, type=replace(s.type, dtype=self.dtype))
                                              if s.name in written else s for s in block.stmts))
        return g.map_blocks(out, fix_new)
