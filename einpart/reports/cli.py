"""`einpart pareto` (sweep chips x batch, draw the latency-vs-cost frontier)
and `einpart report` (one self-contained HTML page about a compiled spec).

Register with COMMAND_MODULES in einpart/cli.py: "einpart.reports.cli".
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..cli_ir import add_spec_args, load_spec
from ..errors import EinpartError

FORMATS = ("csv", "svg", "png")


def _ints(text: str, what: str) -> list[int]:
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(int(item.replace("_", "")))
        except ValueError:
            raise EinpartError(f"{what} {text}: expected integers separated by commas, like 8,16,32") from None
    if not out:
        raise EinpartError(f"{what}: give at least one value")
    return out


def _formats(text: str) -> list[str]:
    out = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise EinpartError(f"--format {text}: expected some of {', '.join(FORMATS)}")
    return out


def _progress(stream):
    """Progress on a terminal only: one line rewritten per planned point."""
    if not stream.isatty():
        return None

    def show(i, n, p):
        what = f"{p.latency_s:.3g} s" if p.feasible else "infeasible"
        stream.write(f"\r\x1b[K[{i}/{n}] {p.phase} {p.chips} chips batch {p.batch}: {what} ({p.plan_s:.1f} s)")
        if i == n:
            stream.write("\n")
        stream.flush()
    return show


def cmd_pareto(args) -> int:
    from ..passes.manager import run_pipeline
    from ..passes.shard.cli import parse_bytes
    from . import pareto
    formats = _formats(args.format)
    chips, batches = _ints(args.chips, "--chips"), _ints(args.batch, "--batch")
    phases = ("prefill", "decode") if args.phase == "both" else (args.phase,)
    if "png" in formats:
        pareto.require_matplotlib()
    graph = load_spec(args)
    if args.pipeline:
        graph = run_pipeline(graph, args.pipeline).graph
    limit = 0.0 if args.memory_limit is None else parse_bytes(args.memory_limit)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = pareto.sweep(graph, args.hardware, chips, batches, context=args.context or 0,
                          prompt=args.prompt or args.context or 0, phases=phases, time_limit=args.time_limit,
                          workers=args.workers, memory_limit=limit, on_point=_progress(sys.stderr),
                          spec=Path(args.spec).stem)
    written = []
    if "csv" in formats:
        pareto.write_csv(result, out / "pareto.csv")
        written.append(out / "pareto.csv")
    if "svg" in formats:
        (out / "pareto.svg").write_text(pareto.frontier_svg(result), encoding="utf-8")
        written.append(out / "pareto.svg")
    if "png" in formats:
        pareto.write_png(result, out / "pareto.png")
        written.append(out / "pareto.png")
    print(pareto.format_frontier(result))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from ..cli_run import _before, plan_graph
    from ..codegen import generate_source
    from ..passes.plans import parse_mesh
    from .html import write_report
    mesh = parse_mesh(args.mesh)
    graph = load_spec(args)
    with tempfile.TemporaryDirectory(prefix="einpart-report-") as tmp:
        result = plan_graph(graph, mesh, args.plan, args.seed, _before(args), dump_dir=tmp, hardware=args.hardware)
        source = generate_source(result.graph, args.layers)
        path = write_report(args.out, args.spec, result.records, result.graph, args.hardware, source)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pareto", help="sweep chips and batch; draw the latency-vs-cost frontier (CSV, SVG, PNG)")
    add_spec_args(p)
    p.add_argument("--hardware", required=True, metavar="H",
                   help="tpu-v4, tpu-v4-torus, h100, h200, cpu, or a .toml/.json file")
    p.add_argument("--chips", required=True, metavar="N,...", help="chip counts, e.g. 8,16,32,64")
    p.add_argument("--batch", required=True, metavar="B,...", help="batch sizes, e.g. 1,4,16,64,256,1024")
    p.add_argument("--context", type=int, metavar="S", help="KV cache positions (default: the spec's)")
    p.add_argument("--prompt", type=int, metavar="T", help="prefill tokens (default: the context)")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="both",
                   help="phases to sweep, each planned on its own (default both)")
    p.add_argument("--pipeline", metavar="P", help="passes to run first, e.g. 'cast{dtype=bf16}'")
    p.add_argument("--memory-limit", metavar="BYTES", help="per device (default: the HBM; 'inf' = none)")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="SECONDS", help="solver limit per point")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", default="csv,svg", metavar="F,...",
                   help="csv, svg (no dependency), png (needs einpart[plot]); default csv,svg")
    p.add_argument("--out", default=".", metavar="DIR", help="where pareto.csv / .svg / .png go")
    p.set_defaults(func=cmd_pareto)

    from ..cli_run import _plan_args
    p = sub.add_parser("report", help="plan and lower a spec; write one self-contained HTML page about it")
    add_spec_args(p)
    _plan_args(p)
    p.add_argument("--out", required=True, metavar="FILE.html")
    p.set_defaults(func=cmd_report)
