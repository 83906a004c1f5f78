"""Why each layout won: every weight's and statement's chosen strategy against
its runner-up, the difference split into compute, memory and communication.

The question "why this layout?" has an exact answer in the planner's own
terms. The plan is an assignment of the strategy graph the ILP minimised
(planner.Builder, built here again from the planned graph with the same
phases and hardware). Changing one node's choice, everything else as
planned, changes the objective by that node's own cost difference plus the
differences on its edges (the reshards between it and its neighbours). The
runner-up is the alternative with the smallest such change; for an optimal
plan it is never cheaper than the choice. Nodes tied by equality (a KV
cache and the writes to it, a layer carry and the values entering and
leaving the layer) change together: the cache's or carry's alternative
takes each tied node's best compatible choice with it.

Differences are given per phase step (one prefill pass, one decode step; the
objective weighs decode by `steps`); a statement's own roofline is split into
compute (FLOPs / peak) and memory (bytes / HBM bandwidth) and the step time
changes by the change of their max; reductions and reshards are
communication. An alternative that does not fit in the memory limit is
skipped. A plan the solver did not prove optimal may have a cheaper
alternative; the text then says so instead of hiding it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import EinpartError
from ...ir import graph as g
from ...ir import layout as lay
from .cost import FORBIDDEN, layout_key
from .hardware import load_hardware
from .phases import make_phases
from .planner import PREP, PREPARE_WEIGHT, Builder, plan_memory

TOL = 1e-12          # seconds: differences below this are ties


@dataclass
class Delta:
    """A change of cost in one phase, seconds per step of that phase."""
    compute_s: float = 0.0
    memory_s: float = 0.0
    roofline_s: float = 0.0          # change of max(compute, memory), summed over statements
    comm_s: float = 0.0

    @property
    def time_s(self) -> float:
        return self.roofline_s + self.comm_s

    def add(self, other: "Delta") -> None:
        self.compute_s += other.compute_s
        self.memory_s += other.memory_s
        self.roofline_s += other.roofline_s
        self.comm_s += other.comm_s


@dataclass
class Choice:
    """One alternative of an item, described and priced against the plan."""
    text: str                        # the layout (and split), as written in specs
    objective_s: float               # change of the planner's objective (its byte tie-break included)
    phases: dict = field(default_factory=dict)   # phase -> Delta
    time_s: float = 0.0              # change of prefill + steps x decode time (the objective's time)
    memory_bytes: float = 0.0        # change of the plan's memory per device


@dataclass
class Item:
    kind: str                        # weight | cache | input | statement | carry
    name: str                        # tensor or statement name ("decode:q" for a statement)
    chosen: str
    runner_up: Choice | None         # None: no other legal layout
    alternatives: int = 0            # how many legal alternatives were priced
    tied_to: str = ""                # an equality partner whose alternative moves this one too


@dataclass
class Explanation:
    items: list
    mesh: tuple
    hardware: str
    steps: float
    objective_s: float               # the plan's objective, as the strategy graph prices it
    phases: tuple = ("prefill", "decode")

    def text(self) -> str:
        return format_explanation(self)

    def to_json(self) -> list:
        def delta(d: Delta) -> dict:
            return {"time_s": d.time_s, "compute_s": d.compute_s, "memory_s": d.memory_s, "comm_s": d.comm_s}
        out = []
        for it in self.items:
            r = it.runner_up
            out.append({"kind": it.kind, "name": it.name, "chosen": it.chosen, "tied_to": it.tied_to,
                        "runner_up": None if r is None else {
                            "layout": r.text, "time_s": r.time_s, "objective_s": r.objective_s,
                            "memory_bytes": r.memory_bytes,
                            "phases": {ph: delta(d) for ph, d in sorted(r.phases.items())}}})
        return out

    def __str__(self) -> str:
        return self.text()


def _axes(layout: dict, indices) -> str:
    parts = []
    for i in indices:
        ax = tuple(layout.get(i, ()))
        if ax:
            parts.append(f"{i}@{ax[0]}" if len(ax) == 1 else f"{i}@({','.join(ax)})")
    return " ".join(parts) or "replicated"


def _key_text(key: tuple, indices) -> str:
    return _axes(dict(zip(indices, key)), indices)


def _norm(d: dict) -> dict:
    return {i: tuple(a) for i, a in d.items() if a}


class _Flips:
    """Objective changes of single-node (and tied-group) changes of one assignment."""

    def __init__(self, built, assign, phases, hw, graph: g.Graph, limit):
        self.built, self.nodes = built, built.nodes
        types = graph.types()
        self._refs = {s.name: [types[r.name].dtype for r in lay.stmt_refs(s)]
                      for s, _ in graph.all_stmts() if not isinstance(s.op, g.Repeat)}
        self.assign = list(assign)
        self.weight = {p.name: p.weight for p in phases}
        self.weight[PREP] = PREPARE_WEIGHT      # weight preparation: seconds once per load
        self.phases = phases
        self.hw, self.limit = hw, limit
        self.adj: dict[int, list] = {}
        for (u, v), m in zip(built.sg.edges, built.sg.edge_costs):
            self.adj.setdefault(u, []).append((v, m, True))
            self.adj.setdefault(v, []).append((u, m, False))
        self.equal: dict[int, set] = {}
        for (u, v), m in zip(built.sg.edges, built.sg.edge_costs):
            if (m >= FORBIDDEN).any() and np.all((m == 0) | (m >= FORBIDDEN)):
                self.equal.setdefault(u, set()).add(v)
                self.equal.setdefault(v, set()).add(u)

    # -- pieces of the objective ---------------------------------------------
    def own(self, i: int, c: int) -> dict:
        """Node i's own cost at choice c, per phase: Delta with absolute values."""
        n = self.nodes[i]
        if n.kind != "stmt":
            return {}
        st, var = n.choice(c)
        s = n.scale / self.weight[n.phase]           # layer count
        tc, tm = st.flops / self._peak(n.tensor), st.nbytes / self.hw.hbm_bandwidth
        red = var.reduce_s if var is not None else 0.0
        return {n.phase: Delta(tc * s, tm * s, st.compute_s * s, red * s)}

    def _peak(self, stmt: str) -> float:
        refs = self._refs.get(stmt)
        return self.hw.flops_int8 if refs and all(d == "i8" for d in refs) else self.hw.flops_bf16

    def change(self, old: list, new: list, moved, skip=frozenset()) -> tuple[float, dict]:
        """(objective change, per-phase Delta) from `old` to `new`, which differ only on `moved`;
        inf if `new` makes a forbidden choice. Edges to nodes in `skip` are left out."""
        moved = set(moved)
        obj, per = 0.0, {}
        for i in moved:
            n = self.nodes[i]
            if n.cost[new[i]] >= FORBIDDEN:
                return math.inf, {}
            obj += float(n.cost[new[i]] - n.cost[old[i]])
            x, y = self.own(i, new[i]), self.own(i, old[i])
            for ph in set(x) | set(y):
                a, b = x.get(ph, Delta()), y.get(ph, Delta())
                per.setdefault(ph, Delta()).add(Delta(a.compute_s - b.compute_s, a.memory_s - b.memory_s,
                                                      a.roofline_s - b.roofline_s, a.comm_s - b.comm_s))
        seen = set()
        for i in moved:
            for j, m, out in self.adj.get(i, ()):
                u, v = (i, j) if out else (j, i)
                if (u, v) in seen or j in skip:
                    continue
                seen.add((u, v))
                now, was = float(m[new[u], new[v]]), float(m[old[u], old[v]])
                if now >= FORBIDDEN:
                    return math.inf, {}
                obj += now - was
                # edges are priced at their consumer's scale, in the consumer's phase
                phase = self.nodes[v].phase or self.nodes[u].phase
                if phase is not None and now != was:
                    per.setdefault(phase, Delta()).comm_s += (now - was) / self.weight[phase]
        return obj, per

    def fits(self, assign: list) -> bool:
        return self.limit is None or plan_memory(self.built, assign, self.phases) <= self.limit

    def alternatives(self, i: int) -> list:
        """(objective change, per-phase Delta, assignment) of every legal alternative of node i.
        A cache or carry takes the nodes tied to it along, each to its best choice given the rest."""
        out = []
        old = self.assign
        n = self.nodes[i]
        group = sorted(self.equal.get(i, ())) if n.kind != "stmt" else []
        for c in range(len(n.cost)):
            if c == old[i]:
                continue
            new = list(old)
            new[i] = c
            obj, per = self.change(old, new, {i})
            if not math.isfinite(obj) and group:
                moved = {i}
                for k, j in enumerate(group):
                    best = (math.inf, old[j])
                    later = frozenset(group[k + 1:])     # not moved yet: their edges come later
                    for cj in range(len(self.nodes[j].cost)):
                        new[j] = cj
                        o, _ = self.change(old, new, moved | {j}, later)
                        if o < best[0]:
                            best = (o, cj)
                    new[j] = best[1]
                    moved.add(j)
                obj, per = self.change(old, new, moved)
            if math.isfinite(obj):
                out.append((obj, per, new))
        return out


