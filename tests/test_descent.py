"""Memory-respecting block coordinate descent (einpart/passes/shard/descent.py)."""
import itertools
import warnings

import numpy as np

from einpart.passes.shard.descent import Descent, local_search
from einpart.passes.shard.ilp import StrategyGraph, _feasible, evaluate
from einpart.passes.shard.reduce import Work

_KEEP_ALL = {"dominance", "leaf_pareto", "merge", "eliminate"}   # every node stays alive


def _graph(seed, n=6, k=3):
    """A ring with some forbidden pairs and a memory limit over overlapping intervals."""
    rng = np.random.default_rng(seed)
    edges = [(i, i + 1) for i in range(n - 1)] + [(0, n - 1)]
    mats = []
    for _ in edges:
        m = rng.integers(0, 30, (k, k)).astype(float)
        m[rng.random((k, k)) < 0.3] = 1e15
        mats.append(m)
    return StrategyGraph([rng.integers(0, 20, k).astype(float) for _ in range(n)],
                         [rng.integers(1, 10, k).astype(float) for _ in range(n)],
                         [(i, i + 3) for i in range(n)], edges, mats, usage_limit=16.0)


def _work(g):
    w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, g.usage_limit, skip=_KEEP_ALL)
    w.run()
    return w


def _optimum(g):
    return min(evaluate(g, list(x)) for x in itertools.product(*[range(len(c)) for c in g.node_costs])
               if _feasible(g, list(x)))


def test_start_with_forbidden_pair_is_repaired_without_nan_prices():
    # these seeds' all-zero start uses a forbidden pair and its first DP breaks the memory
    # limit: the prices were raised relative to the current cost, inf, so they became
    # inf, then NaN (0 * inf), and the descent returned None for a feasible problem
    for seed in (1, 5, 9, 13, 14, 19):
        g = _graph(seed)
        w = _work(g)
        assert len(w.nodes()) == len(g.node_costs)
        start = {i: int(w.strat[i][0]) for i in w.nodes()}
        assert evaluate(g, w.reconstruct(start)) == np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            x = local_search(w, start=start, seed=0)
        assert x is not None, seed
        full = w.reconstruct(x)
        assert _feasible(g, full)
        assert evaluate(g, full) == _optimum(g), seed


def test_reused_tables_give_the_one_shot_result():
    g = _graph(3)
    w = _work(g)
    d = Descent(w)
    for seed in range(3):
        assert d.run(seed=seed, iters=50) == local_search(w, seed=seed, iters=50)


def test_region_moves_only_its_nodes():
    g = _graph(1)
    w = _work(g)
    plans = [list(x) for x in itertools.product(*[range(len(c)) for c in g.node_costs]) if _feasible(g, list(x))]
    worst = max(plans, key=lambda x: evaluate(g, x))           # feasible, so the descent keeps a plan
    start = {i: worst[i] for i in w.nodes()}
    moved = set()
    for region in ({0, 1}, {2, 3, 4}):
        x = Descent(w).run(start=start, seed=0, region=region)
        full = w.reconstruct(x)
        assert _feasible(g, full) and evaluate(g, full) <= evaluate(g, worst)
        assert all(x[i] == start[i] for i in w.nodes() if i not in region)
        moved |= {i for i in region if x[i] != start[i]}
    assert moved                                                 # the regions did move
