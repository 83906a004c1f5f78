"""Tests of the sharding ILP core (einpart.passes.shard.ilp), its exact graph
reductions and the IOPDDL reader."""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from einpart.passes.shard.ilp import Solution, StrategyGraph, evaluate, peak_usage, solve
from einpart.passes.shard.iopddl import load_iopddl, solve_iopddl_main
from einpart.passes.shard.reduce import Infeasible

_ROOT = Path(__file__).resolve().parents[1]
DATA = next((p for p in (_ROOT.parent / "shared" / "iopddl", _ROOT.parents[1] / "shared" / "iopddl")
             if p.is_dir()), _ROOT.parent / "shared" / "iopddl")   # a checkout, or a worktree under wt/
F = 1e15  # forbidden


def chain(limit=None):
    """a - b - c; each node: strategy 0 replicated (cheap, big), 1 sharded."""
    return StrategyGraph(
        node_costs=[np.array([1.0, 5.0]), np.array([2.0, 3.0]), np.array([1.0, 4.0])],
        node_usages=[np.array([10.0, 2.0]), np.array([10.0, 2.0]), np.array([10.0, 2.0])],
        intervals=[(0, 2), (1, 3), (2, 4)],
        edges=[(0, 1), (1, 2)],
        edge_costs=[np.array([[0.0, 7.0], [7.0, 0.0]]), np.array([[0.0, 6.0], [6.0, 0.0]])],
        usage_limit=limit,
    )


def brute(g):
    best, arg = np.inf, None
    for x in itertools.product(*[range(len(c)) for c in g.node_costs]):
        v = evaluate(g, x)
        if v < best and (g.usage_limit is None or peak_usage(g, x) <= g.usage_limit):
            best, arg = v, list(x)
    return best, arg


def test_tiny_chain_known_optimum():
    sol = solve(chain(), time_limit=5)
    assert isinstance(sol, Solution)
    assert sol.status == "optimal"
    assert sol.assignment == [0, 0, 0]
    assert sol.objective == 4.0 == evaluate(chain(), sol.assignment)
    assert sol.bound == 4.0 and sol.gap == 0.0


def test_memory_limit_changes_optimum():
    # two replicated nodes live together (20) overflow 12; replicated + sharded (12) fit
    g = chain(limit=12.0)
    sol = solve(g, time_limit=5)
    assert sol.status == "optimal"
    assert sol.assignment == [1, 1, 1]  # 5+3+4; any mix pays 7 or 6 of resharding
    assert sol.objective == brute(g)[0] == 12.0
    assert peak_usage(g, sol.assignment) <= 12.0


def test_memory_limit_mixed_optimum():
    g = chain(limit=12.0)
    g.edge_costs = [np.array([[0.0, 1.0], [1.0, 0.0]])] * 2  # cheap resharding: mixing wins
    sol = solve(g, time_limit=5)
    assert sol.status == "optimal"
    assert sol.assignment == [0, 1, 0] and sol.objective == brute(g)[0] == 1 + 3 + 1 + 1 + 1
    assert solve(chain(limit=20.0), time_limit=5).objective == 4.0  # limit not binding


def test_infeasible_limit():
    sol = solve(chain(limit=3.0), time_limit=5)  # two sharded live nodes need 4
    assert sol.status == "infeasible"
    assert sol.assignment == [] and sol.objective == float("inf")
    sol = solve(chain(limit=3.0), time_limit=5, reductions=False)
    assert sol.status == "infeasible"


def test_forbidden_costs_honoured():
    g = chain()
    g.node_costs[0] = np.array([F, 5.0])          # a must shard
    g.edge_costs[1] = np.array([[0.0, F], [F, 0.0]])  # b and c must agree
    for red in (True, False):
        sol = solve(g, time_limit=5, reductions=red)
        assert sol.status == "optimal"
        assert sol.objective == brute(g)[0]
        assert g.node_costs[0][sol.assignment[0]] < F
        assert sol.assignment[1] == sol.assignment[2]


def test_all_forbidden_is_infeasible():
    g = chain()
    g.edge_costs[0] = np.full((2, 2), F)
    assert solve(g, time_limit=5).status == "infeasible"
    assert solve(g, time_limit=5, reductions=False).status == "infeasible"


def test_evaluate_and_peak_usage():
    g = chain()
    assert evaluate(g, [0, 1, 0]) == 1 + 3 + 1 + 7 + 6
    assert peak_usage(g, [0, 0, 0]) == 20.0  # half-open intervals: at most two live at once
    g.node_costs[1] = np.array([2.0, F])
    assert evaluate(g, [0, 1, 0]) == float("inf")


