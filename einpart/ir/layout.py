"""The layout algebra: what data movement a sharded statement implies.

A layout maps each index of a tensor to the mesh axes it is split over
(major to minor, as in a PartitionSpec entry). A statement's *split* maps
each of its indices to mesh axes, every mesh axis used at most once: it
says how the iteration space is divided. From the stored layouts of its
operands, its split and the declared layout of its result follow exactly
which collectives run. This module derives them once, so the cost model
(which prices them) and codegen (which emits them) can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import graph as g
from .verify import stmt_inputs

Layout = dict  # index -> tuple of mesh axes


@dataclass(frozen=True)
class Collective:
    """One data movement. `index` is the tensor index it acts on.

    all_gather: index becomes less split (suffix axes gathered, tiled).
    slice:      index becomes more split (local dynamic slice, no traffic).
    all_to_all: axes move from `other` (gathered) to `index` (split).
    psum / pmax: partial results over axes combined (index is "").
    psum_scatter: psum whose result is split along index over axes.
    """
    kind: str
    index: str
    axes: tuple[str, ...]
    other: str = ""

    def describe(self) -> str:
        ax = ",".join(self.axes)
        if self.kind in ("psum", "pmax"):
            return f"{self.kind}({ax})"
        if self.kind == "all_to_all":
            return f"all_to_all({ax}: {self.other}->{self.index})"
        return f"{self.kind}({self.index}/{ax})"


def type_layout(typ: g.TensorType) -> Layout:
    return {a.index: a.mesh for a in typ.axes}


def ref_layout(ref: g.Ref, typ: g.TensorType) -> Layout:
    """The stored layout of a tensor, with its axes renamed to the ref's indices."""
    return {i: a.mesh for i, a in zip(ref.indices, typ.axes)}


def with_layout(typ: g.TensorType, layout: Layout) -> g.TensorType:
    return g.TensorType(tuple(g.Axis(a.index, tuple(layout.get(a.index, ()))) for a in typ.axes), typ.dtype)


def split_attr(split: Layout) -> tuple:
    """A split as an attribute value: [d(x), f(y, z)], sorted by index."""
    return tuple(g.Term(i, tuple(g.Sym(a) for a in axes)) for i, axes in sorted(split.items()) if axes)


def stmt_split(s: g.Statement) -> Layout:
    value = g.attr(s.attrs, "split", ())
    return {t.fn: tuple(a.name for a in t.args) for t in value}


def parts(axes: tuple[str, ...], mesh: dict[str, int]) -> int:
    n = 1
    for a in axes:
        n *= mesh[a]
    return n


def reshard(src: Layout, dst: Layout, indices: tuple[str, ...]) -> list[Collective]:
    """Moves that turn layout src into dst: gathers first, then slices.

    Per index, the common prefix stays; the rest of src is gathered (only a
    suffix can be gathered and stay a valid layout), then the rest of dst is
    sliced. A single axis gathered on one index and sliced on another is one
    all_to_all.
    """
    gathers, slices = [], []
    for i in indices:
        a, b = tuple(src.get(i, ())), tuple(dst.get(i, ()))
        if a == b:
            continue
        keep = 0
        while keep < min(len(a), len(b)) and a[keep] == b[keep]:
            keep += 1
        if a[keep:]:
            gathers.append(Collective("all_gather", i, a[keep:]))
        if b[keep:]:
            slices.append(Collective("slice", i, b[keep:]))
    moves: list[Collective] = []
    pairs: list[Collective] = []
    for gth in gathers:
        match = next((s for s in slices if len(gth.axes) == 1 and s.axes == gth.axes), None)
        if match is not None:
            slices.remove(match)
            pairs.append(Collective("all_to_all", match.index, gth.axes, other=gth.index))
        else:
            moves.append(gth)
    # An all_to_all into index i appends an axis to i, so every move that gathers
    # i's minor axes must run before it; in a cycle, one pair falls back to
    # all_gather + slice.
    while pairs:
        ready = next((p for p in pairs if not any(q.other == p.index for q in pairs if q is not p)), None)
        if ready is not None:
            pairs.remove(ready)
            moves.append(ready)
        else:
            p = pairs.pop(0)
            moves.insert(0, Collective("all_gather", p.other, p.axes))
            slices.append(Collective("slice", p.index, p.axes))
    return moves + slices


