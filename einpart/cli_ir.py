"""Subcommands on specs: check, fmt, dump, and the shared spec arguments."""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from .errors import EinpartError
from .ir import graph as g
from .ir.parser import parse_file
from .ir.printer import format_graph
from .ir.shapes import decl_shapes
from .ir.verify import resolve_sizes

BUILTIN_EXAMPLES = ("gpt2", "llama", "palm")


def example_path(name: str) -> Path:
    """The path of a built-in example spec, shipped with the package."""
    return Path(str(resources.files("einpart.examples") / f"{name}.ein"))


def parse_sets(values: list[str] | None) -> dict[str, int]:
    """--set D=4096,F=14336 (repeatable) -> {'D': 4096, 'F': 14336}."""
    out: dict[str, int] = {}
    for value in values or []:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, eq, num = item.partition("=")
            try:
                if not eq:
                    raise ValueError
                out[name.strip()] = int(num.replace("_", ""))
            except ValueError:
                raise EinpartError(f"--set {item}: expected NAME=INTEGER") from None
    return out


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help=f"spec file (or a built-in example: {', '.join(BUILTIN_EXAMPLES)})")
    p.add_argument("--set", action="append", metavar="NAME=VALUE[,...]", help="override sizes (repeatable)")


def load_spec(args) -> g.Graph:
    path = Path(args.spec)
    if not path.exists() and args.spec in BUILTIN_EXAMPLES:
        path = example_path(args.spec)
    return parse_file(path, parse_sets(args.set))


def _count(n: float) -> str:
    return f"{n:.3g}" if n < 1e4 else f"{n:.2e}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def summary(graph: g.Graph, path: str) -> str:
    sizes = resolve_sizes(graph)
    shapes = decl_shapes(graph, sizes)
    lines = [f"{path}: ok"]
    lines.append("sizes: " + " ".join(f"{s.name}={sizes[s.name]}" for s in graph.sizes))
    if graph.mesh:
        lines.append("mesh: " + " ".join(f"{n}={v}" for n, v in graph.mesh))
    for kind, label in (("param", "parameters"), ("state", "state"), ("input", "inputs")):
        items = [i for i in shapes.values() if i.decl.kind == kind]
        if not items:
            continue
        count = sum(i.size for i in items)
        by_dtype: dict[str, int] = {}
        for i in items:
            by_dtype[i.decl.type.dtype] = by_dtype.get(i.decl.type.dtype, 0) + i.nbytes
        dt = ", ".join(f"{human_bytes(b)} {d}" for d, b in sorted(by_dtype.items()))
        lines.append(f"{label}: {_count(count)} ({count:,}) in {len(items)} tensors, {dt}")
    lines.append(f"statements: top level {len(graph.body.stmts)}")
    for s, _ in graph.all_stmts():
        if isinstance(s.op, g.Repeat):
            n = sizes[graph.index_size_names()[s.op.index]]
            lines.append(f"  repeat {s.op.index} ({n} times, '{s.name}'): {len(s.op.body.stmts)} statements, "
                         f"{len(s.op.body.decls)} declarations")
    lines.append("outputs: " + ", ".join(graph.outputs))
    return "\n".join(lines)


def cmd_check(args) -> int:
    graph = load_spec(args)
    print(summary(graph, args.spec))
    return 0


def cmd_fmt(args) -> int:
    sys.stdout.write(format_graph(load_spec(args)))
    return 0


def cmd_dump(args) -> int:
    from .passes import run_pipeline
    graph = load_spec(args)
    result = run_pipeline(graph, args.pipeline, dump_dir=args.dump_dir)
    for rec in result.records:
        print(f"{rec.name:<32} {rec.seconds * 1000:8.1f} ms  {rec.dump}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("check", help="parse and verify a spec; print a summary")
    add_spec_args(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("fmt", help="print the canonical text of a spec")
    add_spec_args(p)
    p.set_defaults(func=cmd_fmt)
    p = sub.add_parser("dump", help="run a pass pipeline and write the IR after each pass")
    add_spec_args(p)
    p.add_argument("--pipeline", required=True, metavar="P", help="e.g. 'dce,cast{dtype=bf16}'")
    p.add_argument("--dump-dir", required=True, metavar="DIR")
    p.set_defaults(func=cmd_dump)
