"""The analytical cost model: what one statement costs under one split.

Everything is per device and in seconds. A statement under a split costs

  compute   a roofline, max(FLOPs / peak, bytes / HBM bandwidth), with the
            bytes of every distinct operand read at the layout the split asks
            for (weights, activations, KV cache) and the result written, plus
            the hardware's kernel_s for every kernel the statement launches;
            an elementwise statement XLA fuses into its consumers (fusion.py)
            moves no bytes and launches nothing: its consumers read its
            operands instead;
  reduce    the psum / pmax / psum_scatter its sharded reduced indices leave
            (einpart.ir.layout.plan_stmt decides which; this module prices);
  operands  the reshard of each operand from its producer's stored layout to
            the split (all_gather, all_to_all, local slice = free), priced on
            the strategy-graph edge between producer and consumer.

Collectives follow the alpha-beta model per mesh axis (Thakur et al.; the
scaling book's chapter on sharded matmuls): over axes A with n = prod n_a
devices and bandwidth W(A) (hardware.py: `combine`),

  all_gather      (n-1)/n * bytes_after / W  + sum_a (n_a-1) alpha_a
  psum_scatter    (n-1)/n * bytes_before / W + sum_a (n_a-1) alpha_a
  psum, pmax      2 (n-1)/n * bytes / W      + 2 sum_a (n_a-1) alpha_a
  all_to_all      (n-1)/n * bytes / W        + sum_a (n_a-1) alpha_a

(bytes per device), so a multi-axis collective is costed over the product
of its axes. These are the forms behind Pope et al.'s closed forms
(arXiv 2211.05102, sec. 3.2): an all-gather plus a reduce-scatter of the
B*L*E activations over all n chips is 2(n-1)/n * BLE / bw ~ 2BLE/bw.

The collectives priced here are exactly those einpart.ir.layout derives for
codegen (`plan_stmt`, `reshard`), so the prediction matches what runs.
Reductions that layout.collective_groups merges into one collective on a
tuple are priced as one: their bytes add, one fixed term (report.py). The
strategy graph (stmt_strategies) prices every reduction on its own, and the
planner's pair edges (planner.merge_edge) give back one fixed term per pair
it credits (parallel branches always, layout.branch_partners).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...ir import graph as g
from ...ir import layout as lay
from ...ir.shapes import DTYPE_BYTES
from .hardware import Hardware

FORBIDDEN = 1e15   # a cost the solver treats as "not allowed" (ilp/reduce FORBIDDEN)


# ------------------------------------------------------------- collectives
class Pricer:
    """Collective times on one mesh and one piece of hardware (cached per axes)."""

    def __init__(self, hw: Hardware, mesh):
        self.hw = hw
        self.mesh = tuple(mesh)
        self.size = dict(self.mesh)
        self.links = hw.axis_links(self.mesh)
        self._cache: dict = {}

    def _group(self, axes: tuple[str, ...]):
        got = self._cache.get(axes)
        if got is None:
            n = math.prod(self.size[a] for a in axes)
            bws = [self.links[a].bandwidth for a in axes if self.size[a] > 1] or [math.inf]
            bw = sum(bws) if self.hw.combine == "sum" else min(bws)
            lat = sum((self.size[a] - 1) * self.links[a].latency for a in axes)
            got = self._cache[axes] = (n, bw, lat)
        return got

    def coef(self, kind: str, axes: tuple[str, ...]) -> tuple[float, float]:
        """(seconds per byte, fixed seconds) of a collective: time = a * nbytes + b."""
        if kind == "slice":
            return 0.0, 0.0
        n, bw, lat = self._group(tuple(axes))
        if n <= 1:
            return 0.0, 0.0
        frac = (n - 1) / n
        if kind in ("psum", "pmax"):
            return 2 * frac / bw, 2 * lat
        return frac / bw, lat

    def time(self, kind: str, nbytes: float, axes: tuple[str, ...]) -> float:
        """Seconds for one collective; nbytes as described in the module docstring."""
        if kind == "slice":
            return 0.0
        n, bw, lat = self._group(tuple(axes))
        if n <= 1:
            return 0.0
        frac = (n - 1) / n
        if kind in ("psum", "pmax"):
            return 2 * frac * nbytes / bw + 2 * lat
        if kind in ("all_gather", "psum_scatter", "all_to_all"):
            return frac * nbytes / bw + lat
        raise ValueError(f"unknown collective {kind}")


# ----------------------------------------------------------------- tensors
def local_bytes(indices, sizes: dict, layout: dict, mesh_size: dict, itemsize: int) -> float:
    """Bytes one device holds of a tensor over `indices` laid out as `layout`."""
    n = itemsize
    for i in indices:
        p = 1
        for a in layout.get(i, ()):
            p *= mesh_size[a]
        n *= sizes[i] / p
    return n


def price_moves(moves, layout: dict, indices, sizes: dict, pricer: Pricer, itemsize: int):
    """Seconds of a reshard (list of Collective from layout.reshard), walking the layout."""
    cur = {i: tuple(layout.get(i, ())) for i in indices}
    total, parts = 0.0, []
    for c in moves:
        if c.kind == "all_gather":
            cur[c.index] = cur[c.index][:len(cur[c.index]) - len(c.axes)]
        elif c.kind == "slice":
            cur[c.index] = cur[c.index] + c.axes
        elif c.kind == "all_to_all":
            cur[c.other] = cur[c.other][:len(cur[c.other]) - len(c.axes)]
            cur[c.index] = cur[c.index] + c.axes
        t = pricer.time(c.kind, local_bytes(indices, sizes, cur, pricer.size, itemsize), c.axes)
        total += t
        parts.append((c, t))
    return total, parts


def reduce_time(reduce, natural: dict, out_indices, sizes: dict, pricer: Pricer, itemsize: int,
                merged: str = "", pays_latency: bool = True):
    """Seconds of a statement's psum / pmax / psum_scatter, starting from its natural layout.

    merged: the reduction runs in one collective with others (layout.collective_groups):
    each member pays for its own bytes, and the one fixed (latency) term of the shared
    collective is paid by the member at which it runs (pays_latency)."""
    nbytes = local_bytes(out_indices, sizes, natural, pricer.size, itemsize)
    total, parts = 0.0, []
    for c in reduce:
        if merged:
            per_byte, fixed = pricer.coef(c.kind, c.axes)
            t = per_byte * nbytes + (fixed if pays_latency else 0.0)
        else:
            t = pricer.time(c.kind, nbytes, c.axes)
        total += t
        parts.append((c, t))
    return total, parts


# --------------------------------------------------------------- layouts
def enumerate_layouts(indices, size_maps, mesh, forbid=frozenset()) -> list[dict]:
    """Every way to give each mesh axis to at most one index (ordered within an index).

    An index may take several axes (major to minor, all orders); a layout is
    kept only if every index it splits divides evenly in every size map
    (the phases' sizes); indices in `forbid` are never split. Axes of size 1
    are left out: splitting over them changes nothing.
    """
    axes = [a for a, s in mesh if s > 1]
    msize = dict(mesh)
    splittable = [i for i in indices if i not in forbid]
    out: list[dict] = []

    def ok(assign) -> bool:
        for i, ax in assign.items():
            if ax:
                p = math.prod(msize[a] for a in ax)
                if any(sm[i] % p for sm in size_maps):
                    return False
        return True

    def rec(k, assign):
        if k == len(axes):
            if ok(assign):
                out.append({i: tuple(v) for i, v in assign.items() if v})
            return
        rec(k + 1, assign)                        # axis k unused
        a = axes[k]
        for i in splittable:
            cur = assign[i]
            for pos in range(len(cur) + 1):       # every order of an index's axes
                assign[i] = cur[:pos] + [a] + cur[pos:]
                rec(k + 1, assign)
            assign[i] = cur

    rec(0, {i: [] for i in indices})
    return out


def layout_key(layout: dict, indices) -> tuple:
    """A hashable layout in a fixed index order."""
    return tuple(tuple(layout.get(i, ())) for i in indices)


# ------------------------------------------------------------- statements
def stmt_indices(s: g.Statement) -> tuple[str, ...]:
    seen = dict.fromkeys(s.type.indices)
    if isinstance(s.op, g.Compute):
        seen.update(dict.fromkeys(g.expr_indices(s.op.expr)))
    for r in lay.stmt_refs(s):
        seen.update(dict.fromkeys(r.indices))
    return tuple(seen)


def forbidden_split(s: g.Statement) -> frozenset:
    """Indices layout.split_problem never lets this statement split."""
    op = s.op
    if isinstance(op, g.Rope):
        return frozenset({op.pair})
    if isinstance(op, g.Write):
        return frozenset(i for i in op.new.indices if i not in op.cache.indices)
    return frozenset()


def _ops(e) -> int:
    if isinstance(e, g.Unary):
        return 1 + _ops(e.x)
    if isinstance(e, g.Binary):
        return 1 + _ops(e.lhs) + _ops(e.rhs)
    return 0


def is_contraction(s: g.Statement) -> bool:
    op = s.op
    if not isinstance(op, g.Compute) or op.reduce != "sum":
        return False
    f = g.product_factors(op.expr)
    return f is not None and sum(isinstance(x, g.Ref) for x in f) >= 2


def stmt_flops(s: g.Statement, sizes: dict, split: dict, mesh_size: dict) -> float:
    """FLOPs one device does (split={} gives the global count)."""
    space = 1.0
    for i in stmt_indices(s):
        space *= sizes[i] / math.prod(mesh_size[a] for a in split.get(i, ()))
    op = s.op
    if isinstance(op, g.Compute):
        return space * (max(_ops(op.expr), 1) + (1 if op.reduce else 0))
    if isinstance(op, g.Rope):
        return 4 * space
    return 0.0


def operand_reads(s: g.Statement, types: dict, fused=None) -> list:
    """(indices, bytes per element) of every distinct tensor s reads from HBM, in the
    statement's index names: each operand once however often the expression names it
    (mean(x * x) reads x once), and in place of a fused map (fusion.fused_maps: name ->
    statement) the tensors that map reads, through chains of fused maps. A weight the
    statement converts (fusion.Lowering.converts) costs its read, the converted copy's
    write and the product's read of that copy; an int8 weight it casts in the GEMM
    (fusion.Lowering.casts) costs the hardware's int8_gemm_bytes per element."""
    converts = getattr(fused, "converts", {}).get(s.name, {})
    casts = getattr(fused, "casts", {}).get(s.name, {})
    fused = fused if fused is not None else {}
    seen: dict = {}

    def visit(name: str, indices: tuple, depth: int = 0):
        m = fused.get(name)
        if m is None or depth > len(fused):
            item = DTYPE_BYTES[types[name].dtype]
            if name in converts:
                item += 2 * converts[name]
            seen.setdefault((name, indices), casts.get(name, item))
            return
        rename = dict(zip(m.type.indices, indices))
        for r in lay.stmt_refs(m):
            visit(r.name, tuple(rename[i] for i in r.indices), depth + 1)

    for r in lay.stmt_refs(s):
        visit(r.name, r.indices)
    return [(ix, b) for (_, ix), b in seen.items()]


def stmt_bytes(s: g.Statement, types: dict, sizes: dict, split: dict, mesh_size: dict,
               fused=None) -> float:
    """HBM bytes one device reads and writes (operands at the split's layout, result);
    fused: fusion.fused_maps of the graph (a fused map moves none; see operand_reads)."""
    op = s.op
    if fused and s.name in fused:
        return 0.0
    out_b = DTYPE_BYTES[s.type.dtype]
    out = local_bytes(s.type.indices, sizes, split, mesh_size, out_b)
    if isinstance(op, g.Write):
        new = local_bytes(op.new.indices, sizes, split, mesh_size, DTYPE_BYTES[types[op.new.name].dtype])
        return 2 * new                            # read the new rows, write them in place
    if isinstance(op, g.Take):
        ids = 0.0
        if isinstance(op.ids, g.Ref):
            ids = local_bytes(op.ids.indices, sizes, split, mesh_size, DTYPE_BYTES[types[op.ids.name].dtype])
        return 2 * out + ids                      # the looked-up rows, the ids, the result
    total = out
    for ix, item in operand_reads(s, types, fused):
        total += local_bytes(ix, sizes, split, mesh_size, item)
    return total


def stmt_kernels(s: g.Statement, fused=None) -> int:
    """Kernels one execution of s launches: none for a fused map (and a repeat, whose
    body's statements count), else one (a GEMM, a loop or reduction fusion, a gather,
    an in-place update; none for an int8 product a sibling's kernel call computes,
    fusion.Lowering.shared) and one per weight it converts (fusion.Lowering.converts);
    collectives pay their latency term instead (Pricer)."""
    if isinstance(s.op, g.Repeat) or (fused and s.name in fused):
        return 0
    own = 0 if s.name in getattr(fused, "shared", ()) else 1
    return own + len(getattr(fused, "converts", {}).get(s.name, ()))


def compute_time(s: g.Statement, types: dict, sizes: dict, split: dict, hw: Hardware, mesh_size: dict,
                 fused=None):
    """(seconds, flops, bytes, bound): the roofline of one statement on one device
    (the kernel launch cost, stmt_kernels x hw.kernel_s, is not in it)."""
    flops = stmt_flops(s, sizes, split, mesh_size)
    nbytes = stmt_bytes(s, types, sizes, split, mesh_size, fused)
    refs = [types[r.name].dtype for r in lay.stmt_refs(s)]
    peak = hw.flops_int8 if refs and all(d == "i8" for d in refs) else hw.flops_bf16
    tc, tm = flops / peak, nbytes / hw.hbm_bandwidth
    return max(tc, tm), flops, nbytes, ("compute" if tc >= tm else "memory")


@dataclass
class Variant:
    """One declared result layout of a split: natural, or reduce-scattered."""
    out: tuple                   # declared result layout, per axis of s.type
    reduce: tuple                # Collective tuple (psum / pmax / psum_scatter)
    reduce_s: float
    mem: float                   # bytes of the result per device


@dataclass
class StmtStrategy:
    """One way to run a statement: its split, and the layouts it may store its result in."""
    split: dict                  # index -> mesh axes
    compute_s: float             # roofline time plus kernel launches
    flops: float
    nbytes: float
    variants: list               # Variant per declared layout (the first is the natural one)
    materialize_s: float = 0.0   # a fused map: what writing its result costs more (see fusion.py)


def reduce_plan(s: g.Statement, split: dict, declared: dict, reduced: tuple | None = None):
    """(reduce collectives, natural layout before them, natural after) as layout.plan_stmt has them;
    reduced: lay.reduced_indices(s), when the caller has it (stmt_strategies asks once per split)."""
    out = s.type.indices
    natural = {i: tuple(split.get(i, ())) for i in out}
    red_axes = tuple(a for i in (lay.reduced_indices(s) if reduced is None else reduced) for a in split.get(i, ()))
    if not red_axes:
        return (), natural, natural
    kind = "pmax" if isinstance(s.op, g.Compute) and s.op.reduce == "max" else "psum"
    if kind == "psum":
        for i in out:
            have, want = natural[i], tuple(declared.get(i, ()))
            extra = want[len(have):]
            if want[:len(have)] == have and extra and set(extra) <= set(red_axes):
                rest = tuple(a for a in red_axes if a not in extra)
                cs = ((lay.Collective("psum", "", rest),) if rest else ()) + (lay.Collective("psum_scatter", i, extra),)
                return cs, natural, dict(natural, **{i: have + extra})
    return (lay.Collective(kind, "", red_axes),), natural, natural


class _Static:
    """What a statement's roofline needs, computed once per statement: for a
    split, FLOPs = flops_per_point * (local iteration points) and bytes =
    sum over terms of itemsize * (local extent of the term's indices)."""

    def __init__(self, s: g.Statement, types: dict, sizes: dict, hw: Hardware, fused=None):
        self.indices = stmt_indices(s)
        self.sizes = sizes
        probe = {}
        self.flops_per_point = stmt_flops(s, {i: 1 for i in self.indices}, probe, {})
        op = s.op
        out_b = DTYPE_BYTES[s.type.dtype]
        terms: list = []                         # (indices, bytes per element)
        if isinstance(op, g.Write):
            terms.append((op.new.indices, 2 * DTYPE_BYTES[types[op.new.name].dtype]))
        elif isinstance(op, g.Take):
            terms.append((s.type.indices, 2 * out_b))
            if isinstance(op.ids, g.Ref):
                terms.append((op.ids.indices, DTYPE_BYTES[types[op.ids.name].dtype]))
        else:
            terms.append((s.type.indices, out_b))
            terms += operand_reads(s, types, fused)
        self.fused = bool(fused) and s.name in fused
        self.terms = [] if self.fused else terms
        self.unfused_terms = terms
        refs = [types[r.name].dtype for r in lay.stmt_refs(s)]
        self.peak = hw.flops_int8 if refs and all(d == "i8" for d in refs) else hw.flops_bf16
        self.hbm = hw.hbm_bandwidth
        self.launch = stmt_kernels(s, fused) * hw.kernel_s
        self.kernel_s = hw.kernel_s

    def materialize(self, split: dict, mesh_size: dict) -> float:
        """A fused map that must write its result after all (a collective reads it):
        seconds more than fused, as one kernel reading its operands and writing it."""
        if not self.fused:
            return 0.0
        ext = self._extents(split, mesh_size)
        flops = self.flops_per_point * math.prod(ext.values())
        nbytes = sum(b * math.prod(ext[i] for i in ix) for ix, b in self.unfused_terms)
        return max(flops / self.peak, nbytes / self.hbm) - flops / self.peak + self.kernel_s

    def _extents(self, split: dict, mesh_size: dict) -> dict:
        ext = {}
        for i in self.indices:
            p = 1
            for a in split.get(i, ()):
                p *= mesh_size[a]
            ext[i] = self.sizes[i] / p
        return ext

    def roofline(self, split: dict, mesh_size: dict):
        ext = self._extents(split, mesh_size)
        points = math.prod(ext.values())
        flops = self.flops_per_point * points
        nbytes = sum(b * math.prod(ext[i] for i in ix) for ix, b in self.terms)
        return max(flops / self.peak, nbytes / self.hbm) + self.launch, flops, nbytes


def materialize_time(s: g.Statement, types: dict, sizes: dict, hw: Hardware, mesh_size: dict, fused) -> float:
    """Seconds a fused map (fusion.fused_maps) costs more when a collective reads it,
    at its own split: the planner's StmtStrategy.materialize_s, for the report."""
    return _Static(s, types, sizes, hw, fused).materialize(lay.stmt_split(s), mesh_size)


def stmt_strategies(s: g.Statement, types: dict, size_maps: list[dict], pricer: Pricer, hw: Hardware,
                    phase_sizes: dict, forbid=frozenset(), fused=None) -> list[StmtStrategy]:
    """All strategies of a non-repeat statement: each legal split (indices in
    `forbid` kept whole), and for a partial sum the reduce-scatter of all its
    reduced axes onto each output index that divides, as extra variants;
    fused: fusion.fused_maps of the graph."""
    mesh_size = pricer.size
    out = s.type.indices
    res_b = DTYPE_BYTES[s.type.dtype]
    static = _Static(s, types, phase_sizes, hw, fused)
    reduced = lay.reduced_indices(s)
    is_sum = not (isinstance(s.op, g.Compute) and s.op.reduce == "max")
    is_write = isinstance(s.op, g.Write)
    out_total = res_b * math.prod(phase_sizes[i] for i in out)
    strategies = []
    for split in enumerate_layouts(stmt_indices(s), size_maps, pricer.mesh, forbidden_split(s) | forbid):
        comp, flops, nbytes = static.roofline(split, mesh_size)
        natural = {i: tuple(split.get(i, ())) for i in out}
        red_axes = tuple(a for i in reduced for a in split.get(i, ()))
        declared = [natural]
        if red_axes and is_sum:
            for i in out:
                cand = natural[i] + red_axes
                p = math.prod(mesh_size[a] for a in cand)
                if all(sm[i] % p == 0 for sm in size_maps):
                    declared.append(dict(natural, **{i: cand}))
        nat_parts = math.prod(mesh_size[a] for i in out for a in natural[i])
        variants = []
        for dec in declared:
            reduce, nat, after = reduce_plan(s, split, dec, reduced) if red_axes else ((), natural, natural)
            rt = 0.0
            for c in reduce:
                ca, cb = pricer.coef(c.kind, c.axes)
                rt += ca * out_total / nat_parts + cb
            parts = math.prod(mesh_size[a] for i in out for a in after[i])
            mem = 0.0 if is_write else out_total / parts
            variants.append(Variant(layout_key(after, out), reduce, rt, mem))
        strategies.append(StmtStrategy(split, comp, flops, nbytes, variants, static.materialize(split, mesh_size)))
    return strategies


_NAMES = tuple(f"i{j}" for j in range(16))
_MOVES: dict = {}


def reshard_moves(src: tuple, want: tuple) -> tuple:
    """layout.reshard(src -> want) on per-axis layout tuples, as positional
    (kind, axis, axes, other axis) moves. Cached: moves do not depend on sizes."""
    key = (src, want)
    got = _MOVES.get(key)
    if got is None:
        got = _MOVES[key] = _positional_reshard(src, want)
    return got


def _positional_reshard(src: tuple, want: tuple) -> tuple:
    """layout.reshard's algorithm on per-axis tuples, with positions for
    indices and plain tuples for moves: the same moves in the same order
    (tests/test_layouts.py checks it against layout.reshard), without the
    dicts and Collective objects (the first plan of a process prices ~50k
    layout pairs, and this was most of that cost)."""
    gathers, slices = [], []
    for j, (a, b) in enumerate(zip(src, want)):
        if a == b:
            continue
        keep = 0
        while keep < min(len(a), len(b)) and a[keep] == b[keep]:
            keep += 1
        if a[keep:]:
            gathers.append((j, a[keep:]))
        if b[keep:]:
            slices.append((j, b[keep:]))
    moves, pairs = [], []
    for gj, gax in gathers:
        match = next((sl for sl in slices if sl[1] == gax), None) if len(gax) == 1 else None
        if match is not None:
            slices.remove(match)
            pairs.append(("all_to_all", match[0], gax, gj))
        else:
            moves.append(("all_gather", gj, gax, -1))
    while pairs:
        ready = next((p for p in pairs if not any(q[3] == p[1] for q in pairs if q is not p)), None)
        if ready is not None:
            pairs.remove(ready)
            moves.append(ready)
        else:
            p = pairs.pop(0)
            moves.insert(0, ("all_gather", p[3], p[2], -1))
            slices.append((p[1], p[2]))
    return tuple(moves) + tuple(("slice", j, ax, -1) for j, ax in slices)


def reshard_coeffs(src: tuple, want: tuple, pricer: Pricer) -> tuple[float, float]:
    """layout.reshard(src -> want) priced as (a, b): seconds = a * (global bytes) + b.

    Every move's traffic is the tensor's bytes over the devices its current
    layout spreads it across, and that count is the product of the mesh axes
    the layout uses, wherever they sit; so the price of a reshard is linear
    in the tensor's size with coefficients that depend on the layouts only.
    """
    cur = list(src)
    msize = pricer.size
    a = b = 0.0
    for kind, j, axes, other in reshard_moves(src, want):
        if kind == "slice":
            continue
        if kind == "all_gather":
            cur[j] = cur[j][:len(cur[j]) - len(axes)]
        else:                                    # all_to_all: from `other` into j
            cur[other] = cur[other][:len(cur[other]) - len(axes)]
            cur[j] = cur[j] + axes
        p = 1
        for ax in cur:
            for m in ax:
                p *= msize[m]
        ca, cb = pricer.coef(kind, axes)
        a += ca / p
        b += cb
    return a, b


def reshard_time(sizes: tuple, item: int, src: tuple, want: tuple, pricer: Pricer) -> float:
    """Seconds of layout.reshard(src -> want) on a tensor of `sizes` (layouts as per-axis tuples)."""
    if src == want:
        return 0.0
    a, b = reshard_coeffs(src, want, pricer)
    return a * item * math.prod(sizes) + b


def unsharded_dropped(src: tuple, want: tuple) -> tuple:
    """(src, want) without the tensor axes unsharded in both. reshard_coeffs
    gives such a pair the same (a, b), bit for bit: those axes take part in no
    move and add no mesh axis to any product, and dropping them keeps the
    other axes in order, so the moves come in the same order. The first plan
    of a process prices ~50k layout pairs and ~12k of these (PaLM 540B).
    ReshardTable._price_missing makes the same cut with numpy, many pairs at
    once; this is the definition the tests hold it to."""
    keep = [j for j, (a, b) in enumerate(zip(src, want)) if a or b]
    if len(keep) == len(src):
        return src, want
    return tuple(src[j] for j in keep), tuple(want[j] for j in keep)


class ReshardTable:
    """Layouts interned as integers and the (a, b) price of every pair asked for,
    in growing matrices, so an edge's cost matrix is a few numpy gathers."""

    def __init__(self, pricer: Pricer):
        self.pricer = pricer
        self.ids: dict = {}
        self.layouts: list = []
        self.masks = np.zeros(0, dtype=np.int64)    # per layout: bit j set where tensor axis j is sharded
        self.a = np.full((0, 0), np.nan)
        self.b = np.full((0, 0), np.nan)
        self._priced: dict = {}      # unsharded_dropped(src, want) -> (a, b)
        self._cut: dict = {}         # (layout id << 32 | kept axes) -> that layout on the kept axes

    def id(self, layout: tuple) -> int:
        i = self.ids.get(layout)
        if i is None:
            i = self.ids[layout] = len(self.layouts)
            self.layouts.append(layout)
        return i

    def _grow(self):
        n = len(self.layouts)
        if n > len(self.masks):
            self.masks = np.concatenate([self.masks, np.array(
                [sum(1 << j for j, ax in enumerate(lt) if ax) for lt in self.layouts[len(self.masks):]],
                dtype=np.int64)])
        if n > self.a.shape[0]:
            m = max(n, 2 * self.a.shape[0], 64)
            for name in ("a", "b"):
                old = getattr(self, name)
                new = np.full((m, m), np.nan)
                new[:old.shape[0], :old.shape[1]] = old
                setattr(self, name, new)

    def _price_missing(self, si, wi):
        """(a, b) of the pairs si[k] -> wi[k] (layout ids, never equal), each
        through unsharded_dropped's pair: the axes sharded in neither are cut
        from both layouts (numpy finds the distinct cut layouts and the distinct
        cut pairs; Python prices only those: the first plan of a process asks
        ~50k pairs, ~12k distinct cut ones, PaLM 540B)."""
        keep = self.masks[si] | self.masks[wi]
        codes, inv = np.unique(np.concatenate([si << 32 | keep, wi << 32 | keep]), return_inverse=True)
        cuts = []
        for c in codes.tolist():
            got = self._cut.get(c)
            if got is None:
                lt, kept = self.layouts[c >> 32], c & 0xFFFFFFFF
                got = self._cut[c] = tuple(ax for j, ax in enumerate(lt) if kept >> j & 1)
            cuts.append(got)
        n = len(si)
        pairs, pinv = np.unique(inv[:n] * len(codes) + inv[n:], return_inverse=True)
        got = np.empty((len(pairs), 2))
        for r, pc in enumerate(pairs.tolist()):
            key = (cuts[pc // len(codes)], cuts[pc % len(codes)])
            ab = self._priced.get(key)
            if ab is None:
                ab = self._priced[key] = reshard_coeffs(*key, self.pricer)
            got[r] = ab
        return got[pinv.ravel()]

    def coeffs(self, src_ids, want_ids):
        """(a, b) matrices for rows src_ids x columns want_ids."""
        self._grow()
        ix = np.ix_(np.asarray(src_ids), np.asarray(want_ids))
        a = self.a[ix]
        missing = np.isnan(a)
        if missing.any():
            rows, cols = np.nonzero(missing)
            si, wi = ix[0][rows, 0].astype(np.int64), ix[1][0, cols].astype(np.int64)
            got = np.zeros((len(si), 2))
            diff = si != wi
            if diff.any():
                got[diff] = self._price_missing(si[diff], wi[diff])
            self.a[si, wi], self.b[si, wi] = got[:, 0], got[:, 1]
            a = self.a[ix]
        return a, self.b[ix]

    @property
    def pairs(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.a)))
