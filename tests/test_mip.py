"""MIP neighbourhood search (einpart/passes/shard/mip.py): caps, exact MIP, search."""
import itertools
import time

import numpy as np

from einpart.passes.shard.ilp import StrategyGraph, _feasible, evaluate, peak_usage
from einpart.passes.shard.mip import (_hint_vector, _pairs_model, capped, memory_free_plan, mip_search,
                                      solve_mip)
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
        x, c = mip_search(w, start, priced, until=time.perf_counter() + 30, stats=stats, union_first=False)
        full = w.reconstruct(x)
        assert _feasible(g, full) and c == evaluate(g, full) <= evaluate(g, start_full)
        assert c == min(evaluate(g, p) for p in plans), seed   # the two-level steps reach every level here
        steps = stats["mip"]["steps"]
        assert "memory_free" in steps[0]                         # the memory-free optimum is computed first
        if c < evaluate(g, start_full):
            assert steps[1]["tight"] == 0                        # the first MIP step: everything capped


def test_mip_search_union_first_stops_at_the_union_optimum():
    """Default schedule: the union step comes first; when it improves, the
    search stops there (its plan is the final CP-SAT's start) with the
    brute-force optimum of the union neighbourhood; when it does not, the
    capped and two-level steps follow."""
    stopped = went_on = 0
    for seed in range(8):
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
        free_w = _free_work(g)
        free = memory_free_plan(w, time_limit=30, free_work=free_w)
        if free is None or evaluate(g, w.reconstruct(free)) >= min(evaluate(g, p) for p in plans):
            continue                                   # the memory-free optimum fits: no union step
        stats = {}
        x, c = mip_search(w, start, priced, until=time.perf_counter() + 30, stats=stats, free_work=free_w)
        full = w.reconstruct(x)
        assert _feasible(g, full) and c == evaluate(g, full) <= evaluate(g, start_full)
        steps = stats["mip"]["steps"]
        assert steps[1]["tight"] == "union", seed
        wc = capped(w, start, ub=evaluate(g, start_full), also=free)
        _, xu, _ = solve_mip(wc, time_limit=30, hint=start_full)
        union_opt = evaluate(g, wc.reconstruct(xu))
        assert steps[1]["cost"] == union_opt, seed
        if union_opt < evaluate(g, start_full):
            assert len(steps) == 2 and c == union_opt, seed
            stopped += 1
        else:
            assert len(steps) > 2 and steps[2]["tight"] == 0, seed
            went_on += 1
    assert stopped >= 1


def _usage_in(w, i, x):
    """{constraint index: usage of x's strategy} for node i in the binding constraints of w."""
    return {k: terms[i][np.searchsorted(w.strat[i], x[i])]
            for k, (terms, _) in enumerate(w.memory_constraints()[0]) if i in terms}


def _free_work(g):
    w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, None)
    w.run()
    return w


def test_memory_free_plan_is_the_optimum_without_the_limit():
    """With a Work built without the limit: the optimum over every plan, the
    limit ignored; without one: over the strategies the memory-aware
    reductions left (every node stays alive here)."""
    checked = strict = 0
    for seed in range(6):
        g = _graph(seed)
        if not _plans(g):
            continue
        w = _work(g)
        free = memory_free_plan(w, time_limit=30, free_work=_free_work(g))
        every = itertools.product(*[range(len(c)) for c in g.node_costs])
        assert evaluate(g, w.reconstruct(free)) == min(evaluate(g, list(p)) for p in every), seed
        thinned = memory_free_plan(w, time_limit=30)
        assert sorted(w.nodes()) == list(range(len(g.node_costs)))
        left = itertools.product(*[w.strat[i] for i in range(len(g.node_costs))])
        best = min(evaluate(g, list(p)) for p in left)
        assert evaluate(g, w.reconstruct(thinned)) == best, seed
        strict += best < min(evaluate(g, p) for p in _plans(g))  # the limit binds: not a plan
        checked += 1
    assert checked >= 4 and strict >= 1


def test_union_neighbourhood_is_exactly_the_plans_below_start_or_memory_free_usage():
    """capped(also=free): a node may use up to the larger of its usage in the
    start and in the memory-free optimum; the MIP optimum of that copy is
    feasible and equals the brute-force optimum over exactly those plans."""
    wider = 0
    for seed in range(6):
        g = _graph(seed)
        plans = _plans(g)
        if not plans:
            continue
        w = _work(g)
        start_full = max(plans, key=lambda p: evaluate(g, p))
        start = {i: start_full[i] for i in w.nodes()}
        free = memory_free_plan(w, time_limit=30, free_work=_free_work(g))

        def cap(i, k):        # a memory-free strategy the reductions removed raises nothing
            up = _usage_in(w, i, free)[k] if free[i] in w.strat[i] else 0.0
            return max(_usage_in(w, i, start)[k], up)

        def inside(p):
            return all(u <= cap(i, k) for i in w.nodes() for k, u in _usage_in(w, i, p).items())
        allowed = [p for p in plans if inside(p)]
        assert start_full in allowed
        wc = capped(w, start, ub=evaluate(g, start_full), also=free)
        status, x, _ = solve_mip(wc, time_limit=30, hint=start_full)
        assert status == "optimal"
        full = wc.reconstruct(x)
        assert _feasible(g, full) and inside(full)
        assert evaluate(g, full) == min(evaluate(g, p) for p in allowed), seed
        wider += len(allowed) > len([p for p in plans if _within_caps(w, start, p)])
    assert wider >= 1                        # the memory-free levels add plans to the capped neighbourhood


def test_hint_is_a_solution_of_the_pairs_model_and_keeps_the_optimum():
    """The start handed to HiGHS satisfies every equality row of the pairs
    model (a full plan, so every column is set), and a hinted solve from the
    worst feasible plan still returns the brute-force optimum."""
    for seed in range(6):
        g = _graph(seed)
        plans = _plans(g)
        if not plans:
            continue
        w = _work(g)
        c, eq, rhs, mem, mb, ub, off, pairs = _pairs_model(w)
        worst = max(plans, key=lambda p: evaluate(g, p))
        idx, vals = _hint_vector(w, worst, off, pairs)
        x0 = np.zeros(len(c))
        x0[idx] = vals
        assert np.allclose(eq @ x0, rhs)
        assert np.all(mem @ x0 <= mb + 1e-9)
        assert float(c @ x0) + w.const == evaluate(g, worst)
        status, x, obj = solve_mip(w, time_limit=30, hint=worst)
        assert status == "optimal"
        assert evaluate(g, w.reconstruct(x)) == obj == min(evaluate(g, p) for p in plans), seed
