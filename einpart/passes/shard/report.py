"""Price an annotated single-phase graph: what each statement costs as codegen
will run it, and the totals (seconds per step, MFU, memory per device).

This reads only the graph: every statement's `split` attribute and the
layouts on the types, through einpart.ir.layout.plan_stmt, the function
codegen lowers from. Weight preparation (param-only statements) runs once
at load time: it is priced apart (`prepared`, not in the step), and the
weights a step holds are what it reads: prepared weights (int8 and
scales, gain-folded weights) instead of the parameters they came from. So it prices exactly the collectives that run, for
the planner's choice and for any layout written by hand, and the planner's
objective can be checked against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import EinpartError
from ...ir import graph as g
from ...ir import layout as lay
from ...ir.analysis import param_only
from ...ir.shapes import DTYPE_BYTES, decl_shapes
from ...ir.verify import index_sizes, resolve_sizes
from .cost import (Pricer, compute_time, is_contraction, local_bytes, materialize_time, price_moves,
                   reduce_time, stmt_flops, stmt_kernels)
from .fused_attention import attention_cost
from .fusion import lowering
from .hardware import Hardware, load_hardware


@dataclass
class StmtCost:
    name: str
    split: dict
    layout: dict                 # declared result layout
    collectives: list            # [(description, seconds)] in the order they run
    compute_s: float             # FLOPs / peak
    memory_s: float              # bytes / HBM bandwidth
    comm_s: float
    flops: float
    count: int                   # executions per step (the layer count inside a repeat)
    in_repeat: bool = False
    launch_s: float = 0.0        # kernels launched x hardware kernel_s (cost.stmt_kernels)
    fusion_s: float = 0.0        # fused maps this statement reads through a collective, written after all

    @property
    def time_s(self) -> float:
        """One execution: roofline, kernel launches, collectives (no overlap assumed)."""
        return max(self.compute_s, self.memory_s) + self.launch_s + self.fusion_s + self.comm_s


@dataclass
class PhaseReport:
    phase: str
    devices: int
    hardware: str
    stmts: list = field(default_factory=list)
    weights_bytes: float = 0.0   # per device
    kv_bytes: float = 0.0
    input_bytes: float = 0.0
    activation_bytes: float = 0.0   # peak of live statement results
    model_flops: float = 0.0        # global FLOPs of the contractions
    peak_flops: float = 0.0         # per device
    prepared: list = field(default_factory=list)   # StmtCost of weight preparation (once, at load time)

    @property
    def prepare_s(self) -> float:
        """Seconds of weight preparation (once per load, not per step)."""
        return sum(s.time_s * s.count for s in self.prepared)

    def _total(self, part: str) -> float:
        """One part of every statement's time, times how often it runs, summed over the step."""
        return sum(getattr(s, part) * s.count for s in self.stmts)

    step_s = property(lambda self: self._total("time_s"))
    compute_s = property(lambda self: self._total("compute_s"))
    memory_s = property(lambda self: self._total("memory_s"))
    comm_s = property(lambda self: self._total("comm_s"))
    launch_s = property(lambda self: self._total("launch_s"))
    fusion_s = property(lambda self: self._total("fusion_s"))

    @property
    def mfu(self) -> float:
        t = self.step_s
        return self.model_flops / (t * self.devices * self.peak_flops) if t > 0 else 0.0

    @property
    def memory_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.input_bytes + self.activation_bytes

    def stmt(self, name: str) -> StmtCost:
        return next(s for s in self.stmts if s.name == name)

    def to_json(self) -> dict:
        return {
            "phase": self.phase, "devices": self.devices, "hardware": self.hardware,
            "step_s": self.step_s, "compute_s": self.compute_s, "memory_s": self.memory_s,
            "comm_s": self.comm_s, "launch_s": self.launch_s, "fusion_s": self.fusion_s, "mfu": self.mfu, "prepare_s": self.prepare_s,
            "prepared": [s.name for s in self.prepared],
            "memory_per_device": {"weights": self.weights_bytes, "kv_cache": self.kv_bytes,
                                  "inputs": self.input_bytes, "activations": self.activation_bytes,
                                  "total": self.memory_bytes},
            "statements": [{
                "name": s.name, "count": s.count, "split": {k: list(v) for k, v in s.split.items()},
                "layout": {k: list(v) for k, v in s.layout.items() if v},
                "collectives": [{"op": d, "s": t} for d, t in s.collectives],
                "compute_s": s.compute_s, "memory_s": s.memory_s, "comm_s": s.comm_s,
                "launch_s": s.launch_s, "fusion_s": s.fusion_s, "time_s": s.time_s,
            } for s in self.stmts],
        }


