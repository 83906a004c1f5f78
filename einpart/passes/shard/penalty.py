"""Soft-memory rounds of ``ilp.solve`` (step 3 of its pipeline): a Lagrangian
relaxation of the memory constraints, each round solved by CP-SAT on the
memory-free graph and repaired by the memory-respecting descent.  Moved out
of ``ilp.py`` (which keeps the CP-SAT model and the pipeline) to keep that
file short; ``ilp`` is imported as a module because it imports this one."""
from __future__ import annotations

import copy
import math
import time

import numpy as np
from ortools.sat.python import cp_model

from . import ilp as _ilp
from .descent import Descent, local_search

__all__ = ["penalty_rounds"]

_THETA0 = 0.05  # initial Polyak step factor of the soft-memory rounds


def penalty_rounds(work, graph, best, best_obj, until, workers, seed, deterministic, form, stats, share=20.0):
    """Soft-memory rounds (Lagrangian relaxation of the memory constraints).

    Each round adds lam_c * usage to the node costs, drops the memory limit
    (so every node becomes memory-free and the reductions shrink the graph
    much further), solves that with CP-SAT, and repairs the memory overflow
    of its answer with the memory-respecting local search.  The multipliers
    follow a Polyak subgradient step.  Returns (best, best_obj, lower bound):
    the penalised optimum minus lam.b bounds the constrained optimum below."""
    cons, _ = work.memory_constraints()
    lb = -math.inf
    if not cons:
        return best, best_obj, lb
    b = np.array([bc for _, bc in cons])
    lam = np.zeros(len(cons))
    base = copy.deepcopy(work)
    base.limit, base.parts, base.dirty = None, [[] for _ in range(base.n)], set(base.nodes())
    prev = _ilp._to_partial(work, best) if best else None
    repair = Descent(work)   # work does not change during the rounds: its tables are built once
    theta, stall, rounds = _THETA0, 0, 0
    while rounds < (3 if deterministic else 50):
        left = until - time.perf_counter()
        if not deterministic and left < 2.0:
            break
        rounds += 1
        tr = time.perf_counter()
        wi = copy.deepcopy(base)
        for c, (terms, _) in enumerate(cons):
            if lam[c] > 0:
                for i, coef in terms.items():
                    wi.cost[i] = wi.cost[i] + lam[c] * coef
        wi.run()
        start = local_search(wi, start=prev, iters=100, seed=seed + rounds)
        if wi.nodes():
            model = _ilp._Model(wi, form=form)
            if start:
                model.hint(start)
            st, solver = _ilp._cpsat(model, min(2.0, 0.1 * share) if deterministic else min(4.0, 0.5 * left),
                                workers, seed, deterministic)
            if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
                stats.setdefault("penalty_rounds", []).append(
                    {"inner_status": solver.status_name(st), "wall_s": round(time.perf_counter() - tr, 2)})
                break
            full = wi.reconstruct(model.read(solver))
            err = 0.0 if model.exact else (model.terms + 1) * 0.5 / model.scale
            # only a proved optimum is used as the Lagrangian value (a bound read
            # from a run cut short in presolve was once seen above the optimum)
            bound = (solver.objective_value / model.scale + model.base - err
                     if st == cp_model.OPTIMAL else -math.inf)
            raw = solver.best_objective_bound / model.scale + model.base
        else:
            full, bound = wi.reconstruct({}), wi.const
            raw = bound
        xp = _ilp._to_partial(work, full)
        prev = xp
        lagr = bound - float(lam @ b)
        if lagr > best_obj:  # cannot be a bound: ignore
            lagr = -math.inf
        if lagr > lb and (lb == -math.inf or lagr > lb + 1e-9 * abs(lb)):
            lb, stall = lagr, 0
        else:
            stall += 1
            if stall >= 2:
                theta, stall = theta / 2, 0
        g = np.array([sum(coef[np.searchsorted(work.strat[i], xp[i])] for i, coef in terms.items())
                      for terms, _ in cons]) - b
        cands = [xp] if (g <= 0).all() else []
        for k in range(4):  # repair the overflow (and improve) with the memory-aware local search
            xr = repair.run(start=xp, iters=100, seed=seed + 1000 * rounds + k)
            if xr:
                cands.append(xr)
        for xc in cands:
            fullc = work.reconstruct(xc)
            obj = _ilp.evaluate(graph, fullc)
            if obj < best_obj and _ilp._feasible(graph, fullc):
                best, best_obj = fullc, obj
        stats.setdefault("penalty_rounds", []).append(
            {"lagrangian_bound": lagr, "overflow": float(np.maximum(g, 0).sum()), "best": best_obj,
             "wall_s": round(time.perf_counter() - tr, 2)})
        nrm = float(g @ g)
        if nrm == 0 or lb >= best_obj - 1e-9 * abs(best_obj):  # gap closed: best is optimal
            break
        # Polyak step towards the best cost; the reference value is the inner
        # solver's bound even when not proved (a step size needs no proof)
        ref = min(raw - float(lam @ b), best_obj) if math.isfinite(best_obj) else raw - float(lam @ b)
        ub = best_obj if math.isfinite(best_obj) else 2 * abs(ref) + 1
        lam = np.maximum(0.0, lam + theta * max(ub - ref, 0.01 * abs(ub)) / nrm * g)
    return best, best_obj, lb
