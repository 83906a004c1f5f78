"""Predicted (the planner's cost model as it is now) against measured time for
every row of a benchmarks/decode.py result, without a device: rebuilds each
row's program graph (same spec, sizes, plan, int8 or not) and prices it with
einpart.passes.shard.report.price_graph on the given hardware, with the row's
layer loop (its --layers mode; "auto" as codegen.lower.resolve_layers resolves
it, or, for results older than AUTO_CHANGED, as it was then: decode unrolled,
prefill scanned) and the attention lowering the program used
(the row's "attention", written by decode.py; einsum where a row has none).
Prints the prediction the row was written with ("then") beside today's.

    python benchmarks/reprice.py benchmarks/results/decode-8b-nvidia-h200-run3-*.json --hardware h200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def row_layers(impl: str) -> str:
    """The --layers mode of a decode.py row, from its name: LABEL[-int8]-LAYERS[-ATTENTION]."""
    parts = impl.split("-")
    return next(p for p in parts[1:] if p in ("scan", "unroll", "auto"))


# when layers="auto" became "unroll up to 64 layers" (commit "layers=auto: unroll ...")
AUTO_CHANGED = "2026-12-02T13:00"


def row_loop(res: dict, impl: str, phase: str, graph) -> str:
    """The layer loop a row's program ran with (module docstring)."""
    from einpart.codegen.lower import resolve_layers
    mode = row_layers(impl)
    if mode != "auto":
        return mode
    if res.get("date", "") < AUTO_CHANGED:
        return "unroll" if phase == "decode" else "scan"
    return resolve_layers(mode, graph)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--out", default="", help="write the re-priced rows as JSON to this file")
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
    out_rows = []
    print(f"{'impl':<22}{'phase':<9}{'batch':>6}{'layers':>8}{'attn':>8}{'measured ms':>13}{'then ms':>11}"
          f"{'predicted ms':>14}{'pred/meas':>11}")
    for r in res["rows"]:
        if r["impl"].startswith("plain") or r["phase"] not in ("decode", "prefill"):
            continue
        int8 = "-int8" in r["impl"]
        if int8 not in graphs:
            g = parse_file(HERE.parent / "examples" / "llama.ein", sizes=sizes)
            g = run_pipeline(g, ("int8," if int8 else "") + "cast{dtype=bf16}").graph
            graphs[int8] = simple_plan(g, {"x": 1})
        prefill_len = r.get("tokens") or 2048
        pg = split_prepare(program_graphs(graphs[int8], prefill_len, r["batch"])[r["phase"]])[0]
        layers = row_loop(res, r["impl"], r["phase"], pg)
        attention = r.get("attention") or "einsum"      # the lowering the program used (decode.attention_used)
        int8_matmul = r.get("int8_matmul") or "xla"      # decode.py's int8 product lowering (xla before it had one)
        pred = price_graph(pg, args.hardware, r["phase"], layers=layers, attention=attention,
                           int8_matmul=int8_matmul).step_s * 1e3
        r["repriced_ms"] = pred
        out_rows.append({"impl": r["impl"], "phase": r["phase"], "batch": r["batch"], "layers": layers,
                         "attention": attention, "measured_ms": r["ms"], "predicted_then_ms": r.get("predicted_ms"),
                         "predicted_ms": pred, "ratio": pred / r["ms"]})
        print(f"{r['impl']:<22}{r['phase']:<9}{r['batch']:>6}{layers:>8}{attention:>8}{r['ms']:>13.2f}"
              f"{r.get('predicted_ms', 0):>11.2f}{pred:>14.2f}{pred / r['ms']:>11.2f}"
              + ("" if 0.75 <= pred / r["ms"] <= 1.25 else "   outside +-25%"))
    if args.out:
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                text=True).stdout.strip()
        doc = {"source": Path(args.result).name, "device": res.get("device"), "jax": res.get("jax"),
               "hardware": args.hardware, "git": commit,
               "command": " ".join(["python", "benchmarks/reprice.py", *(argv if argv is not None else sys.argv[1:])]),
               "rows": out_rows}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
