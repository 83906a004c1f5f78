"""The exact elimination solver (passes/shard/eliminate.py): its optimum equals
brute force and CP-SAT's proved optimum on random graphs, with and without a
memory limit, with a table cap small enough that edges are dropped (the
min-marginal pruning and the dual multipliers do the work) and large enough
that the last pass is exact; it never reports a bound above the optimum."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import einpart.passes.shard  # noqa: F401
from einpart.ir.parser import parse_file
from einpart.passes import run_pipeline
from einpart.passes.shard import eliminate, plan, planner as pl
from einpart.passes.shard.hardware import load_hardware
from einpart.passes.shard.ilp import StrategyGraph, evaluate, peak_usage, solve
from einpart.passes.shard.phases import make_phases
from einpart.passes.shard.reduce import Work

F = 1e15


def random_graph(seed, n=7, kmax=4, pe=0.5, pforb=0.05, limit=None, integral=True):
    """Dense random graphs (many cycles: the reductions leave work to do)."""
    rng = np.random.default_rng(seed)
    ks = rng.integers(2, kmax + 1, n)
    scale = 1.0 if integral else 0.37
    costs = [np.where(rng.random(k) < 0.04, F, rng.integers(0, 20, k) * scale) for k in ks]
    usages = [rng.integers(1, 10, k).astype(float) for k in ks]
    intervals = [(s, s + int(rng.integers(1, 5))) for s in rng.integers(0, 6, n)]
    edges, ecosts = [], []
    for u, v in itertools.combinations(range(n), 2):
        if rng.random() < pe:
            m = rng.integers(0, 30, (ks[u], ks[v])) * scale
            m = np.where(rng.random(m.shape) < pforb, F, m)
            edges.append((u, v))
            ecosts.append(m)
    g = StrategyGraph(costs, usages, intervals, edges, ecosts, None)
    if limit is not None:
        lo = peak_usage(g, [int(np.argmin(u)) for u in usages])
        hi = peak_usage(g, [int(np.argmax(u)) for u in usages])
        g.usage_limit = float(lo + (hi - lo) * limit)
    return g


def brute(g):
    best = np.inf
    for x in itertools.product(*[range(len(c)) for c in g.node_costs]):
        v = evaluate(g, x)
        if v < best and (g.usage_limit is None or peak_usage(g, x) <= g.usage_limit):
            best = v
    return best


def check(g, got, best):
    """What solve returns is true: a proved optimum is the optimum, a bound is
    below it, a plan is feasible and priced right."""
    if np.isinf(best):
        assert got.status == "infeasible" and got.assignment is None
        return
    assert got.status in ("optimal", "feasible")
    assert got.bound <= best * (1 + 1e-9) + 1e-9
    assert evaluate(g, got.assignment) == pytest.approx(got.objective, rel=1e-12)
    assert got.objective >= best * (1 - 1e-12) - 1e-12
    if g.usage_limit is not None:
        assert peak_usage(g, got.assignment) <= g.usage_limit
    if got.status == "optimal":
        assert got.objective == pytest.approx(best, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("cap", [30, 10 ** 6])
@pytest.mark.parametrize("seed", range(12))
def test_unlimited_optimum_is_brute_force(seed, cap):
    g = random_graph(seed, integral=seed % 2 == 0)
    got = eliminate.solve(g, cap=cap, total=10 * cap)
    best = brute(g)
    check(g, got, best)
    assert got.status == ("infeasible" if np.isinf(best) else "optimal")   # no memory: always proved


def test_small_cap_drops_edges_and_still_proves():
    """A cap below the graphs' tables: edges are dropped, pruning and the multipliers
    (and a growing cap) still end in proofs of the brute-force optimum."""
    dropped = 0
    for seed in range(8):
        g = random_graph(300 + seed, n=8, kmax=5, pe=0.6, pforb=0.0)
        got = eliminate.solve(g, cap=20, total=200)
        check(g, got, brute(g))
        assert got.status == "optimal"
        dropped += got.stats.get("dropped_edges", 0) > 0
    assert dropped >= 4


@pytest.mark.parametrize("seed", range(12))
def test_memory_limited_answers_are_true(seed):
    g = random_graph(100 + seed, limit=0.4)
    got = eliminate.solve(g, cap=10 ** 6, max_iter=60)
    check(g, got, brute(g))


def test_memory_limited_proofs_happen():
    """Most small limited graphs are proved (the priced pass meets the plan)."""
    proved = 0
    for seed in range(12):
        g = random_graph(100 + seed, limit=0.4)
        got = eliminate.solve(g, cap=10 ** 6, max_iter=60)
        check(g, got, brute(g))
        proved += got.status == "optimal"
    assert proved >= 6


@pytest.mark.parametrize("seed", range(4))
def test_larger_graphs_match_cp_sat(seed):
    """Graphs too large for brute force: the same optimum as CP-SAT proves (integral
    costs, so CP-SAT's model is exact)."""
    g = random_graph(200 + seed, n=14, kmax=6, pe=0.3)
    ref = solve(g, time_limit=30)
    assert ref.status == "optimal"
    for cap in (200, 10 ** 6):
        got = eliminate.solve(g, cap=cap, total=10 * cap)
        assert got.status == "optimal"
        if cap == 10 ** 6:
            assert got.stats.get("dropped_edges", 0) == 0     # the exact pass at once
        assert got.objective == ref.objective == evaluate(g, got.assignment)


def test_junction_pass_min_marginals_are_exact():
    """With every edge kept the pass is exact: each strategy's min-marginal is
    the best cost of a plan that uses it (brute force), and the pass's plan costs
    its bound."""
    g = random_graph(7, n=6, kmax=3, pforb=0.0)
    w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, None, skip={"eliminate", "merge",
                                                                                          "dominance"})
    w.normalize()
    relax = eliminate._relaxation(w, 10 ** 6, 10 ** 7)
    assert len(relax[0]) == len(w.emat)
    p = eliminate.junction_pass(w, {i: w.cost[i] for i in w.nodes()}, relax)
    plans = list(itertools.product(*[range(len(c)) for c in g.node_costs]))
    vals = np.array([evaluate(g, x) for x in plans])
    assert p.bound == pytest.approx(vals.min(), rel=1e-12)
    x = [int(w.strat[i][p.plan[i]]) for i in range(len(g.node_costs))]
    assert evaluate(g, x) == pytest.approx(p.bound, rel=1e-12)
    for i in w.nodes():
        for s, mm in enumerate(p.node_mm[i]):
            want = vals[[x[i] == w.strat[i][s] for x in plans]].min()
            assert mm == pytest.approx(want, rel=1e-12)
    eid, mm = next(iter(p.pair_mm.items()))
    u, v = w.ends[eid]
    a, b = 0, 1 if mm.shape[1] > 1 else 0
    want = vals[[x[u] == w.strat[u][a] and x[v] == w.strat[v][b] for x in plans]].min()
    assert mm[a, b] == pytest.approx(want, rel=1e-12)


