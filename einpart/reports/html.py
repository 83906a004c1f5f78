"""One self-contained HTML page about a compiled spec: the pass pipeline with
each dump and the diff each pass made, the plan table (per statement:
split, layout, collectives, predicted compute / memory / communication
time; totals per phase), and a drawing of how every weight and cache is
laid out over the mesh.

Self-contained: inline CSS and SVG, no script, no network. Every piece of
text from a spec, a pass or a path goes through `esc`, so a hostile name
or string cannot inject markup.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..ir import graph as g
from ..passes.shard.cli import _axes as axes_text
from ..passes.shard.cli import _b as bytes_text
from ..passes.shard.cli import _t as time_text
from ..passes.shard.mesh import format_mesh
from .layout_svg import tensor_svg
from .svg import esc

CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1500px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 15px; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.total td { font-weight: bold; background: #fafafa; }
pre { background: #f8f8f8; border: 1px solid #e4e4e4; padding: 8px; font-size: 11px; overflow-x: auto;
      max-height: 420px; overflow-y: auto; margin: 4px 0; }
pre.diff span { display: block; } .add { background: #e6ffec; color: #1a5e2a; } .del { background: #ffebe9; color: #8e1b1b; }
.hunk { color: #6a5acd; } details { margin: 6px 0 10px; } summary { cursor: pointer; font-size: 13px; }
.pass { border-left: 3px solid #4e79a7; padding-left: 10px; margin: 14px 0; }
.muted { color: #666; font-size: 12px; }
.weight { display: inline-block; vertical-align: top; margin: 8px 28px 14px 0; }
"""


@dataclass
class Stage:
    """One step of the pipeline as the page shows it: the IR text after it."""
    name: str
    seconds: float
    text: str


def stages_from_records(records) -> list[Stage]:
    """Stages from run_pipeline's records (each with its dump file)."""
    return [Stage(r.name, r.seconds, Path(r.dump).read_text(encoding="utf-8")) for r in records]


