"""Exact strategy-graph optimum by variable (bucket) elimination, with bound pruning.

Why: the two-phase PaLM graph (prefill and decode sharing weights and the KV
cache) is hard for CP-SAT, but after the reductions (reduce.Work) it is 31
nodes of 18-193 strategies with treewidth 5. Bucket elimination over a greedy
order solves such a graph exactly; eliminating node v makes one dense table
over v and its neighbours (min-plus, numpy). At treewidth 5 those tables
reach ~1e10-1e11 entries there, far too many, so this module prunes first:

1. the relaxation: drop the weakest edges (after the reductions every edge is
   normalized, its entries >= 0, so dropping an edge lowers every plan's cost)
   until every table of the elimination stays under ``cap`` entries;
2. a two-pass junction-tree pass over the bucket tree of the relaxation gives
   its optimum (a lower bound), its plan (an upper bound once priced on the
   true graph) and the min-marginals of every strategy and of every edge pair:
   the least relaxed cost of a plan that uses it;
3. a strategy or pair whose min-marginal exceeds the best known cost cannot
   be in any plan at most that cost: it goes (exact: the optimum stays), the
   reductions run again and shrink the graph further; repeat.
When no edge is dropped any more the pass is the exact optimum: a proof.

Memory (a usage limit over liveness intervals, reduce.Work.memory_constraints)
enters as a Lagrangian price: lam_c * (usage in constraint c - its bound) is
<= 0 on every plan that fits, so adding it to the costs keeps every relaxed
value a lower bound of the constrained optimum and the pruning exact. The
prices are set by subgradient steps on the relaxation (one priced segment: a
safeguarded secant step), the dropped edges' multipliers by damped star
updates (_star_updates); a plan is only an upper bound when it fits. The
duality gap the prices leave is closed by `finish` (CP-SAT on the small
graph the pruning leaves, ilp.solve_work) when the caller gives one. When the priced optimum's plan fits and leaves no slack in
the priced constraints, it is optimal; otherwise the pruned graph is what is
left, with the bound (``solve`` returns "feasible").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .junction import Pass, junction_pass  # noqa: F401  (junction_pass: used by tests as eliminate's)
from .reduce import Infeasible, Work

CAP = 4_000_000          # entries of the largest dense table of one elimination step
MAX_CAP = 32_000_000     # the cap grows up to this when the bound stalls with edges dropped
TOTAL = 40_000_000       # entries of all tables of one pass together
_TOL = 1e-9              # relative tolerance of "above the best known cost"
STAR_DAMPING = 0.5       # share of a star update of the edge multipliers taken (1 diverged on PaLM)
FINISH_AT = 1600         # strategies left at most when solve hands the graph to `finish`


def _order(adj: dict, size: dict) -> tuple[list, list, float, float]:
    """Greedy elimination order (smallest table first, then least fill): the
    order, each step's neighbour set, the largest table and their sum."""
    A = {i: set(s) for i, s in adj.items()}
    order, seps, mx, tot = [], [], 0.0, 0.0

    def fill(v):
        nb = list(A[v])
        return sum(1 for a in range(len(nb)) for c in nb[a + 1:] if c not in A[nb[a]])
    # each node's table, kept up to date: only the neighbours of an eliminated node change
    tab = {v: math.prod(size[j] for j in A[v]) * size[v] for v in A}
    while A:
        # the fill is counted only for the nodes of the least table: the same choice as
        # min by (table, fill, v), at a fraction of the cost (this runs once per dropped edge)
        least = min(tab.values())
        v = min((u for u in A if tab[u] == least), key=lambda u: (fill(u), u))
        nb = A.pop(v)
        t = tab.pop(v)
        mx, tot = max(mx, t), tot + t
        for a in nb:
            A[a] |= nb - {a}
            A[a].discard(v)
            tab[a] = math.prod(size[j] for j in A[a]) * size[a]
        order.append(v)
        seps.append(tuple(sorted(nb)))
    return order, seps, mx, tot


