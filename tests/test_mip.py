"""MIP neighbourhood search (einpart/passes/shard/mip.py): caps, exact MIP, search."""
import itertools
import time

import numpy as np

from einpart.passes.shard.ilp import StrategyGraph, _feasible, evaluate, peak_usage
from einpart.passes.shard.mip import capped, mip_search, solve_mip
from einpart.passes.shard.reduce import Work

_KEEP_ALL = {"dominance", "leaf_pareto", "merge", "eliminate"}   # every node stays alive in the base work


def _graph(seed, n=7, k=3, limit=18.0):
    """A ring with a chord, some forbidden pairs, and overlapping liveness under a memory limit."""
    rng = np.random.default_rng(seed)
    edges = [(i, i + 1) for i in range(n - 1)] + [(0, n - 1), (1, 4)]
    mats = []
    for _ in edges:
        m = rng.integers(0, 30, (k, k)).astype(float)
        m[rng.random((k, k)) < 0.2] = 1e15
        mats.append(m)
    return StrategyGraph([rng.integers(0, 20, k).astype(float) for _ in range(n)],
                         [rng.integers(1, 10, k).astype(float) for _ in range(n)],
                         [(i, i + 3) for i in range(n)], edges, mats, usage_limit=limit)


def _plans(g):
    return [list(x) for x in itertools.product(*[range(len(c)) for c in g.node_costs]) if _feasible(g, list(x))]


def _work(g):
    w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, g.usage_limit, skip=_KEEP_ALL)
    w.run()
    return w


def _within_caps(w, start, x):
    """x uses, in every binding constraint of w, no more memory per node than start."""
    for terms, _ in w.memory_constraints()[0]:
        for i, a in terms.items():
            if a[np.searchsorted(w.strat[i], x[i])] > a[np.searchsorted(w.strat[i], start[i])]:
                return False
    return True


def test_solve_mip_matches_brute_force_with_memory():
    checked = 0
    for seed in range(6):
        g = _graph(seed)
        plans = _plans(g)
        if not plans:
            continue
        w = _work(g)
        assert w.memory_constraints()[0], seed                 # the limit binds: the MIP has memory rows
        status, x, obj = solve_mip(w, time_limit=30)
        assert status == "optimal"
        full = w.reconstruct(x)
        assert _feasible(g, full)
        assert evaluate(g, full) == obj == min(evaluate(g, p) for p in plans), seed
        checked += 1
    assert checked >= 4


def test_capped_neighbourhood_is_exactly_the_plans_within_the_start_usage():
    for seed in range(6):
        g = _graph(seed)
        plans = _plans(g)
        if not plans:
            continue
        w = _work(g)
        start_full = max(plans, key=lambda p: evaluate(g, p))      # the worst feasible plan
        start = {i: start_full[i] for i in w.nodes()}
        inside = [p for p in plans if _within_caps(w, start, p)]
        assert start_full in inside
        wc = capped(w, start, ub=evaluate(g, start_full))
        status, x, _ = solve_mip(wc, time_limit=30)
        assert status == "optimal"
        full = wc.reconstruct(x)
        assert _feasible(g, full) and peak_usage(g, full) <= g.usage_limit
        assert _within_caps(w, start, full)
        assert evaluate(g, full) == min(evaluate(g, p) for p in inside), seed
        # two levels more for every node: a larger neighbourhood, never a worse optimum
        wide = capped(w, start, extra={i: 2 for i in w.nodes()})
        _, y, _ = solve_mip(wide, time_limit=30)
        assert evaluate(g, wide.reconstruct(y)) == min(evaluate(g, p) for p in plans)   # k=3: every level


def test_mip_search_stays_feasible_and_reaches_the_capped_optimum():
    for seed in range(4):
        g = _graph(seed)
        plans = _plans(g)
        if not plans:
            continue
        w = _work(g)

        def priced(x):
            full = w.reconstruct(x)
            return evaluate(g, full) if _feasible(g, full) else np.inf
        start_full = max(plans, key=lambda p: evaluate(g, p))
        start = {i: start_full[i] for i in w.nodes()}
        stats = {}
        x, c = mip_search(w, start, priced, until=time.perf_counter() + 30, stats=stats)
        full = w.reconstruct(x)
        assert _feasible(g, full) and c == evaluate(g, full) <= evaluate(g, start_full)
        assert c == min(evaluate(g, p) for p in plans), seed   # the two-level steps reach every level here
        assert stats["mip"]["steps"][0]["tight"] == 0           # the first step: everything capped