def test_junction_pass_pair_min_marginals_of_a_clique_are_exact():
    """A complete graph: the first table's node has four partners, so the pass
    shares their reductions (_pair_mins splits them in halves); every pair and
    node min-marginal is still the best cost of a plan using it (brute force)."""
    n, k = 5, 3
    rng = np.random.default_rng(11)
    costs = [rng.integers(0, 9, k).astype(float) for _ in range(n)]
    edges = list(itertools.combinations(range(n), 2))
    ecosts = [rng.integers(0, 9, (k, k)).astype(float) for _ in edges]
    g = StrategyGraph(costs, [np.ones(k)] * n, [(0, 1)] * n, edges, ecosts, None)
    w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, None,
             skip={"eliminate", "merge", "dominance"})
    relax = eliminate._relaxation(w, 10 ** 6, 10 ** 7)
    assert len(relax[0]) == len(edges) and max(len(s) for s in relax[2]) == 4
    p = eliminate.junction_pass(w, {i: w.cost[i] for i in w.nodes()}, relax)
    plans = np.array(list(itertools.product(range(k), repeat=n)))
    vals = np.array([evaluate(g, x) for x in plans])
    assert p.bound == vals.min()
    for i in range(n):
        assert p.node_mm[i].tolist() == [vals[plans[:, i] == s].min() for s in range(k)]
    assert len(p.pair_mm) == len(edges)
    for eid, mm in p.pair_mm.items():
        u, v = w.ends[eid]
        want = [[vals[(plans[:, u] == a) & (plans[:, v] == b)].min() for b in range(k)] for a in range(k)]
        assert mm.tolist() == want


