"""What a statement launches once XLA has compiled the lowered step: which
elementwise statements it fuses into their consumers, and how many kernels
each statement costs.

The lowering (einpart.codegen.statements) emits one jnp expression per
statement; XLA fuses an elementwise producer into the loop or reduction
fusion of an elementwise or reducing consumer, so such a producer writes no
result to HBM and launches no kernel of its own: its consumers read its
operands instead (the softmax maps of Llama's prefill over [b, g, r, t, s]
scores, 57 ms each on an H200 when priced as written). It cannot fuse, and
must write its result as a kernel of its own, where

  - a consumer is a contraction (a library GEMM: cuBLAS reads its operands
    from HBM), a rope, a take or a cache write;
  - it is a step output, a repeat's initial or yielded value, or read from
    another block (across the layer loop);
  - it is weight preparation (param-only: runs once, priced apart);

these are structural (`fused_maps`). And, depending on the layouts, where a
consumer reads it through a collective (all_gather, all_to_all): the
collective reads a materialised buffer. That case is priced on the edge to
that consumer (planner) and on that consumer's operand (report), once per
such operand: an upper bound where two consumers gather the same map.

A consumer that fuses a map reads the map's operands in its place, through
chains of fused maps, each distinct tensor once (cost.operand_reads): the
fused residual x1 = x + attn costs its readers x and attn; the fused
softmax's p = exp(sc / sqrt(K) - mx) / z costs its reader sc, mx and z.

Kernels (cost.stmt_kernels): one per statement that is not a fused map (a
GEMM, a reduction or loop fusion, a gather, an in-place update); a
collective's fixed cost is its latency term (cost.py), not counted again.
Each costs the hardware's `kernel_s` (launch, ramp-up and tail of a kernel;
hardware.py).
"""
from __future__ import annotations

from ...ir import graph as g
from ...ir import layout as lay
from ...ir.analysis import param_only
from .cost import is_contraction


def is_map(s: g.Statement) -> bool:
    """An elementwise statement: a computation with no reduction."""
    return isinstance(s.op, g.Compute) and s.op.reduce is None


def _fuses_into(s: g.Statement) -> bool:
    """Can an elementwise producer fuse into consumer s (as XLA fuses loops and reductions)?"""
    return isinstance(s.op, g.Compute) and not is_contraction(s)


def fused_maps(graph: g.Graph) -> dict:
    """The elementwise statements XLA fuses into every consumer, by name (module docstring)."""
    prepared = param_only(graph)
    where: dict = {}                      # statement name -> its block
    maps: set = set()
    stmts: dict = {}
    pinned: set = set(graph.outputs)      # values that must be written whatever reads them
    readers: dict = {}                    # name -> [(block, consumer statement)]

    def walk(block: g.Block):
        for s in block.stmts:
            if isinstance(s.op, g.Repeat):
                pinned.update((s.op.init, s.op.result))
                walk(s.op.body)
                continue
            where[s.name] = id(block)
            if is_map(s) and s.name not in prepared and \
                    all(set(r.indices) <= set(s.type.indices) for r in lay.stmt_refs(s)):
                maps.add(s.name)
                stmts[s.name] = s
            for r in lay.stmt_refs(s):
                readers.setdefault(r.name, []).append((id(block), s))

    walk(graph.body)
    out = {}
    for name in sorted(maps - pinned):
        uses = readers.get(name, [])
        if uses and all(b == where[name] and _fuses_into(c) for b, c in uses):
            out[name] = stmts[name]
    return out

