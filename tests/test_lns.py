"""Iterated local search (einpart/passes/shard/lns.py): kicks, memory, optimum."""
import itertools
import time

import numpy as np

from einpart.passes.shard.ilp import StrategyGraph, _feasible, evaluate, peak_usage
from einpart.passes.shard.lns import ball, iterated_local_search
from einpart.passes.shard.reduce import Work


def _graph(seed, n=7, k=3):
    rng = np.random.default_rng(seed)
    edges = [(i, i + 1) for i in range(n - 1)] + [(0, n - 1), (1, 4)]
    return StrategyGraph(
        node_costs=[rng.integers(0, 20, k).astype(float) for _ in range(n)],
        node_usages=[rng.integers(1, 10, k).astype(float) for _ in range(n)],
        intervals=[(i, i + 3) for i in range(n)],
        edges=edges, edge_costs=[rng.integers(0, 30, (k, k)).astype(float) for _ in edges],
        usage_limit=18.0)


def _brute(g):
    best = np.inf
    for x in itertools.product(*[range(len(c)) for c in g.node_costs]):
        if peak_usage(g, x) <= g.usage_limit:
            best = min(best, evaluate(g, x))
    return best


def test_ball_is_connected_and_sized():
    adj = [{1: 0}, {0: 0, 2: 1}, {1: 1, 3: 2}, {2: 2}, {}]
    rng = np.random.default_rng(0)
    assert ball(adj, 0, 3, rng) == [0, 1, 2]
    assert sorted(ball(adj, 2, 10, rng)) == [0, 1, 2, 3]   # component smaller than the size
    assert ball(adj, 4, 3, rng) == [4]


def test_ils_stays_feasible_never_worsens_and_reaches_brute_force_optimum():
    for seed in range(4):
        g = _graph(seed)
        opt = _brute(g)
        work = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, g.usage_limit,
                    skip={"dominance", "leaf_pareto", "merge", "eliminate"})   # keep every node alive
        nodes = work.nodes()

        def priced(x):
            full = work.reconstruct(x)
            return evaluate(g, full) if _feasible(g, full) else np.inf
        feasible = [x for x in itertools.product(*[range(len(c)) for c in g.node_costs])
                    if peak_usage(g, x) <= g.usage_limit]
        worst = max(feasible, key=lambda x: evaluate(g, x))        # the worst feasible plan as start
        start = {i: int(worst[i]) for i in nodes}
        seen = []

        def priced_logged(x):
            c = priced(x)
            seen.append(c)
            return c
        x, c = iterated_local_search(work, start, priced_logged, until=time.perf_counter() + 30,
                                     seed=seed, kick=(1, 3), max_kicks=60)
        full = work.reconstruct(x)
        assert peak_usage(g, full) <= g.usage_limit
        assert c == evaluate(g, full) <= evaluate(g, worst)
        assert c == opt, (seed, c, opt)
        again = iterated_local_search(work, start, priced, until=time.perf_counter() + 30,
                                      seed=seed, kick=(1, 3), max_kicks=60)
        assert again == (x, c)                                     # deterministic for a seed