def chosen_assignment(built, planned: g.Graph, phase_graphs: dict) -> list:
    """The strategy graph's assignment that a planned graph is (raises on a plan it cannot express)."""
    decls = {d.name: d for d, _ in planned.all_decls()}
    stmts = {ph: {s.name: s for s, _ in pg.all_stmts()} for ph, pg in phase_graphs.items()}
    out = []

    def find(n, key):
        if key not in n.layouts:
            raise EinpartError(f"explain: the layout {_key_text(key, n.indices)} of '{n.tensor}' is not one the "
                               f"planner chooses from on this mesh (explain a plan of the shard pass)")
        return n.layouts.index(key)
    for n in built.nodes:
        if n.kind == "decl":
            out.append(find(n, layout_key(lay.type_layout(decls[n.tensor].type), n.indices)))
            continue
        # a prepared weight (phase "prepare") has one layout in every phase graph
        s = stmts[n.phase if n.phase in stmts else next(iter(stmts))][n.tensor]
        out_key = layout_key(lay.type_layout(s.type), n.indices)
        if n.kind == "carry":
            out.append(find(n, out_key))
            continue
        split = _norm(lay.stmt_split(s))
        for c, (si, vi) in enumerate(n.choices):
            st = n.strategies[si]
            if _norm(st.split) == split and st.variants[vi].out == out_key:
                out.append(c)
                break
        else:
            raise EinpartError(f"explain: the split {_axes(split, tuple(split)) if split else 'none'} of "
                               f"'{n.label}' is not one the planner chooses from (explain a plan of the shard pass)")
    return out


