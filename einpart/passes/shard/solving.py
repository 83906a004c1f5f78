"""Solving the planner's strategy graphs into a plan: one phase (solve_phase)
and prefill and decode together (solve_plan), each a sequence of rounds whose
records the plan keeps (relaxations that usually prove, exact models, pinned
joint solves, one-node polish, priced bounds). planner.py builds the graphs;
joint.py holds the exact steps by elimination; this module decides which runs
when, within one time limit.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from ...errors import PlanError
from ...ir import graph as g
from . import ilp, joint, polish
from .hardware import Hardware
from .phases import Phase
from .planner import (PREP, Builder, Built, NoPlanInTime, Solved, map_assignment, memory_error, memory_floor,
                      rule_out_oversized)


def _time_note(time_limit: float, gap: float) -> str:
    return f"time limit ({time_limit:g} s) hit: best plan found, gap {gap:.3g}"


def solve_built(built: Built, plain, **kw) -> ilp.Solution:
    """Solve a strategy graph with merge-pair edges. The pair edges close cycles
    the reductions cannot remove, and CP-SAT alone then often stops at worse
    plans than the graph without them has: so the graph without pair edges
    (`plain()`, built with merge=False, branch=False) is solved first and its plan, which the
    pair graph prices at most as high, is the hint (and the plan, should the
    pair graph's solve run out of time first). Branch pairs (layout.branch_partners,
    always on) close cycles too: the same two steps."""
    if not built.stats.get("merge_pairs") and not built.stats.get("branch_pairs"):
        return ilp.solve(built.sg, **kw)
    until = time.perf_counter() + kw["time_limit"]     # (the two solves share the one limit)
    other = plain()
    first = ilp.solve(other.sg, **{**kw, "time_limit": 0.5 * kw["time_limit"]})
    hint = map_assignment(other, first.assignment, built) if first.assignment else None
    second = ilp.solve(built.sg, hint=hint, **{**kw, "time_limit": max(until - time.perf_counter(),
                                                                           0.1 * kw["time_limit"])})
    if second.assignment is None and hint is not None:     # (out of time before a plan: the first's)
        obj = ilp.evaluate(built.sg, hint)
        return replace(second, assignment=hint, objective=obj, status="feasible",
                       gap=max(0.0, (obj - second.bound) / max(abs(obj), 1e-30)))
    return second


# Share of a two-phase plan's time limit the second relaxation (joint.least_variants) gets
# when the first one's plan does not fit: it rarely proves there, but its plan is the best
# found (PaLM 540B both phases at 20 / 22 GB: 12.266 / 12.360 s in 7.5-8.4 s, where the steps
# after it end at 12.366 / 12.389 s in ~35 s).
LEAST_SHARE = 0.3


def solve_plan(graph: g.Graph, mesh, hw: Hardware, phases: list[Phase], limit: float | None,
               time_limit: float, workers: int, fix: dict | None, prune: bool, seed: int,
               memory_of, deterministic: bool = False, merge: bool = False) -> Solved:
    """One phase: solve_phase. merge: price merged reductions (Builder merge
    pairs). Prefill and decode together: the phases share only
    the declarations (weights, KV cache), and the joint strategy graph is much
    harder for the solver than either phase alone. So each phase is solved on
    its own (a relaxation: the sum of their optima, weighted, bounds the joint
    optimum from below), then the joint problem is solved with the declarations
    pinned to each phase's choice (small and fast), and the best joint plan is
    kept with its gap to that bound (0 when a phase's weights suit both)."""
    if len(phases) == 1:
        return solve_phase(graph, mesh, hw, phases, limit, time_limit, workers, fix, prune, seed, memory_of,
                           deterministic=deterministic, merge=merge, knapsack=True)
    devices = math.prod(s for _, s in mesh)
    until = time.perf_counter() + time_limit

    def left():      # what is left of the one time limit, and at least a quarter of it
        return max(until - time.perf_counter(), 0.25 * time_limit)

    rounds: list = []
    knap_bound, knap_plan = -math.inf, None
    folded = joint.build_joint(graph, mesh, hw, phases, limit, fix, prune, merge)
    if limit is not None:      # stored layouts exact, activations at their least: usually proved here
        proved, knap_bound, knap_plan = joint.joint_limited(
            graph, mesh, hw, phases, limit, fix, prune, merge, memory_of, rounds,
            math.inf if deterministic else until, seed, deterministic, built=folded)
        if proved is not None:
            return proved
        if knap_plan is None and knap_bound > -math.inf:     # its plan did not fit: activations bind
            got = joint.joint_limited(
                graph, mesh, hw, phases, limit, fix, prune, merge, memory_of, rounds,
                math.inf if deterministic else min(until, time.perf_counter() + LEAST_SHARE * time_limit),
                seed, deterministic, built=folded, relaxation="activations at their least variant", patience=None)
            if got[0] is not None:
                return got[0]
            knap_bound, knap_plan = max(knap_bound, got[1]), got[2]
    joint_plan, joint_bound, unlimited = joint.joint_unlimited(
        graph, mesh, hw, phases, limit, fix, prune, merge, memory_of, rounds,
        math.inf if deterministic else until, built=folded,
        hint=knap_plan.solution.assignment if knap_plan else None)
    if joint_plan is not None:
        return joint_plan
    lower, cands = 0.0, []
    for ph in phases:
        built = Builder(graph, mesh, hw, [ph], fix, fold=True, prune=prune, merge=merge).build(None)
        slack = None
        if limit is not None:
            floor = memory_floor(built, [ph])
            if sum(floor.values()) > limit:
                raise memory_error(floor, limit, hw, devices)
            slack = limit - sum(floor.values())
            rule_out_oversized(built, slack)

        def plain(ph=ph, slack=slack):
            b = Builder(graph, mesh, hw, [ph], fix, fold=True, prune=prune, merge=False, branch=False).build(None)
            if slack is not None:
                rule_out_oversized(b, slack)
            return b
        sol = solve_built(built, plain, time_limit=left(), seed=seed, workers=workers, deterministic=deterministic)
        rounds.append({"model": f"{ph.name} alone (bound)", "status": sol.status, "objective": sol.objective,
                       "bound": sol.bound, "wall_s": sol.wall_s, **built.stats})
        if sol.status in ("infeasible", "unknown"):
            return solve_phase(graph, mesh, hw, phases, limit, left(), workers, fix, prune, seed, memory_of,
                               time_limit, deterministic, merge)
        lower += sol.bound
        sizes = dict(mesh)
        cand = {}
        for i, n in enumerate(built.nodes):
            if n.kind != "decl":
                continue
            layout = dict(zip(n.indices, n.layouts[sol.assignment[i]]))
            if all(p.idx[j] % math.prod(sizes[a] for a in ax) == 0 for j, ax in layout.items() for p in phases):
                cand[n.tensor] = layout    # (a layout legal in this phase only, e.g. a split prompt, is left free)
        for i, n in enumerate(built.nodes):   # prepared weights: pinned as (split, stored layout)
            if n.phase == PREP:
                st, var = n.choice(sol.assignment[i])
                cand[n.tensor] = (st.split, dict(zip(n.indices, var.out)))
        if cand not in cands:
            cands.append(cand)
    # (Letting every declaration choose between the phases' choices in one joint
    # solve found plans ~1% better on PaLM 540B, at 2-5x the time: not by default.)
    best = None
    for cand in cands:
        try:
            got = solve_phase(graph, mesh, hw, phases, limit, left(), workers, {**cand, **(fix or {})},
                              prune, seed, memory_of, time_limit, deterministic, merge)
        except NoPlanInTime:
            if best is None and cand is cands[-1]:
                raise
            continue
        except PlanError:
            continue
        rounds += [dict(r, model=f"joint, weights pinned ({r['model']})") for r in got.rounds]
        if best is None or got.solution.objective < best.solution.objective:
            best = got
    if best is None:      # no phase's weights serve both: the joint model, as it is
        best = solve_phase(graph, mesh, hw, phases, limit, left(), workers, fix, prune, seed, memory_of,
                           time_limit, deterministic, merge)
        rounds += best.rounds
        lower = max(lower, best.bound)
    best = _polished(graph, mesh, hw, phases, limit, fix, prune, memory_of, best, rounds, merge,
                     math.inf if deterministic else max(until, time.perf_counter() + 0.1 * time_limit))
    lower = max(lower, joint_bound)
    if knap_plan is not None and knap_plan.solution.objective < best.solution.objective:
        best = replace(best, built=knap_plan.built, solution=knap_plan.solution)
    if unlimited is not None and limit is not None and (deterministic or time.perf_counter() < until):
        best, lower = joint.priced(unlimited, limit, memory_of, best, lower, rounds,
                                   math.inf if deterministic else until)
    lower = max(lower, knap_bound)     # (after joint.priced: its price is set from the unlimited bound)
    obj = best.solution.objective
    gap = max(0.0, (obj - lower) / max(abs(obj), 1e-30))
    proved = best.status == "optimal" and gap <= 1e-9
    note = "" if proved else best.note or "gap to the phases' separate optima (weights shared by both)"
    if best.note.startswith("time limit"):     # (an inner solve's note: its own gap, not this plan's)
        note = _time_note(time_limit, gap)
    return Solved(best.built, best.solution, min(lower, obj), 0.0 if proved else gap,
                  "optimal" if proved else "feasible", rounds, note)


def _polished(graph, mesh, hw, phases, limit, fix, prune, memory_of, best: Solved, rounds: list,
              merge: bool, until: float) -> Solved:
    """best, improved by one-node changes on the exact joint graph with the stored
    layouts free (polish.py: recovers weights that neither phase alone picks)."""
    t0 = time.perf_counter()
    exact = Builder(graph, mesh, hw, phases, fix, fold=False, prune=prune, merge=merge).build(limit)
    got = polish.polish(best, exact, memory_of, limit, until)
    rounds.append({"model": "joint, one-node changes", "status": "improved" if got else "unchanged",
                   "objective": got[1] if got else best.solution.objective, "bound": -math.inf,
                   "changes": got[2] if got else 0, "wall_s": time.perf_counter() - t0, **exact.stats})
    if got is None:
        return best
    x, obj, moves = got
    old = best.solution
    sol = ilp.Solution(x, obj, old.bound, old.gap, old.status, old.wall_s + time.perf_counter() - t0,
                       dict(old.stats, polish_changes=moves))
    return replace(best, built=exact, solution=sol)


def solve_phase(graph: g.Graph, mesh, hw: Hardware, phases: list[Phase], limit: float | None,
                time_limit: float, workers: int, fix: dict | None, prune: bool, seed: int,
                memory_of, asked: float | None = None, deterministic: bool = False,
                merge: bool = False, knapsack: bool = False) -> Solved:
    """Solve without the memory limit first (folded, small, usually solved by the
    reductions alone); if that plan fits it is optimal for the limited problem
    too. Otherwise, with `knapsack`, the stored-layout relaxation
    (joint.joint_limited: elimination, then CP-SAT on ~10 stored layouts), which
    usually proves the limited optimum (PaLM 540B prefill on tpu-v4 4x4x4: 1.3-1.7 s,
    where the CP-SAT model below ran out of its 30 s at a 0.5-5% gap), and when
    its plan does not fit (activations bind), the tighter joint.least_variants. Otherwise
    solve the exact model (every reduce-scatter variant its own strategy) with
    the limit; the unlimited optimum stays a lower bound. `memory_of(built,
    assignment)` returns the bytes per device of a plan; `asked` is the time
    limit the user gave (for messages) when time_limit is what is left of it.
    (solve_plan's pinned joint solves leave `knapsack` off: their stored layouts
    are fixed, and the relaxation already ran on the joint graph.)"""
    devices = math.prod(s for _, s in mesh)
    asked = time_limit if asked is None else asked
    t0 = time.perf_counter()
    built = Builder(graph, mesh, hw, phases, fix, fold=True, prune=prune, merge=merge).build(None)
    if limit is not None:
        floor = memory_floor(built, phases)
        if sum(floor.values()) > limit:
            raise memory_error(floor, limit, hw, devices)
        rule_out_oversized(built, limit - sum(floor.values()))

    def plain():
        b = Builder(graph, mesh, hw, phases, fix, fold=True, prune=prune, merge=False, branch=False).build(None)
        if limit is not None:
            rule_out_oversized(b, limit - sum(memory_floor(b, phases).values()))
        return b
    sol = solve_built(built, plain, time_limit=time_limit, seed=seed, workers=workers, deterministic=deterministic)
    rounds = [{"model": "unlimited", "status": sol.status, "objective": sol.objective, "bound": sol.bound,
               "wall_s": sol.wall_s, **built.stats}]
    if sol.status == "infeasible":
        raise PlanError("no plan exists: every combination of layouts is ruled out "
                        "(a fixed layout may conflict with the cache or the layer carry)")
    if sol.status == "unknown":
        raise NoPlanInTime(f"the solver found no plan within its time limit ({asked:g} s)")
    if limit is None or memory_of(built, sol.assignment) <= limit:
        return Solved(built, sol, sol.bound, sol.gap, sol.status, rounds,
                      "" if sol.status == "optimal" else _time_note(asked, sol.gap))
    relaxed, knap_plan = sol.bound, None
    for relaxation in joint.RELAXATIONS if knapsack else ():   # the next only when the first's plan does not fit
        if knap_plan is not None or not (deterministic or time.perf_counter() < t0 + time_limit):
            break
        proved, knap_bound, knap_plan = joint.joint_limited(
            graph, mesh, hw, phases, limit, fix, prune, merge, memory_of, rounds,
            math.inf if deterministic else t0 + time_limit, seed, deterministic, built=built, relaxation=relaxation)
        if proved is not None:
            return proved
        relaxed = max(relaxed, knap_bound)
    left = max(time_limit - (time.perf_counter() - t0), 0.25 * time_limit)
    exact = Builder(graph, mesh, hw, phases, fix, fold=False, prune=prune, merge=merge).build(limit)
    rule_out_oversized(exact, limit - sum(memory_floor(exact, phases).values()))

    def plain_exact():
        b = Builder(graph, mesh, hw, phases, fix, fold=False, prune=prune, merge=False, branch=False).build(limit)
        rule_out_oversized(b, limit - sum(memory_floor(b, phases).values()))
        return b
    sol = solve_built(exact, plain_exact, time_limit=left, seed=seed, workers=workers, deterministic=deterministic)
    rounds.append({"model": "memory-limited", "status": sol.status, "objective": sol.objective,
                   "bound": sol.bound, "wall_s": sol.wall_s, **exact.stats})
    if sol.status == "infeasible":
        raise memory_error(memory_floor(exact, phases), limit, hw, devices,
                           "no combination of layouts fits, although each class alone could")
    if sol.status == "unknown" and knap_plan is None:
        raise NoPlanInTime(f"the solver found no plan that fits in memory within its time limit ({asked:g} s)")
    if knap_plan is not None and (sol.status == "unknown" or knap_plan.solution.objective < sol.objective):
        exact, sol = knap_plan.built, replace(knap_plan.solution, status="feasible")
    bound = max(sol.bound, relaxed) if sol.status != "optimal" else sol.objective
    gap = 0.0 if sol.status == "optimal" else max((sol.objective - bound) / max(abs(sol.objective), 1e-30), 0.0)
    return Solved(exact, sol, bound, gap, sol.status, rounds,
                  "" if sol.status == "optimal" else _time_note(asked, gap))
