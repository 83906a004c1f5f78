"""Generic sharding-strategy ILP: pick one strategy per node, minimise node plus
edge (resharding) costs, under a memory limit over liveness intervals.

Pipeline of :func:`solve`:

1. exact reductions (``reduce.Work``): forbidden/memory-infeasible/dominated
   strategies, singleton folding, leaf and degree-2 chain elimination of
   memory-free nodes, parallel-edge merging, edge normalisation (row/column
   minima moved into node costs; additive edges vanish);
2. a local-search start (greedy + coordinate descent + edge pair moves,
   memory respecting, ``reduce.local_search``); its cost is an upper bound that
   prunes every node strategy / edge pair that alone costs more than the gap to
   the lower bound, after which the reductions run again;
3. CP-SAT on what is left: one-hot bools per node; per edge the marginal
   ("pair variable") formulation over classes of identical rows/columns
   (exact and LP-tight on tree edges), forbidden pairs left out; one linear
   memory constraint per maximal live set (deduplicated);
4. the assignment is mapped back through the reconstruction stack and its
   objective recomputed with :func:`evaluate` on the original graph.

Integer costs are passed to CP-SAT as they are; others are scaled so the
largest finite cost is ~1e9 (rounding error <= 0.5e-9 of it per term); the
reported bound is lowered by the worst-case rounding error.  Non-integer
usages are scaled conservatively (coefficients rounded up, limits down).

Determinism: the reductions and the local search are deterministic (bounded by
pass counts, not by time, in deterministic mode).  CP-SAT with a wall-clock
limit is not reproducible (with several workers not even run to run on an
idle machine).  ``deterministic=True`` sets ``interleave_search`` (documented
in sat_parameters.proto as deterministic independently of num_workers) and
uses ``time_limit`` as ``max_deterministic_time``; a wall-clock safety cap of
``4*time_limit+10`` s remains and, if it ever triggers, breaks reproducibility.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from .reduce import FORBIDDEN, Infeasible, Work, local_search

__all__ = ["StrategyGraph", "Solution", "evaluate", "peak_usage", "solve", "validate"]


@dataclass
class StrategyGraph:
    node_costs: list[np.ndarray]          # node i: cost of each strategy (float64)
    node_usages: list[np.ndarray]         # node i: memory of each strategy
    intervals: list[tuple[int, int]]      # liveness [start, end) per node; (0,0) = never live
    edges: list[tuple[int, int]]          # (u, v)
    edge_costs: list[np.ndarray]          # shape (len(node_costs[u]), len(node_costs[v]))
    usage_limit: float | None = None      # None = no memory constraint
    names: list[str] | None = None        # optional node names for messages

    def node_name(self, i: int) -> str:
        return f"node {i}" + (f" ({self.names[i]})" if self.names and i < len(self.names) else "")


@dataclass
class Solution:
    assignment: list[int]
    objective: float
    bound: float
    gap: float
    status: str
    wall_s: float
    stats: dict = field(default_factory=dict)


def validate(graph: StrategyGraph) -> None:
    """Raise ValueError naming the first inconsistent field."""
    n = len(graph.node_costs)
    for what, seq in (("node_usages", graph.node_usages), ("intervals", graph.intervals)):
        if len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries, node_costs has {n}")
    for i in range(n):
        if len(graph.node_costs[i]) == 0:
            raise ValueError(f"{graph.node_name(i)}: no strategies")
        if np.shape(graph.node_usages[i]) != np.shape(graph.node_costs[i]):
            raise ValueError(f"{graph.node_name(i)}: {len(graph.node_usages[i])} usages "
                             f"for {len(graph.node_costs[i])} strategies")
    if len(graph.edge_costs) != len(graph.edges):
        raise ValueError(f"{len(graph.edge_costs)} edge cost matrices for {len(graph.edges)} edges")
    for k, (u, v) in enumerate(graph.edges):
        if not (0 <= u < n and 0 <= v < n):
            raise ValueError(f"edge {k}: endpoint out of range ({u}, {v})")
        want = (len(graph.node_costs[u]), len(graph.node_costs[v]))
        if np.shape(graph.edge_costs[k]) != want:
            raise ValueError(f"edge {k}: cost matrix shape {np.shape(graph.edge_costs[k])}, expected {want}")


def evaluate(graph: StrategyGraph, assignment) -> float:
    """Objective of an assignment; inf if it makes a forbidden choice."""
    total = 0.0
    for i, s in enumerate(assignment):
        c = float(graph.node_costs[i][s])
        if c >= FORBIDDEN:
            return math.inf
        total += c
    for (u, v), m in zip(graph.edges, graph.edge_costs):
        c = float(m[assignment[u], assignment[v]])
        if c >= FORBIDDEN:
            return math.inf
        total += c
    return total


def peak_usage(graph: StrategyGraph, assignment) -> float:
    """Largest total usage of live nodes over time."""
    events = []
    for i, (s, e) in enumerate(graph.intervals):
        if s < e:
            u = float(graph.node_usages[i][assignment[i]])
            events += [(s, u), (e, -u)]
    events.sort(key=lambda t: (t[0], t[1] > 0))  # ends before starts at equal time
    peak = cur = 0.0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    return peak


def _feasible(graph, x) -> bool:
    if len(x) != len(graph.node_costs) or any(s < 0 for s in x):
        return False
    if not math.isfinite(evaluate(graph, x)):
        return False
    return graph.usage_limit is None or peak_usage(graph, x) <= graph.usage_limit


class _Model:
    """CP-SAT model of the graph left in a Work."""

    def __init__(self, work: Work):
        self.work = work
        self.nodes = work.nodes()
        self.pos = {i: p for p, i in enumerate(self.nodes)}
        self.m = cp_model.CpModel()
        self.x = [[self.m.new_bool_var(f"x{i}_{s}") for s in range(len(work.strat[i]))] for i in self.nodes]
        self.base = work.const
        costs = []
        for i in self.nodes:
            c = work.cost[i]
            lo = float(c[np.isfinite(c)].min())
            self.base += lo
            costs.append(c - lo)
        self.edges = []
        for eid, (u, v) in work.ends.items():
            mat = work.emat[eid]
            rows, rinv = np.unique(mat, axis=0, return_inverse=True)
            q, cinv = np.unique(rows, axis=1, return_inverse=True)
            self.edges.append((self.pos[u], self.pos[v], q, rinv.ravel(), cinv.ravel()))
        finite = [c[np.isfinite(c)] for c in costs] + [e[2][np.isfinite(e[2])] for e in self.edges]
        allc = np.concatenate(finite) if finite else np.zeros(1)
        mx = float(np.abs(allc).max()) if allc.size else 0.0
        integral = bool(np.all(allc == np.round(allc))) and mx * (len(finite) + 1) < 2**53
        self.scale = 1.0 if integral or mx == 0 else 1e9 / mx
        self.terms = len(finite)
        self.exact = integral
        obj_v, obj_c = [], []
        for p, i in enumerate(self.nodes):
            xs = self.x[p]
            ok = np.isfinite(costs[p])
            for s in np.flatnonzero(~ok):
                self.m.add(xs[s] == 0)
            self.m.add_exactly_one(xs)
            for s in np.flatnonzero(ok & (costs[p] != 0)):
                obj_v.append(xs[s])
                obj_c.append(int(round(costs[p][s] * self.scale)))
        self.z = []
        for p, r, q, rinv, cinv in self.edges:
            z = {}
            for a, b in zip(*np.nonzero(np.isfinite(q))):
                z[a, b] = self.m.new_bool_var("")
                if q[a, b] != 0:
                    obj_v.append(z[a, b])
                    obj_c.append(int(round(q[a, b] * self.scale)))
            for a in range(q.shape[0]):
                self._marg([z[a, b] for b in range(q.shape[1]) if (a, b) in z],
                           [self.x[p][s] for s in np.flatnonzero(rinv == a)])
            for b in range(q.shape[1]):
                self._marg([z[a, b] for a in range(q.shape[0]) if (a, b) in z],
                           [self.x[r][s] for s in np.flatnonzero(cinv == b)])
            self.z.append(z)
        self.pair_vars = sum(len(z) for z in self.z)
        self.m.minimize(cp_model.LinearExpr.weighted_sum(obj_v, obj_c))
        cons, self.mem_binding = work.memory_constraints()
        self.mem_cons = len(cons)
        for nodes, b in cons:
            av = [work.use[i] - work.use[i].min() for i in nodes]
            allv = np.concatenate(av + [[b]])
            f = 1.0 if np.all(allv == np.round(allv)) else 1e9 / max(np.abs(allv).max(), 1e-300)
            vs, cs = [], []
            for i, a in zip(nodes, av):
                for s in np.flatnonzero(a > 0):
                    vs.append(self.x[self.pos[i]][s])
                    cs.append(int(math.ceil(a[s] * f - 1e-9 * (f != 1.0))))
            self.m.add(cp_model.LinearExpr.weighted_sum(vs, cs) <= int(math.floor(b * f + 1e-9 * (f == 1.0))))

    def _marg(self, pairs, xs):
        """sum(pairs) == sum(xs): pair variables of one row (column) class."""
        if not pairs:
            for v in xs:
                self.m.add(v == 0)
        else:
            self.m.add(cp_model.LinearExpr.sum(pairs) == cp_model.LinearExpr.sum(xs))

    def hint(self, partial):
        """partial: {node: original strategy} for every node of the model."""
        choice = []
        for p, i in enumerate(self.nodes):
            s = int(np.searchsorted(self.work.strat[i], partial[i]))
            choice.append(s)
            for t, var in enumerate(self.x[p]):
                self.m.add_hint(var, t == s)
        for (p, r, q, rinv, cinv), z in zip(self.edges, self.z):
            a, b = rinv[choice[p]], cinv[choice[r]]
            for key, var in z.items():
                self.m.add_hint(var, key == (a, b))

    def read(self, solver):
        out = {}
        for p, i in enumerate(self.nodes):
            vals = [solver.boolean_value(v) for v in self.x[p]]
            out[i] = int(self.work.strat[i][vals.index(True)])
        return out


def _to_partial(work, x):
    return {i: x[i] for i in work.nodes()}


def solve(graph: StrategyGraph, *, time_limit: float = 10.0, seed: int = 0, workers: int = 2,
          reductions: bool = True, hint=None, heuristic: bool | None = None,
          deterministic: bool = False, log: bool = False, params: dict | None = None) -> Solution:
    """Minimise the cost of a strategy assignment (see module docstring).

    ``reductions=False`` gives the plain CP-SAT model (only forbidden strategies
    dropped); ``heuristic`` (default: same as ``reductions``) runs the local
    search for a start solution and bound pruning.  ``hint`` is a full
    assignment in original numbering; if feasible it seeds the search.
    ``params`` sets extra CP-SAT parameters by name.
    """
    t0 = time.perf_counter()
    validate(graph)
    heuristic = reductions if heuristic is None else heuristic
    times: dict[str, float] = {}
    stats: dict = {"time_s": times}

    def done(status, x=None, bound=-math.inf):
        obj = evaluate(graph, x) if x is not None else math.inf
        if status == "infeasible":
            bound = math.inf
        if status == "optimal":
            bound = obj
        gap = 0.0 if status == "optimal" else (
            (obj - bound) / max(abs(obj), 1e-9) if math.isfinite(obj) and math.isfinite(bound) else math.inf)
        return Solution(list(x) if x is not None else [], obj, bound, gap, status,
                        time.perf_counter() - t0, stats)

    best, best_obj = None, math.inf
    if hint is not None and _feasible(graph, list(hint)):
        best, best_obj = list(hint), evaluate(graph, hint)
    try:
        work = Work(graph.node_costs, graph.node_usages, graph.intervals, graph.edges,
                    graph.edge_costs, graph.usage_limit)
        stats["before"] = work.counts()
        if reductions:
            work.run()
        else:
            work.drop_forbidden()
        t1 = time.perf_counter()
        times["reduce"] = t1 - t0
        if heuristic:
            budget = None if deterministic else 0.25 * time_limit
            for _ in range(4):
                x = local_search(work, _to_partial(work, best) if best else None, t_cap=budget)
                if x is not None:
                    full = work.reconstruct(x)
                    if _feasible(graph, full) and evaluate(graph, full) < best_obj:
                        best, best_obj = full, evaluate(graph, full)
                stats.setdefault("heuristic_costs", []).append(best_obj)
                if best is None or not reductions or not work.prune_by_bound(best_obj):
                    break
                work.run()
        t2 = time.perf_counter()
        times["heuristic"] = t2 - t1
    except Infeasible as exc:
        stats["infeasible_reason"] = str(exc)
        stats["removed"] = dict(work.removed) if "work" in locals() else {}
        return done("infeasible")
    stats["after"] = work.counts()
    stats["removed"] = dict(work.removed)
    stats["reduce_phases_s"] = dict(work.times)
    if not work.nodes():  # everything eliminated: the reductions solved it
        return done("optimal", work.reconstruct({}))
    model = _Model(work)
    stats["model"] = {"node_vars": sum(map(len, model.x)), "pair_vars": model.pair_vars,
                      "memory_constraints": model.mem_cons, "binding_segments": model.mem_binding,
                      "scale": model.scale}
    if best is not None:
        model.hint(_to_partial(work, best))
    t3 = time.perf_counter()
    times["model"] = t3 - t2
    solver = cp_model.CpSolver()
    prm = solver.parameters
    remaining = max(time_limit - (t3 - t0), 0.5)
    prm.num_workers = workers
    prm.random_seed = seed
    prm.log_search_progress = log
    if deterministic:
        prm.interleave_search = True
        prm.max_deterministic_time = remaining
        prm.max_time_in_seconds = 4 * remaining + 10
    else:
        prm.max_time_in_seconds = remaining
    for k, v in (params or {}).items():
        setattr(prm, k, v)
    st = solver.solve(model.m)
    times["cpsat"] = time.perf_counter() - t3
    stats["cpsat_status"] = solver.status_name(st)
    if st == cp_model.MODEL_INVALID:
        raise RuntimeError(f"CP-SAT rejected the model: {model.m.validate()}")
    if st == cp_model.INFEASIBLE:
        return done("infeasible")
    err = 0.0 if model.exact else (model.terms + 1) * 0.5 / model.scale
    bound = solver.best_objective_bound / model.scale + model.base - err
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        full = work.reconstruct(model.read(solver))
        obj = evaluate(graph, full)
        if obj < best_obj and _feasible(graph, full):
            best, best_obj = full, obj
    if best is None:
        return done("unknown", None, bound)
    proved = st == cp_model.OPTIMAL and (model.exact or err <= 1e-6 * max(1.0, abs(best_obj)))
    return done("optimal" if proved else "feasible", best, min(bound, best_obj))