def random_graph(seed, n=8, kmax=4, pe=0.35, pfun=0.2, pforb=0.05):
    rng = np.random.default_rng(seed)
    ks = rng.integers(1, kmax + 1, n)
    costs = [np.where(rng.random(k) < 0.04, F, rng.integers(0, 20, k)).astype(float) for k in ks]
    usages = [rng.integers(1, 10, k).astype(float) for k in ks]
    intervals = []
    for _ in range(n):
        s = int(rng.integers(0, 8))
        intervals.append((s, s + int(rng.integers(0, 5))))
    edges, ecosts = [], []
    for u in range(n):
        for v in range(u + 1, n):
            if rng.random() < pe:
                m = rng.integers(0, 30, (ks[u], ks[v])).astype(float)
                if rng.random() < pfun:  # functional edge: each row allows one column
                    m = np.full(m.shape, F)
                    m[np.arange(ks[u]), rng.integers(0, ks[v], ks[u])] = rng.integers(0, 5, ks[u])
                m[rng.random(m.shape) < pforb] = F
                edges.append((u, v))
                ecosts.append(m)
    g = StrategyGraph(costs, usages, intervals, edges, ecosts, None)
    if seed % 4:
        lo = peak_usage(g, [int(np.argmin(u)) for u in usages])
        hi = peak_usage(g, [int(np.argmax(u)) for u in usages])
        g.usage_limit = float(lo + (hi - lo) * rng.random() * 0.7)
    return g


@pytest.mark.parametrize("seed", range(20))
def test_reductions_are_exact(seed):
    g = random_graph(seed)
    reduced = solve(g, time_limit=10, reductions=True)
    plain = solve(g, time_limit=10, reductions=False)
    best, _ = brute(g)
    if np.isinf(best):
        assert reduced.status == plain.status == "infeasible"
        return
    assert reduced.status == plain.status == "optimal"
    assert reduced.objective == plain.objective == best
    assert evaluate(g, reduced.assignment) == reduced.objective
    if g.usage_limit is not None:
        assert peak_usage(g, reduced.assignment) <= g.usage_limit


def test_float_costs_and_hint():
    g = random_graph(3)
    g.node_costs = [c * 0.37 for c in g.node_costs]
    g.edge_costs = [m * 0.37 for m in g.edge_costs]
    best, arg = brute(g)
    sol = solve(g, time_limit=10, hint=arg)
    assert sol.status == "optimal"
    assert abs(sol.objective - best) <= 1e-9 * max(1.0, best)
    assert sol.objective == evaluate(g, sol.assignment)


@pytest.mark.parametrize("seed", [1, 2, 9, 26])
def test_reductions_exact_on_larger_graphs(seed):
    g = random_graph(seed, n=18, kmax=5, pe=0.25, pfun=0.05, pforb=0.02)  # CP-SAT gets real work
    reduced = solve(g, time_limit=20, reductions=True)
    plain = solve(g, time_limit=20, reductions=False)
    assert reduced.status == plain.status
    if plain.status == "optimal":
        assert reduced.objective == plain.objective == evaluate(g, reduced.assignment)


def test_deterministic_mode_repeats():
    g = random_graph(9, n=12)
    a = solve(g, time_limit=2, deterministic=True, seed=3)
    b = solve(g, time_limit=2, deterministic=True, seed=3)
    assert a.assignment == b.assignment and a.objective == b.objective


def test_stats_record_reductions():
    sol = solve(random_graph(9, n=12), time_limit=5)
    assert sol.status == "optimal"
    st = sol.stats
    assert st["before"]["nodes"] == 12
    assert st["after"]["nodes"] <= st["before"]["nodes"]
    assert isinstance(st["removed"], dict) and "reduce" in st["time_s"]


# ---- IOPDDL ------------------------------------------------------------------------

needs_data = pytest.mark.skipif(not (DATA / "B.json.gz").exists(), reason="shared/iopddl not present")


@needs_data
def test_iopddl_B_reader_and_short_solve():
    g = load_iopddl(DATA / "B.json.gz")
    assert len(g.node_costs) == 816 and len(g.edges) == 1096
    assert g.usage_limit == 14392528
    sol = solve(g, time_limit=5)
    assert sol.status in ("feasible", "optimal")
    assert len(sol.assignment) == 816
    assert evaluate(g, sol.assignment) == sol.objective < 1e15
    assert peak_usage(g, sol.assignment) <= g.usage_limit
    assert sol.bound <= sol.objective