def _relaxation(work: Work, cap: float, total: float):
    """Edges to keep so that the elimination fits (weakest edges dropped first):
    (kept edge ids, order, separators). Strength: edges with forbidden pairs
    last, then by their largest entry (all entries are >= 0 once normalized)."""
    nodes = work.nodes()
    size = {i: len(work.strat[i]) for i in nodes}
    kept = set(work.emat)

    def strength(eid):
        m = work.emat[eid]
        f = m[np.isfinite(m)]
        return (0 if np.isfinite(m).all() else 1, float(f.max()) if f.size else 0.0, eid)
    by_strength = sorted(kept, key=strength)
    while True:
        adj = {i: set() for i in nodes}
        for eid in kept:
            u, v = work.ends[eid]
            adj[u].add(v)
            adj[v].add(u)
        order, seps, mx, tot = _order(adj, size)
        if mx <= cap and tot <= total:
            return kept, order, seps
        # drop the weakest edge inside the largest table of this order
        k = max(range(len(order)), key=lambda j: math.prod(size[x] for x in seps[j]) * size[order[j]])
        clique = {order[k], *seps[k]}
        eid = next((e for e in by_strength if e in kept and set(work.ends[e]) <= clique), None)
        if eid is None:
            eid = next((e for e in by_strength if e in kept), None)
            if eid is None:         # no edge left: one node alone is over the cap
                return kept, order, seps
        kept.discard(eid)


def prune(work: Work, p: Pass, ub: float) -> int:
    """Drop every strategy and edge pair whose min-marginal exceeds ub (exact for
    every plan of cost <= ub). Returns how many went."""
    cut = ub + _TOL * max(1.0, abs(ub))
    gone = 0
    for v, mm in p.node_mm.items():
        mask = mm <= cut
        if not mask.all():
            gone += int((~mask).sum())
            work.keep(v, mask, "strategies_min_marginal")
    return gone


def prune_pairs(work: Work, p: Pass, ub: float, before: dict) -> int:
    """Forbid edge pairs whose min-marginal exceeds ub; `before` maps each node to
    its original strategies when the pass ran (the pass indexes those)."""
    cut = ub + _TOL * max(1.0, abs(ub))
    gone = 0
    for eid, mm in p.pair_mm.items():
        if eid not in work.emat:
            continue
        u, v = work.ends[eid]
        ru = np.searchsorted(before[u], work.strat[u])
        rv = np.searchsorted(before[v], work.strat[v])
        bad = (mm[np.ix_(ru, rv)] > cut) & np.isfinite(work.emat[eid])
        if bad.any():
            gone += int(bad.sum())
            work.removed["pairs_min_marginal"] += int(bad.sum())
            work.emat[eid] = np.where(bad, np.inf, work.emat[eid])
            work.dirty.update((u, v))
    return gone


def _memory_rows(work: Work):
    """Binding memory segments of the graph left in work that no other implies:
    (segment ids, their bounds b_k, {node: [(segments a..b, usage above its
    least)]}). Segment k is implied by j when every varying part live at k is
    live at j and b_j <= b_k (as in Work.memory_constraints): pricing k too
    would only weaken the bound (a price on k costs lam_k * b_k >= lam_k * b_j).
    On the two-phase graphs, where only the stored layouts vary, one segment is
    left: the one with the largest fixed usage."""
    if work.limit is None:
        return np.zeros(0, dtype=int), np.zeros(work.nseg), {}
    bvec, maxa, _ = work.mem_state()
    binding = np.flatnonzero(maxa > bvec)
    parts = {i: [(a, b, u - u.min()) for a, b, u in work.parts[i] if u.max() > u.min()] for i in work.nodes()}
    lo = np.zeros(work.nseg, dtype=int)
    hi = np.full(work.nseg, work.nseg)
    for ps in parts.values():
        for a, b, _ in ps:
            lo[a:b] = np.maximum(lo[a:b], a)
            hi[a:b] = np.minimum(hi[a:b], b)
    keep = []
    for k in binding:
        if lo[k] >= hi[k]:       # no varying part live at k: over the limit at least usage
            keep.append(k)
            continue
        j = lo[k] + int(np.argmin(bvec[lo[k]:hi[k]]))
        if (bvec[j], j) >= (bvec[k], k):
            keep.append(k)
    return np.array(keep, dtype=int), bvec, parts


def _priced(work: Work, lam: np.ndarray, parts: dict) -> dict:
    """Node costs plus lam_k times each strategy's usage above its least in segment k."""
    out = {}
    for i in work.nodes():
        c = work.cost[i]
        for a, b, u in parts.get(i, ()):
            w = float(lam[a:b].sum())
            if w:
                c = c + w * u
        out[i] = c
    return out


def _usage(work: Work, parts: dict, plan: dict) -> np.ndarray:
    """Usage above the least of a plan (local positions), per segment."""
    g = np.zeros(work.nseg)
    for i, ps in parts.items():
        for a, b, u in ps:
            g[a:b] += u[plan[i]]
    return g