def _choice_text(n, c: int) -> str:
    if n.kind != "stmt":
        return _key_text(n.layouts[c], n.indices)
    st, var = n.choice(c)
    split = _axes(st.split, tuple(st.split))
    text = f"split {split if st.split else 'none'}"
    natural = layout_key({i: st.split.get(i, ()) for i in n.indices}, n.indices)
    if var.out != natural:
        text += f" -> {_key_text(var.out, n.indices)}"
    return text


KIND = {"param": "weight", "state": "cache", "input": "input"}


def explain(planned: g.Graph, hardware="cpu", phase: str = "both", batch: int = 0, context: int = 0,
            prompt: int = 0, steps: int = 64, memory_limit: float | None = 0.0, prune: bool = True) -> Explanation:
    """Explain a planned graph (the shard pass's output): every weight, cache, input,
    layer carry and statement, its choice and its runner-up. The options are the
    shard pass's (sizes, phases, hardware and memory limit must be those it planned with;
    memory_limit: bytes per device, 0 = the hardware's HBM, None = no limit)."""
    from .shard import specialize
    hw = load_hardware(hardware)
    mesh = tuple(planned.mesh)
    phases = make_phases(planned, phase, batch, context, prompt, steps)
    if len(phases) == 1:
        phase_graphs = {phases[0].name: planned}
    else:
        phase_graphs = {ph.name: specialize(planned, ph.name) for ph in phases}
    built = Builder(planned, mesh, hw, phases, fold=False, prune=prune).build(None)
    assign = chosen_assignment(built, planned, phase_graphs)
    limit = hw.hbm_bytes if memory_limit == 0 else memory_limit
    if limit is not None and not math.isfinite(limit):
        limit = None
    flips = _Flips(built, assign, phases, hw, planned, limit)
    from .ilp import evaluate
    items = []
    for i, n in enumerate(built.nodes):
        alts = flips.alternatives(i)
        fitting = [a for a in alts if flips.fits(a[2])]
        best = min(fitting, key=lambda a: a[0]) if fitting else None
        runner = None
        if best is not None:
            obj, per, alt = best
            weighted = sum(flips.weight[ph] * d.time_s for ph, d in per.items())
            mem = plan_memory(built, alt, phases) - plan_memory(built, assign, phases)
            runner = Choice(_choice_text(n, alt[i]), obj, per, weighted, mem)
        kind = KIND.get(n.decl_kind, "input") if n.kind == "decl" else {"stmt": "statement"}.get(n.kind, n.kind)
        name = n.tensor if n.kind == "decl" else f"{n.phase}:{n.tensor}"
        tied = ", ".join(sorted(built.nodes[j].label for j in flips.equal.get(i, ())))
        items.append(Item(kind, name, _choice_text(n, assign[i]), runner, len(alts), tied))
    return Explanation(items, mesh, hw.name, float(steps), float(evaluate(built.sg, assign)),
                       tuple(p.name for p in phases))


