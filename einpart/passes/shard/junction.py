"""One junction-tree pass over the bucket tree of an elimination order
(eliminate.py's step 2): the relaxation's optimum, its plan and the
min-marginals of every strategy and of every kept edge's pairs.

Why a module of its own, and why blocks: the pass's tables reach 4e6 entries
(32 MB, the CAP of eliminate.py). Summed whole they stream through memory
once per operand and once more per reduction, several times per clique. Here
a table is never materialized: it is a list of terms (the node's cost, its
kept edges, the messages of its neighbours in the tree), each broadcastable
over the clique, and it is summed block by block along its first axis, each
block of about BLOCK entries (it stays in the L2 cache), and every output the
pass needs from that table (the upward message, pair and node min-marginals,
the downward messages) is reduced from the block while it is there. Min is
exact in any order, so the blocks change no value. Blocks of independent
rows go to two threads when the table is large (numpy releases the GIL in
its loops), each with its own buffers and its own partial minima.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BLOCK = 1 << 16        # entries of one block of a table (8 bytes each: 512 KB, in L2)
THREADS_FROM = 1 << 19  # entries of a table from which its blocks are shared by two threads

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor | None:
    """Two threads where the process may use two cores, else None (one thread)."""
    global _POOL
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores < 2:
        return None
    if _POOL is None:
        _POOL = ThreadPoolExecutor(2, thread_name_prefix="einpart-junction")
    return _POOL


@dataclass
class Pass:
    """One junction-tree pass: bound, its plan (local strategy positions), the
    node and pair min-marginals, and whether any edge was dropped."""
    bound: float
    plan: dict
    node_mm: dict
    pair_mm: dict
    dropped: int


def expand(vars_, table, target):
    """table over vars_ as an array broadcastable over target (a tuple of vars)."""
    if not vars_:
        return np.asarray(table).reshape((1,) * len(target))
    perm = sorted(range(len(vars_)), key=lambda a: target.index(vars_[a]))
    t = np.transpose(table, perm)
    shape = [1] * len(target)
    for a in perm:
        shape[target.index(vars_[a])] = table.shape[a]
    return t.reshape(shape)


def min_to(table, vars_, keep):
    """min of table (over vars_) onto the vars in keep (in vars_ order)."""
    ax = tuple(a for a, x in enumerate(vars_) if x not in keep)
    return table.min(axis=ax) if ax else table, tuple(x for x in vars_ if x in keep)


def pair_mins(table, vars_, v, partners) -> dict:
    """{u: min of table onto (v, u) as a (v, u) array} for every u in partners,
    sharing the reductions: the partners are split in halves and the table is
    first reduced onto each half (with v), so a clique of r partners costs about
    two full-table reductions instead of r (min is exact in any order)."""
    if len(partners) == 1:
        u, = partners
        t, vs = min_to(table, vars_, {v, u})
        return {u: t if vs == (v, u) else t.T}
    keep = set(partners) | {v}
    if len(keep) < len(vars_):
        table, vars_ = min_to(table, vars_, keep)
    half = len(partners) // 2
    out = {}
    for part in (partners[:half], partners[half:]):
        t, vs = min_to(table, vars_, set(part) | {v}) if len(part) + 1 < len(vars_) else (table, vars_)
        out.update(pair_mins(t, vs, v, part))
    return out


class _Min:
    """The minimum of one output over the blocks of a table: blocks along the
    table's first axis are rows of this output along `axis` (the output keeps
    that variable) and are written in place, or (axis None) the same shape,
    and are combined by minimum."""

    def __init__(self, shape, axis):
        self.axis = axis
        self.out = np.empty(shape) if axis is not None else None

    def add(self, r, sl):
        if self.axis is not None:
            self.out[(slice(None),) * self.axis + (sl,)] = r
        elif self.out is None:
            self.out = np.array(r, dtype=np.float64)
        else:
            np.minimum(self.out, r, out=self.out)

    def merge(self, other: "_Min"):
        if self.axis is None and other.out is not None:
            self.add(other.out, None)


def _part(t, sl):
    """A term's block (a term of size 1 on the first axis is broadcast)."""
    return t if t.shape[0] == 1 else t[sl]