def test_repair_keeps_answers_true_and_lowers_the_upper_bound():
    """repair (local search from every pass's plan): the answers on memory-limited
    graphs stay true (proved ones at the brute-force optimum), and on some the
    repaired plan is a new best, which the passes' own plans were not."""
    repaired, proved = 0, 0
    for seed in range(12):      # (a small cap: edges are dropped, so the passes' plans are rough)
        g = random_graph(100 + seed, limit=0.4)
        got = eliminate.solve(g, cap=20, total=200, max_iter=60, repair=20)
        check(g, got, brute(g))
        repaired += got.stats.get("repaired", 0) > 0
        proved += got.status == "optimal"
    assert repaired >= 3 and proved >= 6


def test_infeasible_limit_and_deadline():
    g = random_graph(3, limit=0.4)
    g.usage_limit = 0.5      # below every plan's least usage
    assert eliminate.solve(g).status == "infeasible"
    g = random_graph(104, n=12, kmax=5, limit=0.3)
    got = eliminate.solve(g, cap=50, until=0.0)      # out of time at once: what it has
    assert got.status in ("feasible", "unknown", "optimal", "infeasible")
    if got.assignment is not None:
        assert peak_usage(g, got.assignment) <= g.usage_limit


def test_palm_joint_graph_matches_cp_sat():
    """The both-phase strategy graph of the tiny palm.ein on a 2x2x2 cpu mesh
    (5,724 strategies; the first pass must drop edges): the same optimum as
    CP-SAT proves."""
    graph = parse_file("examples/palm.ein")
    built = pl.Builder(graph, (("x", 2), ("y", 2), ("z", 2)), load_hardware("cpu"),
                       make_phases(graph, "both")).build(None)
    got = eliminate.solve(built.sg)
    ref = solve(built.sg, time_limit=30)
    assert got.status == ref.status == "optimal"
    assert got.stats["dropped_edges"] > 0
    assert got.objective == pytest.approx(ref.objective, rel=1e-9)
    assert evaluate(built.sg, got.assignment) == got.objective


def test_palm_540b_both_phases_is_proved_optimal():
    """PaLM 540B sizes, 2 layers (memory does not bind), both phases on 64 chips:
    the planner's answer is proved (status optimal, gap 0) by the elimination, fits
    in memory, and prices as the reports do."""
    graph = run_pipeline(parse_file("examples/palm.ein", dict(D=18432, F=73728, H=48, K=256, V=256000, L=2)),
                         "cast{dtype=bf16}").graph
    p = plan(graph, "x=4,y=4,z=4", "tpu-v4", "both", batch=64, context=2048, prompt=2048, time_limit=30)
    assert p.status == "optimal" and p.gap == 0.0 and p.bound == p.objective
    assert p.stats["rounds"][0]["model"] == "joint, stored layouts exact (elimination + CP-SAT)"
    assert max(r.memory_bytes for r in p.phases.values()) <= load_hardware("tpu-v4").hbm_bytes
    # the reports' price: the same, but for the stored-byte tie-break (~1e-19 s per byte)
    assert p.objective == pytest.approx(p.stats["objective_repriced"], abs=1e-8)


