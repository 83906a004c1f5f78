"""MIP neighbourhood search for the sharding-strategy ILP (see ``ilp.py``):
the classic marginal ("pairs") formulation solved by HiGHS, a MIP solver with
a strong LP, on the graph left in a ``reduce.Work`` whose memory-relevant
nodes are capped at the usage of the incumbent.

Why.  On IOPDDL V the memory-free graph left by the reductions (139 nodes,
3,705 strategies) has an integral LP: HiGHS's simplex gives its optimum
(777,327) in about 2 s, while CP-SAT, whose LP relaxation of the same model
is far weaker (bound 0.1-0.9M), stops at 1.78M after 30 s.  The memory
limit is what makes the problem hard; capping every node that a binding
memory constraint involves at the usage it has in the incumbent makes every
such constraint hold whatever the capped nodes pick, so the reductions drop
the limit there and the rest is a memory-free problem (again solved by
HiGHS as a MIP to optimality in seconds).  That is a very large neighbourhood:
every node may change, only the memory each one takes is bounded.  From the
1,835,848 plan the ILS stops in, one such step gives 1,727,502 (the optimum
of that neighbourhood, 5-8 s).  The next steps let the nodes of the tightest
memory constraints rise up to two usage levels (their constraints stay in
the MIP, the other nodes stay capped): 1,666,236 (8-20 s on a loaded
machine).  Letting every node rise two levels gives 1,617,084, below the
contest's best known 1,632,051, but takes 34-55 s, so ``mip_search`` does not
do it by default.  From a plan in another basin (2,015,634 or 2,161,752)
the capped neighbourhood holds nothing better and the two-level steps find
little (1,983,594 and 2,112,031 within their 20 s).

The way out of such a basin is the "union" neighbourhood (``mip_search``
step 1b): every memory node may rise to its usage in the memory-free optimum
(87,814 on V, about 4 s), which contains every level but one of the
1,617,084 plan; with the incumbent as HiGHS's start it takes 2,112,031 to
1,823,915 and 2,270,353 to 1,715,389 in 30 s, and 1,790,072 to 1,617,084
(proved optimal for the union) in 26 s.

The union's optimum, where it is not 1,617,084, is a plan CP-SAT gets out of
at once: hinted with 1,764,542 or 1,715,389 (the union optima from the
2.16M and 2.32M basins), CP-SAT on the whole reduced graph (2 workers)
finds 1,617,084 after 2.8 s (2.0 s of it presolve), where from 2.11M,
2.27M, 1.79M or 1.84M it finds nothing or little in 15 s.  Those two plans
differ from 1,617,084 in 10-16 nodes, 2-3 of them memory nodes that must
rise far (node 287 from 0 to its top level, 1 MB): no HiGHS neighbourhood
tried holds them and stays small (union + every level of the nodes whose
memory-free strategy the reductions removed: 3,941-4,078 strategies,
nothing found in 40 s; union + every level the LP relaxation supports:
holds 1,617,084, 1,724,180 in 40 s).  So by default the union step comes
first (directly from the ILS plan: the capped step before it cost 5-8.5 s
and only delayed it: from 2,161,752, 1,764,542 proved in 23.3 s either way)
and, when it gains, ends the search, leaving the time to the caller's CP-SAT.

Every plan this module returns is checked by the caller on the original graph.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np

__all__ = ["capped", "slacks", "solve_mip", "memory_free_plan", "mip_search"]


def capped(work, start, extra=None, ub=None, also=None):
    """Copy of ``work`` where every node of a binding memory constraint keeps
    only the strategies whose usage in every such constraint is at most
    ``extra[node]`` (default 0) usage levels above that of its strategy in
    ``start`` ({alive node: original strategy}, memory feasible); a level is
    one of the node's distinct usages in that constraint.  The reductions then
    run again (constraints that can no longer be broken stop binding, so their
    nodes become memory-free and can be eliminated), after pruning by the
    bound ``ub`` when given.  With ``also`` (another {node: strategy}, e.g.
    the memory-free optimum) a node may moreover rise to its usage there.
    ``start`` stays feasible in the copy (if its cost is at most ``ub``), and
    every plan of the copy is one of ``work``."""
    cons, _ = work.memory_constraints()
    extra = extra or {}
    masks = {}
    for terms, _ in cons:
        for i, a in terms.items():
            s = int(np.searchsorted(work.strat[i], start[i]))
            levels = np.unique(a)
            cap = levels[min(int(np.searchsorted(levels, a[s])) + extra.get(i, 0), len(levels) - 1)]
            if also is not None and i in also:
                t = int(np.searchsorted(work.strat[i], also[i]))
                if t < len(work.strat[i]) and work.strat[i][t] == also[i]:
                    cap = max(cap, a[t])
            masks[i] = masks.get(i, True) & (a <= cap)
    wc = copy.deepcopy(work)
    for i, mask in masks.items():
        wc.keep(i, mask, "strategies_capped")
    wc.dirty = set(wc.nodes())
    wc.run()
    if ub is not None and wc.nodes() and wc.prune_by_bound(ub):
        wc.run()
    return wc


def memory_free_plan(work, time_limit=10.0, free_work=None):
    """The optimum (or HiGHS's best within ``time_limit``) without the memory
    limit, as {alive node of ``work``: original strategy}, or None.
    ``free_work``: a ``Work`` of the same graph built and reduced *without*
    the limit (the caller's; see ``ilp.solve``); without it, ``work`` with
    the limit dropped, whose strategies the memory-aware reductions have
    already thinned.  That matters: on IOPDDL V the former's optimum is
    87,814, the latter's 777,327, and only the union with the former's
    levels holds the good basin (from the 1,790,072 plan of seed 0 it gives
    1,617,084, proved, in 26 s; with the latter, no gain in 30 s).
    Memory-free, the reductions eliminate most of the graph and the pairs LP
    is integral on V (about 4 s)."""
    wf = free_work
    if wf is None:
        wf = copy.deepcopy(work)
        wf.limit, wf.parts, wf.dirty = None, [[] for _ in range(wf.n)], set(wf.nodes())
        wf.run()
    status, sol, _ = solve_mip(wf, time_limit)
    if sol is None:
        return None
    full = wf.reconstruct(sol)
    return {i: full[i] for i in work.nodes()}


def slacks(work, x):
    """[(constraint terms, slack at x)] for the binding memory constraints of
    ``work``, x = {alive node: original strategy}."""
    out = []
    for terms, b in work.memory_constraints()[0]:
        used = sum(float(a[np.searchsorted(work.strat[i], x[i])]) for i, a in terms.items())
        out.append((terms, b - used))
    return out


def _pairs_model(work):
    """The pairs formulation of the graph left in ``work`` as sparse arrays:
    (cost vector, equality matrix and right-hand side, memory rows and
    bounds, node offsets).  Column blocks: one binary per node strategy, then
    one continuous pair variable per finite entry of each edge matrix after
    identical rows (columns) are merged into classes; row blocks: one "exactly
    one strategy" row per node, and per edge one marginal row per row class
    and per column class (sum of the class's pair variables = sum of the
    class's strategy binaries)."""
    import scipy.sparse as sp      # scipy comes with jax (see solve_mip)
    nodes = work.nodes()
    pos = {i: p for p, i in enumerate(nodes)}
    off = np.concatenate([[0], np.cumsum([len(work.strat[i]) for i in nodes])]).astype(np.int64)
    cost = [np.where(np.isfinite(work.cost[i]), work.cost[i], 0.0) for i in nodes]
    ub = [np.isfinite(work.cost[i]).astype(float) for i in nodes]   # forbidden strategies fixed at 0
    rows, cols, vals = [np.repeat(np.arange(len(nodes)), np.diff(off))], [np.arange(off[-1])], [np.ones(off[-1])]
    rhs = [np.ones(len(nodes))]
    r, ncol = len(nodes), int(off[-1])
    pairs = []       # per edge: (u, v, row class of each u strategy, column class of each v strategy, {(a, b): column})
    for eid, (u, v) in work.ends.items():
        m = work.emat[eid]
        cls_r, rinv = np.unique(m, axis=0, return_inverse=True)
        q, cinv = np.unique(cls_r, axis=1, return_inverse=True)
        rinv, cinv = rinv.ravel(), cinv.ravel()
        a_ix, b_ix = np.nonzero(np.isfinite(q))
        z = ncol + np.arange(len(a_ix))
        pairs.append((u, v, rinv, cinv, dict(zip(zip(a_ix.tolist(), b_ix.tolist()), z.tolist()))))
        ncol += len(a_ix)
        cost.append(q[a_ix, b_ix])
        ub.append(np.ones(len(a_ix)))
        for node, inv, ix, nclass in ((pos[u], rinv, a_ix, q.shape[0]), (pos[v], cinv, b_ix, q.shape[1])):
            rows += [r + ix, r + inv]
            cols += [z, off[node] + np.arange(len(inv))]
            vals += [np.ones(len(ix)), -np.ones(len(inv))]
            rhs.append(np.zeros(nclass))
            r += nclass
    eq = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, ncol))
    mrows, mcols, mvals, mb = [], [], [], []
    for k, (terms, b) in enumerate(work.memory_constraints()[0]):
        for i, a in terms.items():
            nz = np.flatnonzero(a > 0)
            mrows.append(np.full(len(nz), k))
            mcols.append(off[pos[i]] + nz)
            mvals.append(a[nz])
        mb.append(b)
    mem = None
    if mb:
        mem = sp.csr_matrix((np.concatenate(mvals), (np.concatenate(mrows), np.concatenate(mcols))),
                            shape=(len(mb), ncol))
    return np.concatenate(cost), eq, np.concatenate(rhs), mem, np.array(mb), np.concatenate(ub), off, pairs


def _hint_vector(work, hint, off, pairs):
    """(column indices, values) of ``hint`` ({original node: original
    strategy}, e.g. a full plan) in the pairs model: the strategy binaries of
    every alive node whose hinted strategy is still in ``work`` (a merged or
    pruned one is left out), and the pair variables where both ends are
    known.  HiGHS completes a partial start (it fixes these and solves the
    rest)."""
    idx, loc = [], {}
    for p, i in enumerate(work.nodes()):
        st = work.strat[i]
        want = hint.get(i, -1) if isinstance(hint, dict) else (hint[i] if i < len(hint) else -1)
        s = int(np.searchsorted(st, want))
        if s < len(st) and st[s] == want:
            loc[i] = s
            idx += [int(off[p]) + t for t in range(len(st))]
    vals = [0.0] * len(idx)
    for p, i in enumerate(work.nodes()):
        if i in loc:
            vals[idx.index(int(off[p]) + loc[i])] = 1.0
    for u, v, rinv, cinv, col in pairs:
        if u in loc and v in loc:
            c = col.get((int(rinv[loc[u]]), int(cinv[loc[v]])))
            if c is not None:
                idx.append(c)
                vals.append(1.0)
    return (np.array(idx, dtype=np.int32), np.array(vals)) if loc else None


def _highs_hinted(c, a, lo, hi, ub, nint, time_limit, x0):
    """HiGHS through scipy's own binding (``scipy.optimize._highspy._core``,
    a private module of scipy >= 1.15) with ``x0`` as the starting solution:
    ``milp`` takes no start, and without one HiGHS spends most of a step
    finding its first plan from a poor basin.  Returns (x or None, optimal?,
    objective) or None when the binding is missing."""
    try:
        from scipy.optimize._highspy import _core as h
    except ImportError:
        return None
    import scipy.sparse as sp
    a = sp.csc_matrix(a)
    lp = h.HighsLp()
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = a.shape[1], a.shape[0]
    lp.a_matrix_.format_ = h.MatrixFormat.kColwise
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = c, np.zeros(len(c)), ub
    lp.row_lower_, lp.row_upper_ = lo, hi
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    lp.integrality_ = [h.HighsVarType.kInteger] * nint + [h.HighsVarType.kContinuous] * (len(c) - nint)
    hs = h._Highs()
    hs.setOptionValue("output_flag", False)
    hs.setOptionValue("time_limit", max(float(time_limit), 0.05))
    hs.setOptionValue("threads", 1)
    if hs.passModel(lp) == h.HighsStatus.kError:
        return None
    if x0 is not None:
        hs.setSolution(len(x0[0]), x0[0], x0[1])
    hs.run()
    status = hs.getModelStatus()
    info = hs.getInfo()
    if not math.isfinite(info.objective_function_value) or abs(info.objective_function_value) >= h.kHighsInf:
        return None, False, math.inf
    return np.array(hs.getSolution().col_value), status == h.HighsModelStatus.kOptimal, info.objective_function_value


def solve_mip(work, time_limit=10.0, hint=None):
    """HiGHS (through ``scipy.optimize.milp``) on the pairs formulation of the
    graph left in ``work``, memory constraints included.  Why scipy's
    binding: OR-Tools 9.15's HiGHS (pywraplp, model_builder) crashes on a
    solution hint and reports no solution when the time limit stops a run that
    has one; scipy, a dependency of jax, returns it.  With ``hint`` (a plan,
    {node: strategy} or a full list) HiGHS starts from it through scipy's own
    binding (``_highs_hinted``); without one, or without that binding,
    through ``milp``, and HiGHS finds its own first plan.  Returns (status, {alive node:
    original strategy} or None, objective + ``work.const`` or inf); status is
    "optimal", "feasible" (time limit, a plan found) or "unknown"."""
    nodes = work.nodes()
    if not nodes:
        return "optimal", {}, work.const
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
        import scipy.sparse  # noqa: F401
    except ImportError:       # scipy comes with jax; without it this step is skipped
        return "unknown", None, math.inf
    c, eq, rhs, mem, mb, ub, off, pairs = _pairs_model(work)
    x0 = _hint_vector(work, hint, off, pairs) if hint is not None else None
    if x0 is not None:
        import scipy.sparse as sp
        a = sp.vstack([eq] + ([mem] if mem is not None else []))
        lo = np.concatenate([rhs] + ([np.full(len(mb), -np.inf)] if mem is not None else []))
        hi = np.concatenate([rhs] + ([mb] if mem is not None else []))
        try:
            got = _highs_hinted(c, a, lo, hi, ub, int(off[-1]), time_limit, x0)
        except (AttributeError, TypeError):     # a private binding of another shape: milp instead
            got = None
        if got is not None:
            x, opt, fun = got
            if x is None:
                return "unknown", None, math.inf
            out = {i: int(work.strat[i][int(np.argmax(x[off[p]:off[p + 1]]))]) for p, i in enumerate(nodes)}
            return ("optimal" if opt else "feasible"), out, float(fun) + work.const
    cons = [LinearConstraint(eq, rhs, rhs)]
    if mem is not None:
        cons.append(LinearConstraint(mem, -np.inf, mb))
    integrality = np.zeros(len(c))
    integrality[:off[-1]] = 1
    res = milp(c, constraints=cons, integrality=integrality, bounds=Bounds(0, ub),
               options={"time_limit": max(float(time_limit), 0.05), "disp": False})
    if res.x is None:
        return "unknown", None, math.inf
    x = res.x
    out = {i: int(work.strat[i][int(np.argmax(x[off[p]:off[p + 1]]))]) for p, i in enumerate(nodes)}
    return ("optimal" if res.status == 0 else "feasible"), out, float(res.fun) + work.const


def mip_search(work, start, objective, *, until, step_limit=20.0, capped_limit=8.0, union_limit=30.0,
               max_fails=2, free_work=None, stats=None, union_first=True):
    """Improve ``start`` ({alive node of ``work``: original strategy}, memory
    feasible) by MIP neighbourhoods until ``until`` (perf_counter).  Every
    step gives HiGHS the incumbent as its start (``solve_mip``'s hint).

    Schedule: (1b) "union": every memory-relevant node may take any usage up
    to the larger of its usage in the incumbent and in the memory-free
    optimum (``memory_free_plan``), the constraints that can still break stay
    in the MIP; with ``union_first`` (the default) it comes first and, when
    it gains, the search ends there (see the module docstring: its plan is
    the start from which the caller's CP-SAT finds the rest); (1) every
    memory-relevant node capped at its usage in the incumbent (before (1b)
    when not ``union_first``); (2) the nodes of the ``k`` tightest memory constraints (least slack at the
    incumbent, relative to the constraint's bound) may rise two levels, the
    rest stay capped, for k = 1, 2, 4, ...; ``max_fails`` steps in a row
    without a gain end the search (the rest of the time is the caller's).
    Step (1) gets at most ``capped_limit`` s, (1b) ``union_limit``, the
    others ``step_limit``; (1b) does not count as a failure.  (Without
    ``union_first``, (1) came first as a better start for HiGHS in (1b): from
    the 2,161,752 plan of seed 1, (1b) found nothing in 30 s, twice, on a
    loaded machine; measured again on a quieter one, (1b) from that plan
    proves 1,764,542 in 23.3 s, as it does from the 2,112,031 plan (1) gives
    after 8.5 s.)

    Why (1b): the soft-memory rounds end in a basin that (1) and (2) cannot
    leave when the start leaves memory unused at the tight steps: on IOPDDL V
    seeds 1 and 3 end at 2.11M and 2.27M with 0.36-0.86 MB free there, and
    the good plan (1.62M) differs from them in 14-19 memory nodes' levels,
    some 3-5 levels up (node 83 in every constraint, node 287); every one of
    those levels but one is at most that of the incumbent or of the
    memory-free optimum, so (1b) contains that basin (from 2,112,031 HiGHS
    finds 1,823,915 in 30 s).  Why two levels in (2): the plan (1) gives
    from 1,835,848 (1,727,502) is optimal for "every node at most one level
    up", but weight nodes two levels up, paid for by another node one level
    down, give 1,715,354 (k = 1) and then 1,666,236 (k = 2).
    ``objective(x)`` prices an assignment of ``work``'s alive nodes (inf when
    infeasible on the original graph).  Returns (best, its cost)."""
    best, best_obj = dict(start), objective(start)
    log = []
    ncons = len(work.memory_constraints()[0])
    schedule = [0]
    k = 1
    while k < 2 * max(ncons, 1):
        schedule.append(k)
        k *= 2
    free = None
    if ncons and until - time.perf_counter() > 2.0:
        t = time.perf_counter()
        free = memory_free_plan(work, min(step_limit, until - t), free_work)
        log.append({"memory_free": free is not None, "wall_s": round(time.perf_counter() - t, 2)})
        if free is not None:
            # priced only when every strategy is still in work; if it fits, it is optimal
            obj = objective(free) if all(np.isin(free[i], work.strat[i]) for i in free) else math.inf
            if obj < best_obj:
                best, best_obj, free = free, obj, None
            else:
                schedule.insert(0 if union_first else 1, "union")
    step = fails = 0
    while step < len(schedule):
        left = until - time.perf_counter()
        if left < 1.0:
            break
        k = schedule[step]
        extra, also, limit = {}, None, step_limit if k else capped_limit
        if k == "union":
            also, limit = free, union_limit
        elif k:
            sl = slacks(work, best)
            ranked = sorted(range(len(sl)), key=lambda c: sl[c][1] / max(1.0, sl[c][1] + sum(
                float(a[np.searchsorted(work.strat[i], best[i])]) for i, a in sl[c][0].items())))
            extra = {i: 2 for c in ranked[:k] for i in sl[c][0]}
        t = time.perf_counter()
        wc = capped(work, best, extra, ub=best_obj if np.isfinite(best_obj) else None, also=also)
        status, sol, _ = solve_mip(wc, min(limit, left), hint=best)
        obj = math.inf
        if sol is not None:
            full = wc.reconstruct(sol)
            y = {i: full[i] for i in work.nodes()}
            obj = objective(y)
        log.append({"tight": k, "free_nodes": len(extra), "status": status, "cost": obj,
                    "wall_s": round(time.perf_counter() - t, 2)})
        if obj < best_obj - 1e-9 * abs(best_obj):
            best, best_obj, fails = y, obj, 0
            if k == "union" and union_first:
                break              # its plan is CP-SAT's start: the caller's CP-SAT gets the rest
        elif k != "union":
            fails += 1
            if fails >= max_fails:
                break              # leave the rest of the time to the caller's CP-SAT
        step += 1
    if stats is not None:
        stats["mip"] = {"steps": log, "best": best_obj}
    return best, best_obj