def _sum(terms, sl, buf, start=None):
    """sum(terms) over the rows sl of the table, into buf (shaped to the block);
    start: a block already summed, added first."""
    parts = ([start] if start is not None else []) + [_part(t, sl) for t in terms]
    if len(parts) == 1:
        np.copyto(buf, np.broadcast_to(parts[0], buf.shape))
        return buf
    np.add(parts[0], parts[1], out=buf)
    for p in parts[2:]:
        np.add(buf, p, out=buf)
    return buf


_LOCAL = threading.local()


def _buffers(size: int) -> list:
    """Three scratch buffers of at least `size` entries, kept per thread (fresh
    ones of this size would cost page faults on every table)."""
    bufs = getattr(_LOCAL, "bufs", None)
    if bufs is None or bufs[0].size < size:
        bufs = _LOCAL.bufs = [np.empty(max(size, BLOCK)) for _ in range(3)]
    return bufs


def _compact(terms: list, size: int) -> list:
    """terms with the pairs whose broadcast sum is at most a quarter of the
    table (`size` entries) summed ahead, smallest first: each such sum is one
    add per block fewer over the whole table (a node's cost and its edges, a
    message on a few of the clique's variables). Deterministic: the same terms
    give the same sums."""
    terms = list(terms)
    while len(terms) > 1:
        best = None
        for a in range(len(terms)):
            for b in range(a + 1, len(terms)):
                n = math.prod(np.broadcast_shapes(terms[a].shape, terms[b].shape))
                if best is None or n < best[0]:
                    best = (n, a, b)
        n, a, b = best
        if 4 * n > size:
            break
        merged = terms[a] + terms[b]
        terms = [t for j, t in enumerate(terms) if j not in (a, b)] + [merged]
    return terms


def _rows(shape) -> int:
    return max(1, BLOCK // max(math.prod(shape[1:]), 1))


def _over_blocks(shape, work, make):
    """Run work(sl, bufs, outs) on every block of rows of a table of `shape`,
    its outputs made by make() (a list of _Min); two threads for a large table,
    each on half of the rows with its own buffers and outputs, merged."""
    step = _rows(shape)
    rows = [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)]
    size = step * math.prod(shape[1:])

    def run(blocks, outs):
        bufs = _buffers(size)
        for sl in blocks:
            n = (sl.stop - sl.start) * math.prod(shape[1:])
            work(sl, [b[:n].reshape((sl.stop - sl.start,) + tuple(shape[1:])) for b in bufs], outs)
        return outs
    pool = _pool() if math.prod(shape) >= THREADS_FROM and len(rows) > 1 else None
    outs = make()
    if pool is None:
        return run(rows, outs)
    other = make()
    for o, p in zip(other, outs):      # (outputs written in place by rows are shared)
        if o.axis is not None:
            o.out = p.out
    half = len(rows) // 2
    fut = pool.submit(run, rows[half:], other)
    run(rows[:half], outs)
    fut.result()
    for o, p in zip(outs, other):
        o.merge(p)
    return outs


def _keep_axis(C, keep) -> int | None:
    """The axis of min_to's output that follows the table's first axis, or None."""
    kept = [x for x in C if x in keep]
    return 0 if kept and kept[0] == C[0] else None


