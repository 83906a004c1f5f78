"""Forced layouts: the layouts of Pope et al. as plan kinds, priced by the planner itself.

Pope et al. ("Efficiently Scaling Transformer Inference", arXiv 2211.05102,
sec. 3.2-3.3) compare a few named layouts of the feed-forward and attention
weights. Here each one is a set of constraints on the shard pass's choices
(the planner's `fix`), not a plan of its own: the stored layout of every
weight matrix, and for every statement that reads one, how its split treats
that weight's indices. Everything else (the KV cache, attention, norms, the
activations between the matmuls) is left to the ILP, which builds, prices
and solves the strategy graph exactly as for an unforced plan. So a forced
plan is the best plan of its family under the same cost model; it prints
the same table, codegen lowers it unchanged, and the unforced plan, optimal
over a superset, is never predicted slower.

  ws1d  1D weight-stationary (Megatron): every weight matrix split over all
        mesh axes on its indices other than the model width d (MLP width,
        heads, vocabulary), d whole; its readers use it where it lies.
  ws2d  2D weight-stationary: d split over one set A of mesh axes, the other
        indices over the rest B (heads and MLP width over B); every way to
        part the mesh's axes into A and B is planned and the best kept.
  wg    weight-gathered: weights stored split over all axes and gathered
        whole for every use; their readers split the batch over all axes.
  dp    data-parallel: weights replicated; readers split the batch over all axes.

A weight is a parameter with two or more axes, or a statement computed from
parameters alone with two or more axes (a prepared weight: int8's quantised
matrix), which codegen stores like one. Gains and scales are left free. An
index a weight's sizes cannot split as far as the layout asks (fewer heads
than devices) is split as far as it divides, the rest replicated, and the
plan's note says so; a layout that leaves most weight bytes short of its
split, or a batch the mesh cannot split for wg / dp, or a mesh with one
axis for ws2d, does not apply: LayoutNotApplicable says why.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ...errors import EinpartError, PlanError
from ...ir import graph as g
from ...ir import layout as lay
from ...ir.analysis import param_only
from ...ir.shapes import DTYPE_BYTES
from .mesh import format_mesh, parse_mesh
from .phases import find_roles, make_phases
from .planner import rope_pairs

KINDS = {"ws1d": "1D weight-stationary", "ws2d": "2D weight-stationary",
         "wg": "weight-gathered", "dp": "data-parallel"}


class LayoutNotApplicable(EinpartError):
    """A forced layout that cannot apply to this graph, mesh or batch; the message says why."""


@dataclass(frozen=True)
class SplitRule:
    """A constraint on a statement's split: the indices in `fixed` take exactly
    those mesh axes (() = kept whole); the statement's other indices are free.
    The planner keeps only the strategies a rule allows."""
    fixed: tuple                    # ((index, axes), ...)

    def allows(self, split: dict) -> bool:
        return all(tuple(split.get(i, ())) == axes for i, axes in self.fixed)

    def __str__(self) -> str:
        whole = [i for i, a in self.fixed if not a]
        parts = [f"{i} over ({', '.join(a)})" for i, a in self.fixed if a]
        if whole:
            parts.append(f"{', '.join(whole)} whole")
        return "; ".join(parts) or "anything"


@dataclass
class Candidate:
    """One forced plan to solve: its constraints, and what to say about it."""
    label: str                      # e.g. "d over (x), others over (y)"
    fix: dict
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------ roles
@dataclass(frozen=True)
class Roles:
    width: str                      # the model width d (the layer carry's index besides batch and positions)
    batch: str | None
    order: tuple                    # every index, in declaration order
    whole: frozenset                # indices never split (rope pairs)
    weights: dict                   # weight name -> its type's indices
    prepared: frozenset             # the weights that are statements (computed from parameters alone)
    weight_bytes: dict              # weight name -> bytes (all layers)


def find_layout_roles(graph: g.Graph, idx: dict) -> Roles:
    carry = next((s for s in graph.body.stmts if isinstance(s.op, g.Repeat)), None)
    r = find_roles(graph)
    if carry is None:
        raise LayoutNotApplicable("forced layouts need a layer stack (a repeat block): the model width "
                                  "is the index its carried value has besides batch and positions")
    width = [i for i in carry.type.indices if i not in (r.b, r.t)]
    if len(width) != 1:
        raise LayoutNotApplicable(f"forced layouts need one model-width index in the layer carry "
                                  f"'{carry.name}' besides batch and positions; it has {', '.join(width) or 'none'}")
    prepared = param_only(graph)
    weights, nbytes = {}, {}
    for d, owner in graph.all_decls():
        if d.kind == "param" and len(d.type.indices) >= 2:
            weights[d.name] = d.type.indices
            nbytes[d.name] = _bytes(d.type, idx, owner)
    for s, owner in graph.all_stmts():
        if s.name in prepared and len(s.type.indices) >= 2:
            weights[s.name] = s.type.indices
            nbytes[s.name] = _bytes(s.type, idx, owner)
    return Roles(width[0], r.b, tuple(i.name for i in graph.indices), rope_pairs(graph), weights,
                 frozenset(n for n in weights if n in prepared), nbytes)


def _bytes(t: g.TensorType, idx: dict, owner) -> float:
    layers = idx[owner.index] if owner is not None else 1
    return DTYPE_BYTES[t.dtype] * math.prod(idx[i] for i in t.indices) * layers


# ------------------------------------------------------------------ weight layouts
def _greedy(indices, axes, idx: dict, msize: dict, start: dict | None = None) -> dict:
    """Each mesh axis to the first index (in the order given) it still divides, the
    axes taken in the order that splits the tensor most ways (mesh order on a tie):
    4 heads on a 2x4 mesh go over y, not x alone."""
    best, most = {}, 0
    for order in itertools.permutations(axes):
        rest = dict(start or {})
        out = {i: tuple(rest.pop(i, ())) for i in indices}
        for a in order:
            for i in indices:
                if idx[i] % (math.prod(msize[b] for b in out[i]) * msize[a]) == 0:
                    out[i] = out[i] + (a,)
                    break
        got = {i: v for i, v in {**out, **rest}.items() if v}
        if _parts(got, msize) > most:
            best, most = got, _parts(got, msize)
    return best


def _parts(layout: dict, msize: dict) -> int:
    return math.prod(msize[a] for axes in layout.values() for a in axes)


def weight_layouts(roles: Roles, kind: str, idx: dict, mesh, A: tuple = ()) -> tuple[dict, list, float]:
    """(stored layout of every weight, notes on weights split less than the layout
    asks, fraction of the weight bytes so short) for one kind (ws2d: d over A)."""
    msize = dict(mesh)
    axes = tuple(a for a, n in mesh if n > 1)
    n = math.prod(msize[a] for a in axes)
    B = tuple(a for a in axes if a not in A)
    d = roles.width
    layouts, notes, short = {}, [], 0.0
    for w, indices in roles.weights.items():
        free = [i for i in roles.order if i in indices and i not in roles.whole]
        others = [i for i in free if i != d]
        if kind == "dp":
            lt, want = {}, 1
        elif kind == "wg":
            lt, want = _greedy(free, axes, idx, msize), n
        elif kind == "ws1d" or d not in indices:
            lt = _greedy(others, axes, idx, msize)
            want = n if others else 1
        else:   # ws2d
            if idx[d] % math.prod(msize[a] for a in A):
                raise LayoutNotApplicable(f"ws2d with {d} over ({', '.join(A)}): {d} = {idx[d]} of '{w}' does not "
                                          f"split {math.prod(msize[a] for a in A)} ways")
            lt = _greedy(others, B, idx, msize, {d: A})
            want = math.prod(msize[a] for a in A) * (math.prod(msize[a] for a in B) if others else 1)
        got = _parts(lt, msize)
        if got < want:
            sizes = " * ".join(f"{i} = {idx[i]}" for i in (others if kind != "wg" else free)) or "no index"
            notes.append(f"'{w}' split {got} of {want} ways ({sizes})")
            short += roles.weight_bytes[w]
        layouts[w] = lt
    total = sum(roles.weight_bytes.values()) or 1.0
    return layouts, notes, short / total


# ------------------------------------------------------------------ constraints
def layout_fix(graph: g.Graph, roles: Roles, kind: str, layouts: dict, mesh) -> dict:
    """The planner's `fix` for a kind: every parameter weight's stored layout; a
    rule for every prepared weight (its result laid out as stored) and for every
    statement that reads a weight (weight-stationary: the weight's indices split
    as it lies; wg / dp: kept whole, the batch over all axes)."""
    axes = tuple(a for a, n in mesh if n > 1)
    fix: dict = {}
    for w in roles.weights:
        if w not in roles.prepared:
            fix[w] = layouts[w]
    for s, _ in graph.all_stmts():
        if isinstance(s.op, g.Repeat):
            continue
        fixed: dict = {}
        if s.name in roles.prepared:
            if s.name in roles.weights:
                fixed = {i: layouts[s.name].get(i, ()) for i in s.type.indices}
        else:
            for r in lay.stmt_refs(s):
                if r.name not in roles.weights:
                    continue
                stored = layouts[r.name]
                for i, wi in zip(r.indices, roles.weights[r.name]):
                    want = tuple(stored.get(wi, ())) if kind in ("ws1d", "ws2d") else ()
                    if fixed.get(i, want) != want:
                        raise LayoutNotApplicable(f"{kind}: '{s.name}' reads weights that want index {i} split "
                                                  f"both over ({', '.join(fixed[i])}) and ({', '.join(want)})")
                    fixed[i] = want
            if fixed and kind in ("wg", "dp") and roles.batch in _stmt_indices(s):
                fixed[roles.batch] = axes
        if fixed:
            fix[s.name] = SplitRule(tuple(sorted(fixed.items())))
    return fix


def _stmt_indices(s: g.Statement) -> set:
    out = set(s.type.indices) | {i for r in lay.stmt_refs(s) for i in r.indices}
    if isinstance(s.op, g.Compute):
        out |= set(g.expr_indices(s.op.expr))
    return out


def candidates(graph: g.Graph, kind: str, mesh, phases) -> list[Candidate]:
    """The forced plans to solve for a kind (ws2d: one per way to part the axes),
    or LayoutNotApplicable saying why none applies."""
    if kind not in KINDS:
        raise EinpartError(f"force: layout must be one of {', '.join(KINDS)}, got '{kind}'")
    mesh = parse_mesh(mesh)
    idx = phases[0].idx
    roles = find_layout_roles(graph, idx)
    axes = tuple(a for a, n in mesh if n > 1)
    n = math.prod(dict(mesh)[a] for a in axes)
    where = f"mesh {format_mesh(mesh)}"
    if kind in ("wg", "dp"):
        if roles.batch is None:
            raise LayoutNotApplicable(f"{kind} ({KINDS[kind]}) splits the batch, and this spec has no batch index "
                                      f"(an index of the inputs that the KV cache also has)")
        for ph in phases:
            b = ph.idx[roles.batch]
            if b % n:
                raise LayoutNotApplicable(f"{kind} ({KINDS[kind]}) splits the batch over all {n} devices of "
                                          f"{where}: batch {roles.batch} = {b} ({ph.name}) does not divide")
    if kind == "ws2d":
        if len(axes) < 2:
            raise LayoutNotApplicable(f"ws2d ({KINDS[kind]}) splits {roles.width} over some mesh axes and the "
                                      f"other weight indices over the rest: {where} has {len(axes)} axis of "
                                      f"size > 1 (use e.g. 2x4 for 8 devices)")
        splits = [tuple(a for k, a in enumerate(axes) if mask >> k & 1) for mask in range(1, 2 ** len(axes) - 1)]
    else:
        splits = [()]
    out, why = [], []
    for A in splits:
        try:
            layouts, notes, short = weight_layouts(roles, kind, idx, mesh, A)
        except LayoutNotApplicable as e:
            why.append(str(e))
            continue
        if short > 0.5:
            why.append(f"{kind} ({KINDS[kind]}) on {where}: {100 * short:.0f}% of the weight bytes cannot split as "
                       f"it asks: " + "; ".join(notes[:4]) + ("; ..." if len(notes) > 4 else ""))
            continue
        label = KINDS[kind]
        if kind == "ws2d":
            B = tuple(a for a in axes if a not in A)
            label = f"{roles.width} over ({', '.join(A)}), heads/MLP over ({', '.join(B)})"
        out.append(Candidate(label, layout_fix(graph, roles, kind, layouts, mesh), notes))
    if not out:
        raise LayoutNotApplicable(" | ".join(why))
    return out


# ------------------------------------------------------------------ planning
def plan_forced(graph: g.Graph, kind: str, mesh, hardware="cpu", phase: str = "both", batch: int = 0,
                context: int = 0, prompt: int = 0, steps: int = 64, memory_limit: float | None = 0.0,
                time_limit: float = 10.0, workers: int = 2, seed: int = 0):
    """The best plan of a forced layout family (shard.plan with the layout's
    constraints; ws2d: the best over its axis partitions). Its stats["forced"]
    says which kind and variant, and the notes. LayoutNotApplicable if the
    layout cannot apply, PlanError if no variant fits in memory."""
    from .shard import plan
    phases = make_phases(graph, phase, batch, context, prompt, steps)
    cands = candidates(graph, kind, mesh, phases)
    best, best_c, tried, failed = None, None, [], []
    for c in cands:
        try:
            p = plan(graph, mesh, hardware, phase, batch, context, prompt, steps, memory_limit, time_limit,
                     workers, fix=c.fix, seed=seed)
        except PlanError as e:
            failed.append(f"{c.label}: {e}")
            continue
        tried.append({"variant": c.label, "objective": p.objective, "status": p.status})
        if best is None or p.objective < best.objective:
            best, best_c = p, c
    if best is None:
        raise PlanError(f"{kind} ({KINDS[kind]}) has no plan on mesh {format_mesh(parse_mesh(mesh))}: "
                        + " | ".join(failed))
    best.stats["forced"] = {"kind": kind, "name": KINDS[kind], "variant": best_c.label, "notes": best_c.notes,
                            "variants": tried, "variants_failed": failed}
    return best


def describe(p) -> str:
    """One line for a plan's table: which forced layout, which variant, and its notes."""
    f = p.stats.get("forced")
    if not f:
        return ""
    text = f"forced layout: {f['kind']} ({f['name']})"
    if f["variant"] != f["name"]:
        text += f", {f['variant']}"
    if len(f["variants"]) > 1:
        text += f", best of {len(f['variants'])} axis partitions"
    if f["notes"]:
        text += "; split less than asked: " + "; ".join(f["notes"])
    return text


__all__ = ["KINDS", "LayoutNotApplicable", "SplitRule", "candidates", "describe", "plan_forced"]
