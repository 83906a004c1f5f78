"""Softmax attention in the IR: find the chain of statements that computes it.

A spec writes attention as einsums (examples/llama.ein):

    sc[b, g, r, t, s] = qr[b, t, g, r, k] * kc[b, s, g, k]        scores
    sm[b, g, r, t, s] = sc[b, g, r, t, s] * rsqrt(K) + causal(t, s)
    mx[b, g, r, t]    = max(sm[b, g, r, t, s])
    e[b, g, r, t, s]  = exp(sm[b, g, r, t, s] - mx[b, g, r, t])
    z[b, g, r, t]     = sum(e[b, g, r, t, s])
    p[b, g, r, t, s]  = e[b, g, r, t, s] / z[b, g, r, t]
    o[b, t, g, r, k]  = p[b, g, r, t, s] * vc[b, s, g, k]

or, after defer-norm, `o_raw = e * vc; o = o_raw / z` in place of the last two.
`attention_chains(graph)` returns every such chain whose intermediate tensors
(all but `o`) nothing else reads, so that codegen may compute the chain as one
fused attention call (jax.nn.dot_product_attention) without changing what any
other statement sees. The matcher is structural and strict: each intermediate is
read under its own index names, is stored in f32 and is read only by the next
step of the chain; the scale is a constant expression (sizes included); the mask,
if any, is causal(t, s) over the query's and the key's position indices. Anything
else is left to the einsum code, which is always correct.

Index roles (the layout dot_product_attention wants, BTNH): `s` is the one index
of the key that the query lacks, `k` the one the scores sum over, `t` the query's
positions (the causal mask's t, else the step's query index); indices both query
and key carry are the batch (the step's batch index, when present) and the
key/value heads; the query's other indices are the query heads of each
key/value head (llama's r, PaLM's h: grouped-query and multiquery attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import graph as g
from .verify import resolve_sizes, stmt_inputs

__all__ = ["AttentionChain", "attention_chains", "const_value"]


@dataclass(frozen=True)
class AttentionChain:
    """One softmax-attention chain, by statement names, with the roles of its indices."""
    scores: str                 # sc = query . key (sum over k)
    masked: str | None          # sm = sc * scale (+ causal); None when the max reads sc itself
    max: str                    # mx = max over s
    exp: str                    # e = exp(sm - mx)
    total: str                  # z = sum over s of e
    weighted: str               # p = e / z (then o = p . v), or o_raw = e . v (then o = o_raw / z)
    out: str                    # o: the attention output, the one tensor of the chain others read
    deferred: bool              # the defer-norm form: o = (e . v) / z
    query: g.Ref                # the query as the scores read it
    key: g.Ref
    value: g.Ref                # the value as its contraction reads it
    scale: float
    causal: bool                # whether sm adds causal(t, s)
    t: str
    s: str
    k: str
    batch: str | None           # the batch index (shared by query and key), if any
    kv_heads: tuple[str, ...]   # the other shared indices, in the key's order
    q_heads: tuple[str, ...]    # the query's own indices besides t, in the query's order

    @property
    def members(self) -> tuple[str, ...]:
        """The chain's statements in dataflow order, the output last."""
        return tuple(n for n in (self.scores, self.masked, self.max, self.exp, self.total,
                                 self.weighted, self.out) if n is not None)


def const_value(e: g.Expr, sizes: dict[str, int]) -> float | None:
    """The value of an expression of constants and sizes (rsqrt(K), 0.125, 1 / sqrt(K)), else None."""
    if isinstance(e, g.Const):
        return float(e.value)
    if isinstance(e, g.SizeVal):
        return float(sizes[e.name]) if e.name in sizes else None
    if isinstance(e, g.Unary):
        x = const_value(e.x, sizes)
        if x is None:
            return None
        fns = {"neg": lambda v: -v, "sqrt": math.sqrt, "rsqrt": lambda v: 1.0 / math.sqrt(v), "exp": math.exp,
               "log": math.log, "abs": abs}
        if e.fn not in fns:
            return None
        try:
            return float(fns[e.fn](x))
        except (ValueError, ZeroDivisionError, OverflowError):
            return None
    if isinstance(e, g.Binary):
        a, b = const_value(e.lhs, sizes), const_value(e.rhs, sizes)
        if a is None or b is None:
            return None
        if e.op == "/":
            return a / b if b != 0 else None
        return {"+": a + b, "-": a - b, "*": a * b}.get(e.op)
    return None