class _Duals:
    """Multipliers of the dropped edges: each dropped edge (u, v) is its own
    small problem over copies of u and v; lam_u is added to the copy's cost
    and taken from u's cost in the main pass, so any values keep the sum a
    lower bound. Stored by edge ends with the strategies they index, and mapped
    onto what is left when the reductions remove strategies."""

    def __init__(self):
        self.lam: dict = {}

    def get(self, work: Work, ends: tuple) -> tuple:
        u, v = ends
        got = self.lam.get(ends)
        out = []
        for node, k in ((u, 0), (v, 1)):
            if got is None:
                out.append(np.zeros(len(work.strat[node])))
            else:
                lam, strat = got[k]
                out.append(lam[np.searchsorted(strat, work.strat[node])])
        return tuple(out)

    def set(self, work: Work, ends: tuple, lu: np.ndarray, lv: np.ndarray):
        self.lam[ends] = ((lu, work.strat[ends[0]].copy()), (lv, work.strat[ends[1]].copy()))


@dataclass
class Result:
    assignment: list | None
    objective: float
    bound: float
    status: str            # optimal | feasible | infeasible | unknown
    wall_s: float
    stats: dict


def solve(graph, hint=None, until: float = math.inf, cap: float = CAP, total: float | None = None,
          max_iter: int = 200, seed: int = 0, max_cap: float = MAX_CAP, finish=None,
          finish_at: int = FINISH_AT, patience: int | None = None, repair: int = 0) -> Result:
    """Exact optimum of an ilp.StrategyGraph by reductions, min-marginal pruning and
    a final elimination (module docstring). hint: a full assignment (an upper
    bound when it is feasible). until: perf_counter() deadline; past it the best
    plan is returned with its bound as "feasible". Proves what it returns as
    "optimal" (the bound meets the plan's cost to 1e-9) and never returns a plan
    that is forbidden or over the memory limit.

    finish(work, best): an exact solver of the graph left in `work` (memory
    included), called when a memory limit binds, at most `finish_at`
    strategies are left and two passes in a row kept every edge (or raised the
    bound by less than 1% of the gap), and again, should it not prove, once
    the pruning has halved the strategies it was given (ilp.solve_work:
    CP-SAT closes the duality gap of the memory prices, which no multiplier
    can). The graph left holds every plan of cost at most the best one, so
    its optimum is the optimum. Returns (status, full assignment or None,
    bound). patience: give up (status "feasible") after that many passes in
    a row that raise the bound by less than 1e-4 of the gap (a caller with a
    slower fallback). repair: iterations of local_search (descent.py) started from
    every pass's plan, which often does not fit (0: none): a plan that fits
    near the relaxation's optimum lowers the upper bound, so the pruning cuts
    more per pass (PaLM 540B at 8 layers: the optimum turns up at pass 12
    instead of in the finish; 14 passes instead of 20)."""
    from . import ilp
    from .reduce import local_search
    t0 = time.perf_counter()
    total = 10 * cap if total is None else total
    stats: dict = {"iterations": 0, "pruned_strategies": 0, "pruned_pairs": 0}
    best, ub, lb = None, math.inf, -math.inf

    def result(status):
        obj = ub if best is not None else math.inf
        bound = obj if status == "optimal" else (math.inf if status == "infeasible" else min(lb, obj))
        return Result(best, obj, bound, status, time.perf_counter() - t0, stats)

    def consider(full) -> bool:
        nonlocal best, ub
        if full is not None and ilp._feasible(graph, full):
            obj = ilp.evaluate(graph, full)
            if obj < ub:
                best, ub = list(full), obj
                return True
        return False

    try:
        work = Work(graph.node_costs, graph.node_usages, graph.intervals, graph.edges, graph.edge_costs,
                    graph.usage_limit)
        work.run()
    except Infeasible:
        return result("infeasible")
    stats["reduced"] = work.counts()
    if hint is not None:
        consider(list(hint))
    try:
        start = local_search(work, {i: hint[i] for i in work.nodes()} if hint is not None else None,
                             iters=100, seed=seed)
    except Infeasible:
        start = None
    if start is not None:
        consider(work.reconstruct(start))
    lam = np.zeros(work.nseg)
    duals = _Duals()
    theta, stall, flat, exact_passes, slow = 1.0, 0, 0, 0, 0
    omega = STAR_DAMPING
    best_mult = (lam.copy(), {})
    sides: dict = {}          # one priced segment: its last pass above (+1) and below (-1) the limit
    for it in range(max_iter):
        if not work.nodes():
            consider(work.reconstruct({}))
            return result("optimal" if best is not None else "infeasible")
        if time.perf_counter() > until:
            break
        stats["iterations"] = it + 1
        binding, bvec, parts = _memory_rows(work)
        lam[np.setdiff1d(np.arange(work.nseg), binding)] = 0.0
        cost = _priced(work, lam, parts)
        relax = _relaxation(work, cap, total)
        kept = relax[0]
        dropped = [e for e in work.emat if e not in kept]
        side, ends = {}, {}          # dropped edge -> (priced matrix, lam_u, lam_v), its ends
        for e in dropped:
            u, v = ends[e] = work.ends[e]
            lu, lv = duals.get(work, (u, v))
            cost[u] = cost[u] - lu
            cost[v] = cost[v] - lv
            side[e] = (work.emat[e] + lu[:, None] + lv[None, :], lu, lv)
        p = junction_pass(work, cost, relax)
        stats["dropped_edges"] = max(stats.get("dropped_edges", 0), len(dropped))
        before = {i: work.strat[i].copy() for i in work.nodes()}
        mins = {e: float(m.min()) for e, (m, _, _) in side.items()}
        on = np.zeros(work.nseg, bool)
        on[binding] = True
        shift = sum(mins.values()) - float(lam[on] @ bvec[on])
        low = p.bound + shift
        stats.setdefault("bounds", []).append(low)
        improved, lb_before = low > lb, lb
        lb = max(lb, low)
        consider(work.reconstruct({i: int(work.strat[i][s]) for i, s in p.plan.items()}))
        if repair:      # the pass's plan, moved to a plan that fits and descended: a better upper bound
            try:
                fixed = local_search(work, {i: int(work.strat[i][s]) for i, s in p.plan.items()},
                                     iters=repair, seed=seed)
            except Infeasible:
                fixed = None
            if fixed is not None and consider(work.reconstruct(fixed)):
                stats["repaired"] = stats.get("repaired", 0) + 1
        if best is not None and lb >= ub - _TOL * max(1.0, abs(ub)):
            return result("optimal")
        if not dropped and not len(binding):
            # an exact pass: its plan is the optimum of what is left (which holds every
            # plan at most the best cost), so only an infinite bound gets here
            return result("optimal" if best is not None else "infeasible") if not math.isfinite(low) \
                else result("feasible" if best is not None else "unknown")
        if math.isfinite(ub):
            _prune_all(work, p, side, ends, mins, shift, ub, before, stats)
            try:
                work.run()
            except Infeasible:      # nothing at most ub is left but the best plan: rounding
                break
        exact_passes = 0 if dropped else exact_passes + 1
        left_now = work.counts()["strategies"]
        if finish is not None and (exact_passes >= 2 or slow >= 2) and left_now <= finish_at:
            t1 = time.perf_counter()
            status, full, bound = finish(work, best)
            stats.setdefault("finishes", []).append({"status": status, "wall_s": time.perf_counter() - t1,
                                                     **work.counts()})
            stats["finish"] = stats["finishes"][-1]
            consider(full)
            if status == "optimal" and best is not None:
                return result("optimal")
            lb = max(lb, bound)
            # not proved: again once the pruning has halved what is left (Llama 70B prefill on
            # tpu-v4 4x4x4: 1223 strategies unproved in 10 s, then 50 left after 8 more passes)
            finish_at = left_now // 2
        # subgradient step (Polyak) on the edge and the memory multipliers
        gap = (ub - low) if math.isfinite(ub) else max(abs(low), 1.0) * 0.01
        stall = 0 if improved else stall + 1
        restored = False
        if improved:
            best_mult = (lam.copy(), dict(duals.lam))
        elif stall >= 3:       # back to the best multipliers, with shorter steps from there
            theta, omega, stall, restored = theta / 2, omega / 2, 0, True
            lam, duals.lam = best_mult[0].copy(), dict(best_mult[1])
        flat = 0 if improved and low > lb_before + 1e-4 * gap else flat + 1
        slow = 0 if improved and low > lb_before + 1e-2 * gap else slow + 1
        if patience is not None and flat >= patience:
            stats["gave_up"] = it + 1
            break
        if flat >= 6 and dropped and cap < max_cap:      # the relaxation is too weak: keep more edges
            cap, total, flat, theta = min(4 * cap, max_cap), 4 * total, 0, 1.0
            stats["cap"] = cap
        if not restored:      # (a star update starts from this pass's multipliers, not the best ones)
            _star_updates(side, ends, p, before, duals, omega)
        if len(binding):
            g = (_usage(work, parts, p.plan) - bvec)[binding]
            if len(binding) == 1 and g[0] != 0:
                sides = {k: v for k, v in sides.items() if v[3] == binding[0]}
                sides[1 if g[0] > 0 else -1] = (float(lam[binding[0]]), low, float(g[0]), binding[0])
            if len(sides) == 2:
                lam[binding[0]] = _crossing(sides[1], sides[-1])
            elif g @ g > 0:
                lam[binding] = np.maximum(0.0, lam[binding] + theta * gap / float(g @ g) * g)
    return result("feasible" if best is not None else "unknown")


