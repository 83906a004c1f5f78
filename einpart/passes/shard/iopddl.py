"""Reader for the IOPDDL sharding-strategy JSON format (ASPLOS/EuroSys 2025
contest on intra-operator parallelism, google/iopddl) and the
``einpart solve-iopddl`` entry point.

Format (optionally gzip-compressed)::

    {"problem": {"name": str,
                 "nodes": {"intervals": [[start, end], ...],   # half-open liveness
                           "costs":     [[c0, c1, ...], ...],  # per node, per strategy
                           "usages":    [[m0, m1, ...], ...]},
                 "edges": {"nodes": [[u, v], ...],
                           "costs": [[...], ...]},             # row-major len(u) x len(v)
                 "usage_limit": int}}                          # optional

A cost >= 1e15 marks a forbidden choice.
"""
from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np

from .ilp import StrategyGraph, peak_usage, solve

__all__ = ["IopddlFormatError", "load_iopddl", "solve_iopddl_main"]


class IopddlFormatError(ValueError):
    """The file is not a well-formed IOPDDL problem; the message names the field."""


def _numbers(value, field, *, integers=False):
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise IopddlFormatError(f"{field}: expected a list of numbers")
    arr = np.asarray(value, dtype=np.float64)
    if np.isnan(arr).any():
        raise IopddlFormatError(f"{field}: NaN is not a valid number")
    if integers and any(isinstance(v, float) and not v.is_integer() for v in value):
        raise IopddlFormatError(f"{field}: expected integers")
    return arr


def _get(obj, key, field):
    if not isinstance(obj, dict):
        raise IopddlFormatError(f"{field or 'top level'}: expected an object")
    if key not in obj:
        raise IopddlFormatError(f"missing field {field}.{key}" if field else f"missing field {key}")
    return obj[key]


def _list(obj, key, field):
    value = _get(obj, key, field)
    if not isinstance(value, list):
        raise IopddlFormatError(f"{field}.{key}: expected a list")
    return value


def parse_iopddl(data) -> tuple[StrategyGraph, str]:
    """Build a StrategyGraph from decoded JSON; returns (graph, problem name)."""
    prob = _get(data, "problem", "")
    name = prob.get("name", "") if isinstance(prob, dict) else ""
    nodes = _get(prob, "nodes", "problem")
    edges = _get(prob, "edges", "problem")
    intervals = _list(nodes, "intervals", "problem.nodes")
    costs = _list(nodes, "costs", "problem.nodes")
    usages = _list(nodes, "usages", "problem.nodes")
    n = len(costs)
    for fld, seq in (("intervals", intervals), ("usages", usages)):
        if len(seq) != n:
            raise IopddlFormatError(f"problem.nodes.{fld} has {len(seq)} entries, "
                                    f"problem.nodes.costs has {n}")
    node_costs, node_usages, ivs = [], [], []
    for i in range(n):
        c = _numbers(costs[i], f"problem.nodes.costs[{i}]")
        if c.size == 0:
            raise IopddlFormatError(f"problem.nodes.costs[{i}]: node {i} has no strategies")
        u = _numbers(usages[i], f"problem.nodes.usages[{i}]")
        if u.size != c.size:
            raise IopddlFormatError(f"problem.nodes.usages[{i}] has {u.size} entries, expected {c.size} "
                                    f"(one per strategy of node {i})")
        iv = _numbers(intervals[i], f"problem.nodes.intervals[{i}]", integers=True)
        if iv.size != 2 or iv[0] > iv[1]:
            raise IopddlFormatError(f"problem.nodes.intervals[{i}]: expected [start, end] with start <= end")
        node_costs.append(c)
        node_usages.append(u)
        ivs.append((int(iv[0]), int(iv[1])))
    enodes = _list(edges, "nodes", "problem.edges")
    ecosts = _list(edges, "costs", "problem.edges")
    if len(ecosts) != len(enodes):
        raise IopddlFormatError(f"problem.edges.costs has {len(ecosts)} entries, "
                                f"problem.edges.nodes has {len(enodes)}")
    elist, emats = [], []
    for k, (pair, mat) in enumerate(zip(enodes, ecosts)):
        uv = _numbers(pair, f"problem.edges.nodes[{k}]", integers=True)
        if uv.size != 2 or not all(0 <= t < n for t in uv):
            raise IopddlFormatError(f"problem.edges.nodes[{k}]: expected [u, v] with node indices in 0..{n - 1}")
        u, v = int(uv[0]), int(uv[1])
        m = _numbers(mat, f"problem.edges.costs[{k}]")
        ku, kv = node_costs[u].size, node_costs[v].size
        if m.size != ku * kv:
            raise IopddlFormatError(f"problem.edges.costs[{k}] has {m.size} entries, expected {ku}x{kv}={ku * kv} "
                                    f"(edge {k} joins node {u} and node {v})")
        elist.append((u, v))
        emats.append(m.reshape(ku, kv))
    limit = prob.get("usage_limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or math.isnan(limit)):
        raise IopddlFormatError("problem.usage_limit: expected a number")
    graph = StrategyGraph(node_costs, node_usages, ivs, elist, emats,
                          None if limit is None else float(limit))
    return graph, str(name)


def load_iopddl(path) -> StrategyGraph:
    """Read an IOPDDL problem (plain or gzip JSON). Raises OSError for an
    unreadable file and IopddlFormatError for a malformed one."""
    return _load(path)[0]


def _load(path):
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IopddlFormatError(f"not a valid gzip file ({exc})") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IopddlFormatError(f"not valid JSON ({exc})") from None
    return parse_iopddl(data)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return str(int(v)) if float(v).is_integer() and abs(v) < 2**63 else f"{v:.6g}"


def solve_iopddl_main(path: str, time_limit: float, workers: int = 2) -> int:
    """Solve an IOPDDL file and print cost, best bound, gap, status and wall time.

    Exit codes: 0 a feasible (or optimal) assignment was found; 1 the file is
    unreadable or malformed (one line ``error: ...`` on stderr); 2 the problem
    is infeasible or no solution was found in the time limit."""
    try:
        graph, name = _load(path)
    except OSError as exc:
        print(f"error: {path}: cannot read file: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except IopddlFormatError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    sol = solve(graph, time_limit=time_limit, workers=workers)
    print(f"problem: {name or Path(path).name} ({len(graph.node_costs)} nodes, {len(graph.edges)} edges)")
    print(f"cost: {_fmt(sol.objective)}")
    print(f"best bound: {_fmt(sol.bound)}")
    print(f"gap: {sol.gap * 100:.2f}%" if math.isfinite(sol.gap) else "gap: inf")
    print(f"status: {sol.status}")
    if sol.assignment and graph.usage_limit is not None:
        print(f"peak usage: {_fmt(peak_usage(graph, sol.assignment))} (limit {_fmt(graph.usage_limit)})")
    print(f"wall time: {sol.wall_s:.1f} s")
    return 0 if sol.status in ("optimal", "feasible") else 2