@dataclass(frozen=True)
class StmtComm:
    """All movement of one statement: per operand, the reduction, the result."""
    operands: tuple[tuple[g.Ref, tuple[Collective, ...]], ...]
    reduce: tuple[Collective, ...]
    result: tuple[Collective, ...]
    natural: tuple  # the result layout before the result moves, as sorted items

    def all(self) -> list[Collective]:
        out = [c for _, cs in self.operands for c in cs]
        return out + list(self.reduce) + list(self.result)


def stmt_refs(s: g.Statement) -> list[g.Ref]:
    """Tensor operands read by a (non-repeat) statement, in a fixed order."""
    op = s.op
    if isinstance(op, g.Compute):
        seen, out = set(), []
        for r in g.expr_refs(op.expr):
            key = (r.name, r.indices)
            if key not in seen:
                seen.add(key)
                out.append(r)
        return out
    if isinstance(op, g.Take):
        return [op.table] + ([op.ids] if isinstance(op.ids, g.Ref) else [])
    if isinstance(op, g.Write):
        return [op.cache, op.new]
    if isinstance(op, g.Rope):
        return [op.x]
    return []


def reduced_indices(s: g.Statement) -> tuple[str, ...]:
    """Indices a statement combines across: its reduction, or a take's looked-up axis."""
    op, out = s.op, set(s.type.indices)
    if isinstance(op, g.Compute) and op.reduce is not None:
        return tuple(i for i in g.expr_indices(op.expr) if i not in out)
    if isinstance(op, g.Take):
        return tuple(i for i in op.table.indices if i not in out)
    return ()


def split_problem(s: g.Statement, split: Layout, index_size: dict[str, int], mesh: dict[str, int]) -> str | None:
    """Why a split is not legal for a statement, or None."""
    used: list[str] = []
    all_idx = set(s.type.indices) | {i for r in stmt_refs(s) for i in r.indices}
    if isinstance(s.op, g.Compute):
        all_idx |= set(g.expr_indices(s.op.expr))
    for i, axes in split.items():
        if not axes:
            continue
        if i not in all_idx:
            return f"index {i} is not an index of '{s.name}'"
        for a in axes:
            if a not in mesh:
                return f"mesh axis {a} is not declared"
            if a in used:
                return f"mesh axis {a} is used twice"
            used.append(a)
        if index_size[i] % parts(axes, mesh):
            return f"index {i} of size {index_size[i]} does not split {parts(axes, mesh)} ways"
    op = s.op
    if isinstance(op, g.Rope) and split.get(op.pair):
        return f"rope mixes the halves of index {op.pair}: it cannot be split"
    if isinstance(op, g.Write):
        new_only = next(i for i in op.new.indices if i not in op.cache.indices)
        if split.get(new_only):
            return f"the written positions {new_only} cannot be split (every shard of the cache needs them)"
    if isinstance(op, g.Repeat) and any(split.values()):
        return "a repeat statement has no split of its own"
    if isinstance(op, g.Take) and isinstance(op.ids, g.Position) and split.get(op.ids.index):
        pass  # positions are computed per shard from the axis index: fine
    return None


def plan_stmt(s: g.Statement, types: dict[str, g.TensorType], split: Layout) -> StmtComm:
    """The collectives of a non-repeat statement under `split`."""
    operands = []
    for r in stmt_refs(s):
        want = {i: split.get(i, ()) for i in r.indices}
        operands.append((r, tuple(reshard(ref_layout(r, types[r.name]), want, r.indices))))
    out = s.type.indices
    natural = {i: tuple(split.get(i, ())) for i in out}
    declared = type_layout(s.type)
    red_axes = tuple(a for i in reduced_indices(s) for a in split.get(i, ()))
    reduce: list[Collective] = []
    if red_axes:
        kind = "pmax" if isinstance(s.op, g.Compute) and s.op.reduce == "max" else "psum"
        scatter = None
        if kind == "psum":
            for i in out:  # reduce-scatter when the result wants one more split, over reduced axes
                have, want = natural[i], tuple(declared.get(i, ()))
                extra = want[len(have):]
                if want[:len(have)] == have and extra and set(extra) <= set(red_axes):
                    scatter = (i, extra)
                    break
        if scatter is None:
            reduce.append(Collective(kind, "", red_axes))
        else:
            i, extra = scatter
            rest = tuple(a for a in red_axes if a not in extra)
            if rest:
                reduce.append(Collective("psum", "", rest))
            reduce.append(Collective("psum_scatter", i, extra))
            natural = dict(natural, **{i: natural[i] + extra})
    result = tuple(reshard(natural, declared, out))
    return StmtComm(tuple(operands), tuple(reduce), result, tuple(sorted(natural.items())))


