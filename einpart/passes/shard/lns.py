"""Iterated local search (kick and descend) for the sharding-strategy ILP (see ``ilp.py``).

Why: on memory-bound instances every descent method stops in a deep local
optimum.  IOPDDL V (memory-free optimum 87,814 at 418 MB peak; limit 14.4 MB,
the sum of the smallest usages reaches 13.1 MB) stalls at 1,835,848 under the
block coordinate descent of ``reduce.local_search``, under CP-SAT on the whole
reduced graph (60 s), and under CP-SAT neighbourhoods of up to 120 of its 193
reduced nodes with the rest fixed (each proved optimal for its neighbourhood:
the incumbent is optimal for every such window, so exact re-optimisation of a
part cannot leave it).  What leaves it is a *worse* intermediate step, as in
the contest solvers' simulated annealing: here a kick sets a connected ball of
nodes to random strategies, the descent of ``descent.py`` (its tables built
once per walk) repairs the memory overflow and descends again, moving only the
ball and the nodes within ``hops`` edges of it (the rest of the graph is
already at a local optimum: about 9 ms per kick on the reduced V against 80
ms for a descent over the whole graph), and the result replaces the current solution when it is at
most ``threshold`` above it (threshold accepting); the best one is kept and
the walk returns to it after ``restart`` kicks without a new best.

Every solution handed back comes from the descent, so it respects the
memory limit and avoids forbidden pairs; the caller still checks it on the
original graph.  Deterministic for a seed when ``max_kicks`` bounds the run
(the wall-clock ``until`` is then only a safety cap).
"""
from __future__ import annotations

import time

import numpy as np

from .descent import Descent

__all__ = ["ball", "iterated_local_search"]


def ball(adj, root, size, rng):
    """``size`` nodes (or fewer, if the component is smaller) reached by a
    breadth-first search from ``root``, neighbours in random order."""
    out, seen, k = [root], {root}, 0
    while len(out) < size and k < len(out):
        nbrs = sorted(adj[out[k]])
        for j in (rng.permutation(nbrs) if nbrs else ()):
            j = int(j)
            if j not in seen and len(out) < size:
                seen.add(j)
                out.append(j)
        k += 1
    return out


def iterated_local_search(work, start, objective, *, until, seed=0, kick=(6, 20), threshold=0.03,
                          restart=60, max_kicks=None, stats=None, hops=1):
    """Improve ``start`` ({alive node of ``work``: original strategy}, memory
    feasible) by kicks and descents until ``until`` (perf_counter) or after
    ``max_kicks`` kicks.  ``objective(x)`` prices an assignment of the alive
    nodes (inf when it is not feasible on the original graph).  A kick picks a
    ball of ``kick[0]..kick[1]`` nodes; the descent then moves the ball and
    its ``hops``-neighbourhood (``None``: the whole graph).  Returns (best
    assignment, its cost)."""
    rng = np.random.default_rng(seed)
    nodes = work.nodes()
    descent = Descent(work)   # built once: the graph does not change during the walk
    best, best_obj = dict(start), objective(start)
    cur, cur_obj = best, best_obj
    if not nodes:
        return best, best_obj
    since_best, kicks, log = 0, 0, []
    while (max_kicks is None or kicks < max_kicks) and time.perf_counter() < until:
        kicks += 1
        trial = dict(cur)
        size = int(rng.integers(kick[0], kick[1] + 1))
        kicked = ball(work.adj, nodes[int(rng.integers(len(nodes)))], size, rng)
        for i in kicked:
            trial[i] = int(rng.choice(work.strat[i]))
        region = None
        if hops is not None:
            region = set(kicked)
            for _ in range(hops):
                region |= {j for i in region for j in work.adj[i]}
        y = descent.run(start=trial, iters=30, max_stall=10, seed=seed + kicks, region=region)
        obj = objective(y) if y is not None else np.inf
        if obj < cur_obj * (1 + threshold):
            cur, cur_obj = y, obj
        if obj < best_obj:
            best, best_obj, since_best = y, obj, 0
            log.append((kicks, round(time.perf_counter(), 3), best_obj))
        else:
            since_best += 1
            if since_best >= restart:
                cur, cur_obj, since_best = best, best_obj, 0
    if stats is not None:
        stats["ils"] = {"kicks": kicks, "improvements": len(log), "best": best_obj}
    return best, best_obj
