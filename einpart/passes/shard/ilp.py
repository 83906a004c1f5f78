"""Generic sharding-strategy ILP: pick one strategy per node, minimise node plus
edge (resharding) costs, under a memory limit over liveness intervals.

Pipeline of :func:`solve` (``reductions=True``, the default):

1. exact reductions (``reduce.Work``): forbidden, memory-infeasible and
   dominated strategies go, identical strategies merge, single-strategy nodes
   fold into their neighbours, functional edges (v determined by u) merge v
   into u, memory-free nodes of degree <= 2 are eliminated (leaf / chain),
   memory-relevant leaves keep only Pareto-optimal pairs, parallel edges merge
   and row/column minima of every edge move into node costs (additive edges
   vanish).  A reconstruction stack maps assignments back exactly.
2. start solution: memory-respecting block coordinate descent (exact DP over
   random induced forests, ``descent.local_search``).  Its cost is an upper
   bound: every node strategy / edge pair whose excess alone exceeds the gap
   to the lower bound is dropped and the reductions run again.
3. soft-memory rounds (Lagrangian relaxation of the memory constraints): the
   memory limit is priced into node costs, the then memory-free graph is
   reduced much further and solved by CP-SAT, and its answer is repaired by
   the local search.  A proved inner optimum gives a lower bound; when it
   meets the best cost the solution is optimal and CP-SAT is skipped.
3b. with a memory limit: iterated local search (``lns.py``): kick a ball of
   nodes to random strategies, repair and descend with the local search
   (``descent.py``, restricted to the ball and its neighbours), accept
   results up to 3% worse, keep the best (escapes the local optimum every
   descent stops in on IOPDDL V).
3c. then MIP neighbourhoods (``mip.py``, not in deterministic mode): first
   every memory-relevant node may rise to its usage in the memory-free
   optimum (the way out of a poor basin; when it gains, the MIP steps end
   and step 4 starts from its plan, which CP-SAT leaves in seconds on V),
   else the memory-relevant nodes capped at the best plan's usage levels
   (those of the tightest constraints may rise two levels); everything else
   free, solved by HiGHS on the pairs formulation with the best plan as its
   start.
4. CP-SAT on the reduced graph with the best solution as a complete hint.
   Default edge formulation ``form="enforced"``: one integer cost per edge,
   ``e >= sum_j M[i,j]*y_j`` enforced by the row literal (and the column
   version), allowed-pair constraints for forbidden entries; rows and columns
   with identical entries share literals.  ``form="pairs"`` is the classic
   marginal formulation (a bool per allowed pair, LP-tight on trees).  The
   memory limit becomes one linear constraint per maximal live set
   (segments implied by another are dropped).
5. the assignment is mapped back and its objective recomputed with
   :func:`evaluate` on the original graph.

Integer costs are passed to CP-SAT as they are; others are scaled so the
largest finite cost is ~1e9 (rounding error <= 0.5e-9 of it per term); the
reported bound is lowered by the worst-case rounding error.  Non-integer
usages are scaled conservatively (coefficients rounded up, limits down).

Determinism: the reductions are deterministic; the local search is seeded
(``seed``) and only its wall-clock cap (off in deterministic mode) can cut it
short.  CP-SAT with a wall-clock limit is not reproducible (with several
workers not even run to run).  ``deterministic=True`` sets
``interleave_search`` (documented in sat_parameters.proto as deterministic
independently of num_workers), gives every CP-SAT call a deterministic time
limit (``max_deterministic_time``; the final call gets ``time_limit`` of it,
the quick call 0.15 and each soft-memory round 0.1 of it, at most 2 units;
so wall time may exceed ``time_limit``), runs exactly three soft-memory
rounds, never skips a step for lack of wall time, and keeps a wall-clock safety cap of ``4*limit+10`` s per call which,
if it ever triggers, breaks reproducibility.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from .descent import local_search
from .lns import iterated_local_search
from .mip import mip_search
from .penalty import penalty_rounds
from .reduce import FORBIDDEN, Infeasible, Work

_SCALE_TOP = 1e9  # largest finite cost after scaling
_PENALTY_MIN_STRATEGIES = 1000  # smaller reduced graphs go straight to CP-SAT
_ILS_KICKS = 1000  # kicks of the iterated local search in deterministic mode (about 9 s on IOPDDL V)

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

    def __init__(self, work: Work, form: str = "pairs"):
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
        self.scale = 1.0 if integral or mx == 0 else _SCALE_TOP / mx
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
        self.form = form
        # CP-SAT 9.15's inclusion presolve (presolve_inclusion_work_limit) was seen to
        # cut off optimal solutions of the enforced form when costs are scaled to ~1e9
        # (tiny PaLM decode on 2x2x2 cpu: OPTIMAL 3.2e-4 although a plan of 2.7e-5
        # satisfies the model; right with the inclusion step off or scale 1e7), so the
        # enforced form runs without that presolve step
        self.params = {"presolve_inclusion_work_limit": 0} if form == "enforced" else {}
        if form == "enforced":
            self._enforced(obj_v, obj_c)
        for p, r, q, rinv, cinv in (self.edges if form == "pairs" else ()):
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
        self.mem_exact = True       # integral usages: the constraints are the graph's, not rounded ones
        for terms, b in cons:
            allv = np.concatenate(list(terms.values()) + [[b]])
            f = 1.0 if np.all(allv == np.round(allv)) else 1e9 / max(np.abs(allv).max(), 1e-300)
            self.mem_exact &= f == 1.0
            vs, cs = [], []
            for i, a in terms.items():
                for s in np.flatnonzero(a > 0):
                    vs.append(self.x[self.pos[i]][s])
                    cs.append(int(math.ceil(a[s] * f - 1e-9 * (f != 1.0))))
            self.m.add(cp_model.LinearExpr.weighted_sum(vs, cs) <= int(math.floor(b * f + 1e-9 * (f == 1.0))))

    def _classlit(self, p, members):
        if len(members) == 1:
            return self.x[p][members[0]]
        y = self.m.new_bool_var("")
        self.m.add(y == cp_model.LinearExpr.sum([self.x[p][s] for s in members]))
        self.classlits.append((y, p, set(members.tolist())))
        return y

    def _enforced(self, obj_v, obj_c):
        """Edge cost as one integer per edge: e >= sum_b q[a,b]*col_b if row class a,
        plus 'allowed columns' constraints for forbidden pairs (both sides)."""
        self.e, self.classlits = [], []
        for p, r, q, rinv, cinv in self.edges:
            rl = [self._classlit(p, np.flatnonzero(rinv == a)) for a in range(q.shape[0])]
            cl = [self._classlit(r, np.flatnonzero(cinv == b)) for b in range(q.shape[1])]
            fin = np.isfinite(q)
            qs = np.where(fin, np.round(np.where(fin, q, 0) * self.scale), 0).astype(np.int64)
            e = None
            if qs.max() > 0:
                e = self.m.new_int_var(0, int(qs.max()), "")
                obj_v.append(e)
                obj_c.append(1)
            self.e.append(e)
            for a in range(q.shape[0]):
                if not fin[a].all():
                    self.m.add(cp_model.LinearExpr.sum([cl[b] for b in np.flatnonzero(fin[a])]) == 1).only_enforce_if(rl[a])
                nz = np.flatnonzero(qs[a] > 0)
                if e is not None and len(nz):
                    self.m.add(e >= cp_model.LinearExpr.weighted_sum([cl[b] for b in nz], [int(qs[a, b]) for b in nz])).only_enforce_if(rl[a])
            for b in range(q.shape[1]):
                if not fin[:, b].all():
                    self.m.add(cp_model.LinearExpr.sum([rl[a] for a in np.flatnonzero(fin[:, b])]) == 1).only_enforce_if(cl[b])
                nz = np.flatnonzero(qs[:, b] > 0)
                if e is not None and len(nz):
                    self.m.add(e >= cp_model.LinearExpr.weighted_sum([rl[a] for a in nz], [int(qs[a, b]) for a in nz])).only_enforce_if(cl[b])

    def _marg(self, pairs, xs):
        """sum(pairs) == sum(xs): pair variables of one row (column) class."""
        if not pairs:
            for v in xs:
                self.m.add(v == 0)
        else:
            self.m.add(cp_model.LinearExpr.sum(pairs) == cp_model.LinearExpr.sum(xs))

    def hint(self, partial):
        """partial: {node: original strategy}; nodes whose strategy is gone (or
        missing) are left unhinted."""
        choice = []
        for p, i in enumerate(self.nodes):
            st = self.work.strat[i]
            s = int(np.searchsorted(st, partial.get(i, -1)))
            s = s if s < len(st) and st[s] == partial.get(i, -1) else -1
            choice.append(s)
            if s >= 0:
                for t, var in enumerate(self.x[p]):
                    self.m.add_hint(var, t == s)
        for (p, r, q, rinv, cinv), z in zip(self.edges, self.z):
            if choice[p] >= 0 and choice[r] >= 0:
                a, b = rinv[choice[p]], cinv[choice[r]]
                for key, var in z.items():
                    self.m.add_hint(var, key == (a, b))
        for y, p, members in getattr(self, "classlits", []):
            if choice[p] >= 0:
                self.m.add_hint(y, choice[p] in members)
        for (p, r, q, rinv, cinv), e in zip(self.edges, getattr(self, "e", [])):
            # a pair that the reductions forbade (leaf Pareto pruning keeps a pair at least
            # as good) is left unhinted: CP-SAT repairs an incomplete hint
            if e is not None and choice[p] >= 0 and choice[r] >= 0 and np.isfinite(q[rinv[choice[p]], cinv[choice[r]]]):
                self.m.add_hint(e, int(round(q[rinv[choice[p]], cinv[choice[r]]] * self.scale)))

    def read(self, solver):
        out = {}
        for p, i in enumerate(self.nodes):
            vals = [solver.boolean_value(v) for v in self.x[p]]
            out[i] = int(self.work.strat[i][vals.index(True)])
        return out


def _to_partial(work, x):
    return {i: x[i] for i in work.nodes()}


def _cpsat(model, limit, workers, seed, deterministic, log=False, params=None):
    """Run CP-SAT on a _Model; returns (status, solver)."""
    solver = cp_model.CpSolver()
    prm = solver.parameters
    prm.num_workers = workers
    prm.random_seed = seed
    prm.log_search_progress = log
    limit = max(limit, 0.05)
    if deterministic:
        prm.interleave_search = True
        prm.max_deterministic_time = limit
        prm.max_time_in_seconds = 4 * limit + 10
    else:
        prm.max_time_in_seconds = limit
    for k, v in {**model.params, **(params or {})}.items():
        if isinstance(v, (list, tuple)):
            getattr(prm, k).extend(v)
        else:
            setattr(prm, k, v)
    st = solver.solve(model.m)
    if st == cp_model.MODEL_INVALID:
        raise RuntimeError(f"CP-SAT rejected the model: {model.m.validate()}")
    return st, solver


# The finish's CP-SAT without presolve probing: on the 40-1200 strategy graphs that
# eliminate.solve leaves (benchmarks/plan_sweep.py's cases, one worker) probing took
# up to half of a solve that proves, and never helped one prove (PaLM 540B both
# phases 0.24 -> 0.14 s, prefill 0.46 -> 0.33 s; Llama 70B prefill on 2x4x4
# 0.25 -> 0.07 s; at 20 GB one 2 s finish proved without it, not with it)
FINISH_PARAMS = {"cp_model_probing_level": 0}


def solve_work(work: Work, graph: StrategyGraph, best, time_limit: float, workers: int = 2, seed: int = 0,
               deterministic: bool = False, form: str = "enforced"):
    """CP-SAT on the graph left in a Work (eliminate.solve's `finish`: the small
    graph its pruning leaves, memory limit included). best: a full assignment
    of `graph` (the hint) or None. Returns (status, full assignment or None,
    bound), status "optimal" on the same terms as solve: CP-SAT proved it and
    the costs' rounding error is at most 1e-6 of the cost (and the memory
    constraints were not rounded)."""
    model = _Model(work, form=form)
    if best is not None:
        model.hint(_to_partial(work, best))
    st, solver = _cpsat(model, time_limit, workers, seed, deterministic, params=FINISH_PARAMS)
    if st == cp_model.INFEASIBLE:
        return "unknown", None, -math.inf     # (the caller's pruning kept its best plan: not expected)
    full = work.reconstruct(model.read(solver)) if st in (cp_model.OPTIMAL, cp_model.FEASIBLE) else None
    if full is not None and not _feasible(graph, full):
        full = None
    err = 0.0 if model.exact else (model.terms + 1) * 0.5 / model.scale
    trusted = st == cp_model.OPTIMAL and model.mem_exact
    bound = solver.best_objective_bound / model.scale + model.base - err if trusted else -math.inf
    obj = evaluate(graph, full) if full is not None else math.inf
    proved = trusted and full is not None and err <= 1e-6 * max(1.0, abs(obj))
    if proved and best is not None and evaluate(graph, best) < obj - 2 * err - 1e-9 * max(1.0, abs(obj)):
        proved, bound = False, -math.inf      # a known plan beats CP-SAT's "optimum": its proof is unsound
    return ("optimal" if proved else "feasible" if full is not None else "unknown"), full, bound


def _quick_cpsat(work, graph, best, limit, workers, seed, deterministic, form):
    """Short CP-SAT run on the reduced graph: (status, full assignment or None)."""
    model = _Model(work, form=form)
    if best is not None:
        model.hint(_to_partial(work, best))
    st, solver = _cpsat(model, limit, workers, seed, deterministic)
    if st == cp_model.INFEASIBLE:
        raise Infeasible("CP-SAT proved the reduced model infeasible")
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    full = work.reconstruct(model.read(solver))
    if not _feasible(graph, full):
        return None
    proved = st == cp_model.OPTIMAL and model.exact
    return ("optimal" if proved else "feasible"), full


def solve(graph: StrategyGraph, *, time_limit: float = 10.0, seed: int = 0, workers: int = 2,
          reductions: bool = True, hint=None, heuristic: bool | None = None,
          deterministic: bool = False, log: bool = False, params: dict | None = None,
          form: str = "enforced", penalty_share: float = 0.3, ils_share: float = 0.3,
          mip_share: float = 0.95, skip=()) -> Solution:
    """Minimise the cost of a strategy assignment (see module docstring).

    ``reductions=False`` gives the plain CP-SAT model (only forbidden strategies
    dropped, no start solution): the baseline.  ``heuristic`` (default: same as
    ``reductions``) runs the local search, bound pruning and, with a memory
    limit, the soft-memory rounds for up to ``penalty_share`` of the time.
    ``hint`` is a full assignment in original numbering; if feasible it seeds
    the search.  ``form`` picks the edge formulation ("enforced" or "pairs").
    ``params`` sets extra CP-SAT parameters by name.  ``skip`` turns reductions
    off by name (``reduce.REDUCTIONS``, and "bound" for the pruning by the best
    cost found), for measuring what each one buys.  With a memory limit and a
    large reduced graph, the iterated local search of ``lns.py`` runs until
    ``ils_share`` of the time (``_ILS_KICKS`` kicks when deterministic), then
    (not deterministic) the MIP neighbourhoods of ``mip.py`` until
    ``mip_share`` of it.

    Time: without ``deterministic``, a search step that would start after
    ``time_limit`` is skipped; the answer is then the best assignment found
    ("feasible", with the bound so far) or none ("unknown").
    """
    t0 = time.perf_counter()
    validate(graph)
    heuristic = reductions if heuristic is None else heuristic
    times: dict[str, float] = {}
    stats: dict = {"time_s": times, "timeline": []}

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

    until = t0 + time_limit

    def mark(step):
        """stats["timeline"]: (seconds since the start, step just ended, best cost then)"""
        stats["timeline"].append((round(time.perf_counter() - t0, 2), step, best_obj))

    def out_of_time():
        return not deterministic and time.perf_counter() >= until

    def stopped():
        """The answer when the time is up before the search could run: the best
        assignment so far (or none) with the bound the reductions give."""
        bound = max(lag_lb, work.lower_bound() if work is not None else -math.inf)
        if work is not None:
            stats["after"], stats["removed"] = work.counts(), dict(work.removed)
        return done("feasible" if best is not None else "unknown", best, min(bound, best_obj))

    best, best_obj, lag_lb = None, math.inf, -math.inf
    if hint is not None and _feasible(graph, list(hint)):
        best, best_obj = list(hint), evaluate(graph, hint)
    work = None
    try:
        work = Work(graph.node_costs, graph.node_usages, graph.intervals, graph.edges,
                    graph.edge_costs, graph.usage_limit, skip=set(skip) - {"bound"})
        stats["before"] = {"nodes": len(graph.node_costs), "edges": len(graph.edges),
                           "strategies": int(sum(len(c) for c in graph.node_costs))}
        if reductions:
            work.run()
        else:
            work.drop_forbidden()
        t1 = time.perf_counter()
        times["reduce"] = t1 - t0
        if not work.nodes():      # the reductions solved it
            stats["after"], stats["removed"] = work.counts(), dict(work.removed)
            stats["reduce_phases_s"] = dict(work.times)
            full = work.reconstruct({})
            return done("optimal", full) if _feasible(graph, full) else done("infeasible")
        if out_of_time():
            stats["time_limit_hit"] = "after the reductions"
            return stopped()
        if heuristic:
            def improve(x):
                nonlocal best, best_obj
                if x is not None:
                    full = work.reconstruct(x)
                    if _feasible(graph, full) and evaluate(graph, full) < best_obj:
                        best, best_obj = full, evaluate(graph, full)

            def prune():
                if best is not None and reductions and "bound" not in skip and work.prune_by_bound(best_obj):
                    work.run()

            improve(local_search(work, _to_partial(work, best) if best else None, seed=seed,
                                 t_cap=None if deterministic else min(0.2 * time_limit, until - t1)))
            stats["heuristic_cost"] = best_obj
            mark("local_search")
            prune()
            t2 = time.perf_counter()
            times["local_search"] = t2 - t1
            if work.counts()["strategies"] >= _PENALTY_MIN_STRATEGIES and not out_of_time():
                # a short plain CP-SAT run first: easy instances are proved here
                tq = time.perf_counter()
                quick = _quick_cpsat(work, graph, best, min(0.15 * time_limit, 2.0 if deterministic else 10.0),
                                     workers, seed, deterministic, form)
                times["quick_cpsat"] = time.perf_counter() - tq
                if quick is not None:
                    status, xq = quick
                    stats["quick_status"] = status
                    if xq is not None and evaluate(graph, xq) < best_obj:
                        best, best_obj = xq, evaluate(graph, xq)
                    if status == "optimal":
                        stats["after"], stats["removed"] = work.counts(), dict(work.removed)
                        stats["proved_by"] = "quick CP-SAT"
                        return done("optimal", best)
                    prune()
                mark("quick_cpsat")
                best, best_obj, lag_lb = penalty_rounds(
                    work, graph, best, best_obj, t0 + penalty_share * time_limit, workers, seed,
                    deterministic, form, stats, time_limit)
            stats["penalty_cost"] = best_obj
            mark("penalty")
            prune()
            improve(local_search(work, _to_partial(work, best) if best else None, seed=seed + 1,
                                 iters=100, t_cap=None if deterministic else 0.1 * time_limit))
            times["penalty"] = time.perf_counter() - t2
            mark("descent")
    except Infeasible as exc:
        stats["infeasible_reason"] = str(exc)
        if work is not None:
            stats["after"], stats["removed"] = work.counts(), dict(work.removed)
        return done("infeasible")
    t2 = time.perf_counter()
    stats["after"] = work.counts()
    if best is not None and lag_lb >= best_obj - 1e-9 * max(1.0, abs(best_obj)):
        stats["proved_by"] = "lagrangian bound"
        return done("optimal", best)
    if heuristic and best is not None and work.limit is not None and work.nodes() \
            and work.counts()["strategies"] >= _PENALTY_MIN_STRATEGIES and not out_of_time():
        # kick-and-descend walk out of the descent's local optimum (lns.py), memory-bound graphs only
        def priced(x):
            full = work.reconstruct(x)
            return evaluate(graph, full) if _feasible(graph, full) else math.inf
        tk = time.perf_counter()
        xk, ok = iterated_local_search(work, _to_partial(work, best), priced, seed=seed, stats=stats,
                                       until=t0 + ils_share * time_limit if not deterministic else tk + 4 * time_limit + 10,
                                       max_kicks=_ILS_KICKS if deterministic else None)
        if ok < best_obj:
            best, best_obj = work.reconstruct(xk), ok
            prune()
        times["ils"] = time.perf_counter() - tk
        stats["ils_cost"] = best_obj
        mark("ils")
        if not deterministic and work.nodes() and not out_of_time():
            # MIP neighbourhoods (mip.py): memory capped at the incumbent's levels, HiGHS for the rest
            tm = time.perf_counter()
            # the memory-free optimum of the graph itself (not of work, whose strategies the
            # memory-aware reductions thinned): its usage levels open the union step
            free_work = Work(graph.node_costs, graph.node_usages, graph.intervals, graph.edges,
                             graph.edge_costs, None, skip=set(skip) - {"bound"})
            free_work.run()
            xm, om = mip_search(work, _to_partial(work, best), priced, until=t0 + mip_share * time_limit,
                                free_work=free_work, stats=stats)
            if om < best_obj:
                best, best_obj = work.reconstruct(xm), om
                prune()
            times["mip"] = time.perf_counter() - tm
            stats["mip_cost"] = best_obj
            mark("mip")
        stats["after"] = work.counts()
        t2 = time.perf_counter()   # times["model"] counts the model build only
    stats["removed"] = dict(work.removed)
    stats["reduce_phases_s"] = dict(work.times)
    if not work.nodes():  # everything eliminated: the reductions solved it
        full = work.reconstruct({})
        return done("optimal", full) if _feasible(graph, full) else done("infeasible")
    if out_of_time():
        stats["time_limit_hit"] = "before CP-SAT"
        return stopped()
    try:
        model = _Model(work, form=form)
    except Infeasible as exc:
        stats["infeasible_reason"] = str(exc)
        return done("infeasible")
    stats["model"] = {"node_vars": sum(map(len, model.x)), "pair_vars": model.pair_vars,
                      "memory_constraints": model.mem_cons, "binding_segments": model.mem_binding,
                      "scale": model.scale, "form": form}
    if best is not None:
        model.hint(_to_partial(work, best))
    t3 = time.perf_counter()
    times["model"] = t3 - t2
    st, solver = _cpsat(model, time_limit if deterministic else time_limit - (t3 - t0),
                        workers, seed, deterministic, log, params)
    times["cpsat"] = time.perf_counter() - t3
    stats["cpsat_status"] = solver.status_name(st)
    if st == cp_model.INFEASIBLE:
        return done("infeasible")
    err = 0.0 if model.exact else (model.terms + 1) * 0.5 / model.scale
    # CP-SAT's bound of a scaled (non-integral) model stopped short of OPTIMAL was seen
    # ABOVE a solution of the same model (PaLM 540B memory-limited prefill: 10.77-10.83
    # against a plan of 10.7682 that the model accepts when its literals are fixed), so
    # it is used only for integral models; otherwise the reductions' bound stands
    trusted = model.exact or st == cp_model.OPTIMAL
    if st == cp_model.OPTIMAL and best_obj < solver.objective_value / model.scale + model.base - err \
            - 1e-9 * max(1.0, abs(best_obj)):
        # a known plan (the hint) beats CP-SAT's "optimum": its proof is unsound
        stats["cpsat_unsound"] = True
        trusted = False
    cp_bound = solver.best_objective_bound / model.scale + model.base - err if trusted else work.lower_bound()
    bound = max(cp_bound, lag_lb)
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        full = work.reconstruct(model.read(solver))
        obj = evaluate(graph, full)
        if obj < best_obj and _feasible(graph, full):
            best, best_obj = full, obj
    mark("cpsat")
    if best is None:
        return done("unknown", None, bound)
    proved = trusted and st == cp_model.OPTIMAL and (model.exact or err <= 1e-6 * max(1.0, abs(best_obj)))
    return done("optimal" if proved else "feasible", best, min(bound, best_obj))
