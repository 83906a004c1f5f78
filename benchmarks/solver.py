"""Benchmark of the sharding ILP solver on IOPDDL contest instances.

    python benchmarks/solver.py [--time-limit 60] [--instances B,G,V] [--workers 2]

Each instance is solved with the same time limit, seed and worker count by
``full`` = reductions + local search + soft-memory rounds + CP-SAT (the default
``solve``), by ``plain`` = the plain CP-SAT model (pair-variable edges, no
reductions, no start solution), and, for the ablation, by ``full`` with one
reduction turned off (``-dominance``, ``-leaf_pareto``, ``-merge``,
``-eliminate``, ``-bound``; ``--no-ablation`` skips them).  Every row records
what is left after the reductions, the cost and its ratio to the best known,
wall and CPU time (the process's, so a loaded machine shows).  Prints a table
and writes ``benchmarks/results/solver-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ortools  # noqa: E402

from einpart.passes.shard.ilp import peak_usage, solve  # noqa: E402
from einpart.passes.shard.iopddl import load_iopddl  # noqa: E402
from einpart.passes.shard.reduce import REDUCTIONS  # noqa: E402

ABLATIONS = tuple(REDUCTIONS) + ("bound",)

BEST_KNOWN = {"B": 532_843, "G": 217_039, "V": 1_632_051}


def _scipy_version():
    """scipy's HiGHS runs the MIP neighbourhoods (einpart/passes/shard/mip.py)."""
    try:
        import scipy
    except ImportError:
        return None
    return scipy.__version__


def device():
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def run(graph, name, time_limit, workers, seed, plain, skip=(), deterministic=False):
    t0, c0 = time.perf_counter(), time.process_time()
    if plain:
        sol = solve(graph, time_limit=time_limit, workers=workers, seed=seed, reductions=False, form="pairs")
    else:
        sol = solve(graph, time_limit=time_limit, workers=workers, seed=seed, skip=skip, deterministic=deterministic)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    best = BEST_KNOWN.get(name)
    ok = bool(sol.assignment) and (graph.usage_limit is None or peak_usage(graph, sol.assignment) <= graph.usage_limit)
    return {
        "status": sol.status,
        "cost": sol.objective if np.isfinite(sol.objective) else None,
        "bound": sol.bound if np.isfinite(sol.bound) else None,
        "gap": sol.gap if np.isfinite(sol.gap) else None,
        "ratio_to_best_known": (sol.objective / best) if best and np.isfinite(sol.objective) else None,
        "memory_ok": ok,
        "wall_s": wall,
        "cpu_s": cpu,
        "stats": sol.stats,
    }


def _num(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--instances", default="B,G,V")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    data = next((p for p in (ROOT.parent / "shared" / "iopddl", ROOT.parents[1] / "shared" / "iopddl")
                 if p.is_dir()), ROOT.parent / "shared" / "iopddl")   # a checkout, or a worktree under wt/
    ap.add_argument("--data", default=str(data))
    ap.add_argument("--no-plain", action="store_true", help="skip the plain CP-SAT baseline")
    ap.add_argument("--no-ablation", action="store_true", help="skip the runs with one reduction off")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic time limits (reproducible; wall time then exceeds the limit)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/solver-<date>.json)")
    args = ap.parse_args(argv)

    results = {"command": " ".join([Path(sys.executable).name] + sys.argv), "device": device(),
               "versions": {"python": platform.python_version(), "ortools": ortools.__version__,
                            "numpy": np.__version__, "scipy": _scipy_version()},
               "time_limit_s": args.time_limit, "workers": args.workers, "seed": args.seed, "deterministic": args.deterministic,
               "started": _dt.datetime.now().isoformat(timespec="seconds"), "instances": {}}
    rows = []
    for name in [s.strip() for s in args.instances.split(",") if s.strip()]:
        path = Path(args.data) / f"{name}.json.gz"
        t0 = time.perf_counter()
        graph = load_iopddl(path)
        load_s = time.perf_counter() - t0
        entry = {"file": str(path), "nodes": len(graph.node_costs), "edges": len(graph.edges),
                 "best_known": BEST_KNOWN.get(name), "load_s": load_s}
        entry["full"] = run(graph, name, args.time_limit, args.workers, args.seed, plain=False,
                            deterministic=args.deterministic)
        if not args.no_plain:
            entry["plain"] = run(graph, name, args.time_limit, args.workers, args.seed, plain=True)
        for red in () if args.no_ablation else ABLATIONS:
            entry[f"-{red}"] = run(graph, name, args.time_limit, args.workers, args.seed, plain=False, skip=(red,),
                                   deterministic=args.deterministic)
        results["instances"][name] = entry
        for kind in ("full", "plain") + tuple(f"-{r}" for r in ABLATIONS):
            if kind not in entry:
                continue
            r = entry[kind]
            st = r["stats"]
            before, after = st.get("before", {}), st.get("after", {})
            rows.append([name, kind,
                         f"{before.get('nodes', '-')}/{before.get('edges', '-')}/{before.get('strategies', '-')} -> "
                         f"{after.get('nodes', '-')}/{after.get('edges', '-')}/{after.get('strategies', '-')}",
                         _num(r["cost"]), _num(entry["best_known"]), _num(r["ratio_to_best_known"], "{:.3f}"),
                         _num(r["bound"]), r["status"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}"])
        print(f"{name}: done", file=sys.stderr, flush=True)

    head = ["inst", "solver", "nodes/edges/strategies before -> after", "cost", "best known", "ratio", "bound", "status",
            "wall s", "cpu s"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for r in [head] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"solver-{_dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
