"""Forced layouts against the planner (issue 9): Pope et al.'s layouts, measured
and predicted, for the palm.ein and llama.ein examples at 8B-70B sizes.

For every point (model, size, dtype, decode at a batch or prefill of B x P
tokens, mesh) this plans the planner's layout and each forced one (ws1d, ws2d,
wg, dp: einpart.passes.shard.forced, priced by the same cost model), then
compiles and times each plan's program on the devices there (N GPUs, or N
simulated CPU devices): warmed up, the median of repeats, block_until_ready.
Per point it reports measured and predicted time, which layout wins, whether
the planner's plan is the winner (the baseline every forced layout is a ratio
to), and Spearman's rank correlation of predicted vs measured (issue 7's rank
check wants >= 0.8). Prints a table, writes JSON (device, versions, command)
and a markdown table to benchmarks/results/.

    # the issue-9 run on 8 GPUs (repeat it until it prints "complete": --budget
    # keeps each call inside the device's 10-minute limit, --resume continues)
    python benchmarks/layouts.py --hardware h200 --mesh 2x4 --mesh x=8 --sizes 8b,70b \\
        --budget 500 --resume benchmarks/results/layouts-h200-8gpu.json
    # predicted only (no devices needed)
    python benchmarks/layouts.py --hardware h200 --mesh x=8 --mesh 2x4 --dry-run
    # end to end on 8 simulated CPU devices, tiny sizes
    python benchmarks/layouts.py --sizes tiny --cpu-devices 8 --hardware cpu --mesh 2x4
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# Llama-3 8B / 70B; PaLM 8B / 62B (Chowdhery et al. 2022, table 1: 32 / 64 layers,
# d_model 4096 / 8192, 16 / 32 heads of 256, multiquery, vocabulary 256k).
SIZES = {
    ("llama", "8b"): "D=4096,F=14336,H=32,G=8,K=128,L=32,V=128256",
    ("llama", "70b"): "D=8192,F=28672,H=64,G=8,K=128,L=80,V=128256",
    ("palm", "8b"): "D=4096,F=16384,H=16,K=256,L=32,V=256000",
    ("palm", "70b"): "D=8192,F=32768,H=32,K=256,L=64,V=256000",     # PaLM 62B
    ("llama", "tiny"): "D=64,F=128,H=16,G=8,K=16,L=2,V=256",     # tests/test_layouts.py TINY
    ("palm", "tiny"): "D=64,F=256,H=8,K=16,L=2,V=256",            # tests/test_layouts.py TINY
}
LABEL = {("palm", "70b"): "62B"}
# bf16 / int8: weights and KV cache stored in bf16 (int8: the matmul weights quantised).
# f32 / int8f32 keep f32 storage: XLA's CPU backend cannot run some bf16 x bf16 dots
# ("Unsupported element type for DotThunk"), so the CPU smoke run uses these.
PIPELINES = {"bf16": "cast{dtype=bf16}", "int8": "int8,cast{dtype=bf16}", "f32": "", "int8f32": "int8"}
LAYOUTS = ("planner", "ws1d", "ws2d", "wg", "dp")
DEFAULT_POINTS = "decode-1,decode-16,decode-128,prefill-8,prefill-64"


# ------------------------------------------------------------------ points
def parse_point(text: str, context: int) -> dict:
    """'decode-16' | 'prefill-8' (8 x context) | 'prefill-8x2048'."""
    phase, _, rest = text.partition("-")
    try:
        if phase == "decode":
            return {"phase": "decode", "batch": int(rest), "prompt": 0, "name": f"decode b={int(rest)}"}
        if phase == "prefill":
            b, _, p = rest.partition("x")
            p = int(p) if p else context
            return {"phase": "prefill", "batch": int(b), "prompt": p, "name": f"prefill {int(b)}x{p}"}
    except ValueError:
        pass
    raise SystemExit(f"--points: '{text}' is not decode-B, prefill-B or prefill-BxP")


def model_graph(model: str, size: str, dtype: str, context: int):
    from einpart.ir.parser import parse_file
    from einpart.passes import run_pipeline
    sets = {k: int(v) for k, v in (kv.split("=") for kv in SIZES[(model, size)].split(","))}
    graph = parse_file(ROOT / "examples" / f"{model}.ein", dict(sets, S=context))
    return run_pipeline(graph, PIPELINES[dtype]).graph if PIPELINES[dtype] else graph


def plan_point(graph, layout: str, mesh: str, pt: dict, args, context: int) -> dict:
    """Plan one layout at one point: predicted seconds, or why it does not apply."""
    from einpart.errors import EinpartError, PlanError
    from einpart.ir.printer import format_graph
    from einpart.passes.shard import plan
    from einpart.passes.shard.forced import describe, plan_forced
    kw = dict(batch=pt["batch"], context=context, prompt=pt["prompt"], time_limit=args.time_limit,
              workers=args.workers)
    start = time.perf_counter()
    try:
        if layout == "planner":
            p = plan(graph, mesh, args.hardware, pt["phase"], **kw)
        else:
            p = plan_forced(graph, layout, mesh, args.hardware, pt["phase"], **kw)
    except EinpartError as e:
        fits = not (isinstance(e, PlanError) and "HBM" in str(e))
        return {"applies": False, "why": str(e), "fits": fits, "plan_s": time.perf_counter() - start}
    rep = p.phases[pt["phase"]]
    text = format_graph(p.graph)
    lays = {d.name: {a.index: list(a.mesh) for a in d.type.axes if a.mesh}
            for d, _ in p.graph.all_decls() if d.name in ("w_gate", "wq", "k_cache")}
    return {"applies": True, "predicted_s": rep.step_s, "compute_s": rep.compute_s, "memory_s": rep.memory_s,
            "comm_s": rep.comm_s, "mfu": rep.mfu, "memory_per_device": rep.memory_bytes,
            "status": p.status, "gap": p.gap, "plan_s": time.perf_counter() - start,
            "forced": describe(p), "layouts": lays, "digest": hashlib.sha256(text.encode()).hexdigest()[:16],
            "_graph": p.graph, "_text": text}


# ------------------------------------------------------------------ measuring
def random_weights(expected: dict, seed: int = 0) -> dict:
    """Random (not zero) weights, fast: one random block tiled over each tensor."""
    from einpart.runtime.weights import NUMPY_DTYPE
    rng = np.random.default_rng(seed)
    block = rng.standard_normal(1 << 20) * 0.02
    gains = 1.0 + rng.standard_normal(1 << 16) * 0.02
    out = {}
    for name, (shape, dtype) in expected.items():
        src = gains if len(shape) <= 2 and "norm" in name else block
        out[name] = np.resize(src.astype(NUMPY_DTYPE[dtype]), shape)
    return out


def measure(planned, pt: dict, weights: dict, args, context: int) -> dict:
    """Compile the point's program for a plan and time it (median of repeats after warm-up)."""
    import jax
    from jax.sharding import PartitionSpec as P
    from einpart.runtime.executable import Executable
    start = time.perf_counter()
    ex = Executable(planned, layers=args.layers, weights=weights, compile=False,
                    prefill_len=pt["prompt"] or None, platform="cpu" if args.cpu_devices else None)
    b = pt["batch"]
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    if pt["phase"] == "decode":
        prog, T, pos, steps = ex.compiled("decode", b), ex.prefill_len, context - 8, args.steps
        ids = (b, 1)
    else:
        T = pt["prompt"]
        prog, pos, steps = ex.compiled("prefill", b, T), 0, 1
        ids = (b, T)
    compile_s = time.perf_counter() - start
    module = ex.module(b, T)
    tokens = np.random.default_rng(b).integers(0, ex.vocab, ids).astype(np.int32)
    tok = ex._put(tokens, module.INPUT_SPECS[pt["phase"]][ex.axes.tokens])
    pos_arr = ex._put(np.asarray(pos, np.int32), P())
    holder = {"state": ex.new_state(b)}

    def run():
        for _ in range(steps):
            outs, holder["state"] = prog(ex.params, holder["state"], {ex.axes.tokens: tok}, pos_arr)
        jax.block_until_ready((outs, holder["state"]))
    for _ in range(args.warmup):
        run()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) / steps)
    del holder, ex
    return {"measured_s": statistics.median(times), "times_s": times, "compile_s": compile_s, "build_s": build_s}


