"""The planner's exact steps by elimination (solving.solve_plan, and
joint_limited for one phase too: solving.solve_phase).

Why a module of its own: prefill and decode share only the stored layouts
(weights, KV cache), and the joint strategy graph that ties them is what CP-SAT
cannot prove. With a memory limit, joint_limited solves the stored-layout
relaxation (stored_knapsack) by elimination and CP-SAT on what the pruning
leaves: usually a proof. Otherwise eliminate.py solves it exactly without the
memory limit (joint_unlimited): when that plan fits it is the limited optimum,
and otherwise its optimum bounds the limited one from below. priced() then adds a
Lagrangian memory price at the unlimited plan's peak time, for a tighter bound
and often a better plan. Both work on the folded joint graph (planner.Builder).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np

from . import eliminate, ilp
from .planner import (Builder, Solved, _min_usage, is_stored, map_assignment, memory_error, memory_floor,
                      rule_out_oversized)

# Time CP-SAT gets to close the stored-layout knapsack on the pruned graph: FINISH_S up
# to FINISH_SMALL strategies (PaLM 540B: 400-475 left, proved in 0.1-0.5 s), FINISH_LARGE_S
# above (832 left: 3.7 s; 1025 and more: not proved in 20 s), where it is a try that
# eliminate.solve repeats once the pruning has halved the graph.
FINISH_S = 10.0
FINISH_SMALL = 600
FINISH_LARGE_S = 2.0
# Passes the stored-layout relaxation gets (PaLM 540B: proved after 12-14), and the
# flat passes in a row after which it gives up (the planner's other steps follow): 6
# lets eliminate.solve try shorter multiplier steps from its best ones after 3 (with 4
# it gave up first; Llama 70B both phases on tpu-v4 2x4x4: gap 2.4% -> 1.0%, 9.1 ->
# 8.8 s; PaLM 540B both at 24 / 20 GB: +0.4 / +0.3 s, the same plans).
KNAPSACK_ITERATIONS = 30
KNAPSACK_PATIENCE = 6
# Descent iterations from each pass's plan (eliminate.solve's repair): the passes' plans
# rarely fit, and a fitting one near them is a better upper bound (PaLM 540B, 8 layers:
# 14 passes and a 0.1 s finish instead of 20 and 1.7 s; 20 finds what 100 do).
KNAPSACK_REPAIR = 20


def build_joint(graph, mesh, hw, phases, limit, fix, prune, merge):
    """The folded joint graph without a limit, declaration layouts that cannot
    fit ruled out (exact), or the error that no layout fits."""
    built = Builder(graph, mesh, hw, phases, fix, fold=True, prune=prune, merge=merge).build(None)
    if limit is not None:
        floor = memory_floor(built, phases)
        if sum(floor.values()) > limit:
            raise memory_error(floor, limit, hw, math.prod(s for _, s in mesh))
        rule_out_oversized(built, limit - sum(floor.values()))
    return built


def stored_knapsack(built, limit: float) -> ilp.StrategyGraph:
    """The relaxation R of the limited joint problem that keeps the stored
    layouts' memory exact: every stored node (weights, KV cache, prepared
    weights) uses its bytes, every other node its least (a folded statement:
    its smallest variant) whatever its strategy. A plan that fits uses at least
    that much at every time point, so it is a plan of R of the same or lower
    cost (folding takes the cheapest variant): R's optimum bounds the limited
    one from below, and when R's optimal plan fits with its own activations it
    is the limited optimum. Only the stored nodes' usage varies, so the
    reductions still eliminate every activation node, and the memory is one
    knapsack over ~10 stored layouts (PaLM 540B: 3-4 sizes each): what a
    Lagrangian price cannot close, and CP-SAT on the pruned graph can."""
    sg = built.sg
    usages = [n.usage if is_stored(n) else np.full(len(n.cost), _min_usage(n)) for n in built.nodes]
    return replace(sg, node_usages=usages, usage_limit=limit)


def least_variants(built, limit: float) -> ilp.StrategyGraph:
    """A tighter relaxation than stored_knapsack, for when activations bind: every
    node uses its own bytes per choice, a folded statement those of its smallest
    variant for each split (its reduce-scatter variant is chosen by its reader,
    and folding takes the cheapest). A plan that fits is a plan of it of the same
    or lower cost and usage, so its optimum bounds the limited one, and when its
    plan fits with the variants the fold picks, it is the limited optimum. More
    nodes keep a varying usage, so the reductions eliminate fewer: it is run only
    when stored_knapsack's plan does not fit (PaLM 540B prefill on tpu-v4 4x4x4
    at 20 GB: proved in 0.6 s where the exact CP-SAT model took 6 s)."""
    usages = [np.array([min(v.mem for v in n.strategies[si].variants) for si, _ in n.choices])
              if n.kind == "stmt" and n.layouts and n.layouts[0] is None else n.usage for n in built.nodes]
    return replace(built.sg, node_usages=usages, usage_limit=limit)


RELAXATIONS = {"stored layouts exact": stored_knapsack, "activations at their least variant": least_variants}


def joint_limited(graph, mesh, hw, phases, limit, fix, prune, merge, memory_of, rounds: list, until: float,
                  seed: int, deterministic: bool, built=None, relaxation: str = "stored layouts exact",
                  patience: int | None = KNAPSACK_PATIENCE) -> tuple[Solved | None, float, Solved | None]:
    """The joint problem with the memory limit through one of its RELAXATIONS
    (stored_knapsack by default): eliminate.solve prunes it with memory prices
    and hands the small graph left to CP-SAT (ilp.solve_work), which proves R's
    optimum. Returns (the proved limited optimum or None, R's bound, R's plan
    as a Solved when it fits but is not proved, else None). built: that folded
    graph (build_joint) when the caller has it, else it is built here. patience:
    eliminate.solve's (None: the passes go on to `until` or KNAPSACK_ITERATIONS,
    for the plans their repairs find)."""
    t0 = time.perf_counter()
    if built is None:
        built = build_joint(graph, mesh, hw, phases, limit, fix, prune, merge)
    relaxed = RELAXATIONS[relaxation](built, limit)

    def finish(work, best):
        most = FINISH_S if work.counts()["strategies"] <= FINISH_SMALL else FINISH_LARGE_S
        left = most if deterministic else max(min(most, until - time.perf_counter()), 0.05)
        # one worker: as fast on these 400-700 strategy graphs as two, at half the CPU (measured)
        return ilp.solve_work(work, relaxed, best, left, 1, seed, deterministic)
    got = eliminate.solve(relaxed, until=until, finish=finish, max_iter=KNAPSACK_ITERATIONS,
                          patience=patience, repair=KNAPSACK_REPAIR)
    fits = got.assignment is not None and memory_of(built, got.assignment) <= limit
    stats = {k: v for k, v in got.stats.items() if k != "bounds"}
    rounds.append({"model": f"{'joint' if len(phases) > 1 else phases[0].name}, {relaxation} "
                            "(elimination + CP-SAT)", "status": got.status,
                   "objective": got.objective, "bound": got.bound, "fits": fits,
                   "wall_s": time.perf_counter() - t0, **built.stats, **stats})
    if got.status == "infeasible":     # (no plan fits: the steps after it say why, with the sizes)
        return None, -math.inf, None
    if not fits:
        return None, got.bound, None
    proved = got.status == "optimal"
    gap = 0.0 if proved else max(0.0, (got.objective - got.bound) / max(abs(got.objective), 1e-30))
    sol = ilp.Solution(got.assignment, got.objective, got.bound, gap, got.status,
                       got.wall_s, {"proved_by": "elimination + CP-SAT" if proved else "", **stats})
    solved = Solved(built, sol, got.bound, 0.0, "optimal", rounds, "") if proved else \
        Solved(built, sol, got.bound, 0.0, "feasible", rounds, "")
    return (solved if proved else None), got.bound, (None if proved else solved)



def joint_unlimited(graph, mesh, hw, phases, limit, fix, prune, merge, memory_of, rounds: list,
                    until: float, built=None, hint=None) -> tuple[Solved | None, float, tuple | None]:
    """The joint problem (both phases, stored layouts shared) without the memory
    limit, solved exactly by elimination (eliminate.py); declaration layouts that
    cannot fit are ruled out first (exact). Its optimum bounds the limited
    optimum from below; when its plan fits, it is the limited optimum: returned
    as a proved plan. hint: an assignment of `built` (a plan that fits is one of
    this problem too: an upper bound from the start). Each pass's plan is
    repaired as in joint_limited. Returns (that plan or None, the bound, (the
    folded Built, the unlimited plan) when that plan does not fit, for priced())."""
    t0 = time.perf_counter()
    if built is None:
        built = build_joint(graph, mesh, hw, phases, limit, fix, prune, merge)
    got = eliminate.solve(built.sg, hint=hint, until=until, repair=KNAPSACK_REPAIR)
    fits = got.assignment is not None and (limit is None or memory_of(built, got.assignment) <= limit)
    rounds.append({"model": "joint unlimited, elimination", "status": got.status, "objective": got.objective,
                   "bound": got.bound, "fits": fits, "wall_s": time.perf_counter() - t0, **built.stats,
                   **{k: v for k, v in got.stats.items() if k != "bounds"}})
    if got.status == "infeasible":
        return None, -math.inf, None
    if got.status != "optimal" or not fits:
        return None, got.bound, ((built, got.assignment) if got.assignment is not None else None)
    sol = ilp.Solution(got.assignment, got.objective, got.objective, 0.0, "optimal", got.wall_s,
                       {"proved_by": "elimination", **{k: v for k, v in got.stats.items() if k != "bounds"}})
    return Solved(built, sol, got.objective, 0.0, "optimal", rounds, ""), got.bound, None


def priced(unlimited, limit: float, memory_of, best: Solved, lower: float, rounds: list,
            until: float) -> tuple[Solved, float]:
    """A Lagrangian lower bound when the unlimited joint plan x0 does not fit.
    At the time point t where x0 holds the most, every plan that fits has
    usage(t) <= limit, so lam * (usage(t) - limit) <= 0 and min over plans of
    cost + lam * usage(t), minus lam * limit, bounds the limited optimum from
    below (usage(t) counts each folded statement at its smallest variant, so it
    never exceeds the plan's memory). lam = (best cost - bound) / x0's excess:
    the price at which x0's overflow costs the gap (PaLM 540B, 118 layers:
    3.8e-12 s/B; the bound then rises from 12.450 to ~12.51 s). The priced plan,
    if it fits and is cheaper, is kept. Returns (best, bound)."""
    t0 = time.perf_counter()
    built, x0 = unlimited
    sg = built.sg
    over = memory_of(built, x0) - limit
    lam = (best.solution.objective - lower) / over if over > 0 else 0.0
    if not lam > 0 or not math.isfinite(lam):
        return best, lower
    held = [float(u[x]) for u, x in zip(sg.node_usages, x0)]
    points = sorted({a for a, b in sg.intervals if b > a})

    def live(p):        # stored nodes and one phase's (the memory takes the largest phase, not a sum)
        by = defaultdict(float)
        for n, h, (a, b) in zip(built.nodes, held, sg.intervals):
            if a <= p < b and not is_stored(n):
                by[n.phase] += h
        ph = max(by, key=by.get) if by else None
        return ph, by.get(ph, 0.0)
    t = max(points, key=lambda p: live(p)[1])
    phase = live(t)[0]
    costs = []
    for n, c, (a, b) in zip(built.nodes, sg.node_costs, sg.intervals):
        if not a <= t < b or not (is_stored(n) or n.phase == phase):
            costs.append(c)
            continue
        if n.kind == "stmt" and n.layouts and n.layouts[0] is None:     # folded: its smallest variant
            use = np.array([min(v.mem for v in n.strategies[si].variants) for si, _ in n.choices])
        else:
            use = n.usage
        costs.append(c + lam * use)
    try:        # the best plan so far: a good first upper bound of the priced problem
        hint = map_assignment(best.built, best.solution.assignment, built)
    except (KeyError, ValueError, StopIteration):
        hint = None
    got = eliminate.solve(replace(sg, node_costs=costs, usage_limit=None), hint=hint, until=until)
    bound = got.bound - lam * limit
    kept = False
    if got.assignment is not None and memory_of(built, got.assignment) <= limit:
        obj = ilp.evaluate(sg, got.assignment)
        if obj < best.solution.objective:
            old = best.solution
            best = replace(best, built=built, solution=ilp.Solution(got.assignment, obj, old.bound, old.gap,
                                                                    old.status, old.wall_s, dict(old.stats)))
            kept = True
    rounds.append({"model": "joint, memory priced (bound)", "status": got.status, "objective": got.objective,
                   "bound": bound, "price_s_per_byte": lam, "time_point": t, "plan_kept": kept,
                   "wall_s": time.perf_counter() - t0, **{k: v for k, v in got.stats.items() if k != "bounds"}})
    return best, max(lower, bound)