def write(tmp_path, name, data, compress=False):
    p = tmp_path / name
    raw = json.dumps(data).encode() if not isinstance(data, bytes) else data
    p.write_bytes(gzip.compress(raw) if compress else raw)
    return p


def tiny_problem():
    return {"problem": {"name": "tiny",
                        "nodes": {"intervals": [[0, 2], [1, 3]], "costs": [[1, 5], [2, 3, 9]],
                                  "usages": [[10, 2], [10, 2, 1]]},
                        "edges": {"nodes": [[0, 1]], "costs": [[0, 7, 1, 7, 0, 1]]},
                        "usage_limit": 12}}


def test_solve_iopddl_main_ok(tmp_path, capsys):
    p = write(tmp_path, "tiny.json.gz", tiny_problem(), compress=True)
    assert solve_iopddl_main(str(p), time_limit=5) == 0
    out = capsys.readouterr().out
    assert "cost: 8" in out and "status: optimal" in out and "gap: 0.00%" in out


def test_malformed_truncated_gzip(tmp_path, capsys):
    raw = gzip.compress(json.dumps(tiny_problem()).encode())
    p = write(tmp_path, "cut.json.gz", raw[: len(raw) // 2])
    assert solve_iopddl_main(str(p), time_limit=1) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {p}: not a valid gzip file "
                   "(Compressed file ended before the end-of-stream marker was reached)\n")


def test_malformed_invalid_json(tmp_path, capsys):
    p = write(tmp_path, "bad.json", b'{"problem": {"nodes": ')
    assert solve_iopddl_main(str(p), time_limit=1) == 1
    assert capsys.readouterr().err == (f"error: {p}: not valid JSON "
                                       "(Expecting value: line 1 column 23 (char 22))\n")


def test_malformed_matrix_size(tmp_path, capsys):
    d = tiny_problem()
    d["problem"]["edges"]["costs"][0] = [0, 7, 1, 7, 0]
    p = write(tmp_path, "size.json", d)
    assert solve_iopddl_main(str(p), time_limit=1) == 1
    assert capsys.readouterr().err == (f"error: {p}: problem.edges.costs[0] has 5 entries, expected 2x3=6 "
                                       "(edge 0 joins node 0 and node 1)\n")


def test_malformed_missing_field_and_usages(tmp_path, capsys):
    d = tiny_problem()
    del d["problem"]["nodes"]["usages"]
    p = write(tmp_path, "missing.json", d)
    assert solve_iopddl_main(str(p), time_limit=1) == 1
    assert capsys.readouterr().err == f"error: {p}: missing field problem.nodes.usages\n"
    d = tiny_problem()
    d["problem"]["nodes"]["usages"][1] = [10, 2]
    p = write(tmp_path, "usages.json", d)
    assert solve_iopddl_main(str(p), time_limit=1) == 1
    assert capsys.readouterr().err == (f"error: {p}: problem.nodes.usages[1] has 2 entries, expected 3 "
                                       "(one per strategy of node 1)\n")


def test_unreadable_file(tmp_path, capsys):
    p = tmp_path / "nope.json"
    assert solve_iopddl_main(str(p), time_limit=1) == 1
    assert capsys.readouterr().err == f"error: {p}: cannot read file: No such file or directory\n"


# ---- dominance, ablation switches, time limit -------------------------------------

def _dominated_by_definition(cost, mats):
    """dom[a, b] straight from the definition: cost_b - cost_a + sum_e max_j (M[b,j] - M[a,j]) <= 0,
    a column that a forbids never counting (b may then be anything there)."""
    k = len(cost)
    dom = np.zeros((k, k), bool)
    for a in range(k):
        for b in range(k):
            if a == b:
                continue
            total = cost[b] - cost[a]
            with np.errstate(invalid="ignore"):       # -inf + inf: not dominated
                for m in mats:
                    cols = [j for j in range(m.shape[1]) if np.isfinite(m[a, j])]
                    total += max((m[b, j] - m[a, j] for j in cols), default=-np.inf)
            dom[a, b] = total <= 0
    return dom


@pytest.mark.parametrize("sampled", [False, True, "in blocks"])
@pytest.mark.parametrize("seed", range(12))
def test_dominance_test_matches_the_definition(seed, sampled, monkeypatch):
    from einpart.passes.shard import dominance as dm
    from einpart.passes.shard.dominance import _dominated_pairs
    if sampled:      # the sampled-columns path, which only large nodes take otherwise
        monkeypatch.setattr(dm, "_FULL_TEST_MAX", 0)
    if sampled == "in blocks":      # its exact test in blocks of a few pairs (_PAIR_CHUNK)
        monkeypatch.setattr(dm, "_PAIR_CHUNK", 5)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 14))
    cost = rng.integers(0, 6, k).astype(float)
    mats = []
    for _ in range(int(rng.integers(1, 4))):
        m = rng.integers(0, 4, (k, int(rng.integers(1, 12)))).astype(float)
        m[rng.random(m.shape) < 0.15] = np.inf
        m[rng.integers(0, k)] = m[rng.integers(0, k)]          # duplicate rows: ties
        mats.append(m)
    np.testing.assert_array_equal(_dominated_pairs(cost, mats), _dominated_by_definition(cost, mats))