def _readers(graph: g.Graph) -> dict[str, set[str]]:
    """Who reads each tensor: statement names, '<output>' for outputs, '<yield>' / '<init>' for a repeat."""
    out: dict[str, set[str]] = {}
    for s, _ in graph.all_stmts():
        if isinstance(s.op, g.Repeat):
            out.setdefault(s.op.init, set()).add("<init>")
            out.setdefault(s.op.result, set()).add("<yield>")
            continue
        for name in stmt_inputs(s):
            out.setdefault(name, set()).add(s.name)
    for name in graph.outputs:
        out.setdefault(name, set()).add("<output>")
    return out


def _compute(stmts: dict, name: str) -> g.Statement | None:
    s = stmts.get(name)
    return s if s is not None and isinstance(s.op, g.Compute) else None


def _own_read(e, stmts: dict, name: str) -> bool:
    """Whether `e` reads tensor `name` under the index names of its statement."""
    return isinstance(e, g.Ref) and e.name == name and e.indices == stmts[name].type.indices


def _affine(e, sc_name: str, stmts: dict, sizes) -> tuple[float, tuple | None] | None:
    """sm's expression as (scale, causal (t, s) or None): sc * c (+ causal), c * sc, sc / c, sc."""
    causal = None
    if isinstance(e, g.Binary) and e.op == "+":
        for a, b in ((e.lhs, e.rhs), (e.rhs, e.lhs)):
            if isinstance(b, g.Causal) and not g.has_causal(a):
                e, causal = a, (b.t, b.s)
                break
        else:
            return None
    if _own_read(e, stmts, sc_name):
        return 1.0, causal
    if isinstance(e, g.Binary) and e.op in "*/":
        if _own_read(e.lhs, stmts, sc_name):
            c = const_value(e.rhs, sizes)
            if c is None or (e.op == "/" and c == 0):
                return None
            return (c if e.op == "*" else 1.0 / c), causal
        if e.op == "*" and _own_read(e.rhs, stmts, sc_name):
            c = const_value(e.lhs, sizes)
            return (None if c is None else (c, causal))
    return None


def _contraction(s: g.Statement | None) -> list[g.Ref] | None:
    """The two refs of a sum over their product, else None."""
    if s is None or s.op.reduce != "sum":
        return None
    f = g.product_factors(s.op.expr)
    if f is None or len(f) != 2 or not all(isinstance(x, g.Ref) for x in f):
        return None
    return f