def stmt_cost(s: g.Statement, types: dict, sizes: dict, pricer: Pricer, hw: Hardware,
              count: int, in_repeat: bool, group: lay.Group | None = None, fused=None,
              producers: dict | None = None) -> StmtCost:
    """Cost of one non-repeat statement under its `split` attribute and declared layout;
    `group`: the merged collective its reduction runs in (its last member pays the latency);
    fused: fusion.fused_maps of the graph; producers: statements by name (a fused map read
    through a collective is written after all: fusion_s, priced as the planner's edge)."""
    split = lay.stmt_split(s)
    comm = lay.plan_stmt(s, types, split)
    out = s.type.indices
    parts = []
    fusion_s = 0.0
    for ref, moves in comm.operands:
        item = DTYPE_BYTES[types[ref.name].dtype]
        _, p = price_moves(moves, lay.ref_layout(ref, types[ref.name]), ref.indices, sizes, pricer, item)
        parts += [(f"{c.describe()} on {ref.name}", t) for c, t in p]
        if fused and ref.name in fused and any(c.kind != "slice" for c in moves):
            fusion_s += materialize_time(producers[ref.name], types, sizes, hw, pricer.size, fused)
    res_b = DTYPE_BYTES[s.type.dtype]
    natural = {i: tuple(split.get(i, ())) for i in out}
    if group is None:
        _, p = reduce_time(comm.reduce, natural, out, sizes, pricer, res_b)
        parts += [(c.describe(), t) for c, t in p]
    else:
        _, p = reduce_time(comm.reduce, natural, out, sizes, pricer, res_b, group.describe(),
                           group.members[-1] == s.name)
        parts += [(group.describe(), t) for c, t in p]
    _, p = price_moves(comm.result, dict(comm.natural), out, sizes, pricer, res_b)
    parts += [(f"{c.describe()} on result", t) for c, t in p]
    _, flops, nbytes, _ = compute_time(s, types, sizes, split, hw, pricer.size, fused)
    refs = [types[r.name].dtype for r in lay.stmt_refs(s)]
    peak = hw.flops_int8 if refs and all(d == "i8" for d in refs) else hw.flops_bf16
    return StmtCost(s.name, split, lay.type_layout(s.type), parts, flops / peak, nbytes / hw.hbm_bandwidth,
                    sum(t for _, t in parts), flops, count, in_repeat,
                    stmt_kernels(s, fused) * hw.kernel_s, fusion_s)


def attention_stmt_cost(chain, stmts: dict, types, sizes, pricer: Pricer, hw: Hardware, count: int,
                        in_repeat: bool, phase: str) -> StmtCost:
    """The fused cuDNN call of an attention chain (fused_attention.py), on its output's row:
    one kernel, the moves of q and k into the scores' split, of v into its product's and
    of the output after; FLOPs and bytes of fused_attention.attention_cost."""
    value_stmt = chain.weighted if chain.deferred else chain.out
    parts = []
    for name, refs in ((chain.scores, (chain.query, chain.key)), (value_stmt, (chain.value,))):
        comm = lay.plan_stmt(stmts[name], types, lay.stmt_split(stmts[name]))
        for ref, moves in comm.operands:
            if ref in refs and moves:
                item = DTYPE_BYTES[types[ref.name].dtype]
                _, p = price_moves(moves, lay.ref_layout(ref, types[ref.name]), ref.indices, sizes, pricer, item)
                parts += [(f"{c.describe()} on {ref.name}", t) for c, t in p]
    out = stmts[chain.out]
    split = lay.stmt_split(out)
    comm = lay.plan_stmt(out, types, split)
    _, p = price_moves(comm.result, dict(comm.natural), out.type.indices, sizes, pricer, DTYPE_BYTES[out.type.dtype])
    parts += [(f"{c.describe()} on result", t) for c, t in p]
    flops, nbytes = attention_cost(chain, stmts, types, sizes, pricer.size, phase)
    return StmtCost(out.name, split, lay.type_layout(out.type), parts, flops / hw.flops_bf16,
                    nbytes / hw.hbm_bandwidth, sum(t for _, t in parts), flops, count, in_repeat, hw.kernel_s)