@pytest.mark.parametrize("path", ["skyline", "pairs"])
@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_kept_is_what_the_sequential_removal_keeps(seed, usage, path, monkeypatch):
    """dominance.kept_strategies through _skyline (forced on: no size or candidate threshold)
    or through the pairs of _dominated_pairs keeps exactly the strategies the
    sequential removal over the definition's relation keeps: ties (duplicate
    rows, equal costs) go to the larger index, forbidden columns and the usage
    condition of memory-relevant nodes count, repeated columns (which the
    tests drop) change nothing."""
    from einpart.passes.shard import dominance as dm
    if path == "skyline":
        monkeypatch.setattr(dm, "_FULL_TEST_MAX", 0)
        monkeypatch.setattr(dm, "_SKYLINE_PAIRS", 0)
    rng = np.random.default_rng(50 + seed)
    k = int(rng.integers(6, 30))
    cost = rng.integers(0, 4, k).astype(float)
    mats = []
    for _ in range(int(rng.integers(1, 4))):
        m = rng.integers(0, 3, (k, int(rng.integers(2, 8)))).astype(float)
        m[rng.random(m.shape) < 0.1] = np.inf
        m[:, 0] = np.minimum(m[:, 0], 2.0)          # no row forbids every column (those take the other path)
        for _ in range(3):
            a, b = rng.integers(0, k, 2)
            m[a] = m[b]
            cost[a] = cost[b]
        mats.append(m[:, rng.integers(0, m.shape[1], 2 * m.shape[1])])     # repeated columns
    use = rng.integers(0, 3, k).astype(float)
    le = (use[:, None] <= use[None, :]) if usage else None
    dom = _dominated_by_definition(cost, mats)
    if le is not None:
        dom &= le.T
    want = dm._undominated(dom)
    got = dm.kept_strategies(cost, mats, le)
    np.testing.assert_array_equal(got, want)
    assert not want.all() or seed % 3      # (most instances remove something)


def test_distinct_columns_keeps_the_first_of_each_in_order():
    from einpart.passes.shard.dominance import _distinct_columns
    inf = np.inf
    m = np.array([[1.0, 0.0, 1.0, inf, 0.0, inf],
                  [2.0, 3.0, 2.0, 1.0, 3.0, 1.0]])
    np.testing.assert_array_equal(_distinct_columns(m), m[:, [0, 1, 3]])
    one = np.array([[1.0], [2.0]])
    assert _distinct_columns(one) is one
    np.testing.assert_array_equal(_distinct_columns(m[:, :2]), m[:, :2])   # nothing repeated


@pytest.mark.parametrize("sampled", [False, True])
def test_dominance_of_a_row_an_edge_forbids_entirely(sampled, monkeypatch):
    """A strategy whose row forbids every column of one edge is in no plan: every
    other strategy dominates it, except one that forbids a column it allows on
    another edge (-inf + inf is no dominance, as in the definition). The fast test
    uses finite stand-ins for inf, whose sums would get this wrong."""
    from einpart.passes.shard import dominance as dm
    if sampled:
        monkeypatch.setattr(dm, "_FULL_TEST_MAX", 0)
    inf = np.inf
    cost = np.array([0.0, 5.0, 1.0, 2.0])
    m1 = np.array([[inf, inf], [0.0, 1.0], [2.0, 0.0], [1.0, 1.0]])     # strategy 0: forbidden on all of m1
    m2 = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, inf, 0.0], [1.0, 0.0, 2.0]])
    dom = dm._dominated_pairs(cost, [m1, m2])
    np.testing.assert_array_equal(dom, _dominated_by_definition(cost, [m1, m2]))
    assert dom[0].tolist() == [False, True, False, True]      # 2 forbids m2's column 1, which 0 allows


