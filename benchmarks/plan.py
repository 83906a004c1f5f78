"""Benchmark the sharding planner on PaLM 540B (examples/palm.ein), the issue's
speed target: both phases on a 64-chip 4x4x4 TPU v4 mesh, 118 and 8 layers,
under 2 s on 2 CPU cores with gap 0 for the layer body.

    python benchmarks/plan.py [--layers 118 8] [--phases both decode prefill]
                              [--dump-iopddl DIR]

Prints a table and writes JSON (device, versions, command, results) to
benchmarks/results/plan-<time>.json. Each row also gives its wall time over a
fixed machine probe run first (machine_probe: numpy and Python work shaped like
the planner's), which compares runs across machines. --dump-iopddl writes each strategy graph
in the IOPDDL JSON format, for benchmarking the solver core on its own
(`einpart solve-iopddl FILE`).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import einpart.passes.shard  # noqa: E402,F401
from einpart.ir.parser import parse_file  # noqa: E402
from einpart.passes import run_pipeline  # noqa: E402
from einpart.passes.shard import plan  # noqa: E402

PALM_540B = dict(D=18432, F=73728, H=48, K=256, V=256000)


def versions() -> dict:
    out = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import ortools
        out["ortools"] = ortools.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, check=False).stdout.strip()
    except OSError:  # pragma: no cover
        pass
    return out


def device() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def envelope(benchmark: str, args, rows: list) -> dict:
    """A benchmark's JSON: what ran (command, arguments), where (device,
    versions), when, and its rows."""
    return {"benchmark": benchmark, "command": " ".join([sys.executable] + sys.argv), "device": device(),
            "versions": versions(), "args": vars(args), "results": rows,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def machine_probe(repeats: int = 5) -> dict:
    """Seconds of a fixed workload shaped like the planner's, the median of a few
    runs: numpy (broadcast sums and min-reductions over L2-sized blocks, as the
    junction passes and dominance tests do) and Python (tuples, dicts and small
    loops, as the builder does). The planner's times over these compare across
    machines: the same code ran 1.35-1.4x slower on one 2-core machine than on
    another (2026-12-02 and -03), which the times alone do not show."""
    rng = np.random.default_rng(0)
    a, b, c = rng.random((64, 1, 32, 32)), rng.random((1, 64, 32, 32)), rng.random((64, 64, 1, 32))
    buf = np.empty((64, 64, 32, 32))

    def numpy_part():
        for _ in range(12):
            np.add(a, b, out=buf)
            np.add(buf, c, out=buf)
            buf.min(axis=-1)
            buf.min(axis=(0, 2))

    def python_part():
        d = {}
        for i in range(1_200_000):
            key = (i % 97, (i * 7) % 13, ("x", "y")[i & 1])
            d[key] = d.get(key, 0) + len(key)
        return d

    out = {}
    for name, fn in (("numpy_s", numpy_part), ("python_s", python_part)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    out["total_s"] = out["numpy_s"] + out["python_s"]
    return out


def write_result(result: dict, name: str, out: str | None = None, default=str) -> Path:
    """Write a benchmark's JSON: to `out`, or benchmarks/results/<name>-<time>.json."""
    path = Path(out) if out else ROOT / "benchmarks" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=default))
    return path


def dump_iopddl(graph, mesh, hw, phase, args, path: Path):
    """The strategy graph the planner solves first, in the IOPDDL format."""
    from einpart.passes.shard import planner as pl
    from einpart.passes.shard.hardware import load_hardware
    from einpart.passes.shard.mesh import parse_mesh
    from einpart.passes.shard.phases import make_phases
    phases = make_phases(graph, phase, args.batch, args.context, args.prompt, args.steps)
    hwo = load_hardware(hw)
    b = pl.Builder(graph, parse_mesh(mesh), hwo, phases).build(hwo.hbm_bytes)
    scale = 1e9   # seconds -> integer nanoseconds, as the format's costs are integers in the contest
    sg = b.sg

    def ints(a):
        return [int(min(round(float(x) * scale), 10 ** 15)) for x in a]
    data = {"problem": {"name": path.stem, "nodes": {
        "intervals": [list(map(int, iv)) for iv in sg.intervals],
        "costs": [ints(c) for c in sg.node_costs],
        "usages": [[int(u) for u in us] for us in sg.node_usages]},
        "edges": {"nodes": [list(e) for e in sg.edges], "costs": [ints(m.ravel()) for m in sg.edge_costs]},
        "usage_limit": int(hwo.hbm_bytes)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(data, f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[118, 8])
    ap.add_argument("--phases", nargs="+", default=["both", "decode", "prefill"])
    ap.add_argument("--mesh", default="x=4,y=4,z=4")
    ap.add_argument("--hardware", default="tpu-v4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dump-iopddl", metavar="DIR")
    ap.add_argument("--out", metavar="FILE")
    args = ap.parse_args(argv)

    probe = machine_probe()
    print(f"machine probe: {probe['total_s']:.3f} s (numpy {probe['numpy_s']:.3f}, python {probe['python_s']:.3f}); "
          "'x probe' below is wall / probe", flush=True)
    rows = []
    for layers in args.layers:
        t0 = time.perf_counter()
        graph = run_pipeline(parse_file(ROOT / "examples" / "palm.ein", dict(PALM_540B, L=layers)),
                             "cast{dtype=bf16}").graph
        t_parse = time.perf_counter() - t0
        for phase in args.phases:
            t0, c0 = time.perf_counter(), time.process_time()
            p = plan(graph, args.mesh, args.hardware, phase, batch=args.batch, context=args.context,
                     prompt=args.prompt, steps=args.steps, time_limit=args.time_limit, workers=args.workers)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            row = {"layers": layers, "phase": phase, "wall_s": wall, "cpu_s": cpu, "parse_s": t_parse,
                   "status": p.status, "note": p.note, "solver_times_s": p.stats.get("solver", {}).get("time_s"),
                   "gap": p.gap, "objective": p.objective, "bound": p.bound,
                   "nodes": p.stats.get("nodes"), "strategies": p.stats.get("strategies", 0),
                   "edges": p.stats.get("edges"), "rounds": p.stats.get("rounds"),
                   "phases": {k: {"step_s": r.step_s, "mfu": r.mfu, "memory_bytes": r.memory_bytes,
                                  "weights_bytes": r.weights_bytes, "kv_bytes": r.kv_bytes,
                                  "activation_bytes": r.activation_bytes} for k, r in p.phases.items()}}
            rows.append(row)
            if args.dump_iopddl:
                dump_iopddl(graph, args.mesh, args.hardware, phase, args,
                            Path(args.dump_iopddl) / f"palm540b-L{layers}-{phase}.json.gz")
            steps = ", ".join(f"{k} {v['step_s'] * (1e3 if k == 'decode' else 1):.4g} "
                              f"{'ms' if k == 'decode' else 's'} (MFU {100 * v['mfu']:.0f}%)"
                              for k, v in row["phases"].items())
            row["wall_over_probe"] = wall / probe["total_s"]
            print(f"L={layers:<4} {phase:<8} {wall:6.2f} s wall {cpu:6.2f} s cpu {row['wall_over_probe']:5.1f} x probe  "
                  f"{p.status:<8} gap {p.gap:.2%}  {row['strategies']:>6} strategies  {steps}", flush=True)
    print(f"wrote {write_result(dict(envelope('plan', args, rows), machine_probe=probe), 'plan', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
