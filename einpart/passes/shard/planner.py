"""From the IR to a strategy graph, and back: the sharding planner.

Nodes (einpart.passes.shard.ilp.StrategyGraph):
  * every declaration (param, state, input): one node shared by all phases,
    one strategy per layout of its type, memory = its bytes per device
    (times the layer count for a stacked declaration), live throughout;
  * per phase, every statement: one strategy per legal split (and, for a
    partial sum, per reduce-scatter of it); cost = roofline + reduction
    collectives, times the layer count inside the repeat block and the
    phase's weight; memory = its result per device, live from its slot to
    its last use (report.schedule);
  * per phase, every repeat: a carry node, the layout of the value entering
    and leaving the layer body. The body is built once, so solve time does
    not grow with depth; its costs are multiplied by the layer count;
  * weight preparation (param-only statements: an int8 quantisation, a
    folded gain, pooled heads; einpart.ir.analysis.param_only): one node per
    statement shared by all phases, like a declaration, because the runtime
    computes it once at load time and stores ONE copy that both programs
    read. Its strategies are its splits; a prepared weight that a step reads
    holds its bytes per device throughout (it replaces the parameter it came
    from, which is released once prepared: a parameter that only
    preparation reads holds no memory during the steps). Preparation runs
    once per load, so its seconds are only a tie-break (PREPARE_WEIGHT,
    below the stored-byte tie-break): a parameter that only preparation
    reads is stored at its smallest layout, and among those the cheaper
    preparation wins. (Memory at load time, the parameters and the prepared
    weights together, is not limited.)
Edges: operand reshards from producer layout to the consumer's split (cost
matrices through cost.ReshardTable); equality edges (0 or forbidden) tie
init / yield to the carry and a cache write to its state, so the layout
entering a layer is the one leaving it and the cache keeps its layout.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from ...errors import EinpartError, PlanError
from ...ir import graph as g
from ...ir import layout as lay
from ...ir.analysis import param_only
from ...ir.shapes import DTYPE_BYTES
from . import ilp
from .cost import (FORBIDDEN, Pricer, StmtStrategy, enumerate_layouts, layout_key, local_bytes,
                   ReshardTable, stmt_strategies)
from .fusion import lowering
from .hardware import Hardware
from .phases import Phase
from .report import live_interval, peak_of, schedule, step_reads


@dataclass
class Node:
    label: str                   # "decl:wq", "decode:gate", "prefill:carry:xl"
    kind: str                    # decl | stmt | carry
    tensor: str
    phase: str | None
    indices: tuple               # of the tensor, in type order
    layouts: list                # per choice: layout tuple in `indices` order (None: folded)
    cost: np.ndarray
    usage: np.ndarray
    interval: tuple = (0, 0)
    strategies: list | None = None   # StmtStrategy list (statements)
    choices: list | None = None      # per choice: (strategy index, variant index; -1 = folded)
    scale: float = 1.0               # layer count x phase weight of its costs
    decl_kind: str = ""
    fold: tuple | None = None        # folded: (consumer node, argmin variant per (choice, consumer choice))

    def choice(self, c: int):
        """(StmtStrategy, Variant or None) of choice c."""
        si, vi = self.choices[c]
        st = self.strategies[si]
        return st, (st.variants[vi] if vi >= 0 else None)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def _limit_text(n: float) -> str:
    gib = n / 2 ** 30
    return f"{gib:g} GiB" if abs(gib - round(gib)) < 1e-9 else _gb(n)


@dataclass
class Built:
    sg: ilp.StrategyGraph
    nodes: list
    by_label: dict
    stats: dict = field(default_factory=dict)

    def out_layout(self, i: int, assign: list) -> tuple:
        """The stored layout node i ends up with under an assignment."""
        n = self.nodes[i]
        if n.kind != "stmt":
            return n.layouts[assign[i]]
        st, var = n.choice(assign[i])
        if var is None:
            cons, arg = n.fold
            var = st.variants[arg[assign[i], assign[cons]]]
        return var.out

    def variant(self, i: int, assign: list):
        n = self.nodes[i]
        st, var = n.choice(assign[i])
        if var is None:
            cons, arg = n.fold
            var = st.variants[arg[assign[i], assign[cons]]]
        return st, var


# The phase name of weight-preparation nodes (shared by every phase, like declarations).
PREP = "prepare"
# Weight preparation runs once per load, not per step: its seconds count this much
# (a tie-break: 1 s of preparation weighs as much as 10 stored bytes).
PREPARE_WEIGHT = 1e-18

# Tie-break: a stored byte costs this many seconds, so that among plans of equal
# time the planner stores less (e.g. shards a table no step reads whole).
BYTE_TIE = 1e-19


def use_counts(graph: g.Graph) -> dict:
    """How many times each statement's value is read (operands, repeat init /
    yield, outputs). A value read once can fold its reduce-scatter choice
    into the edge to its reader (exact: nothing else sees that choice)."""
    alias = {s.op.carry: s.name for s, _ in graph.all_stmts() if isinstance(s.op, g.Repeat)}
    n: dict = defaultdict(int)
    for s, _ in graph.all_stmts():
        if isinstance(s.op, g.Repeat):
            n[s.op.init] += 1
            n[s.op.result] += 1
            continue
        for r in lay.stmt_refs(s):
            n[alias.get(r.name, r.name)] += 1
    for o in graph.outputs:
        n[o] += 2
    return n


def is_stored(n: Node) -> bool:
    """Held for the whole run: declarations and prepared weights."""
    return n.kind == "decl" or n.phase == PREP


def rope_pairs(graph: g.Graph) -> frozenset:
    """Indices some rope keeps whole (its rotation pairs)."""
    return frozenset(s.op.pair for s, _ in graph.all_stmts() if isinstance(s.op, g.Rope))


class Builder:
    """Builds the strategy graph of a graph for some phases (see module docstring).

    fold: statements read once carry one choice per split; their reduce-scatter
    variant is chosen on the edge to the reader (exact for time; memory takes
    the largest variant, so the planner uses it only without a memory limit).
    prune: never split a rope pair index anywhere (a split pair must be
    gathered before every rope; it never paid on the models we tried and
    removes about 40% of the strategies).
    merge: credit merge_partners' pairs (opt-in); branch: credit parallel
    branches (layout.branch_partners: PaLM's attention and MLP psums, which
    codegen merges), on by default; both through merge_edge.
    """

    def __init__(self, graph: g.Graph, mesh, hw: Hardware, phases: list[Phase], fix: dict | None = None,
                 fold: bool = True, prune: bool = True, merge: bool = False, branch: bool = True):
        self.graph = graph
        self.merge = merge
        self.branch = branch     # credit parallel branches' merged reductions (layout.branch_partners)
        self.mesh = tuple(mesh)
        self.hw = hw
        self.phases = phases
        self.pricer = Pricer(hw, self.mesh)
        self.types = graph.types()
        self.fix = fix or {}
        self.fold = fold
        self.forbid = rope_pairs(graph) if prune else frozenset()
        self.uses = use_counts(graph)
        self.nodes: list[Node] = []
        self.by_label: dict[str, int] = {}
        self.edges: dict[tuple[int, int], np.ndarray] = {}
        self.table = _reshard_table(hw, self.mesh, self.pricer)
        self.defs, self.last, self.end = schedule(graph)
        self.used_fix: set = set()
        self.prepared = param_only(graph)
        self.step_read = step_reads(graph, self.prepared)
        self.fused = lowering(graph, hw)
        self.prep_prod: dict[str, int] = {}
        self.pairs = 0           # merge_partners' pairs (opt-in: merge)
        self.branch_pairs = 0    # branch_partners' pairs (always)

    # -- helpers -----------------------------------------------------------
    def _fixed(self, phase: str | None, name: str):
        for key in ((f"{phase}:{name}",) if phase else ()) + (name,):
            if key in self.fix:
                self.used_fix.add(key)
                return self.fix[key]
        return None

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        self.by_label[node.label] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def add_edge(self, u: int, v: int, m: np.ndarray):
        key = (u, v)
        self.edges[key] = self.edges[key] + m if key in self.edges else m

    def link(self, prod: int, cons: int, wants: list, nbytes: float, scale: float, equal: bool):
        """Edge prod -> cons: consumer choice c needs the value laid out as wants[c]
        (a tensor of nbytes in all); equal: only the same layout is allowed. A fused
        map's producer pays its materialize_s on every pair of choices whose reshard
        runs a collective (fusion.py: a collective reads a written buffer)."""
        P = self.nodes[prod]
        tab = self.table
        want_u, want_ix = _unique([tab.id(w) for w in wants])

        def rows(src_ids):
            if equal:
                return np.where(np.asarray(src_ids)[:, None] == np.asarray(want_u)[None, :], 0.0, FORBIDDEN)
            a, b = tab.coeffs(src_ids, want_u)
            return (a * nbytes + b) * scale

        if P.kind == "stmt" and P.layouts[0] is None:        # folded producer
            outs = [[tab.id(v.out) for v in P.strategies[si].variants] for si, _ in P.choices]
            flat = sorted({i for o in outs for i in o})
            pos = {i: k for k, i in enumerate(flat)}
            base = rows(flat)
            best, arg = [], []
            for (si, _), o in zip(P.choices, outs):
                red = np.array([v.reduce_s for v in P.strategies[si].variants]) * P.scale
                cand = base[[pos[i] for i in o]] + red[:, None]
                arg.append(cand.argmin(axis=0))
                best.append(cand.min(axis=0))
            P.fold = (cons, np.array(arg)[:, want_ix])
            self.add_edge(prod, cons, np.array(best)[:, want_ix])
            return
        src_u, src_ix = _unique([tab.id(lt) for lt in P.layouts])
        m = rows(src_u)[np.ix_(src_ix, want_ix)]
        if P.kind == "stmt" and P.tensor in self.fused and not equal:
            a, b = tab.coeffs(src_u, want_u)
            moved = ((a > 0) | (b > 0))[np.ix_(src_ix, want_ix)]
            extra = np.array([P.strategies[si].materialize_s for si, _ in P.choices]) * scale
            m = m + np.where(moved, extra[:, None], 0.0)
        self.add_edge(prod, cons, m)

    # -- nodes -------------------------------------------------------------
    def decls(self):
        size_maps = [p.idx for p in self.phases]
        for d, owner in self.graph.all_decls():
            layers = self.phases[0].idx[owner.index] if owner is not None else 1
            layouts = enumerate_layouts(d.type.indices, size_maps, self.mesh, self.forbid)
            want = self._fixed(None, d.name)
            if want is not None:     # one layout, or a list of allowed ones
                allowed = [{i: tuple(a) for i, a in w.items() if a} for w in (want if isinstance(want, list)
                                                                               else [want])]
                layouts = [lt for lt in layouts if lt in allowed]
                if not layouts:
                    raise EinpartError(f"fixed layout of '{d.name}' {want} is not a legal layout on this mesh")
            item = DTYPE_BYTES[d.type.dtype]
            use = np.array([max(local_bytes(d.type.indices, m, lt, self.pricer.size, item) for m in size_maps)
                            for lt in layouts]) * layers
            keys = [layout_key(lt, d.type.indices) for lt in layouts]
            held = use if (d.kind != "param" or d.name in self.step_read) else np.zeros_like(use)
            self.add(Node(f"decl:{d.name}", "decl", d.name, None, d.type.indices, keys,
                          use * BYTE_TIE, held, decl_kind=d.kind))

    def preparation(self):
        """One node per param-only statement, shared by the phases (see the module docstring)."""
        prod = {d.name: self.by_label[f"decl:{d.name}"] for d, _ in self.graph.all_decls()}
        ph = self.phases[0]
        size_maps = [p.idx for p in self.phases]

        def walk(block: g.Block, layers: int):
            for s in block.stmts:
                if isinstance(s.op, g.Repeat):
                    walk(s.op.body, layers * ph.idx[s.op.index])
                    continue
                if s.name not in self.prepared:
                    continue
                sts = self._strategies(s, ph, None, size_maps)
                choices = [(si, vi) for si, st in enumerate(sts) for vi in range(len(st.variants))]
                keep = s.name in self.step_read
                usage = np.array([sts[si].variants[vi].mem * layers if keep else 0.0 for si, vi in choices])
                scale = PREPARE_WEIGHT * layers
                cost = np.array([sts[si].compute_s + sts[si].variants[vi].reduce_s for si, vi in choices]) * scale
                n = self.add(Node(f"{PREP}:{s.name}", "stmt", s.name, PREP, s.type.indices,
                                  [sts[si].variants[vi].out for si, vi in choices], cost + usage * BYTE_TIE,
                                  usage, (0, 0), sts, choices, scale))
                for r in lay.stmt_refs(s):
                    wants = [tuple(sts[si].split.get(i, ()) for i in r.indices) for si, _ in choices]
                    self._ref_link(prod[r.name], n, r.indices, r.name, wants, ph.idx, scale)
                prod[s.name] = self.prep_prod[s.name] = n
                for p in self.phases:       # the phase programs find it under their own labels too
                    self.by_label[f"{p.name}:{s.name}"] = n

        walk(self.graph.body, 1)

    def phase(self, ph: Phase, offset: int):
        prod = {d.name: self.by_label[f"decl:{d.name}"] for d, _ in self.graph.all_decls()}
        prod.update(self.prep_prod)
        self._block(self.graph.body, ph, 1.0, prod, offset)

    def _ref_link(self, prod: int, cons: int, ref_indices: tuple, tensor: str, wants: list, idx: dict,
                  scale: float, equal: bool = False):
        nbytes = DTYPE_BYTES[self.types[tensor].dtype] * math.prod(idx[i] for i in ref_indices)
        self.link(prod, cons, wants, float(nbytes), scale, equal)

    def _block(self, block: g.Block, ph: Phase, mult: float, prod: dict, offset: int):
        same, branch = lay.credited_pairs(block.stmts, self.prepared, self.merge)
        branch = branch if self.branch else []
        partner = {b: a for a, b in same + branch}
        self.pairs += len(same)
        self.branch_pairs += len(branch)
        paired = set(partner) | set(partner.values())
        for s in block.stmts:
            if s.name in self.prepared:
                continue         # weight preparation: built once (preparation())
            start, end = live_interval(s.name, self.defs, self.last)
            span = (start + offset, end + offset)
            if isinstance(s.op, g.Repeat):
                layouts = enumerate_layouts(s.type.indices, [ph.idx], self.mesh, self.forbid)
                want = self._fixed(ph.name, s.name)
                if want is not None:
                    layouts = [lt for lt in layouts if lt == {i: tuple(a) for i, a in want.items() if a}]
                item = DTYPE_BYTES[s.type.dtype]
                keys = [layout_key(lt, s.type.indices) for lt in layouts]
                use = [local_bytes(s.type.indices, ph.idx, lt, self.pricer.size, item) for lt in layouts]
                c = self.add(Node(f"{ph.name}:carry:{s.name}", "carry", s.name, ph.name, s.type.indices, keys,
                                  np.zeros(len(keys)), np.array(use), span))
                self._ref_link(prod[s.op.init], c, s.type.indices, s.op.init, keys, ph.idx, 1.0, equal=True)
                prod[s.name] = prod[s.op.carry] = c
                self._block(s.op.body, ph, mult * ph.idx[s.op.index], prod, offset)
                self._ref_link(prod[s.op.result], c, s.type.indices, s.op.result, keys, ph.idx, 1.0, equal=True)
                continue
            strategies = self._strategies(s, ph)
            scale = mult * ph.weight
            folded = self.fold and s.name not in paired and self.uses.get(s.name, 0) == 1 and \
                any(len(st.variants) > 1 for st in strategies)
            if folded:
                choices = [(si, -1) for si in range(len(strategies))]
                layouts = [None] * len(choices)
                usage = [max(v.mem for v in st.variants) for st in strategies]
                cost = [st.compute_s for st in strategies]
            else:
                choices = [(si, vi) for si, st in enumerate(strategies) for vi in range(len(st.variants))]
                layouts = [strategies[si].variants[vi].out for si, vi in choices]
                usage = [strategies[si].variants[vi].mem for si, vi in choices]
                cost = [strategies[si].compute_s + strategies[si].variants[vi].reduce_s for si, vi in choices]
            usage = np.array(usage)
            cost = np.array(cost)
            if s.name in partner:      # its latency moves onto the pair edge (see merge_edge)
                cost = cost - self._latency(strategies, choices)
            n = self.add(Node(f"{ph.name}:{s.name}", "stmt", s.name, ph.name, s.type.indices, layouts,
                              cost * scale + usage * BYTE_TIE, usage, span, strategies, choices, scale))
            if s.name in partner:
                self.merge_edge(prod[partner[s.name]], n, scale)
            for r in lay.stmt_refs(s):
                is_cache = isinstance(s.op, g.Write) and r is s.op.cache
                wants = [tuple(strategies[si].split.get(i, ()) for i in r.indices) for si, _ in choices]
                self._ref_link(prod[r.name], n, r.indices, r.name, wants, ph.idx, scale, equal=is_cache)
            prod[s.name] = n

    def _latency(self, strategies, choices) -> np.ndarray:
        """Per choice: the fixed (latency) seconds of its reduction when it is one
        psum or pmax (a collective it could share), else 0."""
        out = []
        for si, vi in choices:
            key = lay.reduce_key(strategies[si].variants[vi].reduce)
            out.append(self.pricer.coef(*key)[1] if key else 0.0)
        return np.array(out)

    def merge_edge(self, a: int, b: int, scale: float):
        """Pair edge of two statements whose reductions codegen can merge
        (layout.merge_partners): b pays its latency term here unless both choices
        leave one psum (or pmax) over the same mesh axes, when the two run as one
        collective and a's latency is the group's. Non-negative, like every edge."""
        A, B = self.nodes[a], self.nodes[b]
        ka = [lay.reduce_key(A.choice(c)[1].reduce) for c in range(len(A.choices))]
        kb = [lay.reduce_key(B.choice(c)[1].reduce) for c in range(len(B.choices))]
        lat = self._latency(B.strategies, B.choices)
        same = np.array([[x is not None and x == y for y in kb] for x in ka], dtype=bool)
        self.add_edge(a, b, np.where(same, 0.0, lat[None, :]) * scale)

    def _strategies(self, s: g.Statement, ph: Phase, phase: str | None = "", size_maps=None) -> list[StmtStrategy]:
        """Legal strategies of s at ph's sizes (in every size map), narrowed by a fixed split
        or a rule on the split (forced.SplitRule); phase: the name a fix may carry ('' = ph's,
        None = no phase: weight preparation)."""
        sts = stmt_strategies(s, self.types, size_maps or [ph.idx], self.pricer, self.hw, ph.idx, self.forbid,
                              self.fused)
        want = self._fixed(ph.name if phase == "" else phase, s.name)
        if want is not None and hasattr(want, "allows"):   # a rule on the split (forced.SplitRule)
            sts = [st for st in sts if want.allows(st.split)]
            if not sts:
                raise EinpartError(f"no legal split of '{s.name}' has {want} on this mesh")
        elif want is not None:
            split, out = want if isinstance(want, tuple) else (want, None)
            split = {i: tuple(a) for i, a in split.items() if a}
            sts = [st for st in sts if st.split == split]
            if out is not None:
                key = layout_key({i: tuple(a) for i, a in out.items()}, s.type.indices)
                sts = [replace(st, variants=[v for v in st.variants if v.out == key]) for st in sts]
                sts = [st for st in sts if st.variants]
            if not sts:
                raise EinpartError(f"fixed split of '{s.name}' {want} is not a legal strategy on this mesh")
        return sts

    def build(self, limit: float | None) -> Built:
        self.decls()
        self.preparation()
        offset = 0
        for ph in self.phases:
            self.phase(ph, offset)
            offset += self.end + 1
        unknown = set(self.fix) - self.used_fix
        if unknown:
            raise EinpartError(f"fixed layout for unknown tensor or statement '{sorted(unknown)[0]}'")
        for n in self.nodes:
            if is_stored(n) and n.usage.any():
                n.interval = (0, offset)
        edges = list(self.edges)
        sg = ilp.StrategyGraph([n.cost for n in self.nodes], [n.usage for n in self.nodes],
                               [n.interval for n in self.nodes], edges, [self.edges[e] for e in edges],
                               limit, [n.label for n in self.nodes])
        stats = {"nodes": len(self.nodes), "edges": len(edges),
                 "strategies": int(sum(len(n.cost) for n in self.nodes)),
                 "layouts": len(self.table.layouts), "reshard_pairs": self.table.pairs, "folded": sum(1 for n in self.nodes if n.fold),
                 "merge_pairs": self.pairs, "branch_pairs": self.branch_pairs}
        return Built(sg, self.nodes, self.by_label, stats)


_TABLES: dict = {}


def _reshard_table(hw: Hardware, mesh: tuple, pricer: Pricer) -> ReshardTable:
    """One ReshardTable per (hardware, mesh), shared by the builders of a plan
    (a two-phase plan builds up to six strategy graphs over the same layouts):
    the prices depend on nothing else, so each pair is priced once."""
    key = (hw, mesh)
    if key not in _TABLES:
        if len(_TABLES) >= 8:
            _TABLES.pop(next(iter(_TABLES)))
        _TABLES[key] = ReshardTable(pricer)
    return _TABLES[key]


def _unique(keys: list):
    """(distinct keys in first-seen order, index of each key among them)."""
    index: dict = {}
    ix = np.empty(len(keys), dtype=np.int64)
    for j, k in enumerate(keys):
        ix[j] = index.setdefault(k, len(index))
    return list(index), ix


def _min_usage(n: Node) -> float:
    if n.kind == "stmt" and n.layouts and n.layouts[0] is None:
        return min(v.mem for st in n.strategies for v in st.variants)
    return float(n.usage.min())


def memory_floor(built: Built, phases: list[Phase]) -> dict:
    """The least memory per device each class can take (every tensor at its smallest)."""
    out = defaultdict(float)
    for n in built.nodes:
        if is_stored(n):
            key = {"param": "weights", "state": "KV cache", "": "weights"}.get(n.decl_kind, "inputs")
            out[key] += float(n.usage.min())
    act = 0.0
    for ph in phases:
        items = [(n.interval, _min_usage(n)) for n in built.nodes if not is_stored(n) and n.phase == ph.name]
        act = max(act, peak_of(items))
    out["activations"] = act
    return dict(out)


def rule_out_oversized(built: Built, slack: float) -> int:
    """Forbid declaration layouts that need more than `slack` bytes above their
    smallest layout: with every other tensor at its smallest, they still do not
    fit, so no plan within the limit uses them (exact). Keeps the unlimited
    first solve from replicating weights that cannot be replicated."""
    dropped = 0
    for n in built.nodes:
        if is_stored(n):
            bad = n.usage - n.usage.min() > slack * (1 + 1e-12)
            if bad.any():
                n.cost[bad] = FORBIDDEN
                dropped += int(bad.sum())
    built.stats["decl_layouts_too_big"] = dropped
    return dropped


def memory_error(floor: dict, limit: float, hw: Hardware, devices: int, why: str = "") -> PlanError:
    parts = [f"{k} {_gb(v)}" for k, v in floor.items() if v >= 0.5e6 or k == "weights"]
    total = sum(floor.values())
    msg = (f"{' + '.join(parts)} > {_limit_text(limit)} HBM on {hw.name} with {devices} chips"
           f" (each at its smallest layout; {_gb(total)} in all)")
    return PlanError(msg + (f": {why}" if why else ""))


class NoPlanInTime(PlanError):
    """The solver found no plan at all within its time limit (the shard pass
    then falls back to the simple plan)."""


@dataclass
class Solved:
    built: Built
    solution: ilp.Solution
    bound: float
    gap: float
    status: str
    rounds: list = field(default_factory=list)
    note: str = ""


def map_assignment(src: Built, x: list, dst: Built) -> list:
    """An assignment of `src` as the same choices of `dst` (two strategy graphs of
    one graph that differ in their pair edges and in which statements are folded)."""
    out = []
    for n in dst.nodes:
        j = src.by_label[n.label]
        if n.kind != "stmt":
            out.append(x[j])
            continue
        st, var = src.variant(j, x)
        si = src.nodes[j].choices[x[j]][0]
        vi = next(k for k, v in enumerate(st.variants) if v is var)
        out.append(n.choices.index((si, -1) if n.layouts and n.layouts[0] is None else (si, vi)))
    return out


def plan_memory(built: Built, assign: list, phases: list[Phase]) -> float:
    """Bytes per device of a plan: declarations plus the largest activation peak of a phase."""
    total = 0.0
    per_phase = defaultdict(list)
    for i, n in enumerate(built.nodes):
        if is_stored(n):
            total += float(n.usage[assign[i]])
        elif n.kind == "carry":
            per_phase[n.phase].append((n.interval, float(n.usage[assign[i]])))
        else:
            per_phase[n.phase].append((n.interval, built.variant(i, assign)[1].mem))
    return total + max((peak_of(v) for v in per_phase.values()), default=0.0)