@pytest.mark.parametrize("seed", range(6))
def test_masked_gain_passes_over_the_columns_the_switched_from_strategy_forbids(seed):
    """_masked_gain (fmax over b - a, no mask) gives the masked definition's values
    bit for bit: a column that a forbids never counts, one only b forbids is +inf,
    and a pair where both forbid every column is -inf."""
    from einpart.passes.shard.dominance import _masked_gain
    rng = np.random.default_rng(seed)
    k, m = int(rng.integers(2, 9)), int(rng.integers(1, 7))
    mat = rng.random((k, m)) * 10
    mat[rng.random(mat.shape) < 0.3] = np.inf
    mat[0] = np.inf                                   # forbids every column
    mat[1] = np.where(rng.random(m) < 0.5, np.inf, mat[1])
    mat[1, 0] = 1.0                                   # allows column 0, which 0 forbids
    a_ix, b_ix = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    a_ix, b_ix = a_ix.ravel(), b_ix.ravel()
    got = _masked_gain(mat[b_ix], mat[a_ix])
    for g, a, b in zip(got, a_ix, b_ix):
        terms = [mat[b, j] - mat[a, j] for j in range(m) if np.isfinite(mat[a, j])]
        assert g == (max(terms) if terms else -np.inf), (a, b)
    assert np.isneginf(got[0]) and np.isposinf(got[k])      # (a, b) = (0, 0): -inf; (1, 0): +inf


def test_dominance_retests_the_nodes_next_to_a_change_and_those_freed_of_memory():
    """Work.dominance re-tests only the nodes whose test can have changed: a node
    that only lost strategies of its own keeps every other pair's test as it was,
    so it stays clean; its neighbours (columns gone) and the nodes that lost the
    usage condition (their segment stopped binding) are re-tested, and there the
    dominance that the change made appears."""
    from einpart.passes.shard.reduce import Work
    inf = np.inf
    # node 0 - node 1 - node 2; node 1's strategies are told apart by node 2.
    # Node 0's strategy 1 beats 0 on cost except at node 1's strategy 1.
    spread = np.array([[0.0, 9, 9], [9, 0, 9], [9, 9, 0]])
    # node 3's strategy 1 beats 0 on cost (never worse), but uses 10 bytes more,
    # and memory binds while node 4 may take 9 more bytes too (its strategy 1,
    # cheaper, uses them)
    edges = [(0, 1), (1, 2), (1, 3)]
    mats = [np.array([[1.0, 0, 0], [0, 5, 0]]), spread, np.array([[0.0, 0], [0, 0], [0, 1]])]
    costs = [np.zeros(2), np.zeros(3), np.zeros(3), np.array([1.0, 0.0]), np.array([1.0, 0.0])]
    usages = [np.zeros(2), np.zeros(3), np.zeros(3), np.array([1.0, 11.0]), np.array([1.0, 10.0])]
    intervals = [(0, 0), (0, 0), (0, 0), (0, 1), (0, 1)]
    w = Work(costs, usages, intervals, edges, mats, 14.0, skip=("eliminate", "merge", "leaf_pareto"))
    w.run()
    assert [len(w.strat[i]) for i in range(5)] == [2, 3, 3, 2, 2]
    w.keep(1, np.array([True, False, True]), "strategies_bound")   # node 0's strategy 1 now beats 0
    assert 1 not in w.dirty and {0, 2, 3} <= w.dirty
    w.run()
    assert w.strat[0].tolist() == [1] and w.strat[3].tolist() == [0, 1]
    assert not w.mem_state()[2][3]           # still memory-relevant: node 3's strategy 1 stays
    w.keep(4, np.array([True, False]), "strategies_bound")      # frees node 3 of memory
    assert 3 not in w.dirty
    w.run()
    assert w.strat[3].tolist() == [1]


@pytest.mark.parametrize("seed", [1, 2, 5, 6])
def test_every_reduction_can_be_switched_off_and_the_optimum_stays(seed):
    from einpart.passes.shard.reduce import REDUCTIONS
    g = random_graph(seed)
    best, _ = brute(g)
    for red in REDUCTIONS + ("bound",):
        sol = solve(g, time_limit=10, skip=(red,))
        if np.isinf(best):
            assert sol.status == "infeasible", red
        else:
            assert sol.status == "optimal" and sol.objective == best, red
    with pytest.raises(ValueError) as e:
        solve(g, skip=("magic",))
    assert str(e.value) == "unknown reduction 'magic' (known: dominance, leaf_pareto, merge, eliminate)"


