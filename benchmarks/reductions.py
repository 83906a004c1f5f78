"""Benchmark of the exact reductions alone (reduce.Work.run) on planner-built
strategy graphs (PaLM 540B, examples/palm.ein, tpu-v4 4x4x4, batch 64, context
and prompt 2048) and the IOPDDL instances B, G, V: CPU time of the dominance
test as it is (sampled columns, then exact on surviving pairs) against the
previous full O(k^2 m) test, in the same run; both must leave the same graph.

    python benchmarks/reductions.py [--layers 118] [--instances B,G,V]

Prints a table and writes benchmarks/results/reductions-<time>.json.
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

from einpart.ir.parser import parse_file  # noqa: E402
from einpart.passes import run_pipeline  # noqa: E402
from einpart.passes.shard import dominance, planner as pl, reduce as red  # noqa: E402
from einpart.passes.shard.hardware import load_hardware  # noqa: E402
from einpart.passes.shard.iopddl import load_iopddl  # noqa: E402
from einpart.passes.shard.mesh import parse_mesh  # noqa: E402
from einpart.passes.shard.phases import make_phases  # noqa: E402
from plan import PALM_540B, device, versions, write_result  # noqa: E402


def full_dominance(cost, mats):
    """The previous test: every pair against every column, k x k x m per edge."""
    k = len(cost)
    d = cost[None, :] - cost[:, None]
    with np.errstate(invalid="ignore"):
        for m in mats:
            diff = m[None, :, :] - m[:, None, :]
            diff[np.broadcast_to(np.isinf(m)[:, None, :], diff.shape)] = -np.inf
            d += diff.max(axis=2)
    np.fill_diagonal(d, np.inf)
    return d <= 0 if k else np.zeros((0, 0), bool)


def reduce_once(sg, fn):
    dominance._dominated_pairs, saved = fn, dominance._dominated_pairs
    try:
        c0 = time.process_time()
        w = red.Work(sg.node_costs, sg.node_usages, sg.intervals, sg.edges, sg.edge_costs, sg.usage_limit)
        w.run()
        return time.process_time() - c0, w
    finally:
        dominance._dominated_pairs = saved


def graphs(args):
    hw, mesh = load_hardware("tpu-v4"), parse_mesh("x=4,y=4,z=4")
    for layers in args.layers:
        graph = run_pipeline(parse_file(ROOT / "examples" / "palm.ein", dict(PALM_540B, L=layers)),
                             "cast{dtype=bf16}").graph
        for phase in ("both", "prefill"):
            phases = make_phases(graph, phase, 64, 2048, 2048, 64)
            yield f"palm540b-L{layers}-{phase}-unlimited", pl.Builder(graph, mesh, hw, phases).build(None).sg
            yield (f"palm540b-L{layers}-{phase}-memory", pl.Builder(graph, mesh, hw, phases, fold=False)
                   .build(hw.hbm_bytes).sg)
    data = next((p for p in (ROOT.parent / "shared" / "iopddl", ROOT.parents[1] / "shared" / "iopddl")
                 if p.is_dir()), None)
    for name in args.instances.split(","):
        if data is not None and name:
            yield f"iopddl-{name}", load_iopddl(data / f"{name}.json.gz")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[118])
    ap.add_argument("--instances", default="B,G,V")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name, sg in graphs(args):
        t_new, w_new = reduce_once(sg, dominance._dominated_pairs)
        t_old, w_old = reduce_once(sg, full_dominance)
        same = w_new.counts() == w_old.counts() and all(
            np.array_equal(w_new.strat[i], w_old.strat[i]) for i in w_new.nodes())
        row = {"graph": name, "before": {"nodes": len(sg.node_costs), "edges": len(sg.edges),
                                         "strategies": int(sum(len(c) for c in sg.node_costs))},
               "after": w_new.counts(), "cpu_s": t_new, "cpu_s_full_test": t_old,
               "dominance_cpu_s": w_new.times["dominance"], "dominance_cpu_s_full_test": w_old.times["dominance"],
               "speedup": t_old / max(t_new, 1e-9), "same_result": bool(same)}
        rows.append(row)
        print(f"{name:<34} {row['before']['strategies']:>7} -> {row['after']['strategies']:>6} strategies  "
              f"reduce {t_new:6.2f} s (full test {t_old:6.2f} s, x{row['speedup']:.1f})  "
              f"dominance {row['dominance_cpu_s']:.2f} vs {row['dominance_cpu_s_full_test']:.2f} s  "
              f"same {same}", flush=True)
    result = {"benchmark": "reductions", "command": " ".join([sys.executable] + sys.argv), "device": device(),
              "versions": versions(), "note": "CPU seconds (time.process_time); dominance times are wall (perf_counter)",
              "results": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"wrote {write_result(result, 'reductions', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
