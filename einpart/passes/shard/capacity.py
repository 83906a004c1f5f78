"""`einpart plan --report context`: the longest context that fits, like Table 1
of Pope et al. 2022 ("Efficiently scaling Transformer inference").

For a variant (a graph, i.e. a spec after its pipeline, and a way to lay out
its KV cache) and a batch size, the decode step is planned by the planner
itself (shard.plan, phase=decode) with the cache's layout pinned:

  heads   the cache split over its key/value head axes, every mesh axis on
          them (multihead: one head per chip; multiquery has no head axis to
          split, so its one head is replicated on every chip);
  batch   the cache split over the batch, every mesh axis on it (Pope et
          al.'s optimised multiquery layout);
  auto    whatever the planner picks (at the probe context).

The planned step's KV bytes per device (PhaseReport.kv_bytes, the same
accounting as the plan's memory), divided by the probe context, is the
cache's bytes per token per device; the longest context is the budget
(`kv_fraction` of the chip's HBM) over that, rounded down to what the
cache's split of the positions allows. The rest of the plan (weights,
activations) is reported beside it, so a variant whose weights leave no
room is visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import EinpartError
from ...ir import graph as g
from ...ir import layout as lay
from ...ir.verify import resolve_sizes
from .hardware import load_hardware
from .mesh import mesh_devices, parse_mesh
from .phases import find_roles

LAYOUTS = ("heads", "batch", "auto")


@dataclass(frozen=True)
class Variant:
    label: str          # e.g. "as given", "multiquery{groups=1}"
    graph: g.Graph
    layout: str         # one of LAYOUTS


@dataclass
class Capacity:
    variant: str
    layout: str
    batch: int
    cache_layout: dict          # state name -> {index: mesh axes} as planned
    kv_bytes_per_token: float   # per device, every layer, K and V
    max_context: int
    weights_bytes: float        # per device, in the same plan
    activation_bytes: float

    def to_json(self) -> dict:
        return {"variant": self.variant, "layout": self.layout, "batch": self.batch,
                "cache_layout": {n: {i: list(a) for i, a in lt.items() if a} for n, lt in self.cache_layout.items()},
                "kv_bytes_per_token": self.kv_bytes_per_token, "max_context": self.max_context,
                "weights_bytes": self.weights_bytes, "activation_bytes": self.activation_bytes}


@dataclass
class ContextReport:
    hardware: str
    mesh: tuple
    kv_fraction: float
    budget_bytes: float
    rows: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"hardware": self.hardware, "mesh": [list(a) for a in self.mesh], "kv_fraction": self.kv_fraction,
                "kv_budget_bytes": self.budget_bytes, "rows": [r.to_json() for r in self.rows]}


def _states(graph: g.Graph) -> list[g.Decl]:
    states = [d for d, _ in graph.all_decls() if d.kind == "state"]
    if not states:
        raise EinpartError("--report context: the spec has no KV cache (no state declarations)")
    return states


def cache_fix(graph: g.Graph, layout: str, mesh) -> dict:
    """The planner's `fix` that pins every cache (state) to the variant's layout."""
    if layout not in LAYOUTS:
        raise EinpartError(f"--kv-layout: expected {', '.join(LAYOUTS)}, got '{layout}'")
    if layout == "auto":
        return {}
    from ..multiquery import find_attention
    from ..rewrite_util import GraphInfo
    axes = tuple(a for a, n in mesh if n > 1)
    devices = mesh_devices(mesh)
    if layout == "batch":
        b = find_roles(graph).b
        if b is None:
            raise EinpartError("--kv-layout batch: cannot tell the batch index of the KV cache")
        split = (b,)
    else:
        info = GraphInfo(graph)
        split = find_attention(graph, info).kh      # one head (multiquery): replicated
        heads = math.prod(info.extent[i] for i in split)
        if heads == 1:
            split = ()
        elif heads % devices:
            raise EinpartError(f"--kv-layout heads: {heads} key/value heads cannot be split over {devices} chips")
    fix = {}
    for d in _states(graph):
        idx = [i for i in split if i in d.type.indices]
        fix[d.name] = {idx[0]: axes} if idx and axes else {}
    return fix


def capacity(variant: Variant, mesh, hardware, batch: int, kv_fraction: float, probe: int = 0,
             time_limit: float = 10.0, workers: int = 2) -> Capacity:
    """One row: plan the decode step (cache pinned to the variant's layout) and divide the budget."""
    from .shard import plan
    hw = load_hardware(hardware)
    mesh = parse_mesh(mesh)
    graph = variant.graph
    roles = find_roles(graph)
    if roles.s is None:
        raise EinpartError("--report context: the spec has no KV cache write")
    p = plan(graph, mesh, hw, "decode", batch=batch, context=probe, memory_limit=None,
             time_limit=time_limit, workers=workers, fix=cache_fix(graph, variant.layout, mesh) or None)
    rep = p.phases["decode"]
    context = resolve_sizes(p.graph)[roles.s_size]
    per_token = rep.kv_bytes / context
    cache = {d.name: lay.type_layout(d.type) for d, _ in p.graph.all_decls() if d.kind == "state"}
    parts = max(lay.parts(tuple(lt.get(roles.s, ())), dict(mesh)) for lt in cache.values())
    budget = kv_fraction * hw.hbm_bytes
    longest = int(budget // per_token) // parts * parts if per_token > 0 else 0
    return Capacity(variant.label, variant.layout, batch, cache, per_token, longest, rep.weights_bytes,
                    rep.activation_bytes)


def context_report(variants: list[Variant], mesh, hardware, batches: list[int], kv_fraction: float,
                   probe: int = 0, time_limit: float = 10.0, workers: int = 2) -> ContextReport:
    if not 0 < kv_fraction <= 1:
        raise EinpartError(f"--kv-fraction {kv_fraction:g}: must be in (0, 1]")
    if not batches:
        raise EinpartError("--report context needs --batch (one or more sizes, e.g. --batch 128,512)")
    hw = load_hardware(hardware)
    mesh = parse_mesh(mesh)
    out = ContextReport(hw.name, mesh, kv_fraction, kv_fraction * hw.hbm_bytes)
    for v in variants:
        for b in batches:
            out.rows.append(capacity(v, mesh, hw, b, kv_fraction, probe, time_limit, workers))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def format_context(rep: ContextReport, spec: str = "") -> str:
    """The table: one row per variant and cache layout, one column per batch."""
    batches = sorted({r.batch for r in rep.rows})
    lines = [f"longest context {spec} on {rep.hardware}, {mesh_devices(rep.mesh)} chips, "
             f"{100 * rep.kv_fraction:g}% of HBM ({_gb(rep.budget_bytes)} per chip) for the KV cache"
             .replace("  ", " "),
             f"{'variant':<28} {'cache layout':<22} {'KV B/token/chip':>16} " +
             " ".join(f"{'batch ' + str(b):>12}" for b in batches) + f"  {'weights/chip':>12}"]
    keys = list(dict.fromkeys((r.variant, r.layout) for r in rep.rows))
    for v, layout in keys:
        rows = {r.batch: r for r in rep.rows if (r.variant, r.layout) == (v, layout)}
        first = rows[batches[0]] if batches[0] in rows else next(iter(rows.values()))
        lt = next(iter(first.cache_layout.values()))
        where = " ".join(f"{i}@({','.join(a)})" for i, a in lt.items() if a) or "replicated"
        per_seq = first.kv_bytes_per_token / first.batch
        lines.append(f"{v:<28} {layout + ': ' + where:<22} {per_seq:>16.4g} " +
                     " ".join(f"{rows[b].max_context:>12,}" if b in rows else f"{'-':>12}" for b in batches) +
                     f"  {_gb(first.weights_bytes):>12}")
    lines.append("(KV B/token/chip: bytes per token of one sequence, per chip, all layers, K and V)")
    return "\n".join(lines)