def test_time_limit_spent_returns_what_it_has():
    """No time left after the reductions: no search runs; with a feasible hint
    that is the answer ('feasible', bound below it), without one 'unknown'."""
    g = random_graph(26, n=18, kmax=5, pe=0.25, pfun=0.05, pforb=0.02)
    full = solve(g, time_limit=20)
    assert full.status == "optimal" and full.stats["after"]["nodes"] > 0   # the reductions alone do not solve it
    sol = solve(g, time_limit=0)
    assert sol.status == "unknown" and sol.assignment == [] and sol.stats["time_limit_hit"] == "after the reductions"
    hinted = solve(g, time_limit=0, hint=full.assignment)
    assert hinted.status == "feasible" and hinted.objective == full.objective
    assert hinted.bound <= full.objective and hinted.gap >= 0


def _tiny_palm_decode_graph():
    """The tiny PaLM decode (examples/palm.ein default sizes) on a 2x2x2 cpu mesh:
    float costs of ~1e-5 s, scaled to ~1e9 for CP-SAT. With merge pairs (their edges
    close cycles), so the reductions leave a model for CP-SAT to solve."""
    from einpart.ir.parser import parse_file
    from einpart.passes.shard import planner as pl
    from einpart.passes.shard.hardware import load_hardware
    from einpart.passes.shard.phases import make_phases
    graph = parse_file(str(_ROOT / "examples" / "palm.ein"))
    mesh = (("x", 2), ("y", 2), ("z", 2))
    return pl.Builder(graph, mesh, load_hardware("cpu"), make_phases(graph, "decode"), merge=True).build(None).sg


def test_enforced_form_keeps_the_optimum_of_scaled_costs():
    """CP-SAT's inclusion presolve once cut the optimum off the enforced model of
    this graph (OPTIMAL at 3.2e-4 s with a 2.7e-5 s plan in the model; solve()
    then called a 9.6e-5 s plan optimal).  Both edge formulations must agree on
    the reduced graph, solve() must find that optimum, and no bound may exceed a
    known plan."""
    from ortools.sat.python import cp_model

    from einpart.passes.shard import ilp
    from einpart.passes.shard.reduce import Work
    sg = _tiny_palm_decode_graph()
    work = Work(sg.node_costs, sg.node_usages, sg.intervals, sg.edges, sg.edge_costs, sg.usage_limit)
    work.run()
    opt = {}
    for form in ("enforced", "pairs"):
        model = ilp._Model(work, form=form)
        assert not model.exact
        st, solver = ilp._cpsat(model, 30, 2, 0, False)
        assert st == cp_model.OPTIMAL  # a proved optimum: its value is reproducible
        opt[form] = evaluate(sg, work.reconstruct(model.read(solver)))
    assert opt["enforced"] == pytest.approx(opt["pairs"], rel=1e-6)
    sol = solve(sg, time_limit=30)
    assert sol.status == "optimal" and sol.objective == pytest.approx(opt["pairs"], rel=1e-6)
    plain = solve(sg, reductions=False, time_limit=3, hint=sol.assignment)
    assert plain.objective <= sol.objective * (1 + 1e-9)
    assert plain.bound <= plain.objective


@pytest.mark.parametrize("chunk", [1, 7, 1 << 17])
def test_chain_elimination_in_blocks_is_the_whole_min(chunk, monkeypatch):
    """reduce._chain_min (a degree-2 node's elimination, in blocks of u's rows
    of about _CHAIN_BLOCK entries): the same argmin and min, bit for bit, as over
    the whole u x v x w tensor, infinities included."""
    from einpart.passes.shard import reduce as red
    monkeypatch.setattr(red, "_CHAIN_BLOCK", chunk)
    rng = np.random.default_rng(chunk)
    a, b = rng.random((9, 5)) * 7, rng.random((5, 4)) * 3
    a[rng.random(a.shape) < 0.2] = np.inf
    cost = rng.random(5)
    t = a[:, :, None] + cost[None, :, None] + b[None, :, :]
    arg, mm = red._chain_min(a, cost, b)
    np.testing.assert_array_equal(arg, np.argmin(t, axis=1))
    np.testing.assert_array_equal(mm, t.min(axis=1))