@pytest.mark.parametrize("mesh, frac", [("x=2", 0.6), ("x=4", 0.6)])
def test_memory_priced_bound_is_below_the_limited_optimum(mesh, frac):
    """joint.priced (the Lagrangian bound of a two-phase plan whose unlimited
    optimum does not fit): between the unlimited optimum and the limited optimum
    that CP-SAT proves on the exact joint graph; a plan it keeps fits."""
    import math

    from einpart.passes.shard import joint
    from einpart.passes.shard.mesh import parse_mesh
    graph = parse_file("examples/palm.ein")
    hw, m = load_hardware("tpu-v4"), parse_mesh(mesh)
    phases = make_phases(graph, "both")
    memory = lambda b, a: pl.plan_memory(b, a, phases)  # noqa: E731
    free = pl.Builder(graph, m, hw, phases).build(None)
    unlimited = eliminate.solve(free.sg)
    assert unlimited.status == "optimal"
    limit = frac * memory(free, unlimited.assignment)
    exact = pl.Builder(graph, m, hw, phases, fold=False).build(limit)
    ref = solve(exact.sg, time_limit=30)
    assert ref.status == "optimal" and ref.objective > unlimited.objective * (1 + 1e-6)   # memory binds
    rounds: list = []
    best = pl.Solved(exact, ref, ref.bound, 0.0, "optimal")
    got, bound = joint.priced((free, unlimited.assignment), limit, memory, best, unlimited.objective, rounds,
                            math.inf)
    assert rounds and rounds[0]["model"] == "joint, memory priced (bound)" and rounds[0]["price_s_per_byte"] > 0
    assert unlimited.objective <= bound <= ref.objective * (1 + 1e-9)
    assert memory(got.built, got.solution.assignment) <= limit
    assert got.solution.objective == pytest.approx(evaluate(got.built.sg, got.solution.assignment), rel=1e-12)
    assert got.solution.objective >= ref.objective * (1 - 1e-9)


@pytest.mark.parametrize("integral", [True, False])
def test_finish_by_cp_sat_proves_memory_limited_graphs(integral):
    """With a finish (ilp.solve_work: CP-SAT on the pruned graph, memory included)
    every memory-limited graph is proved, at the brute-force optimum, where the
    memory prices alone leave a duality gap on some; each finish ran on a graph
    no larger than finish_at."""
    from einpart.passes.shard.ilp import solve_work
    finished = 0
    for seed in range(12):
        g = random_graph(100 + seed, limit=0.4, integral=integral)
        g.usage_limit = float(np.floor(g.usage_limit))    # CP-SAT's proof counts only for unrounded memory
        got = eliminate.solve(g, cap=10 ** 6, max_iter=60, finish=lambda w, b, g=g: solve_work(w, g, b, 10.0),
                              finish_at=10 ** 4)
        best = brute(g)
        check(g, got, best)
        if np.isfinite(best):
            assert got.status == "optimal"
        if "finish" in got.stats:
            finished += 1
            assert got.stats["finish"]["strategies"] <= 10 ** 4
    assert finished >= 3


def test_a_finish_that_does_not_prove_is_tried_again_on_half_the_graph():
    """A finish that does not prove (here: the first call of each solve gives up)
    is called again once the pruning has halved the strategies it was given,
    and the solve still ends at the brute-force optimum."""
    from einpart.passes.shard.ilp import solve_work
    retried = 0
    for seed in range(12):
        g = random_graph(100 + seed, limit=0.4)
        g.usage_limit = float(np.floor(g.usage_limit))
        sizes = []

        def finish(w, b, g=g, sizes=sizes):
            sizes.append(w.counts()["strategies"])
            return ("unknown", None, -np.inf) if len(sizes) == 1 else solve_work(w, g, b, 10.0)
        got = eliminate.solve(g, cap=10 ** 6, max_iter=60, finish=finish, finish_at=10 ** 4)
        best = brute(g)
        check(g, got, best)
        assert [f["strategies"] for f in got.stats.get("finishes", [])] == sizes
        if len(sizes) > 1:
            retried += 1
            assert all(b <= a // 2 for a, b in zip(sizes, sizes[1:]))
            assert got.status == "optimal"
    assert retried >= 1


def test_star_updates_keep_dropped_edge_bounds_valid():
    """The dropped-edge multipliers (star updates) change only the speed: with a
    tiny cap every pass drops edges, and every bound the passes give stays at or
    below the brute-force optimum."""
    dropped = 0
    for seed in range(8):
        g = random_graph(400 + seed, n=8, kmax=5, pe=0.7, pforb=0.0, integral=seed % 2 == 0)
        got = eliminate.solve(g, cap=12, total=60, max_cap=12, max_iter=25)
        best = brute(g)
        check(g, got, best)
        assert max(got.stats.get("bounds", [-np.inf])) <= best * (1 + 1e-9) + 1e-9
        dropped += got.stats.get("dropped_edges", 0) > 0 and len(got.stats["bounds"]) > 1
    assert dropped >= 4


def test_memory_rows_price_only_segments_nothing_implies():
    """Two segments with the same varying node: only the one with the smaller
    bound (more fixed usage) is priced."""
    g = StrategyGraph([np.array([0.0, 5.0]), np.array([0.0]), np.array([0.0])],
                      [np.array([9.0, 1.0]), np.array([2.0]), np.array([4.0])],
                      [(0, 4), (0, 2), (2, 4)], [], [], 12.0)
    w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, g.usage_limit, skip=REDUCE_ALL)
    binding, bvec, parts = eliminate._memory_rows(w)
    assert list(binding) == [1] and bvec[1] < bvec[0]      # segment [2, 4) holds 4 bytes of fixed usage


