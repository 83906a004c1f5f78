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

Every plan this module returns is checked by the caller on the original graph.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np

__all__ = ["capped", "slacks", "solve_mip", "mip_search"]


def capped(work, start, extra=None, ub=None):
    """Copy of ``work`` where every node of a binding memory constraint keeps
    only the strategies whose usage in every such constraint is at most
    ``extra[node]`` (default 0) usage levels above that of its strategy in
    ``start`` ({alive node: original strategy}, memory feasible); a level is
    one of the node's distinct usages in that constraint.  The reductions then
    run again (constraints that can no longer be broken stop binding, so their
    nodes become memory-free and can be eliminated), after pruning by the
    bound ``ub`` when given.  ``start`` stays feasible in the copy (if its
    cost is at most ``ub``), and every plan of the copy is one of ``work``."""
    cons, _ = work.memory_constraints()
    extra = extra or {}
    masks = {}
    for terms, _ in cons:
        for i, a in terms.items():
            s = int(np.searchsorted(work.strat[i], start[i]))
            levels = np.unique(a)
            cap = levels[min(int(np.searchsorted(levels, a[s])) + extra.get(i, 0), len(levels) - 1)]
            masks[i] = masks.get(i, True) & (a <= cap)
    wc = copy.deepcopy(work)
    for i, mask in masks.items():
        wc.keep(i, mask, "strategies_capped")
    wc.dirty = set(wc.nodes())
    wc.run()
    if ub is not None and wc.nodes() and wc.prune_by_bound(ub):
        wc.run()
    return wc


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
    for eid, (u, v) in work.ends.items():
        m = work.emat[eid]
        cls_r, rinv = np.unique(m, axis=0, return_inverse=True)
        q, cinv = np.unique(cls_r, axis=1, return_inverse=True)
        rinv, cinv = rinv.ravel(), cinv.ravel()
        a_ix, b_ix = np.nonzero(np.isfinite(q))
        z = ncol + np.arange(len(a_ix))
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
    return np.concatenate(cost), eq, np.concatenate(rhs), mem, np.array(mb), np.concatenate(ub), off


def solve_mip(work, time_limit=10.0):
    """HiGHS (through ``scipy.optimize.milp``) on the pairs formulation of the
    graph left in ``work``, memory constraints included.  Why scipy's
    binding: OR-Tools 9.15's HiGHS (pywraplp, model_builder) crashes on a
    solution hint and reports no solution when the time limit stops a run that
    has one; scipy, a dependency of jax, returns it.  There is no hint either
    way, so HiGHS finds its own first plan.  Returns (status, {alive node:
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
    c, eq, rhs, mem, mb, ub, off = _pairs_model(work)
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


def mip_search(work, start, objective, *, until, step_limit=20.0, max_fails=2, stats=None):
    """Improve ``start`` ({alive node of ``work``: original strategy}, memory
    feasible) by MIP neighbourhoods until ``until`` (perf_counter).

    Schedule: (1) every memory-relevant node capped at its usage in the
    incumbent; (2) the nodes of the ``k`` tightest memory constraints (least
    slack at the incumbent, relative to the constraint's bound) may rise two
    levels, the rest stay capped, for k = 1, 2, 4, ...; ``max_fails`` steps in
    a row without a gain end the search (the rest of the time is the
    caller's).  Why two levels: on IOPDDL V the plan (1) gives (1,727,502) is
    optimal for "every node at most one level up", but weight nodes two levels
    up, paid for by another node one level down, give 1,715,354 (k = 1, 4-7 s)
    and then 1,666,236 (k = 2, 9 s).  ``objective(x)`` prices an assignment of
    ``work``'s alive nodes (inf when infeasible on the original graph).
    Returns (best, its cost)."""
    best, best_obj = dict(start), objective(start)
    log = []
    ncons = len(work.memory_constraints()[0])
    schedule = [0]
    k = 1
    while k < 2 * max(ncons, 1):
        schedule.append(k)
        k *= 2
    step = fails = 0
    while step < len(schedule):
        left = until - time.perf_counter()
        if left < 1.0:
            break
        k = schedule[step]
        extra = {}
        if k:
            sl = slacks(work, best)
            ranked = sorted(range(len(sl)), key=lambda c: sl[c][1] / max(1.0, sl[c][1] + sum(
                float(a[np.searchsorted(work.strat[i], best[i])]) for i, a in sl[c][0].items())))
            extra = {i: 2 for c in ranked[:k] for i in sl[c][0]}
        t = time.perf_counter()
        wc = capped(work, best, extra, ub=best_obj if np.isfinite(best_obj) else None)
        status, sol, _ = solve_mip(wc, min(step_limit, left))
        obj = math.inf
        if sol is not None:
            full = wc.reconstruct(sol)
            y = {i: full[i] for i in work.nodes()}
            obj = objective(y)
        log.append({"tight": k, "free_nodes": len(extra), "status": status, "cost": obj,
                    "wall_s": round(time.perf_counter() - t, 2)})
        if obj < best_obj - 1e-9 * abs(best_obj):
            best, best_obj, fails = y, obj, 0
        else:
            fails += 1
            if fails >= max_fails:
                break              # leave the rest of the time to the caller's CP-SAT
        step += 1
    if stats is not None:
        stats["mip"] = {"steps": log, "best": best_obj}
    return best, best_obj