def diff_lines(before: str, after: str, name: str) -> list[str]:
    return list(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", name, lineterm="", n=2))


def _diff_html(lines: list[str]) -> str:
    if not lines:
        return '<pre class="diff"><span class="muted">no change</span></pre>'
    out = []
    for ln in lines:
        cls = ("hunk" if ln.startswith("@@") else "add" if ln.startswith("+") else
               "del" if ln.startswith("-") else "")
        out.append(f'<span class="{cls}">{esc(ln) or " "}</span>' if cls else f"<span>{esc(ln) or ' '}</span>")
    return '<pre class="diff">' + "".join(out) + "</pre>"


def pipeline_section(stages: list[Stage]) -> str:
    rows, bodies = [], []
    prev = ""
    for n, st in enumerate(stages):
        lines = diff_lines(prev, st.text, st.name) if n else []
        plus = sum(1 for ln in lines if ln.startswith("+") and not ln.startswith("+++"))
        minus = sum(1 for ln in lines if ln.startswith("-") and not ln.startswith("---"))
        anchor = f"stage-{n}"
        change = "(the input)" if n == 0 else f"+{plus} / -{minus} lines"
        rows.append(f'<tr><td class="num">{n:02d}</td><td><a href="#{anchor}">{esc(st.name)}</a></td>'
                    f'<td class="num">{st.seconds * 1000:.1f} ms</td><td class="num">{len(st.text.splitlines())}</td>'
                    f"<td>{change}</td></tr>")
        dump = (f'<details{" open" if n == 0 else ""}><summary>dump after this pass '
                f'({len(st.text.splitlines())} lines)</summary><pre class="dump">{esc(st.text)}</pre></details>')
        diff = "" if n == 0 else f'<div class="muted">diff against the previous dump</div>{_diff_html(lines)}'
        bodies.append(f'<div class="pass" id="{anchor}"><h3>{n:02d} {esc(st.name)}</h3>{diff}{dump}</div>')
        prev = st.text
    table = ('<table class="passes"><tr><th>#</th><th>pass</th><th>time</th><th>dump lines</th><th>change</th></tr>'
             + "".join(rows) + "</table>")
    return '<section id="pipeline"><h2>Pass pipeline</h2>' + table + "".join(bodies) + "</section>"


def _phase_table(name: str, rep) -> str:
    head = ("<tr><th>statement</th><th>x</th><th>split</th><th>result layout</th><th>collectives</th>"
            "<th>compute</th><th>memory</th><th>comm</th><th>time (all executions)</th></tr>")
    rows = []
    for s in rep.stmts:
        colls = "<br>".join(f"{esc(d)} <span class='muted'>{esc(time_text(t))}</span>" for d, t in s.collectives)
        rows.append(f"<tr><td>{esc(s.name)}</td><td class='num'>{s.count}</td><td>{esc(axes_text(s.split))}</td>"
                    f"<td>{esc(axes_text(s.layout))}</td><td>{colls or '-'}</td>"
                    f"<td class='num'>{esc(time_text(s.compute_s))}</td><td class='num'>{esc(time_text(s.memory_s))}</td>"
                    f"<td class='num'>{esc(time_text(s.comm_s))}</td>"
                    f"<td class='num'>{esc(time_text(s.time_s * s.count))}</td></tr>")
    rows.append(f"<tr class='total'><td>total</td><td></td><td></td><td></td><td></td>"
                f"<td class='num'>{esc(time_text(rep.compute_s))}</td><td class='num'>{esc(time_text(rep.memory_s))}</td>"
                f"<td class='num'>{esc(time_text(rep.comm_s))}</td><td class='num'>{esc(time_text(rep.step_s))}</td></tr>")
    step = "step" if name == "decode" else "pass"
    summary = (f"<p>per {esc(name)} {step}: <b>{esc(time_text(rep.step_s))}</b>, MFU {100 * rep.mfu:.1f}%; memory per "
               f"device {esc(bytes_text(rep.memory_bytes))} (weights {esc(bytes_text(rep.weights_bytes))}, KV cache "
               f"{esc(bytes_text(rep.kv_bytes))}, activations {esc(bytes_text(rep.activation_bytes))})</p>")
    return (f'<div class="phase" id="plan-{esc(name)}"><h3>{esc(name)}</h3>{summary}'
            f'<table class="plan">{head}{"".join(rows)}</table></div>')


def plan_section(programs: dict, hardware) -> str:
    """programs: phase -> single-phase planned graph (codegen.lower.program_graphs)."""
    from ..passes.shard.report import price_graph
    parts = [_phase_table(name, price_graph(pg, hardware, name)) for name, pg in programs.items()]
    note = (f'<p class="muted">predicted on {esc(getattr(hardware, "name", hardware))} by the cost model '
            f"(roofline compute and memory time, alpha-beta collectives, no overlap); x = executions per step</p>")
    return '<section id="plan"><h2>Plan</h2>' + note + "".join(parts) + "</section>"


def layouts_section(graph: g.Graph) -> str:
    mesh = dict(graph.mesh)
    out = []
    for kind, title in (("param", "weights"), ("state", "KV caches and other state")):
        drawings = [f'<div class="weight" id="layout-{esc(d.name)}">'
                    f'{tensor_svg(d, mesh, owner.index if owner is not None else None)}</div>'
                    for d, owner in graph.all_decls() if d.kind == kind]
        if drawings:
            out.append(f"<h3>{title}</h3>" + "".join(drawings))
    return ('<section id="layouts"><h2>Layouts over the mesh</h2><p class="muted">left: the tensor cut into the '
            'blocks its layout makes; right: every device of the mesh, coloured and numbered by the block it '
            'holds (hover for details)</p>' + "".join(out) + "</section>")


def source_section(source: str | None) -> str:
    if not source:
        return ""
    return ('<section id="source"><h2>Generated module</h2><details><summary>the jax.shard_map module '
            f'({len(source.splitlines())} lines)</summary><pre>{esc(source)}</pre></details></section>')


def build_report(title: str, stages: list[Stage], graph: g.Graph, hardware, source: str | None = None) -> str:
    """The page for a planned graph (graph.mesh set) and the stages that produced it."""
    from ..codegen.lower import program_graphs
    programs = program_graphs(graph)
    mesh = format_mesh(graph.mesh)
    n = 1
    for _, k in graph.mesh:
        n *= k
    head = (f"<h1>einpart report: {esc(title)}</h1><p>mesh {esc(mesh)} ({n} devices), hardware "
            f"{esc(getattr(hardware, 'name', hardware))}; {len(stages) - 1} pass(es): "
            f"{esc(', '.join(s.name for s in stages[1:]))}</p>"
            '<p class="muted"><a href="#pipeline">pipeline</a> · <a href="#plan">plan</a> · '
            '<a href="#layouts">layouts</a>' + (' · <a href="#source">module</a>' if source else "") + "</p>")
    body = head + pipeline_section(stages) + plan_section(programs, hardware) + layouts_section(graph) + \
        source_section(source)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>einpart report: {esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_report(path, title: str, records, graph: g.Graph, hardware, source: str | None = None) -> Path:
    """Write the page for run_pipeline's records (dumps on disk) and the planned graph."""
    path = Path(path)
    path.write_text(build_report(title, stages_from_records(records), graph, hardware, source), encoding="utf-8")
    return path