def junction_pass(work, cost: dict, relaxation) -> Pass:
    """Bound, plan and min-marginals of the graph in `work` (reduce.Work) with
    only the edges `kept` (relaxation = (kept, order, separators) from
    eliminate._relaxation) and the node costs `cost` ({node: array}, e.g.
    priced): two passes over the bucket tree (upward: min over the eliminated
    node; downward: the rest of the tree's message into each table). Each
    table has its eliminated node as the last axis and is a list of terms
    reduced block by block (module docstring)."""
    kept, order, seps = relaxation
    pos = {v: k for k, v in enumerate(order)}
    cliques = [s + (v,) for v, s in zip(order, seps)]
    shapes = [tuple(len(work.strat[x]) for x in C) for C in cliques]
    psi = []            # each table's own terms: its node's cost and its kept edges to later nodes
    for k, v in enumerate(order):
        C = cliques[k]
        psi.append(_compact([expand((v,), cost[v], C)] + [expand((v, u), work.mat(eid, v), C) for u, eid in
                                                          work.adj[v].items() if eid in kept and pos[u] > k],
                            math.prod(shapes[k])))
    parent = [min((pos[x] for x in s), default=-1) for s in seps]
    children = [[] for _ in order]
    for k, p in enumerate(parent):
        if p >= 0:
            children[p].append(k)
    up, ups = [None] * len(order), [None] * len(order)
    for k in range(len(order)):
        C, shape = cliques[k], shapes[k]
        terms = ups[k] = _compact(psi[k] + [expand(seps[c], up[c], C) for c in children[k]], math.prod(shape))

        def upward(sl, bufs, outs, terms=terms):
            outs[0].add(_sum(terms, sl, bufs[0]).min(axis=-1), sl)
        up[k], = (m.out for m in _over_blocks(shape, upward,
                                              lambda s=shape: [_Min(s[:-1], 0 if len(s) > 1 else None)]))
    roots = [k for k, p in enumerate(parent) if p < 0]
    bound = work.const + sum(float(up[k]) for k in roots)
    plan: dict = {}
    for k in reversed(range(len(order))):
        # the argmin of the upward table at the separator's choice, from its row alone
        ix = tuple(plan[x] for x in seps[k])
        # (the same sums in the same order as the upward blocks: the same argmin)
        rows = [t[tuple(i if t.shape[a] > 1 else 0 for a, i in enumerate(ix))]
                for t in ups[k]]
        row = rows[0]
        for r in rows[1:]:
            row = row + r
        plan[order[k]] = int(np.argmin(np.broadcast_to(row, shapes[k][-1:])))
    root = list(range(len(order)))
    for k in reversed(range(len(order))):
        if parent[k] >= 0:
            root[k] = root[parent[k]]
    down = [None] * len(order)
    node_mm, pair_mm = {}, {}
    for k in reversed(range(len(order))):       # parents before children
        C, shape, v = cliques[k], shapes[k], order[k]
        extra = bound - float(up[root[k]])      # const plus the other components' optima
        base = _compact(psi[k] + ([expand(seps[k], down[k], C)] if down[k] is not None else []), math.prod(shape))
        msgs = [expand(seps[c], up[c], C) for c in children[k]]
        partners = [u for u, eid in work.adj[v].items() if eid in kept and pos[u] > k]
        n_v = shape[-1]

        def make(shape=shape, partners=partners, C=C, k=k):
            outs = [_Min((n_v, shape[C.index(u)]), 1 if u == C[0] else None) for u in partners]
            if not partners:
                outs.append(_Min((n_v,), 0 if len(C) == 1 else None))
            for c in children[k]:
                outs.append(_Min(tuple(n for n, x in zip(shape, C) if x in seps[c]), _keep_axis(C, set(seps[c]))))
            return outs

        def downward(sl, bufs, outs, base=base, msgs=msgs, partners=partners, C=C, v=v, k=k):
            b = _sum(base, sl, bufs[0])
            full = _sum(msgs, sl, bufs[1], start=b) if msgs else b
            if partners:
                got = pair_mins(full, C, v, partners)
                for o, u in zip(outs, partners):
                    o.add(got[u], sl)
            else:
                outs[0].add(min_to(full, C, {v})[0], sl)
            at = len(partners) or 1
            for j, c in enumerate(children[k]):
                t = _sum(msgs[:j] + msgs[j + 1:], sl, bufs[2], start=b) if len(msgs) > 1 else b
                outs[at + j].add(min_to(t, C, set(seps[c]))[0], sl)
        outs = [m.out for m in _over_blocks(shape, downward, make)]
        if partners:    # v's min-marginal from the smallest pair table (exact: a min of mins)
            node_mm[v] = min(outs[:len(partners)], key=lambda t: t.size).min(axis=1) + extra
            for u, t in zip(partners, outs):
                eid = work.adj[v][u]
                pair_mm[eid] = (t if work.ends[eid][0] == v else t.T) + extra
        else:
            node_mm[v] = outs[0] + extra
        at = len(partners) or 1
        for j, c in enumerate(children[k]):
            vs = tuple(x for x in C if x in set(seps[c]))
            down[c] = np.transpose(outs[at + j], [vs.index(x) for x in seps[c]])
    return Pass(bound, plan, node_mm, pair_mm, len(work.emat) - len(kept))