REDUCE_ALL = ("dominance", "leaf_pareto", "merge", "eliminate")


@pytest.mark.parametrize("mesh, frac", [("x=2", 0.6), ("x=4", 0.6)])
def test_stored_knapsack_bounds_and_proves_the_limited_optimum(mesh, frac):
    """joint.joint_limited (the stored-layout relaxation, pruned and closed by
    CP-SAT) on the tiny palm.ein with the limit below its unlimited plan: its
    bound is at most the limited optimum CP-SAT proves on the exact joint graph;
    here it proves a plan that fits and costs that optimum."""
    import math

    from einpart.passes.shard import joint
    from einpart.passes.shard.mesh import parse_mesh
    graph = parse_file("examples/palm.ein")
    hw, m = load_hardware("tpu-v4"), parse_mesh(mesh)
    phases = make_phases(graph, "both")
    memory = lambda b, a: pl.plan_memory(b, a, phases)  # noqa: E731
    free = pl.Builder(graph, m, hw, phases).build(None)
    unlimited = eliminate.solve(free.sg)
    limit = float(int(frac * memory(free, unlimited.assignment)))     # bytes, as an HBM size is
    exact = pl.Builder(graph, m, hw, phases, fold=False).build(limit)
    ref = solve(exact.sg, time_limit=30)
    assert ref.status == "optimal" and ref.objective > unlimited.objective * (1 + 1e-6)   # memory binds
    rounds: list = []
    proved, bound, plan_ = joint.joint_limited(graph, m, hw, phases, limit, None, True, False, memory, rounds,
                                               math.inf, 0, False)
    assert rounds[0]["model"] == "joint, stored layouts exact (elimination + CP-SAT)"
    assert unlimited.objective * (1 - 1e-9) <= bound <= ref.objective * (1 + 1e-9)
    got = proved or plan_
    if got is not None:
        assert memory(got.built, got.solution.assignment) <= limit
        assert got.solution.objective == pytest.approx(evaluate(got.built.sg, got.solution.assignment), rel=1e-12)
        assert got.solution.objective >= ref.objective * (1 - 1e-9)
    assert proved is not None and proved.status == "optimal"        # CP-SAT closed the knapsack
    assert proved.solution.objective == pytest.approx(ref.objective, rel=1e-6)


@pytest.mark.parametrize("hinted", [False, True])
def test_joint_unlimited_proves_the_unlimited_optimum_from_a_hint(hinted):
    """joint.joint_unlimited on the tiny palm.ein with a limit that binds: the
    unlimited optimum (eliminate.solve's, proved), whether it starts from the
    stored-layout relaxation's plan that fits (a plan of the unlimited problem
    too: hint) or from nothing; that plan does not fit, so it comes back for
    priced() with its bound, never as the plan."""
    import math

    from einpart.passes.shard import joint
    from einpart.passes.shard.mesh import parse_mesh
    graph = parse_file("examples/palm.ein")
    hw, m = load_hardware("tpu-v4"), parse_mesh("x=4")
    phases = make_phases(graph, "both")
    memory = lambda b, a: pl.plan_memory(b, a, phases)  # noqa: E731
    free = pl.Builder(graph, m, hw, phases).build(None)
    unlimited = eliminate.solve(free.sg)
    limit = float(int(0.6 * memory(free, unlimited.assignment)))
    folded = joint.build_joint(graph, m, hw, phases, limit, None, True, False)
    hint = None
    if hinted:
        proved, _, plan_ = joint.joint_limited(graph, m, hw, phases, limit, None, True, False, memory, [],
                                               math.inf, 0, False, built=folded)
        hint = (proved or plan_).solution.assignment
        assert memory(folded, hint) <= limit
    rounds: list = []
    got, bound, left = joint.joint_unlimited(graph, m, hw, phases, limit, None, True, False, memory, rounds,
                                             math.inf, built=folded, hint=hint)
    best = eliminate.solve(folded.sg)
    assert best.status == "optimal" and rounds[0]["status"] == "optimal"
    assert got is None and bound == pytest.approx(best.objective, rel=1e-12)
    assert memory(folded, left[1]) > limit
    assert evaluate(folded.sg, left[1]) == pytest.approx(best.objective, rel=1e-12)
    if hinted:
        assert best.objective < evaluate(folded.sg, hint)