def _t(s: float) -> str:
    a = abs(s)
    sign = "-" if s < 0 else "+"
    if a < TOL:
        return "0"
    if a >= 1:
        return f"{sign}{a:.3g} s"
    if a >= 1e-3:
        return f"{sign}{a * 1e3:.3g} ms"
    if a >= 1e-6:
        return f"{sign}{a * 1e6:.3g} us"
    return f"{sign}{a * 1e9:.3g} ns"


def _b(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{int(n)} B"


def format_explanation(e: Explanation) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in e.mesh)
    weigh = f" (the planner weighs decode x {e.steps:g})" if len(e.phases) > 1 else ""
    lines = [f"why each layout won (mesh {mesh}, {e.hardware}); the runner-up is the best other choice with "
             f"everything else as planned; differences are per step of each phase{weigh}"]
    for it in e.items:
        head = f"{it.kind} {it.name}: {it.chosen}"
        if it.runner_up is None:
            why = ("every alternative exceeds the memory limit" if it.alternatives else
                   f"fixed by {it.tied_to}" if it.tied_to else "the only legal choice")
            lines.append(f"{head}  ({why})")
            continue
        r = it.runner_up
        if abs(r.time_s) <= TOL:
            verdict = "ties on time with the runner-up" + (
                f" and holds {_b(r.memory_bytes)} less per device" if r.memory_bytes > 0 else "")
        else:
            verdict = "wins" if r.time_s > 0 else "LOSES (the plan is not optimal)"
        unit = (f"per prefill + {e.steps:g} decode steps" if len(e.phases) > 1 else f"per {e.phases[0]} step")
        cost = f" ({_t(r.time_s)} {unit})" if abs(r.time_s) > TOL else ""
        lines.append(f"{head}  {verdict}; runner-up {r.text}{cost}")
        for ph, d in sorted(r.phases.items()):
            if abs(d.time_s) <= TOL and abs(d.compute_s) <= TOL and abs(d.memory_s) <= TOL:
                continue
            lines.append(f"    {ph}: runner-up {_t(d.time_s)} per step (compute {_t(d.compute_s)}, "
                         f"memory {_t(d.memory_s)}, communication {_t(d.comm_s)})")
        if it.tied_to and it.kind in ("cache", "carry"):
            lines.append(f"    (moves together with {it.tied_to})")
    return "\n".join(lines)


__all__ = ["Choice", "Delta", "Explanation", "Item", "explain", "format_explanation"]
