"""`einpart plan` (plan a spec and print the per-statement costs and totals)
and `einpart solve-iopddl` (the solver core on an IOPDDL instance).

Register with COMMAND_MODULES in einpart/cli.py: "einpart.passes.shard.cli".
"""
from __future__ import annotations

import json
import math
import re
import sys

from ... import progress
from ...cli_ir import add_spec_args, load_spec
from ...errors import EinpartError
from .mesh import format_mesh, mesh_devices

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> float | None:
    """'32e9', '32GB', '32 GiB', 'inf' / 'none' (no limit) -> bytes."""
    t = str(text).strip().lower().replace("_", "")
    if t in ("inf", "none", "unlimited"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS:
        raise EinpartError(f"--memory-limit {text}: expected bytes like 32e9, 32GB, 32GiB or inf")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value <= 0:
        raise EinpartError(f"--memory-limit {text}: must be positive")
    return value


def _t(s: float) -> str:
    if s == 0:
        return "0"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _b(n: float) -> str:
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{int(n)} B"


def _axes(layout: dict) -> str:
    parts = []
    for i, ax in layout.items():
        if ax:
            parts.append(f"{i}@{ax[0]}" if len(ax) == 1 else f"{i}@({','.join(ax)})")
    return " ".join(parts) or "-"


def format_plan(p, spec: str = "") -> str:
    """The human table: per phase, every statement, then totals."""
    n = mesh_devices(p.mesh)
    lines = [f"plan {spec} on {p.hardware}, mesh {format_mesh(p.mesh)} ({n} devices)".replace("  ", " "),
             f"solver: {p.status}, gap {p.gap:.3g}" + (f" ({p.note})" if p.note else "") +
             f", {p.timings['total']:.2f} s (build+solve {p.timings['solve']:.2f} s)"]
    if p.stats.get("forced"):
        from .forced import describe
        lines.append(describe(p))
    for name, rep in p.phases.items():
        lines.append("")
        lines.append(f"== {name} ==")
        head = f"{'statement':<10} {'x':>4} {'split':<22} {'result':<22} {'compute':>9} {'memory':>9} {'comm':>9}  collectives"
        lines.append(head)
        for s in rep.stmts:
            colls = ", ".join(d for d, _ in s.collectives) or "-"
            lines.append(f"{s.name:<10} {s.count:>4} {_axes(s.split):<22} {_axes(s.layout):<22} "
                         f"{_t(s.compute_s):>9} {_t(s.memory_s):>9} {_t(s.comm_s):>9}  {colls}")
        lines.append(f"per {name} {'step' if name == 'decode' else 'pass'}: {_t(rep.step_s)} "
                     f"(compute {_t(rep.compute_s)}, memory {_t(rep.memory_s)}, communication {_t(rep.comm_s)}), "
                     f"MFU {100 * rep.mfu:.1f}%")
        lines.append(f"memory per device: {_b(rep.memory_bytes)} (weights {_b(rep.weights_bytes)}, "
                     f"KV cache {_b(rep.kv_bytes)}, activations {_b(rep.activation_bytes)})")
        if rep.prepared:
            lines.append(f"prepared once at load time ({_t(rep.prepare_s)}): " + ", ".join(s.name for s in rep.prepared))
    return "\n".join(lines)


def parse_batches(text: str | None) -> list[int]:
    """'128' or '128,512' -> [128, 512]."""
    if not text:
        return []
    try:
        out = [int(x) for x in str(text).split(",")]
    except ValueError:
        out = []
    if not out or min(out) <= 0:
        raise EinpartError(f"--batch {text}: expected positive integers, e.g. 128 or 128,512")
    return out


def _rewritten(graph, args, kv_groups):
    from ..manager import run_pipeline
    from ..rewrite_util import planning_pass_last, with_rewrites
    text = with_rewrites(args.pipeline, args.int8, kv_groups)
    if text and planning_pass_last(text):
        raise EinpartError("--pipeline: einpart plan runs the planner itself; leave shard/plan out of the pipeline")
    if not text:
        return graph
    result = run_pipeline(graph, text)
    progress.current().timings(result.records)
    return result.graph


def cmd_context_report(args, graph) -> int:
    from .capacity import Variant, context_report, format_context
    variants = []
    models = [(args.pipeline or "as given", None)]
    if args.kv_groups is not None:
        models.append((f"multiquery{{groups={args.kv_groups}}}", args.kv_groups))
    layouts = [x.strip() for x in args.kv_layout.split(",") if x.strip()]
    for label, groups in models:
        g2 = _rewritten(graph, args, groups)
        variants += [Variant(label + (" +int8" if args.int8 else ""), g2, lt) for lt in layouts]
    rep = context_report(variants, args.mesh, args.hardware, parse_batches(args.batch), args.kv_fraction,
                         probe=args.context or 0, time_limit=args.time_limit, workers=args.workers)
    if args.json:
        json.dump(rep.to_json(), sys.stdout, indent=1, default=_json_default)
        print()
    else:
        print(format_context(rep, args.spec))
    return 0


def cmd_plan(args) -> int:
    from .shard import plan
    graph = load_spec(args)
    if args.report == "context":
        return cmd_context_report(args, graph)
    graph = _rewritten(graph, args, args.kv_groups)
    batches = parse_batches(args.batch)
    if len(batches) > 1:
        raise EinpartError(f"--batch {args.batch}: one batch size per plan (several only with --report context)")
    limit = 0.0 if args.memory_limit is None else parse_bytes(args.memory_limit)
    options = dict(phase=args.phase, batch=batches[0] if batches else 0, context=args.context or 0,
                   prompt=args.prompt or args.context or 0, steps=args.steps, memory_limit=limit)
    with progress.current().step("solving the ILP"):
        if args.force:
            from .forced import plan_forced
            p = plan_forced(graph, args.force, args.mesh, args.hardware, time_limit=args.time_limit,
                            workers=args.workers, **options)
        else:
            p = plan(graph, args.mesh, args.hardware, time_limit=args.time_limit, workers=args.workers,
                     merge_pairs=args.merge_pairs, **options)
    why = None
    if args.explain:
        from .explain import explain
        why = explain(p.graph, args.hardware, **options)
    if args.json:
        out = p.to_json()
        if why is not None:
            out["explain"] = why.to_json()
        json.dump(out, sys.stdout, indent=1, default=_json_default)
        print()
    else:
        print(format_plan(p, args.spec))
        if why is not None:
            print()
            print(why.text())
    if args.output:
        from ...ir.printer import format_graph
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(format_graph(p.graph))
    return 0


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return str(x)


def cmd_solve_iopddl(args) -> int:
    from . import iopddl
    return iopddl.solve_iopddl_main(args.file, args.time_limit, args.workers)


def register(sub) -> None:
    p = sub.add_parser("plan", help="plan the sharding of a spec and print its predicted costs")
    add_spec_args(p)
    p.add_argument("--mesh", required=True, metavar="M", help="x=4,y=4,z=4 or 2x4")
    p.add_argument("--hardware", default="cpu", metavar="H",
                   help="tpu-v4, tpu-v4-torus, h100, h200, cpu, or a .toml/.json file")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--batch", metavar="B", help="batch size (default: the spec's); --report context: a list, 128,512")
    p.add_argument("--context", type=int, metavar="S", help="KV cache positions (default: the spec's)")
    p.add_argument("--prompt", type=int, metavar="T", help="prefill tokens (default: the context)")
    p.add_argument("--steps", type=int, default=64, help="decode steps per prefill, weighting phase=both")
    p.add_argument("--memory-limit", metavar="BYTES", help="per device (default: the HBM; 'inf' = none)")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="SECONDS")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--force", choices=("ws1d", "ws2d", "wg", "dp"), metavar="LAYOUT",
                   help="a forced layout, priced the same way: ws1d, ws2d (weight-stationary 1D / 2D), "
                        "wg (weight-gathered), dp (data-parallel)")
    p.add_argument("--pipeline", metavar="P", help="passes to run first, e.g. 'cast{dtype=bf16}'")
    p.add_argument("--int8", action="store_true", help="int8 weights (adds the int8 pass last)")
    p.add_argument("--kv-groups", type=int, metavar="G", help="pool K/V heads into G groups (adds multiquery{groups=G} first)")
    p.add_argument("--report", choices=("context",), help="context: the longest context that fits per batch "
                   "(before and after --kv-groups), like Table 1 of Pope et al.")
    p.add_argument("--kv-fraction", type=float, default=0.3, metavar="F", help="--report context: HBM share of the KV cache")
    p.add_argument("--kv-layout", default="heads,batch", metavar="L",
                   help="--report context: cache layouts to compare (heads, batch, auto)")
    p.add_argument("--merge-pairs", action="store_true",
                   help="let the ILP price merged reductions (slower to prove; codegen merges either way)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--explain", action="store_true",
                   help="print why each layout won: its cost against the runner-up")
    p.add_argument("-o", "--output", metavar="FILE", help="write the annotated spec here")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("solve-iopddl", help="solve an IOPDDL sharding instance with the ILP solver core")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="SECONDS")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_solve_iopddl)
