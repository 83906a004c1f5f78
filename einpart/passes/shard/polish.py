"""Local search over a two-phase plan: one-node changes on the exact joint graph.

Why: solve_plan pins every stored layout (weights, KV cache) to what one phase
alone chose and re-solves the joint problem with them pinned. A weight whose
best layout for prefill plus decode together is neither phase's own choice is
missed that way (on PaLM 540B, tpu-v4 4x4x4: wq at d@z h@y instead of
d@z h@(y,x) saves 9.6 ms of 12.552 s). The joint graph with the weights free
is too hard to prove in the time allowed, but changing one node at a time on
it, everything else as planned, is cheap and exact in its own terms: the
change in objective is the node's own cost difference plus the differences on
its edges, and a change is taken only when the whole plan still fits in
memory (planner.plan_memory).

The search runs on the exact graph (every reduce-scatter variant its own
choice, fold=False), so its objective and memory are the plan's own; it is
first-improvement coordinate descent, best alternative per node, in node
order, until a sweep changes nothing or the time is spent.
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import ilp
from .cost import FORBIDDEN


def _choice_key(n, c: int, built=None, i: int | None = None, assign=None):
    """What a choice of node n means, independent of the graph it was built in."""
    if n.kind != "stmt":
        return ("layout", n.layouts[c])
    if built is not None:
        st, var = built.variant(i, assign)
    else:
        st, var = n.choice(c)
    return ("split", tuple(sorted(st.split.items())), var.out, var.reduce_s)


def map_assignment(src, assign: list, dst) -> list | None:
    """The assignment of Built `src` as an assignment of Built `dst` (same graph,
    same phases, maybe other pins or folding); None when some choice has no
    counterpart in dst."""
    out = []
    for j, n in enumerate(dst.nodes):
        i = src.by_label.get(n.label)
        if i is None or src.nodes[i].label != n.label:
            return None
        want = _choice_key(src.nodes[i], assign[i], src, i, assign)
        hit = -1
        for c in range(len(n.cost)):
            if n.cost[c] < FORBIDDEN and _choice_key(n, c) == want:
                hit = c
                break
        if hit < 0:
            return None
        out.append(hit)
    return out


def descend(built, assign: list, memory_of, limit: float | None, until: float,
            max_sweeps: int = 20) -> tuple[list, int]:
    """Coordinate descent from `assign` on built.sg (see the module docstring).
    Returns (assignment, number of changes taken)."""
    sg = built.sg
    n = len(sg.node_costs)
    adj: list[list] = [[] for _ in range(n)]
    for (u, v), m in zip(sg.edges, sg.edge_costs):
        adj[u].append((v, m, True))
        adj[v].append((u, m, False))
    x = list(assign)
    moves = 0
    for _ in range(max_sweeps):
        changed = False
        for i in range(n):
            if time.perf_counter() > until:
                return x, moves
            tot = np.array(sg.node_costs[i], dtype=float)
            for j, m, out in adj[i]:
                tot = tot + (m[:, x[j]] if out else m[x[j], :])
            cur = tot[x[i]]
            order = np.argsort(tot, kind="stable")
            for c in order:
                if not tot[c] < cur - 1e-12 * max(1.0, abs(cur)) or tot[c] >= FORBIDDEN:
                    break
                y = list(x)
                y[i] = int(c)
                if limit is None or memory_of(built, y) <= limit:
                    x, changed, moves = y, True, moves + 1
                    break
        if not changed:
            break
    return x, moves


def polish(solved, exact, memory_of, limit: float | None, until: float):
    """(assignment, objective, changes) of the descent from solved's plan on the
    exact joint graph `exact` (planner.Built); None when the plan cannot be
    mapped or nothing improves."""
    start = map_assignment(solved.built, solved.solution.assignment, exact)
    if start is None:
        return None
    before = ilp.evaluate(exact.sg, start)
    if not math.isfinite(before):
        return None
    x, moves = descend(exact, start, memory_of, limit, until)
    after = ilp.evaluate(exact.sg, x)
    if moves == 0 or not after < before:
        return None
    return x, after, moves
