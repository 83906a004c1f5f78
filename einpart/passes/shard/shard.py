"""The `shard` pass and its Python API: plan, write the plan into the IR, and
specialise a two-phase plan to the program codegen lowers.

What the annotated graph carries (every value visible in the dump):
  * graph.mesh: the mesh;
  * every declaration's type: its stored layout (`wq[d@x, h@(y, z), k]`),
    one layout serving prefill and decode;
  * every statement's type: its result layout (the natural layout of its
    split, possibly reduce-scattered), and attributes
      split=[d(x), f(y, z)]   how its iteration space is divided,
      comm=["psum_scatter(f/x)", ...]   the collectives codegen emits,
      us=12.3                 predicted microseconds per execution.
With phase=both the types and `split` are the decode program's; each
statement also has split_prefill / split_decode, layout_prefill /
layout_decode, comm_* and us_* attributes, and `specialize(graph, phase)`
returns the single-phase graph (sizes included: decode has t = 1).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from ...errors import EinpartError
from ...ir import graph as g
from ...ir import layout as lay
from ...ir.verify import verify
from ..manager import Pass, register_pass
from . import planner as pl
from .solving import solve_plan
from .hardware import load_hardware
from .mesh import mesh_devices, parse_mesh
from .phases import find_roles, make_phases, sized, with_size
from .report import PhaseReport, pair_credit, price_graph

PHASE_KEYS = ("split", "layout", "comm", "us")


@dataclass
class Plan:
    graph: g.Graph                      # annotated (phase=both: decode types, per-phase attributes)
    phases: dict                        # phase name -> PhaseReport
    status: str                         # optimal | feasible | fallback (no plan found in time)
    objective: float                    # weighted seconds (prefill + steps * decode)
    bound: float
    gap: float
    mesh: tuple
    hardware: str
    timings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    note: str = ""                      # why the status is not "optimal"

    def to_json(self) -> dict:
        def num(x):           # JSON has no infinity: an unknown bound / gap is null
            return x if math.isfinite(x) else None
        return {"mesh": [list(a) for a in self.mesh], "hardware": self.hardware,
                "solver": {"status": self.status, "objective": num(self.objective), "bound": num(self.bound),
                           "gap": num(self.gap), "note": self.note},
                "timings_s": self.timings, "stats": self.stats,
                "phases": {k: v.to_json() for k, v in self.phases.items()}}


def _layout_dict(value) -> dict:
    return {t.fn: tuple(a.name for a in t.args) for t in (value or ())}


def _phase_graph(graph: g.Graph, built: pl.Built, assign: list, ph, mesh) -> g.Graph:
    """The single-phase annotated graph for one phase of the solution."""
    decl_l = {n.tensor: dict(zip(n.indices, n.layouts[assign[i]]))
              for i, n in enumerate(built.nodes) if n.kind == "decl"}
    layout_of = {}
    for i, n in enumerate(built.nodes):
        if n.phase in (ph.name, pl.PREP):      # prepared weights: one layout for every phase
            layout_of[n.tensor] = dict(zip(n.indices, built.out_layout(i, assign)))

    def fix(block: g.Block, owner) -> g.Block:
        decls = tuple(replace(d, type=lay.with_layout(d.type, decl_l[d.name])) for d in block.decls)
        stmts = []
        for s in block.stmts:
            if isinstance(s.op, g.Repeat):
                stmts.append(replace(s, type=lay.with_layout(s.type, layout_of[s.name])))
                continue
            i = built.by_label[f"{ph.name}:{s.name}"]
            st, _ = built.nodes[i].choice(assign[i])
            attrs = g.make_attrs({k: v for k, v in s.attrs if not _planned_key(k)},
                                 split=lay.split_attr(st.split))
            stmts.append(replace(s, type=lay.with_layout(s.type, layout_of[s.name]), attrs=attrs))
        return replace(block, decls=decls, stmts=tuple(stmts))

    out = g.map_blocks(sized(graph, ph), fix)
    return replace(out, mesh=tuple(mesh))


def _planned_key(k: str) -> bool:
    return k in PHASE_KEYS or any(k == f"{p}_{ph}" for p in PHASE_KEYS for ph in ("prefill", "decode"))


def _us(x: float) -> float:
    return float(f"{x * 1e6:.4g}")


def _with_report(graph: g.Graph, rep: PhaseReport) -> g.Graph:
    """Add comm=[...] and us=... (one execution) to every statement."""
    by = {s.name: s for s in rep.stmts + rep.prepared}   # prepared: once, at load time

    def fix(block, owner):
        stmts = []
        for s in block.stmts:
            c = by.get(s.name)
            if c is not None and not isinstance(s.op, g.Repeat):
                s = replace(s, attrs=g.make_attrs(s.attrs, comm=tuple(d for d, _ in c.collectives),
                                                  us=_us(c.time_s)))
            stmts.append(s)
        return replace(block, stmts=tuple(stmts))
    return g.map_blocks(graph, fix)


def _merge(decode: g.Graph, prefill: g.Graph) -> g.Graph:
    """One graph for both phases: decode types, split, comm and us (so it is the
    decode program as it stands), the prefill ones as *_prefill attributes,
    prefill sizes."""
    pre = {s.name: s for s, _ in prefill.all_stmts()}

    def fix(block, owner):
        stmts = []
        for s in block.stmts:
            p = pre[s.name]
            extra = {"layout_prefill": lay.split_attr(lay.type_layout(p.type))}
            if not isinstance(s.op, g.Repeat):
                extra.update(split_prefill=g.attr(p.attrs, "split", ()), split_decode=g.attr(s.attrs, "split", ()),
                             comm_prefill=g.attr(p.attrs, "comm", ()), us_prefill=g.attr(p.attrs, "us", 0.0))
            stmts.append(replace(s, attrs=g.make_attrs(s.attrs, **extra)))
        return replace(block, stmts=tuple(stmts))
    merged = g.map_blocks(decode, fix)
    return replace(merged, sizes=prefill.sizes)


def specialize(graph: g.Graph, phase: str) -> g.Graph:
    """The single-phase program of a phase=both plan: split := split_<phase>,
    types := that phase's layouts, comm/us := that phase's, decode sized with
    t = 1. A graph planned for one phase has no per-phase attributes and
    comes back unchanged."""
    if phase not in ("prefill", "decode"):
        raise EinpartError(f"specialize: phase must be prefill or decode, got '{phase}'")
    if not any(g.attr(s.attrs, "split_decode") is not None for s, _ in graph.all_stmts()):
        return graph

    def fix(block, owner):
        stmts = []
        for s in block.stmts:
            a = dict(s.attrs)
            keep = {k: v for k, v in a.items() if not _planned_key(k)}
            typ = s.type
            if phase == "prefill":
                typ = lay.with_layout(s.type, _layout_dict(a.get("layout_prefill")))
            for k in ("split", "comm", "us"):
                src = a.get(f"{k}_prefill") if phase == "prefill" else a.get(k)
                if src is not None:
                    keep[k] = src
            stmts.append(replace(s, type=typ, attrs=g.make_attrs(keep)))
        return replace(block, stmts=tuple(stmts))

    out = g.map_blocks(graph, fix)
    if phase == "decode":
        r = find_roles(graph)
        if r.t_size:
            out = with_size(out, r.t_size, 1)
    return out


def plan(graph: g.Graph, mesh, hardware="cpu", phase: str = "both", batch: int = 0, context: int = 0,
         prompt: int = 0, steps: int = 64, memory_limit: float | None = 0.0, time_limit: float = 10.0,
         workers: int = 2, fix: dict | None = None, seed: int = 0, prune: bool = True,
         deterministic: bool = False, merge_pairs: bool = False) -> Plan:
    """Plan a graph: build the strategy graph, solve it, annotate, price.

    memory_limit: bytes per device; 0 = the hardware's HBM capacity; None or
    inf = no limit. fix: {name or 'phase:name': layout} pins a declaration's
    (or a repeat's carry) layout (a list of layouts: one of them), or a
    statement's split (or (split, result layout)), e.g.
    {"w_gate": {"d": ("x",), "f": ("y", "z")}, "decode:gate": {"f": ("y", "z")}}; a statement's
    value may also be a rule with allows(split) (forced.SplitRule: the forced layouts).
    prune: keep rope pair indices whole everywhere (planner.Builder).
    deterministic: every CP-SAT call stops on deterministic time (time_limit of
    it for the final one), so the plan does not depend on the machine's load;
    wall time may then exceed time_limit (ilp.solve).
    merge_pairs: let the planner price merged reductions (planner.Builder merge
    pairs: one latency per pair codegen merges). Plans are cheaper where that pays
    (the split-K combine of an s-sharded cache) but the pair edges close cycles
    that CP-SAT proves slowly (PaLM 540B decode on 64 chips: 10 s, not proved,
    against 0.25 s optimal), so it is opt-in; codegen merges either way.
    """
    t0 = time.perf_counter()
    mesh = parse_mesh(mesh)
    hw = load_hardware(hardware)
    if not mesh:
        raise EinpartError("shard: a mesh is required (e.g. mesh=x=4,y=4,z=4 or mesh=2x4)")
    phases = make_phases(graph, phase, batch, context, prompt, steps)
    limit = hw.hbm_bytes if memory_limit == 0 else memory_limit
    if limit is not None and not math.isfinite(limit):
        limit = None
    try:
        solved = solve_plan(graph, mesh, hw, phases, limit, time_limit, workers, fix, prune, seed,
                            lambda b, a: pl.plan_memory(b, a, phases), deterministic, merge_pairs)
    except pl.NoPlanInTime as exc:
        return fallback_plan(graph, mesh, hw, phases, limit, str(exc), t0)
    t2 = time.perf_counter()
    built, sol = solved.built, solved.solution
    per_phase, reports = {}, {}
    for ph in phases:
        pg = _phase_graph(graph, built, sol.assignment, ph, mesh)
        rep = price_graph(pg, hw, ph.name)
        per_phase[ph.name] = _with_report(pg, rep)
        reports[ph.name] = rep
    final = per_phase[phases[0].name] if len(phases) == 1 else _merge(per_phase["decode"], per_phase["prefill"])
    final = verify(final)
    t3 = time.perf_counter()
    # the strategy graph prices every reduction alone but credits one latency per merged
    # pair (report.pair_credit): re-price it so; the reports price the program codegen
    # emits, with merged reductions (objective_merged, at most objective_repriced)
    check = sum(ph.weight * (price_graph(per_phase[ph.name], hw, ph.name, merge=False).step_s
                             - pair_credit(per_phase[ph.name], hw, merge_pairs))
                for ph in phases) + \
        pl.PREPARE_WEIGHT * reports[phases[0].name].prepare_s
    merged = sum(ph.weight * reports[ph.name].step_s for ph in phases)
    stats = dict(built.stats, rounds=solved.rounds, solver=_jsonable(sol.stats), objective_repriced=check,
                 objective_merged=merged)
    return Plan(final, reports, solved.status, sol.objective, solved.bound, solved.gap, mesh, hw.name,
                {"solve": t2 - t0, "annotate": t3 - t2, "total": t3 - t0,
                 "solver_wall": sum(r["wall_s"] for r in solved.rounds)}, stats, solved.note)


def fallback_plan(graph: g.Graph, mesh, hw, phases, limit, why: str, t0: float) -> Plan:
    """The plan when the solver found none in time: codegen's simple plan (1D
    tensor parallelism, Megatron style), priced like any other, with a note
    that says so (and whether it fits in memory)."""
    from ..plans import simple_plan
    per_phase, reports = {}, {}
    for ph in phases:
        pg = simple_plan(sized(graph, ph), dict(mesh))
        rep = price_graph(pg, hw, ph.name)
        per_phase[ph.name] = _with_report(pg, rep)
        reports[ph.name] = rep
    final = per_phase[phases[0].name] if len(phases) == 1 else _merge(per_phase["decode"], per_phase["prefill"])
    final = verify(final)
    objective = sum(ph.weight * reports[ph.name].step_s for ph in phases)
    need = max(r.memory_bytes for r in reports.values())
    note = f"{why}: fell back to the simple plan (1D tensor parallel)"
    if limit is not None and need > limit:
        note += f"; it needs {need / 1e9:.3g} GB per device > {limit / 1e9:.3g} GB"
    total = time.perf_counter() - t0
    return Plan(final, reports, "fallback", objective, -math.inf, math.inf, tuple(mesh), hw.name,
                {"solve": total, "annotate": 0.0, "total": total, "solver_wall": 0.0}, {"fallback": why}, note)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


@register_pass("shard")
@dataclass(frozen=True)
class Shard(Pass):
    """Pick a layout for every tensor and a split for every statement (see plan())."""
    mesh: str = ""
    hardware: str = "cpu"
    phase: str = "both"
    batch: int = 0
    context: int = 0
    prompt: int = 0
    steps: int = 64
    memory_limit: float = 0.0
    time_limit: float = 10.0
    workers: int = 2
    force: str = ""          # a forced layout: ws1d, ws2d, wg, dp (forced.py)
    merge_pairs: bool = False  # price merged reductions in the ILP (plan())

    def apply(self, graph: g.Graph) -> g.Graph:
        if not self.mesh:
            raise EinpartError("shard: option mesh is required (e.g. shard{mesh=(x=4,y=4,z=4)})")
        if self.force:
            from .forced import plan_forced
            return plan_forced(graph, self.force, self.mesh, self.hardware, self.phase, self.batch, self.context,
                               self.prompt, self.steps, self.memory_limit, self.time_limit, self.workers).graph
        return plan(graph, self.mesh, self.hardware, self.phase, self.batch, self.context, self.prompt,
                    self.steps, self.memory_limit, self.time_limit, self.workers,
                    merge_pairs=self.merge_pairs).graph


__all__ = ["Plan", "Shard", "plan", "specialize", "mesh_devices"]
