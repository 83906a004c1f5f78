"""Predicted (the planner's cost model as it is now) against measured time for
every row of a benchmarks/decode.py result, without a device: rebuilds each
row's program graph (same spec, sizes, plan, int8 or not) and prices it with
einpart.passes.shard.report.price_graph on the given hardware, with the row's
layer loop (layers="scan" for the scanned rows: the per-layer weight copies).

    python benchmarks/reprice.py benchmarks/results/decode-8b-nvidia-h200-run3-*.json --hardware h200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--hardware", default="h200")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from einpart.codegen.lower import program_graphs, split_prepare
    from einpart.passes.plans import simple_plan
    from einpart.ir.parser import parse_file
    from einpart.passes import run_pipeline
    from einpart.passes.shard.report import price_graph

    res = json.loads(Path(args.result).read_text())
    sizes = res["sizes"]
    graphs = {}
    print(f"{'impl':<22}{'phase':<9}{'batch':>6}{'measured ms':>13}{'predicted ms':>14}{'pred/meas':>11}")
    for r in res["rows"]:
        if r["impl"].startswith("plain"):
            continue
        int8 = "-int8" in r["impl"]
        if int8 not in graphs:
            g = parse_file(HERE.parent / "examples" / "llama.ein", sizes=sizes)
            g = run_pipeline(g, ("int8," if int8 else "") + "cast{dtype=bf16}").graph
            graphs[int8] = simple_plan(g, {"x": 1})
        prefill_len = r.get("tokens") or 2048
        pg = split_prepare(program_graphs(graphs[int8], prefill_len, r["batch"])[r["phase"]])[0]
        layers = "scan" if "scan" in r["impl"] else "unroll"
        pred = price_graph(pg, args.hardware, r["phase"], layers=layers).step_s * 1e3
        r["repriced_ms"] = pred
        print(f"{r['impl']:<22}{r['phase']:<9}{r['batch']:>6}{r['ms']:>13.2f}{pred:>14.2f}{pred / r['ms']:>11.2f}"
              + ("" if 0.75 <= pred / r["ms"] <= 1.25 else "   outside +-25%"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