def _crossing(over: tuple, under: tuple) -> float:
    """The price of one memory segment where the bound's supporting lines of a
    pass over the limit and one under it cross (the dual function is concave
    and piecewise linear in the price: its maximum lies between them), kept a
    tenth of the bracket inside it (a safeguarded secant step). A price only
    steers the search; any price gives a valid bound."""
    la, qa, ga, _ = over
    lb, qb, gb, _ = under
    lam = (qb - qa + ga * la - gb * lb) / (ga - gb)
    lo, hi = min(la, lb), max(la, lb)
    keep = 0.1 * (hi - lo)      # safeguard: the lines come from passes with other edge multipliers
    return float(min(max(lam, lo + keep), hi - keep)) if math.isfinite(lam) else 0.5 * (lo + hi)


def _star_updates(side: dict, ends: dict, p: Pass, before: dict, duals: _Duals, omega: float = STAR_DAMPING):
    """New multipliers of the dropped edges: at each end u, the main pass's
    min-marginal M_u and the side problems' S_e (their minima given u) are
    shared out evenly, B = M_u + sum_e S_e split into len + 1 equal parts.
    That is the best bound over u's multipliers alone (the min-marginals move
    one for one with them); done at every end at once it can overshoot, so each
    moves omega of the way. Any multipliers give a valid bound (only the speed
    depends on them): on the PaLM 540B two-phase graphs this climbs in 5-6
    passes where the subgradient steps took 15-17."""
    at: dict = {}
    for e in side:
        u, v = ends[e]
        at.setdefault(u, []).append((e, 0))
        at.setdefault(v, []).append((e, 1))
    new = {e: [side[e][1].copy(), side[e][2].copy()] for e in side}
    for x, lst in at.items():
        mm = p.node_mm[x]
        fin = np.isfinite(mm)
        if not fin.any():
            continue
        total = np.where(fin, mm - mm[fin].min(), 0.0)
        mins = []
        for e, k in lst:
            s = side[e][0].min(axis=1 - k)
            ok = np.isfinite(s)
            s = np.where(ok, s - (s[ok].min() if ok.any() else 0.0), 0.0)
            fin &= ok
            mins.append(s)
            total = total + s
        share = total / (len(lst) + 1)
        for (e, k), s in zip(lst, mins):
            new[e][k] = new[e][k] + omega * np.where(fin, share - s, 0.0)
    for e in side:
        u, v = ends[e]
        duals.lam[(u, v)] = ((new[e][0], before[u]), (new[e][1], before[v]))