# ------------------------------------------------------------------ statistics
def ranks(xs) -> list[float]:
    """Ranks from 1, ties given their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    k = 0
    while k < len(order):
        j = k
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[k]]:
            j += 1
        for m in range(k, j + 1):
            out[order[m]] = (k + j) / 2 + 1
        k = j + 1
    return out


def spearman(a, b) -> float | None:
    """Spearman's rho (Pearson on ranks); None for fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return None
    ra, rb = np.array(ranks(a)), np.array(ranks(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def summarise(rows: list[dict], tolerance: float) -> list[dict]:
    """Per point and mesh: the winners, whether the planner won, Spearman's rho."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("applies")]
        pred = {r["layout"]: r["predicted_s"] for r in ok}
        meas = {r["layout"]: r["measured_s"] for r in ok if r.get("measured_s") is not None}
        s = {"group": key, "model": rs[0]["model"], "size": rs[0]["size"], "dtype": rs[0]["dtype"],
             "point": rs[0]["point"], "mesh": rs[0]["mesh"],
             "predicted_winner": min(pred, key=pred.get) if pred else None,
             "best_forced_predicted": min((k for k in pred if k != "planner"), key=pred.get, default=None)}
        if meas:
            best = min(meas.values())
            s["measured_winner"] = min(meas, key=meas.get)
            s["planner_won"] = "planner" in meas and meas["planner"] <= best * (1 + tolerance)
            both = [k for k in meas if k in pred]
            s["spearman"] = spearman([pred[k] for k in both], [meas[k] for k in both])
            s["layouts_measured"] = len(both)
        out.append(s)
    return out


# ------------------------------------------------------------------ output
def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.3g}"


def markdown(rows: list[dict], summary: list[dict], measured: bool, title: str) -> str:
    cell = {(r["group"], r["layout"]): r for r in rows}
    head = ["model", "dtype", "point", "mesh"] + [f"{k} ms" for k in LAYOUTS]
    head += (["winner (measured)", "planner won", "Spearman"] if measured else ["best forced (predicted)"])
    lines = [f"{title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        label = LABEL.get((s["model"], s["size"]), s["size"].upper())
        row = [f"{s['model']} {label}", s["dtype"], s["point"], s["mesh"]]
        for k in LAYOUTS:
            r = cell.get((s["group"], k))
            if r is None:
                row.append("")
            elif not r.get("applies"):
                row.append("n/a" if r.get("fits", True) else "no fit")
            elif measured and r.get("measured_s") is not None:
                row.append(f"{_ms(r['measured_s'])} ({_ms(r['predicted_s'])})")
            else:
                row.append(_ms(r["predicted_s"]))
        if measured:
            rho = s.get("spearman")
            row += [s.get("measured_winner") or "-", {True: "yes", False: "no"}.get(s.get("planner_won"), "-"),
                    "-" if rho is None else f"{rho:.2f}"]
        else:
            row.append(s["best_forced_predicted"] or "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Cells: " + ("measured ms (predicted ms); " if measured else "predicted ms per decode step "
                              "or prefill pass; ") + "n/a: the layout does not apply (a size the mesh does not "
                 "divide, one mesh axis for ws2d, a batch the mesh cannot split for wg / dp); no fit: "
                 "no variant fits in HBM.")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("jax", "jaxlib", "ortools"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 (absent is reported as absent)
            out[mod] = None
    return out


def load_resume(path: Path, config: dict) -> list[dict]:
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    if data.get("config") != config:
        raise SystemExit(f"--resume {path}: written with other options {data.get('config')}; "
                         f"use another file or the same options")
    return data["rows"]


CPU_NOTE = "simulated CPU devices: an end-to-end smoke run; its timings say nothing about GPUs"
PLAN_FREE = ("key", "group", "model", "size", "dtype", "point", "phase", "batch", "prompt", "context", "mesh",
             "layout")
PLAN_CONFIG = ("hardware", "context", "time_limit")


def load_plans(path: Path, config: dict) -> dict:
    """Plans saved by an earlier run (--save-plans): annotated spec text and predictions by key."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    want = {k: config[k] for k in PLAN_CONFIG}
    if data.get("config") != want:
        raise SystemExit(f"--plans {path}: planned with {data.get('config')}, this run asks for {want}")
    return data["plans"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="h200", help="the cost model's preset or file (default h200)")
    ap.add_argument("--mesh", action="append", help="a mesh, repeatable (default: 2x4 and x=8)")
    ap.add_argument("--models", default="llama,palm")
    ap.add_argument("--sizes", default="8b,70b", help="8b, 70b, tiny (comma-separated)")
    ap.add_argument("--dtypes", default="bf16,int8")
    ap.add_argument("--points", default=DEFAULT_POINTS, help="decode-B, prefill-B (B x context), prefill-BxP")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--context", type=int, default=0, help="KV cache positions (default 2048; tiny: 64)")
    ap.add_argument("--dry-run", action="store_true", help="plan only: predicted times, no devices")
    ap.add_argument("--cpu-devices", type=int, default=0, help="run on N simulated CPU devices")
    ap.add_argument("--layers", default="auto", choices=("scan", "unroll", "auto"),
                    help="layer loop of the timed programs (auto: unrolled, each layer its own arrays, up to 64 layers)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="decode steps per timed repeat")
    ap.add_argument("--tolerance", type=float, default=0.03, help="the planner 'won' within this of the best")
    ap.add_argument("--time-limit", type=float, default=30.0, help="per ILP solve")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--budget", type=float, default=0, help="stop measuring after this many seconds (resume later)")
    ap.add_argument("--resume", metavar="JSON", help="continue (and write) this results file")
    ap.add_argument("--save-plans", metavar="JSON.GZ", help="write every plan (annotated spec text) here")
    ap.add_argument("--plans", metavar="JSON.GZ", help="use plans saved by --save-plans (no ILP solver needed)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    meshes = args.mesh or ["2x4", "x=8"]
    sizes = args.sizes.split(",")
    context = args.context or (64 if sizes == ["tiny"] else 2048)
    points = [parse_point(p, context) for p in args.points.split(",") if p]
    layouts = [k for k in args.layouts.split(",") if k]
    for k in args.dtypes.split(","):
        if k not in PIPELINES:
            raise SystemExit(f"--dtypes: '{k}' is not one of {', '.join(PIPELINES)}")
    for k in layouts:
        if k not in LAYOUTS:
            raise SystemExit(f"--layouts: '{k}' is not one of {', '.join(LAYOUTS)}")
    config = {k: v for k, v in vars(args).items()
              if k not in ("budget", "resume", "out", "tag", "workers", "plans", "save_plans")}
    config.update(mesh=meshes, context=context)
    measuring = not args.dry_run
    from einpart.ir.parser import parse
    device = {"kind": "none (dry run: predicted only)", "count": 0, "backend": None}
    if measuring:
        import jax
        devs = jax.devices()
        device = {"kind": devs[0].device_kind, "count": len(devs), "backend": jax.default_backend()}
        print(f"devices: {len(devs)} x {device['kind']} ({device['backend']})", flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    kind = "predicted" if args.dry_run else f"{device['backend']}{device['count']}"
    path = Path(args.resume) if args.resume else Path(args.out) / f"layouts-{args.hardware}-{kind}{args.tag}-{stamp}.json"
    rows = load_resume(path, config) if args.resume else []
    stored = load_plans(Path(args.plans), config) if args.plans else {}
    saved: dict = {}
    done = {r["key"] for r in rows if r.get("complete")}
    rows = [r for r in rows if r.get("complete")]
    results = {"issue": 9, "kind": "predicted only (dry run)" if args.dry_run else "measured and predicted",
               "device": device, "versions": versions(), "command": " ".join([sys.executable] + sys.argv),
               "date": datetime.now(timezone.utc).isoformat(), "hardware_preset": args.hardware,
               "load_average": os.getloadavg(), "config": config, "rows": rows}
    if device["backend"] == "cpu":
        results["note"] = CPU_NOTE
    left = False
    for size in sizes:                 # smallest first: what a short device lease can finish
        for model in args.models.split(","):
            weights = None
            for dtype in args.dtypes.split(","):
                graph = model_graph(model, size, dtype, context)
                for pt in points:
                    for mesh in meshes:
                        group = f"{model}-{size}-{dtype}-{pt['name']}-{mesh}"
                        for layout in layouts:
                            key = f"{group}-{layout}"
                            if key in done:
                                continue
                            if args.budget and time.perf_counter() - t_wall > args.budget:
                                left = True
                                continue
                            row = {"key": key, "group": group, "model": model, "size": size, "dtype": dtype,
                                   "point": pt["name"], "phase": pt["phase"], "batch": pt["batch"],
                                   "prompt": pt["prompt"], "context": context, "mesh": mesh, "layout": layout}
                            if key in stored and stored[key].get("sizes") != SIZES[(model, size)]:
                                raise SystemExit(f"--plans: '{key}' was planned at sizes {stored[key].get('sizes')}, "
                                                 f"not {SIZES[(model, size)]}")
                            if key in stored:          # planned before (--plans): no solver needed here
                                row.update(stored[key]["row"])
                                text = stored[key]["text"]
                                planned = parse(text) if text else None
                            else:
                                row.update(plan_point(graph, layout, mesh, pt, args, context))
                                planned, text = row.pop("_graph", None), row.pop("_text", None)
                            saved[key] = {"row": {k: v for k, v in row.items() if k not in PLAN_FREE}, "text": text,
                                          "sizes": SIZES[(model, size)]}
                            if measuring and row["applies"]:
                                same = next((r for r in rows if r["group"] == group and r.get("digest") == row["digest"]
                                             and r.get("measured_s") is not None), None)
                                if same is not None:      # the same plan as another layout: time it once
                                    row.update({k: same[k] for k in ("measured_s", "times_s", "compile_s")},
                                               same_plan_as=same["layout"])
                                else:
                                    if weights is None:
                                        from einpart.runtime.weights import expected_params
                                        weights = random_weights(expected_params(graph))
                                    try:
                                        row.update(measure(planned, pt, weights, args, context))
                                    except Exception as e:  # noqa: BLE001 (recorded: e.g. out of device memory)
                                        row.update(measured_s=None, error=f"{type(e).__name__}: {str(e)[:300]}")
                            row["complete"] = True
                            rows.append(row)
                            print(line(row), flush=True)
                            if measuring:
                                write(path, results, rows)
    summary = summarise(rows, args.tolerance)
    results["summary"] = summary
    results["complete"] = not left
    results["wall_s"], results["cpu_s"] = time.perf_counter() - t_wall, time.process_time() - t_cpu
    write(path, results, rows)
    if args.save_plans:
        plans_path = Path(args.save_plans)
        with gzip.open(plans_path, "wt", encoding="utf-8") as f:
            json.dump({"config": {k: config[k] for k in PLAN_CONFIG}, "plans": saved}, f, default=str)
        print(f"wrote the plans to {plans_path}")
    title = (f"Predicted on {args.hardware} (no devices: a dry run)" if args.dry_run else
             f"Measured on {device['count']} x {device['kind']}, predicted on {args.hardware}")
    if device["backend"] == "cpu":
        title += f" ({CPU_NOTE})"
    md = markdown(rows, summary, measuring, f"**{title}** (`{' '.join(sys.argv[1:])}`)")
    path.with_suffix(".md").write_text(md)
    print()
    print(md)
    for s in summary:
        if s.get("spearman") is not None:
            print(f"{s['group']}: Spearman {s['spearman']:.2f} over {s['layouts_measured']} layouts")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print("complete" if not left else "budget reached: run the same command again to continue")
    return 0


def line(r: dict) -> str:
    what = f"{r['model']:<6}{r['size']:<5}{r['dtype']:<5}{r['point']:<17}{r['mesh']:<6}{r['layout']:<8}"
    if not r["applies"]:
        return what + "n/a: " + r["why"][:150]
    text = what + f"predicted {_ms(r['predicted_s']):>8} ms"
    if "measured_s" in r:
        text += f"  measured {_ms(r['measured_s']):>8} ms" if r["measured_s"] is not None else f"  {r.get('error')}"
    return text + f"  (plan {r['plan_s']:.1f} s{', compile %.1f s' % r['compile_s'] if 'compile_s' in r else ''})"


def write(path: Path, results: dict, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results["rows"] = rows
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
