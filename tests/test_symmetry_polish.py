"""Mesh-axis symmetry breaking (passes/shard/symmetry.py) and the one-node
local search after a two-phase solve (passes/shard/polish.py): both must keep
the planner exact (same optimum) and give valid plans."""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest

import einpart.passes.shard  # noqa: F401
from einpart.ir.parser import parse_file
from einpart.passes.shard import ilp, planner as pl, polish, symmetry
from einpart.passes.shard.hardware import Link, load_hardware
from einpart.passes.shard.phases import make_phases


@functools.lru_cache(maxsize=None)
def tiny():
    return parse_file("examples/palm.ein")


def build(mesh, hw, phase="both", limit=None, fold=True):
    phases = make_phases(tiny(), phase)
    return pl.Builder(tiny(), mesh, hw, phases, fold=fold).build(limit), phases


SQUARE = (("x", 2), ("y", 2))


@pytest.mark.parametrize("phase,fold", [("decode", True), ("both", True), ("prefill", False)])
def test_breaking_the_axis_swap_keeps_the_optimum(phase, fold):
    hw = load_hardware("tpu-v4")
    free, _ = build(SQUARE, hw, phase, fold=fold)
    want = ilp.solve(free.sg, time_limit=20)
    broken, _ = build(SQUARE, hw, phase, fold=fold)
    stats = symmetry.break_symmetry(broken, SQUARE)
    assert stats["symmetries"] == 1 and stats["forbidden"] > 0
    got = ilp.solve(broken.sg, time_limit=20)
    assert want.status == got.status == "optimal"
    assert got.objective == pytest.approx(want.objective, rel=1e-12)
    # the plan found with the symmetry broken is a plan of the original graph, at that cost
    assert ilp.evaluate(free.sg, got.assignment) == pytest.approx(want.objective, rel=1e-12)


def test_breaking_keeps_the_optimum_under_a_binding_memory_limit():
    hw = load_hardware("tpu-v4")
    free, phases = build(SQUARE, hw, "decode", fold=False)
    unlimited = ilp.solve(free.sg, time_limit=20)
    limit = 0.4 * pl.plan_memory(free, unlimited.assignment, phases)
    free, _ = build(SQUARE, hw, "decode", limit, fold=False)
    want = ilp.solve(free.sg, time_limit=20)
    assert want.status == "optimal" and want.objective > unlimited.objective
    broken, _ = build(SQUARE, hw, "decode", limit, fold=False)
    assert symmetry.break_symmetry(broken, SQUARE)["forbidden"] > 0
    got = ilp.solve(broken.sg, time_limit=20)
    assert got.status == "optimal" and got.objective == pytest.approx(want.objective, rel=1e-12)


def test_renamings_map_strategies_one_to_one():
    b, _ = build((("x", 2), ("y", 2), ("z", 2)), load_hardware("tpu-v4"), "decode")
    found = symmetry.symmetries(b, (("x", 2), ("y", 2), ("z", 2)))
    assert len(found) == 5                      # every non-identity permutation of x, y, z
    for maps in found:
        for m in maps:
            assert sorted(m.tolist()) == list(range(len(m)))


def test_unlike_axes_are_not_symmetric():
    hw = load_hardware("tpu-v4")
    b, _ = build((("x", 2), ("y", 4)), hw, "decode")            # other sizes
    assert symmetry.symmetries(b, (("x", 2), ("y", 4))) == []
    slow = replace(hw, axes=(("y", Link(hw.link.bandwidth / 2, hw.link.latency)),))
    b, _ = build(SQUARE, slow, "decode")                        # other bandwidth on y
    assert symmetry.symmetries(b, SQUARE) == []
    assert symmetry.break_symmetry(b, SQUARE) == {"symmetries": 0, "forbidden": 0}


def test_polish_maps_plans_exactly_and_only_improves():
    hw = load_hardware("tpu-v4")
    folded, phases = build((("x", 2), ("y", 4)), hw, "both")
    exact, _ = build((("x", 2), ("y", 4)), hw, "both", fold=False)
    sol = ilp.solve(folded.sg, time_limit=20)
    x = polish.map_assignment(folded, sol.assignment, exact)
    assert ilp.evaluate(exact.sg, x) == pytest.approx(sol.objective, rel=1e-12)
    # from a poor start (the cheapest strategy of every node alone) descent only goes down
    # and ends where no single change improves
    start = polish.map_assignment(folded, sol.assignment, exact)
    memory = lambda b, a: pl.plan_memory(b, a, phases)  # noqa: E731
    y, moves = polish.descend(exact, start, memory, None, float("inf"))
    assert moves == 0 and y == start              # the optimum is a local optimum
    bad = list(start)
    i = next(k for k, n in enumerate(exact.nodes) if n.kind == "decl" and len(n.cost) > 1
             and n.tensor == "w_up")
    bad[i] = max(range(len(exact.nodes[i].cost)),
                 key=lambda c: ilp.evaluate(exact.sg, bad[:i] + [c] + bad[i + 1:]) if
                 ilp.evaluate(exact.sg, bad[:i] + [c] + bad[i + 1:]) < float("inf") else -1)
    worse = ilp.evaluate(exact.sg, bad)
    assert worse > sol.objective
    z, moves = polish.descend(exact, bad, memory, None, float("inf"))
    assert moves >= 1 and ilp.evaluate(exact.sg, z) < worse
    assert ilp.evaluate(exact.sg, z) >= sol.objective * (1 - 1e-12)


def test_polish_respects_the_memory_limit():
    hw = load_hardware("tpu-v4")
    mesh = (("x", 2), ("y", 4))
    free, phases = build(mesh, hw, "both", fold=False)
    unlimited = ilp.solve(free.sg, time_limit=20)
    memory = lambda b, a: pl.plan_memory(b, a, phases)  # noqa: E731
    limit = 0.4 * memory(free, unlimited.assignment)
    exact, _ = build(mesh, hw, "both", limit, fold=False)
    got = ilp.solve(exact.sg, time_limit=1)
    z, _ = polish.descend(exact, got.assignment, memory, limit, float("inf"))
    assert memory(exact, z) <= limit and ilp.evaluate(exact.sg, z) <= got.objective
    # z is a local optimum within the limit: every single change that saves time does not fit
    base, cheaper = ilp.evaluate(exact.sg, z), 0
    for i, n in enumerate(exact.nodes):
        for c in range(len(n.cost)):
            y = z[:i] + [c] + z[i + 1:]
            if ilp.evaluate(exact.sg, y) < base * (1 - 1e-9):
                cheaper += 1
                assert memory(exact, y) > limit
    assert cheaper > 0