@pytest.mark.parametrize("seed", range(10))
def test_elimination_order_is_the_greedy_min_by_table_fill_and_node(seed):
    """eliminate._order keeps each node's table up to date instead of recomputing
    all of them per step: the order, separators, largest table and their sum are
    those of the plain greedy rule (least table, then least fill, then node id),
    on random graphs with ties."""
    import math
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 16))
    size = {v: int(rng.integers(1, 5)) for v in range(n)}
    adj = {v: set() for v in range(n)}
    for u, v in itertools.combinations(range(n), 2):
        if rng.random() < 0.3:
            adj[u].add(v)
            adj[v].add(u)
    A = {i: set(s) for i, s in adj.items()}
    order, seps, mx, tot = [], [], 0.0, 0.0
    while A:
        def key(v):
            nb = sorted(A[v])
            fill = sum(1 for a, c in itertools.combinations(nb, 2) if c not in A[a])
            return (math.prod(size[j] for j in A[v]) * size[v], fill, v)
        v = min(A, key=key)
        nb = A.pop(v)
        t = math.prod(size[j] for j in nb) * size[v]
        mx, tot = max(mx, t), tot + t
        for a in nb:
            A[a] |= nb - {a}
            A[a].discard(v)
        order.append(v)
        seps.append(tuple(sorted(nb)))
    assert eliminate._order(adj, size) == (order, seps, mx, tot)
    assert max(len(s) for s in seps) >= 1 or not any(adj.values())


@pytest.mark.parametrize("block, threads_from", [(4, 1 << 60), (4, 8), (1, 2)])
def test_junction_pass_in_blocks_and_threads_is_the_same_pass(monkeypatch, block, threads_from):
    """The pass sums and reduces each table in blocks of rows (junction.BLOCK),
    shared by two threads from THREADS_FROM entries: with blocks of a few
    entries, and threads on every table, its bound, plan and every node and
    pair min-marginal are bit for bit those of the pass on whole tables (each
    entry is summed in the same order; min is exact in any order)."""
    from einpart.passes.shard import junction
    for seed in range(6):
        g = random_graph(40 + seed, n=8, kmax=5, pe=0.6, pforb=0.1)
        w = Work(g.node_costs, g.node_usages, g.intervals, g.edges, g.edge_costs, None,
                 skip={"eliminate", "merge", "dominance"})
        w.normalize()
        relax = eliminate._relaxation(w, 200, 2000)
        cost = {i: w.cost[i] for i in w.nodes()}
        monkeypatch.setattr(junction, "BLOCK", 1 << 30)
        whole = junction.junction_pass(w, cost, relax)
        monkeypatch.setattr(junction, "BLOCK", block)
        monkeypatch.setattr(junction, "THREADS_FROM", threads_from)
        got = junction.junction_pass(w, cost, relax)
        assert (got.bound, got.plan, got.dropped) == (whole.bound, whole.plan, whole.dropped)
        assert got.node_mm.keys() == whole.node_mm.keys() and got.pair_mm.keys() == whole.pair_mm.keys()
        for i in whole.node_mm:
            np.testing.assert_array_equal(got.node_mm[i], whole.node_mm[i])
        for e in whole.pair_mm:
            np.testing.assert_array_equal(got.pair_mm[e], whole.pair_mm[e])