def _prune_all(work, p: Pass, side: dict, ends: dict, mins: dict, shift: float, ub: float, before: dict, stats: dict):
    """Prune by the lower bounds of one pass plus its side problems (the dropped
    edges): a strategy's bound is the main pass's min-marginal plus, for each
    side problem, its min-marginal when it holds the node or else its minimum."""
    node_lb = {i: mm + shift for i, mm in p.node_mm.items()}
    side_mm = {}
    for e, (m, _, _) in side.items():
        u, v = ends[e]
        side_mm[e] = (m.min(axis=1) - mins[e], m.min(axis=0) - mins[e])
        node_lb[u] = node_lb[u] + side_mm[e][0]
        node_lb[v] = node_lb[v] + side_mm[e][1]
    extra = {i: 0.0 for i in node_lb}
    for e in side:
        u, v = ends[e]
        extra[u] = extra[u] + side_mm[e][0]
        extra[v] = extra[v] + side_mm[e][1]
    pair_lb = {}
    for e, mm in p.pair_mm.items():
        u, v = work.ends[e]
        pair_lb[e] = mm + shift + np.reshape(extra[u], (-1, 1)) + np.reshape(extra[v], (1, -1))
    for e, (m, _, _) in side.items():
        u, v = ends[e]
        a = node_lb[u] - side_mm[e][0]       # everything but this side problem, u fixed
        b = node_lb[v] - side_mm[e][1]
        pair_lb[e] = m - mins[e] + np.maximum(a[:, None], b[None, :])
    fake = Pass(0.0, {}, node_lb, pair_lb, 0)
    stats["pruned_strategies"] += prune(work, fake, ub)
    stats["pruned_pairs"] += prune_pairs(work, fake, ub, before)