def _carry_cost(s: g.Statement, types, sizes, pricer, src_name: str) -> list:
    """A repeat moves its carried value only where init (once) or the yielded value
    (every layer) is laid out unlike it."""
    want = lay.type_layout(s.type)
    item = DTYPE_BYTES[s.type.dtype]
    src_l = {i: a.mesh for i, a in zip(s.type.indices, types[src_name].axes)}  # positional
    moves = lay.reshard(src_l, want, s.type.indices)
    _, p = price_moves(moves, src_l, s.type.indices, sizes, pricer, item)
    return [(f"{c.describe()} on {src_name}", t) for c, t in p]


def step_reads(graph: g.Graph, prepared: set) -> set:
    """Tensors a step reads: inputs of statements other than weight preparation, and outputs."""
    out = set(graph.outputs)
    for s, _ in graph.all_stmts():
        if s.name in prepared:
            continue
        if isinstance(s.op, g.Repeat):
            out |= {s.op.init, s.op.result}
        else:
            out |= {r.name for r in lay.stmt_refs(s)}
    return out


def schedule(graph: g.Graph):
    """Run order of the statements: (definition slot, last-use slot, end) by name.

    A repeat takes one slot as its carry enters, then its body runs once
    (layers run one after another, so one layer's values are live at a
    time); the carry name inside the body stands for the repeat's value.
    The planner's liveness intervals and the report's activation peak both
    come from here, so the memory the solver limits is the memory reported.
    """
    alias = {s.op.carry: s.name for s, _ in graph.all_stmts() if isinstance(s.op, g.Repeat)}
    defs: dict[str, int] = {}
    last: dict[str, int] = {}
    t = 0

    def use(name, at):
        name = alias.get(name, name)
        last[name] = max(last.get(name, -1), at)

    def walk(block):
        nonlocal t
        for s in block.stmts:
            if isinstance(s.op, g.Repeat):
                use(s.op.init, t)
                defs[s.name] = t
                t += 1
                walk(s.op.body)
                use(s.op.result, t)
                use(s.name, t)
                continue
            for r in lay.stmt_refs(s):
                use(r.name, t)
            defs[s.name] = t
            t += 1

    walk(graph.body)
    for o in graph.outputs:
        use(o, t)
    return defs, last, t


def live_interval(name: str, defs: dict, last: dict) -> tuple[int, int]:
    d = defs[name]
    return d, max(last.get(name, d), d) + 1


def peak_of(intervals_sizes) -> float:
    """Largest sum of sizes over overlapping [start, end) intervals."""
    events = []
    for (a, b), size in intervals_sizes:
        if b > a and size:
            events += [(a, size), (b, -size)]
    events.sort(key=lambda e: (e[0], e[1] > 0))
    peak = cur = 0.0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def result_bytes(s: g.Statement, idx: dict, mesh_size: dict) -> float:
    """Bytes per device a statement's result holds (a cache write aliases the cache: none)."""
    if isinstance(s.op, g.Write):
        return 0.0
    return local_bytes(s.type.indices, idx, lay.type_layout(s.type), mesh_size, DTYPE_BYTES[s.type.dtype])


