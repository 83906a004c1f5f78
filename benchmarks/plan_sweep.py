"""The planner across models, meshes, memory limits and phases, against the
planner without its relaxations (the baseline, in the same run): how long a plan
takes, whether it is proved, and what the relaxations buy.

    python benchmarks/plan_sweep.py [--cases palm-4x4x4,llama70b-4x4x4,...] [--time-limit 30]
                                    [--no-baseline] [--out FILE]

The planner's one-phase and two-phase paths first solve relaxations of the
memory-limited problem by elimination and CP-SAT (passes/shard/joint.py:
stored layouts exact, then each folded statement at its smallest variant); the
baseline turns them off (joint.joint_limited returns nothing), which is the
planner before them: the exact CP-SAT model for one phase, the phases-alone /
pinned / polish / priced steps for two. Each row: wall and CPU seconds, status,
gap and plan cost of both, and the ratios (baseline / planner: > 1 means the
relaxations help). Prints a table and writes JSON (device, versions, command)
to benchmarks/results/plan-sweep-<time>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import einpart.passes.shard  # noqa: E402,F401
from einpart.errors import EinpartError  # noqa: E402
from einpart.ir.parser import parse_file  # noqa: E402
from einpart.passes import run_pipeline  # noqa: E402
from einpart.passes.shard import joint, plan  # noqa: E402
from plan import envelope, write_result  # noqa: E402

MODELS = {
    "palm540b": ("palm.ein", dict(D=18432, F=73728, H=48, K=256, V=256000, L=118)),
    "llama8b": ("llama.ein", dict(D=4096, F=14336, H=32, G=8, K=128, L=32, V=128256)),
    "llama70b": ("llama.ein", dict(D=8192, F=28672, H=64, G=8, K=128, L=80, V=128256)),
}
# name: (model, mesh, hardware, memory limit in bytes per device; 0: the hardware's HBM)
CASES = {
    "palm540b-4x4x4": ("palm540b", "x=4,y=4,z=4", "tpu-v4", 0.0),
    "palm540b-4x4x4-24GB": ("palm540b", "x=4,y=4,z=4", "tpu-v4", 24e9),
    "palm540b-4x4x4-20GB": ("palm540b", "x=4,y=4,z=4", "tpu-v4", 20e9),
    "llama70b-4x4x4": ("llama70b", "x=4,y=4,z=4", "tpu-v4", 0.0),
    "llama70b-2x4x4": ("llama70b", "x=2,y=4,z=4", "tpu-v4", 0.0),
    "llama70b-2x4-h100": ("llama70b", "2x4", "h100", 0.0),
    "llama8b-4x4x4": ("llama8b", "x=4,y=4,z=4", "tpu-v4", 0.0),
    "llama8b-2x4-h100": ("llama8b", "2x4", "h100", 0.0),
}


def run_one(graph, mesh, hw, phase, limit, args) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        p = plan(graph, mesh, hw, phase, batch=args.batch, context=args.context, prompt=args.prompt,
                 steps=args.steps, time_limit=args.time_limit, workers=args.workers, memory_limit=limit)
    except EinpartError as e:
        return {"error": str(e).splitlines()[0], "wall_s": time.perf_counter() - t0}
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "status": p.status,
            "gap": p.gap, "objective": p.objective, "bound": p.bound, "note": p.note,
            "rounds": [r["model"] for r in p.stats.get("rounds", [])]}


def without_relaxations():
    """Context: joint.joint_limited off (the planner before its relaxations)."""
    class Off:
        def __enter__(self):
            self.saved = joint.joint_limited
            joint.joint_limited = lambda *a, **k: (None, -np.inf, None)

        def __exit__(self, *exc):
            joint.joint_limited = self.saved
    return Off()


def cell(r: dict) -> str:
    if "error" in r:
        return f"error: {r['error'][:40]}"
    return f"{r['wall_s']:6.2f} s {r['status']:<8} gap {r['gap']:.1e} cost {r['objective']:.6g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--phases", default="both,prefill,decode")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-baseline", action="store_true", help="skip the planner without its relaxations")
    ap.add_argument("--out", metavar="FILE")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r} (known: {', '.join(CASES)})")

    graphs, rows = {}, []
    print(f"{'case':<22} {'phase':<8} {'planner':<52} {'without relaxations':<52} time x  cost x")
    for name in args.cases.split(","):
        model, mesh, hw, limit = CASES[name]
        if model not in graphs:
            spec, sizes = MODELS[model]
            graphs[model] = run_pipeline(parse_file(ROOT / "examples" / spec, sizes), "cast{dtype=bf16}").graph
        for phase in args.phases.split(","):
            row = {"case": name, "model": model, "mesh": mesh, "hardware": hw, "memory_limit": limit,
                   "phase": phase, "planner": run_one(graphs[model], mesh, hw, phase, limit, args)}
            if not args.no_baseline:
                with without_relaxations():
                    row["baseline"] = run_one(graphs[model], mesh, hw, phase, limit, args)
            a, b = row["planner"], row.get("baseline")
            ratios = ""
            if b is not None and "error" not in a and "error" not in b:
                row["time_ratio"] = b["wall_s"] / max(a["wall_s"], 1e-9)
                row["cost_ratio"] = b["objective"] / a["objective"]
                ratios = f"{row['time_ratio']:6.2f} {row['cost_ratio']:7.4f}"
            rows.append(row)
            print(f"{name:<22} {phase:<8} {cell(a):<52} {cell(b) if b else '':<52} {ratios}", flush=True)
    print(f"wrote {write_result(envelope('plan_sweep', args, rows), 'plan-sweep', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
