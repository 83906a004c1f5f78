"""The latency-vs-cost frontier of a model over chip counts and batch sizes
(Figure 1 of Pope et al. 2022, "Efficiently Scaling Transformer Inference").

Every (chips, batch) point is planned by the shard planner, prefill and
decode each on their own (each phase may pick its own layouts, as each
point of Pope et al.'s figure does). A point's

  latency = predicted seconds per step (one prefill pass over batch x prompt
            tokens; one decode step of batch tokens),
  cost    = chip-seconds per token = chips * latency / tokens per step,

and it is on the frontier when no other point of its phase is at least as
fast and at least as cheap, and strictly better in one. A point that fits
no layout in memory (or that the solver cannot plan in its time limit) is
kept in the table as infeasible, with the planner's message.

Mesh shapes (`mesh_for`): a chip count alone does not say how the chips
are wired, so one rule per kind of hardware:
  * hardware without nodes (a torus: tpu-v4, tpu-v4-torus; also cpu): a
    near-cubic 3-axis mesh x <= y <= z (8 -> 2x2x2, 16 -> 2x2x4, 64 ->
    4x4x4), axes of size 1 dropped;
  * hardware with nodes (GPUs, node_size devices behind one switch): inside
    a node a near-square 2-D mesh (8 -> 2x4, 4 -> 2x2; primes 1-D); beyond a
    node a leading axis over nodes (16 h100 -> x=2 nodes, y=2, z=4); the
    count must then be a whole number of nodes.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field

from ..errors import EinpartError, PlanError
from ..ir import graph as g
from ..passes.shard.hardware import Hardware, load_hardware
from ..passes.shard.mesh import format_mesh
from ..passes.shard.phases import find_roles, make_phases
from . import svg as S

PHASES = ("prefill", "decode")
CSV_COLUMNS = ("phase", "chips", "mesh", "batch", "tokens_per_step", "latency_s", "cost_chip_s_per_token",
               "frontier", "status", "gap", "mfu", "memory_per_device_bytes", "plan_s", "note")
_AXES = ("x", "y", "z")


def _balanced(n: int, k: int) -> tuple[int, ...]:
    """k factors of n, ascending, as equal as possible (smallest largest/smallest ratio)."""
    if k == 1:
        return (n,)
    best = None
    for a in range(1, int(round(n ** (1 / k))) + 2):
        if n % a:
            continue
        rest = _balanced(n // a, k - 1)
        if rest[0] < a:
            continue
        cand = (a,) + rest
        key = (cand[-1] / cand[0], cand[-1])
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1] if best else (1,) * (k - 1) + (n,)


def mesh_for(chips: int, hardware) -> tuple:
    """The mesh a chip count is planned on (the rule in the module docstring)."""
    hw = load_hardware(hardware)
    if chips < 1:
        raise EinpartError(f"--chips: a chip count must be at least 1, got {chips}")
    if hw.node_size and chips > hw.node_size:
        if chips % hw.node_size:
            raise EinpartError(f"--chips {chips}: {hw.name} has {hw.node_size} devices per node; a count above "
                               f"one node must be a whole number of nodes")
        sizes = (chips // hw.node_size,) + _balanced(hw.node_size, 2)
    elif hw.node_size:
        sizes = _balanced(chips, 2)
    else:
        sizes = _balanced(chips, 3)
    sizes = tuple(n for n in sizes if n > 1) or (1,)
    return tuple(zip(_AXES, sizes))


@dataclass
class Point:
    phase: str
    chips: int
    mesh: tuple
    batch: int
    tokens: int                  # tokens per step (batch x prompt for prefill, batch for decode)
    latency_s: float = math.nan
    status: str = "infeasible"   # optimal | feasible (time limit hit) | infeasible
    gap: float = math.nan
    mfu: float = math.nan
    memory_bytes: float = math.nan
    plan_s: float = 0.0
    note: str = ""
    frontier: bool = False

    @property
    def feasible(self) -> bool:
        return self.status in ("optimal", "feasible")

    @property
    def cost(self) -> float:
        """Chip-seconds per token."""
        return self.chips * self.latency_s / self.tokens if self.feasible else math.nan

    def row(self) -> dict:
        return {"phase": self.phase, "chips": self.chips, "mesh": format_mesh(self.mesh), "batch": self.batch,
                "tokens_per_step": self.tokens, "latency_s": _num(self.latency_s),
                "cost_chip_s_per_token": _num(self.cost), "frontier": int(self.frontier), "status": self.status,
                "gap": _num(self.gap), "mfu": _num(self.mfu), "memory_per_device_bytes": _num(self.memory_bytes),
                "plan_s": f"{self.plan_s:.3f}", "note": self.note}


def _num(x: float) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.6g}"


def mark_frontier(points: list[Point]) -> list[Point]:
    """Set .frontier on every feasible point no other point of its phase dominates; return them
    (per phase, by latency)."""
    out = []
    for ph in {p.phase for p in points}:
        live = [p for p in points if p.phase == ph and p.feasible]
        for p in live:
            p.frontier = not any(q.latency_s <= p.latency_s and q.cost <= p.cost and
                                 (q.latency_s < p.latency_s or q.cost < p.cost) for q in live)
        out += sorted((p for p in live if p.frontier), key=lambda p: (p.phase, p.latency_s))
    return out


@dataclass
class Sweep:
    spec: str
    hardware: str
    context: int
    prompt: int
    points: list = field(default_factory=list)


def _check_sizes(graph: g.Graph, phases, batches, context, prompt) -> int:
    """Fail before the sweep on what would fail every point; return the prefill prompt length."""
    roles = find_roles(graph)
    t = 0
    for ph in phases:
        made = make_phases(graph, ph, max(batches), context, prompt)[0]
        if ph == "prefill":
            t = made.sizes[roles.t_size] if roles.t_size else 1
    return t


def sweep(graph: g.Graph, hardware, chips: list[int], batches: list[int], context: int = 0, prompt: int = 0,
          phases=PHASES, time_limit: float = 10.0, workers: int = 2, memory_limit=0.0,
          on_point=None, spec: str = "") -> Sweep:
    """Plan every (phase, chips, batch) point; on_point(i, n, point) after each (progress)."""
    from ..passes.shard.shard import plan
    hw: Hardware = load_hardware(hardware)
    if not chips or not batches:
        raise EinpartError("pareto: give at least one chip count and one batch size")
    if any(b < 1 for b in batches):
        raise EinpartError(f"--batch: batch sizes must be at least 1, got {min(batches)}")
    for ph in phases:
        if ph not in PHASES:
            raise EinpartError(f"pareto: phase must be prefill or decode, got '{ph}'")
    meshes = {c: mesh_for(c, hw) for c in chips}
    t_len = _check_sizes(graph, phases, batches, context, prompt)
    result = Sweep(spec, hw.name, context, prompt)
    todo = [(ph, c, b) for ph in phases for c in chips for b in batches]
    for i, (ph, c, b) in enumerate(todo, start=1):
        pt = Point(ph, c, meshes[c], b, b * t_len if ph == "prefill" else b)
        start = time.perf_counter()
        try:
            p = plan(graph, meshes[c], hw, ph, batch=b, context=context, prompt=prompt,
                     memory_limit=memory_limit, time_limit=time_limit, workers=workers)
            rep = p.phases[ph]
            pt.latency_s, pt.status, pt.gap = rep.step_s, p.status, p.gap
            pt.mfu, pt.memory_bytes, pt.note = rep.mfu, rep.memory_bytes, p.note
        except PlanError as e:
            pt.note = str(e).splitlines()[0]
        pt.plan_s = time.perf_counter() - start
        result.points.append(pt)
        if on_point is not None:
            on_point(i, len(todo), pt)
    mark_frontier(result.points)
    return result


def write_csv(result: Sweep, path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for p in result.points:
            w.writerow(p.row())


def _tip(p: Point) -> str:
    return (f"{p.phase}: {p.chips} chips ({format_mesh(p.mesh)}), batch {p.batch}: "
            f"latency {p.latency_s:.4g} s, cost {p.cost:.4g} chip-s/token, MFU {100 * p.mfu:.1f}%")


def frontier_marks(points: list[Point]) -> list[tuple[Point, str]]:
    """The frontier of one phase by latency, one entry per distinct (latency, cost), labelled with
    every point there ("64c B=16", ties joined), so tied points do not print over each other."""
    groups: dict[tuple, list[Point]] = {}
    for p in sorted((p for p in points if p.frontier), key=lambda p: (p.latency_s, p.chips)):
        groups.setdefault((p.latency_s, p.cost), []).append(p)
    return [(ps[0], ", ".join(f"{p.chips}c B={p.batch}" for p in ps)) for ps in groups.values()]


def _title(result: Sweep, phase: str) -> str:
    return f"{phase} ({result.hardware})"


def _xlabel(phase: str) -> str:
    return "latency per prefill pass (s)" if phase == "prefill" else "latency per decode step (s)"


def frontier_svg(result: Sweep) -> str:
    """Prefill and decode side by side: every feasible point coloured by chip count, the frontier
    as a line with each point's batch size."""
    phases = [ph for ph in PHASES if any(p.phase == ph for p in result.points)]
    pw, ph_, left, top = 460, 360, 80, 60
    svg = S.Svg(left + len(phases) * (pw + 100), top + ph_ + 70)
    head = f"latency vs cost: {result.spec} on {result.hardware}"
    svg.text(10, 22, head, size=15, weight="bold")
    chips = sorted({p.chips for p in result.points})
    for k, phase in enumerate(phases):
        pts = [p for p in result.points if p.phase == phase and p.feasible]
        series = [{"label": f"{c} chips" + ("" if any(p.chips == c for p in pts) else ": none feasible"),
                   "colour": S.colour(j),
                   "points": [(p.latency_s, p.cost, _tip(p), "") for p in pts if p.chips == c]}
                  for j, c in enumerate(chips)]
        series.append({"label": "frontier", "colour": "#111", "line": True,
                       "points": [(p.latency_s, p.cost, _tip(p), m) for p, m in frontier_marks(pts)]})
        S.loglog_panel(svg, left + k * (pw + 100), top, pw, ph_, _title(result, phase), _xlabel(phase),
                       "cost (chip-seconds per token)", series)
    return svg.text_doc()


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a clear error naming the extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EinpartError("PNG output needs matplotlib: pip install 'einpart[plot]' "
                           "(or ask for --format csv,svg, which need nothing)") from None
    return plt