# ------------------------------------------------------------ merged reductions
@dataclass(frozen=True)
class Group:
    """Partial sums that run as one collective: `kind` (psum or pmax) over `axes`
    of the tuple of the members' local results, in block order."""
    kind: str
    axes: tuple[str, ...]
    members: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.kind}({','.join(self.axes)}) on ({', '.join(self.members)})"


def reduce_key(reduce) -> tuple | None:
    """(kind, axes) of a reduction (a tuple of Collective) when it is one psum or
    pmax (the collectives a tuple can share), else None."""
    if len(reduce) == 1 and reduce[0].kind in ("psum", "pmax"):
        return reduce[0].kind, reduce[0].axes
    return None


def merge_key(comm: StmtComm) -> tuple | None:
    """reduce_key of a statement's planned reduction."""
    return reduce_key(comm.reduce)


def merge_partners(stmts, exclude=frozenset()) -> list[tuple[str, str]]:
    """Pairs (a, b) of a block's reducing statements whose reductions the planner
    prices as one collective when both end up with the same merge key.

    Structural, so the strategy graph can hold one edge per pair: b is a later
    statement that reduces (sum or max, like a) and does not read a, directly
    or through other statements of the block; every b has at most one partner,
    so the credited pairs form a forest. The partner is the nearest earlier
    such statement that reduces the same indices (under any split of them
    they carry the same mesh axes: ms and x . gW over d after defer-norm, the
    exp-sum and e . v over s); pairs over different indices are not credited
    here (every pair edge closes a cycle in the strategy graph, and more of
    them left the solver graphs it could not reduce, see docs/architecture.md),
    except parallel branches (branch_partners: PaLM's attention and MLP outputs). collective_groups
    then merges b with a, or b joins an earlier group of the same key: either
    way b's latency term is saved (the ILP's credit is checked against the
    merged repricing, see docs/architecture.md)."""
    names = {s.name for s in stmts}
    anc: dict[str, set] = {}
    cands = []
    out = []
    for s in stmts:
        up = set()
        for r in stmt_inputs(s):
            if r in names:
                up |= {r} | anc.get(r, set())
        anc[s.name] = up
        if isinstance(s.op, g.Repeat) or s.name in exclude or not reduced_indices(s):
            continue
        kind = isinstance(s.op, g.Compute) and s.op.reduce == "max"
        red = frozenset(reduced_indices(s))
        free = [(a, ar) for a, ak, ar in cands if ak == kind and a not in up]
        pick = next((a for a, ar in reversed(free) if ar == red), None)
        if pick is not None:
            out.append((pick, s.name))
        cands.append((s.name, kind, red))
    return out


def branch_partners(stmts, exclude=frozenset(), taken=frozenset()) -> list[tuple[str, str]]:
    """Pairs (a, b) of parallel branches: two reducing statements of a block
    (both sums, or both maxes), b not reading a, directly or through other
    statements, whose results meet in one later statement, read directly or
    through statements that reduce nothing (PaLM's attention and MLP outputs,
    added to the residual by x2, after int8 through their scale products).
    The planner credits these always (merge_partners' pairs only when asked):
    they make 1D weight-stationary win for a parallel block, whose attention
    and MLP partial sums codegen merges into one psum.

    b (not in `taken`: statements that already have a merge_partners
    partner) gets the nearest earlier such a, so with merge_partners' pairs
    they still form a forest. collective_groups gives b's latency back when
    both leave one psum over the same axes: b joins a group of that key
    unless it needs each of them; it does not read a, so it could need a's
    group only through another member it reads, and that group then has two
    members and saves one latency anyway."""
    pos = {s.name: n for n, s in enumerate(stmts)}
    anc: dict[str, set] = {}
    kind: dict[str, bool] = {}      # reducing statements: is it a max
    src: dict[str, set] = {}        # the reducing statements a value comes from through maps only
    red: dict[str, frozenset] = {}  # their reduced indices
    out, paired = [], set(taken)
    for s in stmts:
        inputs = [r for r in stmt_inputs(s) if r in pos]
        anc[s.name] = set().union(set(inputs), *(anc[r] for r in inputs))
        if isinstance(s.op, g.Repeat) or s.name in exclude:
            continue
        meet = sorted(set().union(*(src.get(r, set()) for r in inputs)), key=pos.get)
        for j, b in enumerate(meet):
            if b in paired:
                continue
            pick = next((a for a in reversed(meet[:j]) if kind[a] == kind[b] and a not in anc[b]
                         and red[a] != red[b]), None)
            if pick is not None:
                out.append((pick, b))
                paired.add(b)
        if reduced_indices(s):
            kind[s.name] = isinstance(s.op, g.Compute) and s.op.reduce == "max"
            red[s.name] = frozenset(reduced_indices(s))
            src[s.name] = {s.name}
        elif isinstance(s.op, g.Compute):
            src[s.name] = set(meet)
    return out