def activation_peak(graph: g.Graph, idx: dict, mesh_size: dict, skip=frozenset()) -> float:
    """Peak bytes per device of live statement results (see schedule); `skip`: weight
    preparation, whose results are weights, not activations."""
    defs, last, _ = schedule(graph)
    return peak_of((live_interval(s.name, defs, last), result_bytes(s, idx, mesh_size))
                   for s, _ in graph.all_stmts() if s.name not in skip)


LAYER_MODES = ("unroll", "scan")


def scan_copies(s: g.Statement, idx: dict, pricer: Pricer, hw: Hardware, read: set, count: int,
                converted=frozenset()) -> list:
    """What lax.scan adds per layer (codegen layers="scan"): XLA copies each layer's
    slice of every stacked weight out of the stack before the products read it (the
    dynamic-slice fusions of the H200 HLO: bf16[1, 4096, 14336] per layer), a read and
    a write of its bytes and a kernel each; StmtCost rows named '<weight>@scan'. Only
    weights a product reads: elementwise readers (norm gains, int8 scales) fuse the
    slice. A weight a product converts (fusion.Lowering.converts) is copied by that convert."""
    gemm = {r.name for st in s.op.body.stmts if is_contraction(st) for r in lay.stmt_refs(st)}
    out = []
    for d in s.op.body.decls:
        if d.kind != "param" or d.name not in read or d.name not in gemm or d.name in converted:
            continue
        nbytes = local_bytes(d.type.indices, idx, lay.type_layout(d.type), pricer.size, DTYPE_BYTES[d.type.dtype])
        out.append(StmtCost(f"{d.name}@scan", {}, lay.type_layout(d.type), [], 0.0,
                            2 * nbytes / hw.hbm_bandwidth, 0.0, 0.0, count, True, hw.kernel_s))
    return out


