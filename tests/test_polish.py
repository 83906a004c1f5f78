"""The one-node local search after a two-phase solve (passes/shard/polish.py):
it maps plans between strategy graphs exactly, only improves, and keeps the
memory limit."""
from __future__ import annotations

import functools
from dataclasses import replace

import pytest

import einpart.passes.shard  # noqa: F401
from einpart.ir.parser import parse_file
from einpart.passes.shard import ilp, planner as pl, polish
from einpart.passes.shard.hardware import load_hardware
from einpart.passes.shard.phases import make_phases


@functools.lru_cache(maxsize=None)
def tiny():
    return parse_file("examples/palm.ein")


def build(mesh, hw, phase="both", limit=None, fold=True):
    phases = make_phases(tiny(), phase)
    return pl.Builder(tiny(), mesh, hw, phases, fold=fold).build(limit), phases


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
    limit = 0.3 * memory(free, unlimited.assignment)     # binds: the last assert (at 0.4 the 1 s solve
    # found, once PaLM's attention + MLP psum merge was credited, a plan the limit no longer binds at)
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