def credited_pairs(stmts, exclude=frozenset(), same_index: bool = False) -> tuple[list, list]:
    """The pairs the planner credits one latency each (planner.merge_edge,
    report.pair_credit): (merge_partners' pairs if same_index else [],
    branch_partners' pairs of the statements those leave without a partner)."""
    same = merge_partners(stmts, exclude) if same_index else []
    return same, branch_partners(stmts, exclude, {b for _, b in same})


def collective_groups(stmts, comms: dict, exclude=frozenset()) -> list[Group]:
    """Which reductions of one block run together as one collective.

    The rule: a statement whose reduction is one psum (or pmax) over axes A
    joins an earlier group of the same kind over A unless its local
    computation needs, directly or through other statements, a value that
    only exists after that group's collective (a member's finished result,
    or the result of a statement that needs such a group first). Joining
    postpones the group's collective to the new member, so everything that
    reads a member waits for it; the check on the groups a group already
    waits for keeps that schedule free of cycles. After defer-norm this
    merges a norm statistic with the matmul it scales (RMSNorm `ms` and
    `x . gW`), a softmax's exp-sum with `e . v`, and independent branches
    such as PaLM's parallel attention and MLP outputs.

    `comms`: name -> StmtComm (layout.plan_stmt) of the block's statements;
    `exclude`: statements never merged (weight preparation). Returns only
    groups of two or more, members in block order.
    """
    done_needs: dict[str, frozenset] = {}   # groups that must have run before a value exists
    waits: list[set] = []                   # per group: groups its collective waits for (closed)
    keys: list[tuple] = []
    members: list[list] = []
    for s in stmts:
        need: set = set()
        for r in stmt_inputs(s):
            need |= done_needs.get(r, frozenset())
        for gid in list(need):
            need |= waits[gid]
        comm = comms.get(s.name)
        key = merge_key(comm) if comm is not None and s.name not in exclude else None
        if key is None:
            done_needs[s.name] = frozenset(need)
            continue
        gid = next((j for j, k in enumerate(keys) if k == key and j not in need), None)
        if gid is None:
            gid = len(keys)
            keys.append(key)
            members.append([])
            waits.append(set())
        members[gid].append(s.name)
        waits[gid] |= need
        for other in waits:                  # groups waiting for this one now wait for `need` too
            if gid in other:
                other |= need
        done_needs[s.name] = frozenset(need | {gid})
    return [Group(k[0], k[1], tuple(m)) for k, m in zip(keys, members) if len(m) > 1]


def merged_schedule(stmts, groups: list[Group]) -> list:
    """The run order of a block with merged reductions: ("stmt", s) runs a
    statement (a group member only up to its local partial result),
    ("group", Group) runs the shared collective and finishes its members.
    Topological, and otherwise as close to block order as it can be."""
    pos = {s.name: n for n, s in enumerate(stmts)}
    group_of = {m: gr for gr in groups for m in gr.members}
    items = [("stmt", s) for s in stmts] + [("group", gr) for gr in groups]

    def deps(item) -> set:
        if item[0] == "group":
            return {("stmt", m) for m in item[1].members}
        out = set()
        for r in stmt_inputs(item[1]):
            if r in pos:
                out.add(("group", group_of[r].members) if r in group_of else ("stmt", r))
        return out

    key = {("stmt", s.name) if k == "stmt" else ("group", s.members): (k, s) for k, s in items}
    rank = {k: (max(pos[m] for m in v[1].members) + 0.5 if v[0] == "group" else pos[v[1].name])
            for k, v in key.items()}
    need = {k: deps(v) for k, v in key.items()}
    out, done = [], set()
    while len(out) < len(key):
        ready = min((k for k in key if k not in done and need[k] <= done), key=lambda k: rank[k])
        done.add(ready)
        out.append(key[ready])
    return out