def format_frontier(result: Sweep) -> str:
    """The frontier as text, per phase, fastest first; then how many points were infeasible."""
    lines = []
    for phase in PHASES:
        pts = [p for p in result.points if p.phase == phase]
        if not pts:
            continue
        front = sorted((p for p in pts if p.frontier), key=lambda p: p.latency_s)
        lines.append(f"{phase} frontier ({len(front)} of {len(pts)} points; "
                     f"{sum(not p.feasible for p in pts)} infeasible):")
        lines.append(f"  {'chips':>5} {'mesh':<14} {'batch':>6} {'latency s':>11} {'chip-s/token':>13} {'MFU':>6}")
        for p in front:
            lines.append(f"  {p.chips:>5} {format_mesh(p.mesh):<14} {p.batch:>6} {p.latency_s:>11.4g} "
                         f"{p.cost:>13.4g} {100 * p.mfu:>5.1f}%")
    return "\n".join(lines)


def write_png(result: Sweep, path) -> None:
    """The same chart through matplotlib (the optional extra einpart[plot])."""
    plt = require_matplotlib()
    phases = [ph for ph in PHASES if any(p.phase == ph for p in result.points)]
    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4.8), squeeze=False)
    chips = sorted({p.chips for p in result.points})
    for ax, phase in zip(axes[0], phases):
        pts = [p for p in result.points if p.phase == phase and p.feasible]
        for j, c in enumerate(chips):
            mine = [p for p in pts if p.chips == c]
            if mine:
                ax.scatter([p.latency_s for p in mine], [p.cost for p in mine], color=S.colour(j),
                           label=f"{c} chips", s=22, zorder=3)
        front = frontier_marks(pts)
        if front:
            ax.plot([p.latency_s for p, _ in front], [p.cost for p, _ in front], color="#111", lw=1.5,
                    marker="o", mfc="none", ms=8, label="frontier", zorder=2)
            for p, mark in front:
                ax.annotate(mark, (p.latency_s, p.cost), textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(_xlabel(phase))
        ax.set_ylabel("cost (chip-seconds per token)")
        ax.set_title(_title(result, phase))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.grid(True, which="major", color="#ddd")
        ax.legend(fontsize=8)
    fig.suptitle(f"latency vs cost: {result.spec}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
