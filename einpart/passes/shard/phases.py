"""Prefill and decode as two sizings of one graph.

A spec is written once with a KV cache: `write(cache[b, s, k], new[b, t, k])`
names the written positions t (absent from the cache) and the cached
positions s (absent from the new rows). Prefill runs with t = the prompt
length, decode with t = 1; both read a cache of s = context positions, and
share a batch index b (an index of the program's inputs that the cache
also has). This module finds those roles and sizes each phase, so the same
graph serves both programs without the user naming sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import EinpartError
from ...ir import graph as g
from ...ir.parser import override_sizes
from ...ir.verify import index_sizes, resolve_sizes

PHASES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class Roles:
    t: str | None = None        # index of the positions a step writes (query positions)
    s: str | None = None        # index of the cached positions
    b: str | None = None        # batch index
    t_size: str | None = None   # their size names
    s_size: str | None = None
    b_size: str | None = None


def find_roles(graph: g.Graph) -> Roles:
    names = graph.index_size_names()
    writes = [s.op for s, _ in graph.all_stmts() if isinstance(s.op, g.Write)]
    if not writes:
        return Roles()
    w = writes[0]
    t = next(i for i in w.new.indices if i not in w.cache.indices)
    s = next(i for i in w.cache.indices if i not in w.new.indices)
    inputs = {i for d, _ in graph.all_decls() if d.kind == "input" for i in d.type.indices}
    cands = [i for i in w.cache.indices if i in inputs and i not in (s, t)]
    b = cands[0] if len(cands) == 1 else None
    return Roles(t, s, b, names[t], names[s], names[b] if b else None)


@dataclass(frozen=True)
class Phase:
    name: str
    sizes: dict      # size name -> value
    idx: dict        # index -> extent
    weight: float    # weight of its time in the objective


def overrides(graph: g.Graph, phase: str, batch: int = 0, context: int = 0, prompt: int = 0) -> dict:
    """Size overrides for one phase ('prefill' or 'decode')."""
    r = find_roles(graph)
    over: dict[str, int] = {}
    if batch:
        if not r.b_size:
            raise EinpartError("batch: cannot tell the batch index (an index of the inputs that the KV cache "
                               "also has); set the size with --set instead")
        over[r.b_size] = batch
    if context:
        if not r.s_size:
            raise EinpartError("context: the spec has no KV cache write; set the size with --set instead")
        over[r.s_size] = context
    if phase == "decode":
        if not r.t_size:
            raise EinpartError("phase decode needs a KV cache (a write(...) statement) to tell the "
                               "generated position from the prompt")
        if r.t_size in (r.s_size, r.b_size):
            raise EinpartError(f"phase decode sets size {r.t_size} (of the written positions {r.t}) to 1, "
                               f"but it also sizes another index; give {r.t} a size of its own")
        over[r.t_size] = 1
    elif prompt:
        if not r.t_size:
            raise EinpartError("prompt: the spec has no KV cache write; set the size with --set instead")
        over[r.t_size] = prompt
    sizes = resolve_sizes(graph, over)
    if r.t_size and r.s_size and phase == "prefill" and sizes[r.t_size] > sizes[r.s_size]:
        raise EinpartError(f"the prompt ({r.t_size}={sizes[r.t_size]}) is longer than the context "
                           f"({r.s_size}={sizes[r.s_size]}) the cache holds")
    return over


def make_phases(graph: g.Graph, phase: str, batch=0, context=0, prompt=0, steps=64) -> list[Phase]:
    if phase not in PHASES:
        raise EinpartError(f"phase must be one of {', '.join(PHASES)}, got '{phase}'")
    names = ["prefill", "decode"] if phase == "both" else [phase]
    out = []
    for n in names:
        sizes = resolve_sizes(graph, overrides(graph, n, batch, context, prompt))
        weight = float(steps) if (phase == "both" and n == "decode") else 1.0
        out.append(Phase(n, sizes, index_sizes(graph, sizes), weight))
    return out


def sized(graph: g.Graph, phase: Phase) -> g.Graph:
    """The graph with a phase's sizes written in (what codegen lowers for that phase)."""
    base = resolve_sizes(graph)
    changed = {k: v for k, v in phase.sizes.items() if base.get(k) != v and k in {s.name for s in graph.sizes}}
    return override_sizes(graph, changed) if changed else graph


def with_size(graph: g.Graph, name: str, value: int) -> g.Graph:
    return override_sizes(graph, {name: value})


__all__ = ["PHASES", "Phase", "Roles", "find_roles", "make_phases", "overrides", "sized", "with_size", "replace"]