def price_graph(graph: g.Graph, hardware, phase: str = "", sizes: dict | None = None,
                merge: bool = True, layers: str = "unroll", attention: str = "einsum",
                int8_matmul: str = "xla") -> PhaseReport:
    """Price a single-phase annotated graph (graph.mesh, splits, layouts) on `hardware`;
    merge: reductions run as codegen emits them, merged (layout.collective_groups);
    False prices each alone, as the strategy graph does. layers: the layer loop as
    codegen emits it; "scan" adds the per-layer weight copies (scan_copies) and
    prices stacked weights' casts as copies (fusion.lowering). attention: codegen's
    attention lowering (codegen.attention.ATTENTION_MODES, default as codegen's,
    "einsum"); a chain it computes with cuDNN is one fused kernel (fused_attention.py),
    priced on its output's row, its other members at zero. `phase` names the program
    ("prefill": the causal call skips the masked half). int8_matmul: codegen's int8 product
    lowering (codegen.int8_matmul, default "xla"); a product it computes with the Pallas GEMV
    reads its int8 weight at the hardware's int8_gemv_bytes. The planner's objective prices
    "unroll" and "einsum" (the layouts' costs; the copies scale with the weight bytes
    a layout holds, as the reads do)."""
    if layers not in LAYER_MODES:
        raise EinpartError(f"price_graph: layers must be one of {', '.join(LAYER_MODES)}, got {layers!r}")
    hw = load_hardware(hardware)
    mesh = graph.mesh or (("x", 1),)
    pricer = Pricer(hw, mesh)
    sz = sizes if sizes is not None else resolve_sizes(graph)
    idx = index_sizes(graph, sz)
    types = graph.types()
    rep = PhaseReport(phase, math.prod(n for _, n in mesh), hw.name, peak_flops=hw.flops_bf16)
    prepared = param_only(graph)
    read = step_reads(graph, prepared)
    fused = lowering(graph, hw, layers, attention, phase, int8_matmul)
    producers = {s.name: s for s, _ in graph.all_stmts()}

    def walk(block: g.Block, count: int, in_repeat: bool):
        comms = {s.name: lay.plan_stmt(s, types, lay.stmt_split(s)) for s in block.stmts
                 if not isinstance(s.op, g.Repeat)}
        groups = lay.collective_groups(block.stmts, comms, prepared) if merge else []
        group_of = {m: gr for gr in groups for m in gr.members}
        for s in block.stmts:
            if s.name in prepared:
                rep.prepared.append(stmt_cost(s, types, idx, pricer, hw, count, in_repeat))
                if s.name in read:      # a prepared weight: held, like a parameter
                    rep.weights_bytes += result_bytes(s, idx, pricer.size) * count
                continue
            if isinstance(s.op, g.Repeat):
                for src, n, inside in ((s.op.init, count, in_repeat), (s.op.result, count * idx[s.op.index], True)):
                    parts = _carry_cost(s, types, idx, pricer, src)
                    if parts:
                        rep.stmts.append(StmtCost(s.name, {}, lay.type_layout(s.type), parts, 0.0, 0.0,
                                                  sum(t for _, t in parts), 0.0, n, inside))
                if layers == "scan":
                    converted = {w for c in fused.converts.values() for w in c}
                    rep.stmts += scan_copies(s, idx, pricer, hw, read, count * idx[s.op.index], converted)
                walk(s.op.body, count * idx[s.op.index], True)
                continue
            chain = fused.attention.get(s.name)
            if chain is not None:
                if s.name == chain.out:
                    rep.stmts.append(attention_stmt_cost(chain, producers, types, idx, pricer, hw, count,
                                                         in_repeat, phase))
                else:               # inside the fused call: no kernel, nothing written
                    rep.stmts.append(StmtCost(s.name, lay.stmt_split(s), lay.type_layout(s.type), [], 0.0, 0.0,
                                              0.0, 0.0, count, in_repeat))
            else:
                rep.stmts.append(stmt_cost(s, types, idx, pricer, hw, count, in_repeat, group_of.get(s.name),
                                           fused, producers))
            if is_contraction(s):
                rep.model_flops += stmt_flops(s, idx, {}, pricer.size) * count

    walk(graph.body, 1, False)
    for shp in decl_shapes(graph, sz).values():
        d = shp.decl
        per = local_bytes(d.type.indices, idx, lay.type_layout(d.type), pricer.size, DTYPE_BYTES[d.type.dtype])
        per *= shp.size / max(1, math.prod(idx[i] for i in d.type.indices))   # the stacked layer axis
        if d.kind == "param":
            rep.weights_bytes += per if d.name in read else 0.0   # only preparation reads it: not held
        elif d.kind == "state":
            rep.kv_bytes += per
        else:
            rep.input_bytes += per
    inner = {n for n, c in fused.attention.items() if n != c.out}      # never written by the fused call
    rep.activation_bytes = activation_peak(graph, idx, pricer.size, prepared | inner)
    return rep


def pair_credit(graph: g.Graph, hardware, same_index: bool = False) -> float:
    """Seconds per step the planner's strategy graph credits an annotated
    single-phase graph for merged reductions: one latency term per pair
    (layout.credited_pairs: parallel branches always, merge_partners' pairs with
    same_index, the planner's merge_pairs) whose two reductions are one psum (or
    pmax) over the same mesh axes. price_graph(merge=False).step_s minus this is what the
    planner's objective prices; price_graph(merge=True) is what codegen runs."""
    hw = load_hardware(hardware)
    pricer = Pricer(hw, graph.mesh or (("x", 1),))
    idx = index_sizes(graph, resolve_sizes(graph))
    types = graph.types()
    prepared = param_only(graph)
    total = 0.0

    def walk(block: g.Block, count: int):
        nonlocal total
        keys = {s.name: lay.merge_key(lay.plan_stmt(s, types, lay.stmt_split(s))) for s in block.stmts
                if not isinstance(s.op, g.Repeat)}
        same, branch = lay.credited_pairs(block.stmts, prepared, same_index)
        for a, b in same + branch:
            if keys[a] is not None and keys[a] == keys[b]:
                total += pricer.coef(*keys[b])[1] * count
        for s in block.stmts:
            if isinstance(s.op, g.Repeat):
                walk(s.op.body, count * idx[s.op.index])

    walk(graph.body, 1)
    return total
