"""What a statement launches once XLA has compiled the lowered step: which
elementwise statements it fuses into their consumers, and how many kernels
each statement costs.

The lowering (einpart.codegen.statements) emits one jnp expression per
statement; XLA fuses an elementwise producer into the loop or reduction
fusion of an elementwise, reducing or rope consumer, so such a producer
writes no result to HBM and launches no kernel of its own: its consumers read its
operands instead (the softmax maps of Llama's prefill over [b, g, r, t, s]
scores, 57 ms each on an H200 when priced as written). It cannot fuse, and
must write its result as a kernel of its own, where

  - a consumer is a contraction (a GEMM reads its operands from HBM), a take
    or a cache write;
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

Converted weights (`weight_converts`, on hardware with convert_kernel): the
lowering casts a product's operands to the product's dtype (an int8 weight
to bf16, codegen.statements); XLA on GPU does that cast as a kernel of its
own that writes the converted weight, which the GEMM then reads (the H200
HLO: a loop_slice_fusion of s8 -> bf16[1, 4096, 14336] per layer; 5.6 bytes
moved per int8 weight element measured, 1 + 2 + 2 priced). Under lax.scan
the same kernel is the layer's copy out of the stack (4.9 bytes measured).
"""
from __future__ import annotations

from ...ir import graph as g
from ...ir import layout as lay
from ...ir.analysis import param_only
from ...ir.shapes import DTYPE_BYTES
from .cost import is_contraction


class Lowering(dict):
    """The fused maps of a graph by name (this dict: what cost.py's `fused` arguments
    take), with `converts`: statement name -> {weight name: bytes per element of the
    copy the statement converts it to} (weight_converts)."""

    def __init__(self, fused: dict, converts: dict):
        super().__init__(fused)
        self.converts = converts


def lowering(graph: g.Graph, hw) -> Lowering:
    """What the compiled step launches on `hw` (module docstring)."""
    return Lowering(fused_maps(graph), weight_converts(graph) if hw.convert_kernel else {})


def weight_converts(graph: g.Graph) -> dict:
    """Per contraction, the weights it casts to its product's dtype, as
    codegen.statements does: the first bf16 / f16 operand's dtype, else (int8
    operands) the spec's low float weight storage, else float32. Weights: params
    and prepared weights (param-only statements, params once split_prepare ran)."""
    decls = {d.name for d, _ in graph.all_decls() if d.kind == "param"}
    params = decls | param_only(graph)
    types = graph.types()
    storage = next((types[n].dtype for n in sorted(decls) if types[n].dtype in ("bf16", "f16")), None)
    out: dict = {}
    for s, _ in graph.all_stmts():
        if not is_contraction(s):
            continue
        factors = g.product_factors(s.op.expr)
        if not all(isinstance(f, g.Ref) for f in factors):
            continue
        dts = [types[f.name].dtype for f in factors]
        low = next((d for d in dts if d in ("bf16", "f16")), None)
        if low is None and "i8" in dts:
            low = storage
        product = low or "f32"
        conv = {f.name: DTYPE_BYTES[product] for f in factors
                if f.name in params and types[f.name].dtype != product}
        if conv:
            out[s.name] = conv
    return out



def is_map(s: g.Statement) -> bool:
    """An elementwise statement: a computation with no reduction."""
    return isinstance(s.op, g.Compute) and s.op.reduce is None


def _fuses_into(s: g.Statement) -> bool:
    """Can an elementwise producer fuse into consumer s (as XLA fuses loops and reductions)?
    A rope is elementwise code too (codegen.statements.rope)."""
    return isinstance(s.op, g.Rope) or (isinstance(s.op, g.Compute) and not is_contraction(s))


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

