"""Memory-respecting block coordinate descent on the graph left in a
``reduce.Work`` (start solutions and repairs for ``ilp.py``; the descent step
of the iterated local search in ``lns.py``).

``Descent(work)`` builds the move tables once (neighbour matrices, the memory
constraints and their coefficients, flat cost arrays for vectorised scoring);
``Descent.run`` may then be called many times on the same graph.  Why: the
iterated local search calls the descent after every kick, and rebuilding the
memory constraints and coefficient arrays was more than half of each call
(about 55 of 94 ms on the reduced IOPDDL V).  ``local_search`` is the one-shot
form.

Memory prices.  A move whose DP breaks a memory constraint raises that
constraint's price ``lam`` (doubling from a floor) and retries.  The floor and
a cap are set relative to a finite cost scale: the current cost, or, while the
current assignment still uses a forbidden pair (cost inf, as after a random
kick), the sum of the largest finite node and edge costs.  Without that the
prices became inf, then NaN (0 * inf), and such a start never recovered.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["Descent", "local_search"]

_PRICE_FLOOR = 1e-3   # first price of a broken constraint: this share of the cost scale per full range
_PRICE_CAP = 1e6      # prices never exceed this many cost scales per full range


class Descent:
    """Move tables of the graph left in ``work`` (which must not change while
    this object is used)."""

    def __init__(self, work):
        self.work = work
        nodes = self.nodes = work.nodes()
        pos = self.pos = {i: p for p, i in enumerate(nodes)}
        P = self.P = len(nodes)
        self.cost = [work.cost[i] for i in nodes]
        self.nbr = [dict() for _ in range(P)]
        eu, ev, eoff, ecols, flat = [], [], [], [], []
        off = 0
        for eid, (u, v) in work.ends.items():
            m = work.emat[eid]
            self.nbr[pos[u]][pos[v]] = m
            self.nbr[pos[v]][pos[u]] = m.T
            eu.append(pos[u])
            ev.append(pos[v])
            eoff.append(off)
            ecols.append(m.shape[1])
            flat.append(m.ravel())
            off += m.size
        self.eu, self.ev = np.array(eu, dtype=np.int64), np.array(ev, dtype=np.int64)
        self.eoff, self.ecols = np.array(eoff, dtype=np.int64), np.array(ecols, dtype=np.int64)
        self.eflat = np.concatenate(flat) if flat else np.zeros(0)
        sizes = [len(c) for c in self.cost]
        self.noff = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if P else np.zeros(0, np.int64)
        self.nflat = np.concatenate(self.cost) if P else np.zeros(0)
        cons, _ = work.memory_constraints()
        nc = self.nc = len(cons)
        self.bvec = np.array([b for _, b in cons], dtype=np.float64)
        self.coef = [np.zeros((len(c), nc)) for c in self.cost]  # usage of each strategy per constraint
        for c, (terms, _) in enumerate(cons):
            for i, a in terms.items():
                self.coef[pos[i]][:, c] = a
        self.cflat = np.concatenate(self.coef) if P else np.zeros((0, nc))
        top = self.cflat.max(axis=0) if P and nc else np.zeros(nc)
        self.scale = np.where(top > 0, top, 1.0)
        fin = lambda a: float(a[np.isfinite(a)].max(initial=0.0)) if a.size else 0.0   # noqa: E731
        self.fallback = max(1.0, sum(abs(fin(c)) for c in self.cost)
                            + sum(abs(fin(work.emat[e])) for e in work.ends))

    def score(self, xx):
        """(memory overflow, cost) of positions ``xx``."""
        total = float(self.nflat[self.noff + xx].sum())
        if len(self.eu):
            total += float(self.eflat[self.eoff + xx[self.eu] * self.ecols + xx[self.ev]].sum())
        over = 0.0
        if self.nc:
            used = self.cflat[self.noff + xx].sum(axis=0)
            over = float(np.maximum(used - self.bvec, 0.0).sum())
        return over, total

    def violated(self, xx):
        return self.cflat[self.noff + xx].sum(axis=0) > self.bvec

    def run(self, start=None, t_cap=None, iters=400, seed=0, max_stall=60, region=None):
        """See ``local_search``.  ``region`` (alive nodes of the work): only
        these nodes move (the forests are drawn from them); the others keep
        their strategies from ``start``, which must then be complete."""
        t0 = time.perf_counter()
        nodes, P, cost, nbr, coef, nc = self.nodes, self.P, self.cost, self.nbr, self.coef, self.nc
        work = self.work
        if not nodes:
            return {}
        rng = np.random.default_rng(seed)
        lam = np.zeros(nc)
        x = np.full(P, -1)

        def unary(p, ins):
            u = cost[p].copy()
            for q, m in nbr[p].items():
                if not ins[q]:
                    u += m[:, x[q]] if x[q] >= 0 else m.min(axis=1)
            if nc:
                u += coef[p] @ lam
            return u

        def forest(order):
            ins = np.zeros(P, bool)
            parent = list(range(P))

            def find(a):
                while parent[a] != a:
                    parent[a] = parent[parent[a]]
                    a = parent[a]
                return a
            for p in order:
                roots = [find(q) for q in nbr[p] if ins[q]]
                if len(roots) != len(set(roots)):
                    continue
                ins[p] = True
                for r in roots:
                    parent[r] = p
            trees, seen = [], np.zeros(P, bool)
            for r in order:
                if ins[r] and not seen[r]:
                    seen[r] = True
                    tree, k = [(r, -1)], 0
                    while k < len(tree):
                        p = tree[k][0]
                        k += 1
                        for q in nbr[p]:
                            if ins[q] and not seen[q]:
                                seen[q] = True
                                tree.append((q, p))
                    trees.append(tree)
            return ins, trees

        def dp(ins, trees):
            xx = x.copy()
            for tree in trees:
                u = {p: unary(p, ins) for p, _ in tree}
                arg = {}
                for p, par in reversed(tree[1:]):
                    t = nbr[par][p] + u[p][None, :]
                    a = np.argmin(t, axis=1)
                    arg[p] = a
                    u[par] = u[par] + t[np.arange(len(a)), a]
                r = tree[0][0]
                if not np.isfinite(u[r]).any():
                    return None
                xx[r] = int(np.argmin(u[r]))
                for p, par in tree[1:]:
                    xx[p] = arg[p][xx[par]]
            return xx

        if start is not None:
            for p, i in enumerate(nodes):
                s = np.searchsorted(work.strat[i], start.get(i, -1))
                if s < len(work.strat[i]) and work.strat[i][s] == start.get(i, -1):
                    x[p] = s
        ins, trees = forest(sorted(range(P), key=lambda p: -len(nbr[p])))
        if (x < 0).any():
            ins = ins & (x < 0)
            _, trees = forest([p for p in sorted(range(P), key=lambda p: -len(nbr[p])) if x[p] < 0])
            xx = dp(ins, trees)
            if xx is not None:
                x = xx
        for p in range(P):  # whatever the forest missed: cheapest given the rest
            if x[p] < 0:
                x[p] = int(np.argmin(unary(p, np.zeros(P, bool))))
        cur = self.score(x)
        stall = 0
        movable = np.arange(P) if region is None else np.array(sorted(self.pos[i] for i in region), dtype=np.int64)
        for it in range(iters):
            if t_cap is not None and time.perf_counter() - t0 > t_cap:
                break
            ins, trees = forest(rng.permutation(movable))
            improved = False
            for attempt in range(6):
                xx = dp(ins, trees)
                if xx is None:
                    break
                new = self.score(xx)
                tol = 1e-9 * abs(cur[1]) if np.isfinite(cur[1]) else 0.0
                if new[0] < cur[0] - 1e-9 or (new[0] <= cur[0] + 1e-9 and new[1] < cur[1] - tol):
                    x, cur, improved = xx, new, True
                    break
                if new[0] <= 1e-9 or not nc:
                    break
                bad = self.violated(xx)
                ref = abs(cur[1]) if np.isfinite(cur[1]) else self.fallback
                lam[bad] = np.minimum(np.maximum(2 * lam[bad], ref / (nc * self.scale[bad]) * _PRICE_FLOOR),
                                      ref / self.scale[bad] * _PRICE_CAP)
            lam *= 0.9
            stall = 0 if improved else stall + 1
            if stall > max_stall:
                break
        if cur[0] > 1e-9 or not np.isfinite(cur[1]):
            return None
        return {i: int(work.strat[i][x[p]]) for p, i in enumerate(nodes)}


def local_search(work, start=None, t_cap=None, iters=400, seed=0, max_stall=60):
    """Block coordinate descent on the graph left in ``work``: each move picks a
    random induced forest of the graph, fixes every other node, and re-optimises
    the forest exactly by dynamic programming (so chains and trees of nodes
    switch together; single-node and edge moves are special cases).  Memory
    enters the DP through Lagrangian prices on the constraints it would break,
    raised until the move fits or is given up.  Moves are accepted when they
    lower (memory overflow, cost) lexicographically; forbidden pairs are never
    chosen when avoidable.  Returns {node: original strategy} for a solution
    that is memory feasible and avoids forbidden pairs, or None.  Deterministic
    for a seed unless ``t_cap`` (seconds) stops it early."""
    return Descent(work).run(start, t_cap=t_cap, iters=iters, seed=seed, max_stall=max_stall)
