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

Cast weights (`weight_converts`: the lowering casts a product's operands
to the product's dtype, an int8 weight to bf16, codegen.statements). What
the cast costs depends on how the weight is stored (`lowering(layers=)`):

  - a weight that is its own array (layers="unroll": per-layer storage,
    codegen.layers; and every weight outside the layer loop): XLA fuses the
    cast into the GEMM (the H200 HLO: gemm_fusion_dot reading s8[4096,
    14336]), which reads the int8 bytes once but at a lower rate than bf16:
    each element costs the hardware's int8_gemm_bytes (`Lowering.casts`;
    1.95 on an H200, measured, hardware.py), no kernel of its own;
  - a slice of a stacked weight under lax.scan (layers="scan") on hardware
    with convert_kernel (XLA GPU): the slice and cast are a kernel of their
    own that writes the converted copy the GEMM then reads (a
    loop_slice_fusion of s8 -> bf16[1, 4096, 14336] per layer; 4.9 bytes
    moved per int8 element measured, 1 + 2 + 2 priced: `Lowering.converts`).
    That kernel is the layer's copy out of the stack (report.scan_copies).

With int8_matmul="pallas" / "auto" codegen computes a decode product of an int8
weight with the Pallas GEMV kernel (codegen/int8_matmul.py, kernel_statements
names them): such a weight costs the hardware's int8_gemv_bytes per element
(`Lowering.casts`), or, stacked under a scan, an int8 copy of its slice
(`Lowering.converts`, 1 + 2 x 1 bytes and a kernel; priced, not measured).
Products that share their activation (q / kn / vn, gate / up; int8_matmul.sibling_groups)
are one kernel call: the group's first member launches it, the others launch none
(`Lowering.shared`); each still pays its own weight bytes.

Fused attention (`Lowering.attention`, fused_attention.py): with
attention="cudnn" / "auto" codegen computes a matched softmax-attention
chain as one cuDNN call; its members are priced as one kernel there.
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
    copy the statement converts it to, written by a kernel of its own}; `casts`:
    statement name -> {int8 weight name: bytes per element the GEMM that casts it
    costs} (module docstring); `attention`: member statement name -> the fused
    attention chain it belongs to (fused_attention.fused_attention); `shared`: statements
    whose int8 kernel call is a sibling's (one int8_gemv_siblings launch computes them),
    which launch no kernel of their own."""

    def __init__(self, fused: dict, converts: dict, casts: dict | None = None, attention: dict | None = None,
                 shared: set | None = None):
        super().__init__(fused)
        self.converts = converts
        self.casts = casts or {}
        self.attention = attention or {}
        self.shared = shared or set()


def stacked_weights(graph: g.Graph) -> set:
    """Weights stored as one stack of every layer: params declared in a repeat body and
    the prepared weights (param-only statements) computed there."""
    prepared = param_only(graph)
    out = {d.name for d, owner in graph.all_decls() if owner is not None and d.kind == "param"}
    return out | {s.name for s, owner in graph.all_stmts() if owner is not None and s.name in prepared}


def lowering(graph: g.Graph, hw, layers: str = "unroll", attention: str = "einsum", phase: str = "",
             int8_matmul: str = "xla") -> Lowering:
    """What the compiled step launches on `hw` with the layer loop `layers`, the
    attention lowering `attention` and the int8 product lowering `int8_matmul` of the
    program `phase` (module docstring)."""
    from ...codegen.int8_matmul import kernel_statements, sibling_groups
    from .fused_attention import fused_attention
    stacked = stacked_weights(graph) if layers == "scan" and hw.convert_kernel else set()
    types = graph.types()
    kernel = kernel_statements(graph, int8_matmul, hw.platform)
    converts: dict = {}
    casts: dict = {}
    for st, weights in weight_converts(graph).items():
        for w, nbytes in weights.items():
            if st in kernel and types[w].dtype == "i8":
                # the Pallas GEMV reads the int8 weight (codegen/int8_matmul.py); a stacked weight's
                # slice is first copied as int8 (a custom call reads a buffer of its own; priced, not measured)
                if w in stacked:
                    converts.setdefault(st, {})[w] = DTYPE_BYTES["i8"]
                else:
                    casts.setdefault(st, {})[w] = hw.int8_gemv_bytes
            elif w in stacked:
                converts.setdefault(st, {})[w] = nbytes
            elif types[w].dtype == "i8":
                casts.setdefault(st, {})[w] = hw.int8_gemm_bytes
    shared = {n for members, _ in sibling_groups(graph, int8_matmul, hw.platform).values() for n in members[1:]}
    return Lowering(fused_maps(graph), converts, casts, fused_attention(graph, attention, hw, phase), shared)


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

