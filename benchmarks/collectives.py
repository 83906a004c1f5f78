"""Collectives per layer with and without defer-norm, on a 1D mesh of 8
(issue 5): counted in the generated source, and the predicted per-layer
communication time, for llama.ein (Llama-3 8B sizes) and palm.ein (PaLM 540B
sizes) on H100 and TPU v4. Needs no accelerator: it plans, lowers to source
text, counts `lax.psum / pmax / all_gather / all_to_all / psum_scatter` in
the decode program's layer function, and reads the prediction
(report.price_graph, merged reductions priced as one collective).

Plans per model and pipeline (none / defer-norm):
  planner    the ILP's decode plan (the strategy graph prices every
             reduction alone; the prediction is of the merged program);
  d-sharded  every statement over d splits d over x, weights stored d-split:
             the layout where a norm's statistic is a partial sum;
and for PaLM at batch 1, context 32,768 on TPU v4 (the sequence-sharded
cache): the planner's plan under a memory limit that the replicated cache
does not fit (137 GB: the bf16 weights are 135.1 GB per chip), and the
split-K attention (scores to e . v on s-shards: one pmax, then one psum of z
and e . v) set by hand with everything else replicated, and the planner with
the attention pinned to it.

Baseline of each row: the same plan with every reduction its own collective
(`unmerged`), and, across rows, the plan without defer-norm.

    python benchmarks/collectives.py [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan import device, versions, write_result  # noqa: E402

from einpart.codegen import census, generate_source, set_plan  # noqa: E402
from einpart.codegen.lower import program_graphs  # noqa: E402
from einpart.ir import graph as g  # noqa: E402
from einpart.ir import layout as lay  # noqa: E402
from einpart.ir.analysis import param_only  # noqa: E402
from einpart.ir.parser import parse_file  # noqa: E402
from einpart.passes import run_pipeline  # noqa: E402
from einpart.passes.shard import plan  # noqa: E402

MODELS = {
    "llama": dict(D=4096, F=14336, H=32, G=8, K=128, L=32, V=128256),
    "palm": dict(D=18432, F=73728, H=48, K=256, L=118, V=256000),
}
MESH = {"x": 8}


def d_sharded(graph: g.Graph) -> g.Graph:
    """Every statement over d splits d over x; every weight and the layer carry store d split."""
    layouts = {d.name: {"d": "x"} for d, _ in graph.all_decls() if d.kind == "param" and "d" in d.type.indices}
    splits = {}
    for s, _ in graph.all_stmts():
        if isinstance(s.op, g.Repeat):
            layouts[s.name] = {"d": "x"}
            continue
        if "d" in set(s.type.indices) | {i for r in lay.stmt_refs(s) for i in r.indices}:
            splits[s.name] = {"d": "x"}
    return set_plan(graph, MESH, layouts=layouts, splits=splits)


def split_k(graph: g.Graph) -> g.Graph:
    """By hand: the cache and the attention from scores to e . v on s-shards, the rest replicated."""
    fix = split_k_fix(graph)
    return set_plan(graph, MESH, layouts={n: v for n, v in fix.items() if ":" not in n},
                    splits={n.split(":")[1]: v for n, v in fix.items() if ":" in n})


def split_k_fix(graph: g.Graph) -> dict:
    """Pins for the planner: the cache and the attention statements from scores to
    e . v on s-shards (everything else the planner's choice)."""
    on_s = {"s": ("x",)}
    names = ("kc", "vc", "sc", "sm", "mx", "e", "z", "o_raw", "p", "o")
    present = {s.name for s, _ in graph.all_stmts()}
    fix = {"k_cache": on_s, "v_cache": on_s}
    fix.update({f"decode:{n}": on_s for n in names if n in present and not (n == "o" and "o_raw" in present)})
    return fix


def measure(planned: g.Graph, hardware: str) -> dict:
    """Decode program: collectives per layer in the source, priced merged and unmerged."""
    from einpart.passes.shard.report import price_graph
    t0 = time.perf_counter()
    src = generate_source(planned)
    pg = program_graphs(planned)["decode"]
    prep = param_only(pg)
    em = census.emitted(src, "decode")
    merged = census.priced(price_graph(pg, hardware), prep)
    alone = census.priced(price_graph(pg, hardware, merge=False), prep)
    assert em["layer"] == merged["layer"] and em["outside"] == merged["outside"], (em, merged)
    rep = price_graph(pg, hardware)
    return {"decode_step_ms": 1e3 * rep.step_s, "layer": em["layer"], "kinds": em["kinds"],
            "layer_unmerged": alone["layer"],
            "layer_comm_us": 1e6 * merged["layer_comm_s"], "layer_comm_us_unmerged": 1e6 * alone["layer_comm_s"],
            "lower_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hardware", nargs="+", default=["h100", "tpu-v4"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--out", metavar="FILE")
    args = ap.parse_args(argv)
    t_all, c_all = time.perf_counter(), time.process_time()
    rows = []

    def add(model, hw, pipeline, plan_kind, planned, note=""):
        row = {"model": model, "hardware": hw, "pipeline": pipeline or "none", "plan": plan_kind,
               **measure(planned, hw), "note": note}
        rows.append(row)
        print(f"{model:<6} {hw:<7} {row['pipeline']:<11} {plan_kind:<20} {row['layer']:>3} "
              f"{row['layer_unmerged']:>9} {row['layer_comm_us']:>10.2f} {row['layer_comm_us_unmerged']:>12.2f}"
              f" {row['decode_step_ms']:>9.3f}"
              f"  {json.dumps(row['kinds'])}", flush=True)

    print(f"{'model':<6} {'hw':<7} {'pipeline':<11} {'plan':<20} {'n/layer':>7} {'unmerged':>9} "
          f"{'comm us':>10} {'unmerged us':>12} {'step ms':>9}  kinds (decode, one layer)")
    for model, sizes in MODELS.items():
        base = parse_file(ROOT / "examples" / f"{model}.ein", dict(sizes, B=args.batch, S=args.context))
        for hw in args.hardware:
            for pipeline in ("", "defer-norm"):
                graph = run_pipeline(base, ",".join(["cast{dtype=bf16}"] + ([pipeline] if pipeline else []))).graph
                for pairs in (False, True):
                    p = plan(graph, "x=8", hw, "decode", batch=args.batch, context=args.context, memory_limit=None,
                             time_limit=args.time_limit, merge_pairs=pairs)
                    add(model, hw, pipeline, "planner+pairs" if pairs else "planner", p.graph,
                        f"batch {args.batch}, context {args.context}, no memory limit; solver {p.status}")
                add(model, hw, pipeline, "d-sharded", d_sharded(graph))
    long = parse_file(ROOT / "examples" / "palm.ein", dict(MODELS["palm"], B=1, S=32768))
    for pipeline in ("", "defer-norm"):
        graph = run_pipeline(long, ",".join(["cast{dtype=bf16}"] + ([pipeline] if pipeline else []))).graph
        for pairs in (False, True):
            p = plan(graph, "x=8", "tpu-v4", "decode", batch=1, context=32768, memory_limit=137e9,
                     time_limit=args.time_limit, merge_pairs=pairs)
            cache = lay.type_layout(p.graph.decl("k_cache").type)
            add("palm", "tpu-v4", pipeline, "planner+pairs b1 s32k" if pairs else "planner b1 s32k", p.graph,
                f"batch 1, context 32768, memory limit 137 GB; cache {cache}; solver {p.status}")
        p = plan(graph, "x=8", "tpu-v4", "decode", batch=1, context=32768, memory_limit=137e9,
                 time_limit=args.time_limit, fix=split_k_fix(graph))
        add("palm", "tpu-v4", pipeline, "split-K hand b1 s32k", split_k(graph),
            "by hand: only the attention sharded (s), the rest replicated")
        add("palm", "tpu-v4", pipeline, "split-K b1 s32k", p.graph,
            f"the planner with the attention pinned to s-shards; solver {p.status}")
    wall, cpu = time.perf_counter() - t_all, time.process_time() - c_all
    result = {"benchmark": "collectives", "command": " ".join([sys.executable] + sys.argv), "device": device(),
              "versions": versions(), "args": vars(args), "wall_s": wall, "cpu_s": cpu, "results": rows,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = write_result(result, "collectives", args.out)
    print(f"wall {wall:.1f} s, cpu {cpu:.1f} s (machine shared with other jobs); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
