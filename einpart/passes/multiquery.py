"""multiquery{groups=G}: pool key/value heads into G groups (G=1 is multiquery).

As in the grouped-query uptraining recipe (Ainslie et al. 2023), the key and
value projections of the heads in each group are mean-pooled into one head,
and every query head of the group attends to it. The KV cache, the memory
that limits long-context decode (Pope et al. 2022), shrinks by the factor of
heads pooled together.

What the pass finds. Attention is a contraction of queries with a key cache
(a `write(...)` result) that does not sum over the cached positions. The
query's kept axes other than batch and query positions are its head axes QH
(gpt2/palm `h`, llama `g, r`); the cache's are the key/value head axes KH
(gpt2 `h`, llama `g`, palm none: already multiquery). KH must lead QH.

What it rewrites (new sizes and indices get fresh names: `G, R, g, r` when
free, else `G2, R2, g2, r2`; `J, j` when KH != QH):
  * the query side (every tensor with query head axes, not on the key/value
    path): QH becomes `(g, r)` with `R = H / G`, a row-major split of the
    same flattened head number, so the data do not change;
  * the key/value side (the statements from the K/V parameters to the cache
    writes, weight preparation included, and the caches): KH becomes `g`;
  * each K/V parameter `wk[d, KH, k]` is read as `wk[d, g, j, k]` (j the
    heads pooled into one group) and pooled by a param-only statement
    `wk_pool[d, g, k] = mean(wk[d, g, j, k])`, which the runtime computes at
    load time; reads of `wk` read `wk_pool`.

Parameter data: the IR has no reshape, so a parameter whose axes change
keeps its name and gets `{stored_as=[d, h, k]}`: the weights file holds it
with those axes, and `transform_params(graph, params)` (called by the
runtime and the tests) reshapes it row-major into the declared axes. Only
splits of adjacent axes are ever recorded, so the data never move.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.model import step_axes
from ..ir.shapes import decl_shapes
from ..ir.verify import index_sizes, resolve_sizes, stmt_inputs
from .manager import Pass, register_pass
from .rewrite_util import GraphInfo, Namer, contracted, edit_graph, is_contraction, map_refs

STORED_AS = "stored_as"


@dataclass(frozen=True)
class Attention:
    qh: tuple[str, ...]      # query head axes, as the score contraction reads them
    kh: tuple[str, ...]      # key/value head axes (a prefix of qh)
    heads: int               # query heads
    kv_heads: int            # key/value heads


def find_attention(graph: g.Graph, info: GraphInfo) -> Attention:
    axes = step_axes(graph)
    found = set()
    for w in info.defs.values():
        if not isinstance(w.op, g.Write):
            continue
        pos = next(i for i in w.op.cache.indices if i not in w.op.new.indices)
        for r_name in info.step_readers(w.name):
            s = info.defs[r_name]
            if not is_contraction(s):
                continue
            refs = [f for f in g.product_factors(s.op.expr) if isinstance(f, g.Ref)]
            kref = next((r for r in refs if r.name == w.name), None)
            others = [r for r in refs if r is not kref]
            C = set(contracted(s))
            if kref is None or len(others) != 1 or kref.indices[w.type.indices.index(pos)] in C:
                continue  # not a score contraction (the value contraction sums over positions)
            kept = set(s.type.indices)
            skip = {axes.batch, axes.query, kref.indices[w.type.indices.index(pos)]}
            qh = tuple(i for i in others[0].indices if i in kept and i not in skip)
            kh = tuple(i for i in kref.indices if i in kept and i not in skip)
            found.add((qh, kh))
    if not found:
        raise EinpartError("multiquery: found no attention: no contraction reads a key cache (a write(...) "
                           "result) without summing over its positions")
    if len(found) > 1:
        raise EinpartError(f"multiquery: attention blocks disagree on their head axes: {sorted(found)}")
    qh, kh = found.pop()
    if qh[:len(kh)] != kh:
        raise EinpartError(f"multiquery: the key/value head axes [{', '.join(kh)}] must lead the query head "
                           f"axes [{', '.join(qh)}]")
    return Attention(qh, kh, int(np.prod([info.extent[i] for i in qh])),
                     int(np.prod([info.extent[i] for i in kh])))


def _run(indices, run) -> int | None:
    """Where `run` occurs as adjacent indices, else None."""
    n = len(run)
    for p in range(len(indices) - n + 1):
        if tuple(indices[p:p + n]) == tuple(run):
            return p
    return None


@register_pass("multiquery")
@dataclass(frozen=True)
class MultiQuery(Pass):
    """Pool key/value heads into `groups` groups; see the module docstring."""
    groups: int = 1

    def apply(self, graph: g.Graph) -> g.Graph:
        G = self.groups
        me = f"multiquery{{groups={G}}}"
        if G < 1:
            raise EinpartError(f"{me}: groups must be at least 1")
        info = GraphInfo(graph)
        att = find_attention(graph, info)
        if att.kv_heads == 1:
            raise EinpartError(f"{me}: the spec is already multiquery (one key/value head shared by all "
                               f"{att.heads} query heads); there is nothing to pool")
        if att.heads % G:
            raise EinpartError(f"{me}: {G} does not divide {att.heads} heads")
        if att.kv_heads % G:
            raise EinpartError(f"{me}: {G} groups cannot be pooled from {att.kv_heads} key/value heads "
                               f"({G} must divide {att.kv_heads})")
        kv, kv_params = self._kv_side(info, att)
        if not kv_params:
            raise EinpartError(f"{me}: the key/value heads [{', '.join(att.kh)}] come from no parameter; "
                               f"there are no projections to pool")
        query = {n for n, t in info.types.items()
                 if n not in kv and n not in kv_params and set(t.indices) & set(att.qh)}
        for n in sorted(kv):
            if n in info.defs:
                mixed = sorted(m for m in stmt_inputs(info.defs[n]) if m in query)
                if mixed:
                    raise EinpartError(f"multiquery: '{n}' computes keys/values from '{mixed[0]}', which has "
                                       f"query heads [{', '.join(att.qh)}]")
        for n in query:
            if _run(info.types[n].indices, att.qh) is None:
                raise EinpartError(f"multiquery: cannot regroup '{n}' [{', '.join(info.types[n].indices)}]: "
                                   f"its head axes [{', '.join(att.qh)}] are not adjacent")

        # fresh sizes and indices: the group, the query heads per group, the pooled heads
        used = info.names
        Gs, gi = _fresh_pair(used, "G", "g")
        Rs, ri = _fresh_pair(used, "R", "r")
        size_of = info.index_size
        sizes = [g.SizeDecl(Gs, g.SizeLit(G)), g.SizeDecl(Rs, _quotient([size_of[i] for i in att.qh], Gs))]
        indices = [g.IndexDecl(gi, Gs), g.IndexDecl(ri, Rs)]
        if att.kh == att.qh:
            ji = ri
        else:
            Js, ji = _fresh_pair(used, "J", "j")
            sizes.append(g.SizeDecl(Js, _quotient([size_of[i] for i in att.kh], Gs)))
            indices.append(g.IndexDecl(ji, Js))

        name = Namer(used)
        pooled = {p: name(f"{p}_pool") for p in sorted(kv_params)}
        split_q, split_kv, split_p = (gi, ri), (gi,), (gi, ji)

        def new_axes(n, indices):
            run, new = (att.qh, split_q) if n in query else (att.kh, split_p if n in kv_params else split_kv)
            p = _run(indices, run)
            if p is None:
                raise EinpartError(f"multiquery: '{n}' is read with its head axes renamed "
                                   f"([{', '.join(indices)}]); regrouping needs them as [{', '.join(run)}]")
            return tuple(indices[:p]) + new + tuple(indices[p + len(run):])

        def retype(n, typ):
            if n not in query and n not in kv and n not in kv_params:
                return typ
            old = {a.index: a for a in typ.axes}
            return g.TensorType(tuple(old.get(i, g.Axis(i)) for i in new_axes(n, typ.indices)), typ.dtype)

        def reref(r: g.Ref) -> g.Ref:
            if r.name in kv_params:
                p = _run(r.indices, att.kh)
                if p is None:
                    raise EinpartError(f"multiquery: '{r.name}' is read with its head axes renamed")
                return replace(r, name=pooled[r.name], indices=r.indices[:p] + split_kv + r.indices[p + len(att.kh):])
            if r.name in query or r.name in kv:
                return replace(r, indices=new_axes(r.name, r.indices))
            return r

        def fix_decl(d: g.Decl) -> g.Decl:
            t = retype(d.name, d.type)
            if t == d.type:
                return d
            attrs = d.attrs
            if d.kind == "param" and g.attr(attrs, STORED_AS) is None:
                attrs = g.make_attrs(attrs, **{STORED_AS: tuple(g.Sym(i) for i in d.type.indices)})
            return replace(d, type=t, attrs=attrs)

        def fix_stmt(s: g.Statement) -> g.Statement:
            return replace(s, type=retype(s.name, s.type), op=_map_op_refs(s.op, reref))

        add: dict[str, list[g.Statement]] = {}
        for p in sorted(kv_params):
            typ = retype(p, info.types[p])
            read = g.Ref(p, typ.indices)
            out = tuple(i for i in typ.indices if i != ji)
            add.setdefault(info.block_of[p], []).append(
                g.Statement(pooled[p], g.tensor_type(out, typ.dtype), g.Compute(read, "mean")))
        out = edit_graph(graph, add=None, decl_fn=fix_decl, stmt_fn=fix_stmt)
        out = edit_graph(out, add=add)  # pooling statements read the new parameter types: add after
        return replace(out, sizes=graph.sizes + tuple(sizes), indices=graph.indices + tuple(indices))

    @staticmethod
    def _kv_side(info: GraphInfo, att: Attention) -> tuple[set, set]:
        """Tensors from the K/V parameters to the cache writes (and the caches), and those parameters."""
        kh = set(att.kh)
        kv, params = set(), set()

        def back(n):
            if n in kv or n in params or not kh <= set(info.types[n].indices):
                return
            if n in info.decls:
                if info.decls[n].kind == "param":
                    params.add(n)
                else:
                    kv.add(n)
                return
            kv.add(n)
            for m in stmt_inputs(info.defs[n]):
                back(m)

        for s in info.defs.values():
            if isinstance(s.op, g.Write) and kh <= set(s.type.indices):
                kv.add(s.name)
                back(s.op.cache.name)
                back(s.op.new.name)
        return kv, params


def _map_op_refs(op, fn):
    if isinstance(op, g.Compute):
        return replace(op, expr=map_refs(op.expr, fn))
    if isinstance(op, g.Take):
        ids = fn(op.ids) if isinstance(op.ids, g.Ref) else op.ids
        return replace(op, table=fn(op.table), ids=ids)
    if isinstance(op, g.Write):
        return replace(op, cache=fn(op.cache), new=fn(op.new))
    if isinstance(op, g.Rope):
        return replace(op, x=fn(op.x))
    return op  # a repeat's body is rewritten by the walk itself


def _fresh_pair(used: set, size: str, index: str) -> tuple[str, str]:
    n = 1
    while True:
        suffix = "" if n == 1 else str(n)
        s, i = size + suffix, index + suffix
        if s not in used and i not in used:
            used.update((s, i))
            return s, i
        n += 1


def _quotient(names: list[str], by: str) -> g.SizeExpr:
    e: g.SizeExpr = g.SizeRef(names[0])
    for n in names[1:]:
        e = g.SizeBin("*", e, g.SizeRef(n))
    return g.SizeBin("/", e, g.SizeRef(by))


def transform_params(graph: g.Graph, params: dict, sizes: dict | None = None) -> dict:
    """Weights as the rewritten graph declares them: every param with a `stored_as`
    attribute is reshaped (row-major, the data unchanged) from its stored axes.
    Arrays that already have the declared shape are left alone."""
    idx = index_sizes(graph, sizes if sizes is not None else resolve_sizes(graph))
    out = dict(params)
    for n, info in decl_shapes(graph, sizes).items():
        stored = g.attr(info.decl.attrs, STORED_AS)
        if info.decl.kind != "param" or stored is None or n not in params:
            continue
        shape = tuple(idx[s.name] for s in stored)
        if info.stacked is not None:
            shape = (info.shape[0],) + shape
        arr = np.asarray(params[n])
        if arr.shape == info.shape:
            continue
        if arr.shape != shape:
            raise EinpartError(f"param '{n}' has shape {arr.shape}; expected {shape} (stored as "
                               f"[{', '.join(s.name for s in stored)}]) or {info.shape}")
        out[n] = arr.reshape(info.shape)
    return out