def _match(mx: g.Statement, stmts: dict, readers: dict, sizes, batch_index: str | None,
           query_index: str | None) -> AttentionChain | None:
    op = mx.op
    if op.reduce != "max" or not isinstance(op.expr, g.Ref) or op.expr.name not in stmts:
        return None
    sm_name = op.expr.name
    sm = _compute(stmts, sm_name)
    if sm is None or not _own_read(op.expr, stmts, sm_name):
        return None
    dropped = [i for i in sm.type.indices if i not in mx.type.indices]
    if len(dropped) != 1 or len(mx.type.indices) != len(sm.type.indices) - 1:
        return None
    s_idx = dropped[0]
    # sm: the scaled, masked scores, or the scores themselves
    if _contraction(sm) is not None:
        sc, scale, causal, masked = sm, 1.0, None, None
    else:
        if sm.op.reduce is not None:
            return None
        refs = list(g.expr_refs(sm.op.expr))
        if len(refs) != 1 or refs[0].name not in stmts:
            return None
        sc = _compute(stmts, refs[0].name)
        aff = _affine(sm.op.expr, refs[0].name, stmts, sizes) if sc is not None else None
        if aff is None:
            return None
        scale, causal = aff
        masked = sm.name
        if not math.isfinite(scale):
            return None
    qk = _contraction(sc)
    if qk is None:
        return None
    # e = exp(sm - mx), read by z and by the output's contraction (or p)
    e_name = next(iter(readers.get(sm_name, set()) - {mx.name}), None)
    ex = _compute(stmts, e_name) if e_name is not None else None
    if (ex is None or ex.op.reduce is not None or set(ex.type.indices) != set(sm.type.indices)
            or not (isinstance(ex.op.expr, g.Unary) and ex.op.expr.fn == "exp")):
        return None
    diff = ex.op.expr.x
    if not (isinstance(diff, g.Binary) and diff.op == "-" and _own_read(diff.lhs, stmts, sm_name)
            and _own_read(diff.rhs, stmts, mx.name)):
        return None
    e_readers = readers.get(e_name, set())
    z = next((stmts[n] for n in e_readers if _compute(stmts, n) is not None and stmts[n].op.reduce == "sum"
              and _own_read(stmts[n].op.expr, stmts, e_name)), None)
    if z is None or set(z.type.indices) != set(ex.type.indices) - {s_idx}:
        return None
    rest = e_readers - {z.name}
    if len(rest) != 1:
        return None
    w = _compute(stmts, next(iter(rest)))
    if w is None:
        return None
    wv = _contraction(w)
    if wv is not None:                           # deferred: o_raw = e . v, o = o_raw / z
        deferred = True
        if not _own_read(wv[0], stmts, e_name) and _own_read(wv[1], stmts, e_name):
            wv = wv[::-1]
        if not _own_read(wv[0], stmts, e_name):
            return None
        value, vstmt = wv[1], w
        o = _compute(stmts, next(iter(readers.get(w.name, {""})), ""))
        if (o is None or o.op.reduce is not None or not isinstance(o.op.expr, g.Binary) or o.op.expr.op != "/"
                or not _own_read(o.op.expr.lhs, stmts, w.name) or not _own_read(o.op.expr.rhs, stmts, z.name)
                or set(o.type.indices) != set(w.type.indices) or readers.get(z.name) != {o.name}
                or readers.get(w.name) != {o.name}):
            return None
    else:                                        # p = e / z, o = p . v
        deferred = False
        if (w.op.reduce is not None or not isinstance(w.op.expr, g.Binary) or w.op.expr.op != "/"
                or not _own_read(w.op.expr.lhs, stmts, e_name) or not _own_read(w.op.expr.rhs, stmts, z.name)
                or set(w.type.indices) != set(ex.type.indices) or readers.get(z.name) != {w.name}):
            return None
        o = _compute(stmts, next(iter(readers.get(w.name, {""})), ""))
        pv = _contraction(o)
        if pv is None or readers.get(w.name) != {o.name}:
            return None
        if not _own_read(pv[0], stmts, w.name):
            pv = pv[::-1]
        if not _own_read(pv[0], stmts, w.name):
            return None
        value, vstmt = pv[1], o
    # the index roles of the scores
    q, key = qk
    contracted = [i for i in q.indices if i in key.indices and i not in sc.type.indices]
    k_only = [i for i in key.indices if i not in q.indices]
    q_only = [i for i in q.indices if i not in key.indices]
    if (len(contracted) != 1 or k_only != [s_idx] or set(sc.type.indices) != (set(q.indices) | set(key.indices))
            - set(contracted) or len(set(q.indices)) != len(q.indices) or len(set(key.indices)) != len(key.indices)
            or set(sc.type.indices) != set(sm.type.indices)):
        return None
    k_idx = contracted[0]
    if causal is not None:
        t_idx = causal[0]
        if causal[1] != s_idx or t_idx not in q_only:
            return None
    elif query_index in q_only:
        t_idx = query_index
    elif q_only:
        t_idx = q_only[0]
    else:
        return None
    # the value: read as the key is; the output: the query's indices
    if (set(value.indices) != set(key.indices) or len(set(value.indices)) != len(value.indices)
            or set(vstmt.type.indices) != set(q.indices) or set(o.type.indices) != set(q.indices)):
        return None
    shared = [i for i in key.indices if i in q.indices and i != k_idx]
    batch = batch_index if batch_index in shared else None
    chain = AttentionChain(
        scores=sc.name, masked=masked, max=mx.name, exp=ex.name, total=z.name, weighted=w.name, out=o.name,
        deferred=deferred, query=q, key=key, value=value, scale=float(scale), causal=causal is not None,
        t=t_idx, s=s_idx, k=k_idx, batch=batch, kv_heads=tuple(i for i in shared if i != batch),
        q_heads=tuple(i for i in q_only if i != t_idx))
    # every intermediate: f32, read only by the next step of the chain, never an output
    inner = chain.members[:-1]
    for n in inner:
        if stmts[n].type.dtype != "f32" or readers.get(n, set()) - set(chain.members):
            return None
    if masked is not None:
        if readers.get(sc.name) != {masked} or readers.get(masked) != {mx.name, ex.name}:
            return None
    elif readers.get(sc.name) != {mx.name, ex.name}:
        return None
    if readers.get(mx.name) != {ex.name} or readers.get(ex.name) != {z.name, w.name}:
        return None
    return chain


def attention_chains(graph: g.Graph) -> list[AttentionChain]:
    """Every softmax-attention chain of the graph (any block), in block order."""
    from .model import step_axes
    from ..errors import EinpartError
    try:
        ax = step_axes(graph)
        batch_index, query_index = ax.batch, ax.query
    except (EinpartError, IndexError, KeyError):
        batch_index = query_index = None
    sizes = resolve_sizes(graph)
    readers = _readers(graph)
    out = []
    for block, _ in graph.blocks():
        stmts = {s.name: s for s in block.stmts if isinstance(s.op, g.Compute)}
        for s in block.stmts:
            if isinstance(s.op, g.Compute) and s.op.reduce == "max":
                chain = _match(s, stmts, readers, sizes, batch_index, query_index)
                if chain is not None:
                    out.append(chain)
    return out
