"""defer-norm: move normalisation past the contraction that follows it
(Salmani & Soloveychik 2025), as one algebraic rule on the einsum cascade.

The rule. A contraction `y[O] = sum_C(A * B * ...)` is linear in each
operand. Expand every operand that is a map (`A[..] = expr`) into a sum of
monomials, each a coefficient times a product / quotient of factors, looking
through the maps it reads. Then for every monomial

  * a factor that reads no contracted index (in C) is constant under the sum
    and moves after it: `sum_C(f[O'] * rest) = f[O'] * sum_C(rest)`;
  * factors computed from parameters alone fold together into one derived
    weight (a param-only statement the runtime prepares at load time);
  * a monomial left with nothing per-step under the sum (a mean term
    `mu[b,t] * g[d]`, a bias `b[d]`) becomes a param-only contraction of
    weights: the column sum of the (gain-folded) weight, `b . W`.

So `(exp(s - m) / z) . v` becomes `(exp(s - m) . v) / z`; RMSNorm
`(x * rsqrt(ms) * g) . W` becomes `rsqrt(ms) * (x . (g W))`; LayerNorm
`((x - mu) * r * g + b) . W` becomes `r * (x . gW - mu * colsum(gW)) + b . W`.
Sharded, the statistic's reduction and the matmul's partial sum then run
side by side (or as one collective) instead of one after the other.

A map is looked through only when that moves something (a factor leaves the
sum, or a sum term becomes a precomputed weight) and leaves at most one
monomial with per-step work under the sum, so `(x + ao + bo) . W` is not
split into three matmuls. A weight is folded only when this contraction is
its only per-step reader (a tied embedding is not duplicated) and it is a
float (an int8 weight keeps its integers; the gain then stays an einsum
operand). The same engine moves int8 scales (see int8.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product as cartesian

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.verify import verify
from .manager import Pass, register_pass
from .rewrite_util import (GraphInfo, Namer, axes_like, contracted, edit_graph, is_contraction,
                           product, rename_expr)
from .basic import DeadCode

MAX_TERMS = 8      # beyond this an operand is left alone (no blow-up through nested sums)
MAX_ROUNDS = 16    # rewrites enable rewrites downstream; each round handles every contraction once


@dataclass(frozen=True)
class Term:
    """coeff * prod(num) / prod(den)."""
    coeff: float
    num: tuple = ()
    den: tuple = ()

    def times(self, o: "Term") -> "Term":
        return Term(self.coeff * o.coeff, self.num + o.num, self.den + o.den)

    def over(self, o: "Term") -> "Term":
        return Term(self.coeff / o.coeff, self.num + o.den, self.den + o.num)

    def factors(self):
        return self.num + self.den


class Rewriter:
    """One round of rewrites over a graph.

    Collects replacements and new statements; weight-preparation and shared
    scale statements are created once per (block, expression) and reused by
    every consumer (q, k and v share one folded `rsqrt`, a column sum reuses
    the folded weight)."""

    def __init__(self, graph: g.Graph):
        self.graph = graph
        self.info = GraphInfo(graph)
        self.name = Namer(self.info.names)
        self.replace: dict[str, list[g.Statement]] = {}
        self.add: dict[str, list[g.Statement]] = {}
        self.memo: dict = {}
        for s in self.info.defs.values():
            if isinstance(s.op, g.Compute):
                key = (self.info.block_of[s.name], s.op.expr, s.op.reduce, s.type.indices, s.type.dtype)
                self.memo.setdefault(key, s.name)

    def result(self) -> g.Graph:
        return edit_graph(self.graph, self.replace, self.add)

    # -- statements ---------------------------------------------------------
    def make(self, expr, out, reduce, block, base, like=None, create=True, dtype="f32") -> g.Ref | None:
        """A read of a statement computing `expr` over `out` (memoised per block)."""
        block = self.info.home_block(expr, block)
        key = (block, expr, reduce, tuple(out), dtype)
        if key not in self.memo:
            if not create:
                return None
            name = self.name(base)
            typ = axes_like(like, out, dtype) if like is not None else g.tensor_type(out, dtype)
            self.add.setdefault(block, []).append(g.Statement(name, typ, g.Compute(expr, reduce)))
            self.memo[key] = name
        return g.Ref(self.memo[key], tuple(out))

    # -- expansion ----------------------------------------------------------
    def expand(self, e: g.Expr, ctx: "Ctx") -> list[Term]:
        if isinstance(e, g.Const):
            return [Term(float(e.value))]
        if isinstance(e, g.Unary) and e.fn == "neg":
            return [replace(t, coeff=-t.coeff) for t in self.expand(e.x, ctx)]
        if isinstance(e, g.Binary):
            if e.op in "+-":
                rhs = self.expand(e.rhs, ctx)
                if e.op == "-":
                    rhs = [replace(t, coeff=-t.coeff) for t in rhs]
                out = self.expand(e.lhs, ctx) + rhs
            elif e.op == "*":
                out = [a.times(b) for a in self.expand(e.lhs, ctx) for b in self.expand(e.rhs, ctx)]
            else:
                rhs = self.expand(e.rhs, ctx)
                if len(rhs) == 1 and rhs[0].coeff != 0:
                    out = [a.over(rhs[0]) for a in self.expand(e.lhs, ctx)]
                else:  # a sum in a denominator stays one factor
                    out = [replace(a, den=a.den + (e.rhs,)) for a in self.expand(e.lhs, ctx)]
            return out if len(out) <= MAX_TERMS else [Term(1.0, (e,))]
        if isinstance(e, g.Ref):
            sub = ctx.inline(self, e)
            if sub is not None:
                return sub
        return [Term(1.0, (e,))]

    def look_through(self, ref: g.Ref, ctx: "Ctx") -> list[Term] | None:
        """The expansion of the map defining `ref`, when looking through it moves something."""
        info = self.info
        d = info.defs.get(ref.name)
        if (d is None or not isinstance(d.op, g.Compute) or d.op.reduce is not None
                or d.type.dtype not in ("f32", "f64") or ref.name in info.weights):
            return None  # not a map, rounds on store, or is itself a weight
        terms = self.expand(rename_expr(d.op.expr, dict(zip(d.type.indices, ref.indices))), ctx)
        if len(terms) > MAX_TERMS or sum(not ctx.cheap(self, t) for t in terms) > 1:
            return None
        if len(terms) == 1 and not any(ctx.movable(f) for f in terms[0].factors()):
            return None
        return terms

    # -- the rule -----------------------------------------------------------
    def defer(self, s: g.Statement, ctx: "Ctx") -> bool:
        """Rewrite one contraction; False (and no edits) when nothing moves."""
        info = self.info
        block = info.block_of[s.name]
        out = s.type.indices
        ctx.C = set(contracted(s))
        factors = g.product_factors(s.op.expr)
        expansions = []
        for n, f in enumerate(factors):
            if isinstance(f, g.Ref):
                others = [o for m, o in enumerate(factors) if m != n and isinstance(o, g.Ref)]
                ctx.others_weight = all(o.name in info.weights for o in others)
                expansions.append(self.expand(f, ctx))
            elif isinstance(f, g.Const):
                expansions.append([Term(float(f.value))])
            else:
                expansions.append([Term(1.0, (f,))])
        terms = []
        for combo in cartesian(*expansions):
            t = Term(1.0)
            for part in combo:
                t = t.times(part)
            if t.coeff != 0:
                terms.append(t)
            if len(terms) > 2 * MAX_TERMS:
                return False
        moves = any(ctx.movable(f) for t in terms for f in t.factors())
        if not terms or (len(terms) == 1 and not moves):
            return False
        # every output index must survive in some term (else the result would lose an axis)
        covered = set()
        for t in terms:
            for f in t.factors():
                covered |= set(g.expr_indices(f)) - ctx.C
        if not set(out) <= covered:
            return False
        # per-step work first, so the folded weight exists when a mean term wants its column sum
        terms.sort(key=lambda t: all(ctx.movable(f) or info.is_weight_expr(f) for f in t.factors()))
        final = []
        new_stmts: list[g.Statement] = []
        for t in terms:
            mov = [f for f in t.num if ctx.movable(f)]
            mov_den = [f for f in t.den if ctx.movable(f)]
            stay = [f for f in t.num if not ctx.movable(f)]
            stay_den = [f for f in t.den if not ctx.movable(f)]
            value, per_step = self.contract(s, block, stay, stay_den, new_stmts, ctx)
            mov = [self.scale_ref(f, block, out, s) for f in mov]
            mov_den = [self.scale_ref(f, block, out, s) for f in mov_den]
            # per-step results read first (`q_raw * r`), precomputed weights last (`mu * cs`)
            num = tuple(value) + tuple(mov) if per_step else tuple(mov) + tuple(value)
            final.append(Term(t.coeff, num, tuple(mov_den)))
        expr = build_sum(final)
        new_stmts.append(g.Statement(s.name, s.type, g.Compute(expr, None), s.attrs, s.span))
        self.replace[s.name] = new_stmts
        return True

    def contract(self, s, block, stay, stay_den, new_stmts, ctx) -> tuple[list[g.Expr], bool]:
        """The factors left under the sum, contracted: the term's value factors, and
        whether they are per-step work (else a precomputed weight)."""
        info = self.info
        C = ctx.C
        if not stay and not stay_den:  # sum over C of 1: the number of contracted elements
            return [g.SizeVal(info.index_size[i]) for i in sorted(C)], False
        w = [f for f in stay if info.is_weight_expr(f)]
        w_den = [f for f in stay_den if info.is_weight_expr(f)]
        act = [f for f in stay if not info.is_weight_expr(f)]
        act_den = [f for f in stay_den if not info.is_weight_expr(f)]
        per_step = bool(act or act_den)
        if len(w) + len(w_den) >= 2 and self.can_fold(s, w + w_den):
            w, w_den = [self.fold(w, w_den, block, create=per_step)], []
            if w[0] is None:  # a bias / mean term: contract the weights directly
                w = [f for f in stay if info.is_weight_expr(f)]
                w_den = [f for f in stay_den if info.is_weight_expr(f)]
        w = [f if isinstance(f, g.Ref) else self.make(f, _idx(f), None, block, _base(f) + "_w") for f in w]
        w += [self.make(g.Binary("/", g.Const(1.0), f), _idx(f), None, block, _base(f) + "_inv") for f in w_den]
        if act_den or not all(isinstance(f, g.Ref) for f in act):
            e = product(act) if act else g.Const(1.0)
            for f in act_den:
                e = g.Binary("/", e, f)
            act = [self.make(e, _ordered(_idx(e), s.type.indices), None, block, s.name + "_in")]
        operands = act + w
        idx = []
        for f in operands:
            idx += [i for i in g.expr_indices(f) if i not in idx]
        res = [i for i in s.type.indices if i in idx]
        expr = product(operands)
        if per_step:
            name = self.name(s.name.removesuffix("_raw") + "_raw")
            new_stmts.append(g.Statement(name, axes_like(s.type, res), g.Compute(expr, "sum")))
            return [g.Ref(name, tuple(res))], True
        base = "_".join(r.name for r in sorted((r for r in operands if isinstance(r, g.Ref)),
                                               key=lambda r: -len(r.indices))) + "_sum"
        return [self.make(expr, res, "sum", block, base)], False

    def can_fold(self, s, ws) -> bool:
        """Fold weights only when it stores nothing twice and keeps int8 weights int8."""
        for f in ws:
            for r in g.expr_refs(f):
                if self.info.dtype(r.name) not in g.FLOAT_DTYPES:
                    return False
                if len(r.indices) >= 2 and self.info.step_readers(r.name) != [s.name]:
                    return False
        return True

    def fold(self, w, w_den, block, create=True) -> g.Ref | None:
        big = sorted([r for r in w if isinstance(r, g.Ref)], key=lambda r: -len(r.indices))
        idx: list[str] = []
        for f in big + w + w_den:
            idx += [i for i in g.expr_indices(f) if i not in idx]
        e = product(w)
        for f in w_den:
            e = g.Binary("/", e, f)
        base = "_".join(r.name for r in big) if big else "w"
        # stored like the weight it replaces (a bf16 weight folds into a bf16 weight)
        dtype = self.info.dtype(big[0].name) if big else "f32"
        return self.make(e, idx, None, block, base, create=create, dtype=dtype)

    def scale_ref(self, f, block, out, s):
        """A factor moved past the contraction; a computed one (rsqrt(var + eps)) becomes a
        statement shared by every consumer of the same normalised tensor."""
        if isinstance(f, (g.Ref, g.SizeVal, g.Const)):
            return f
        return self.make(f, _ordered(_idx(f), out), None, block, _base(f), like=s.type)


@dataclass
class Ctx:
    """What the engine may look through, for one contraction."""
    C: set = None
    others_weight: bool = False
    through_maps: bool = True         # defer-norm: look through map definitions
    override: dict | None = None      # name -> fn(ref) -> [Term]: int8's view of a weight

    def movable(self, f) -> bool:
        return not (set(g.expr_indices(f)) & self.C)

    def cheap(self, rw: Rewriter, t: Term) -> bool:
        """Nothing per step under the sum: only movable factors and weights against weights."""
        return self.others_weight and all(self.movable(f) or rw.info.is_weight_expr(f) for f in t.factors())

    def inline(self, rw: Rewriter, ref: g.Ref):
        if self.override and ref.name in self.override:
            return self.override[ref.name](ref)
        return rw.look_through(ref, self) if self.through_maps else None


def build_sum(terms: list[Term]) -> g.Expr:
    """A sum of monomials, with the factor shared by most of them pulled out:
    `r * (raw - mu * cs) + b_w` rather than `r * raw - mu * r * cs + b_w`."""
    counts: dict = {}
    for t in terms:
        for f in dict.fromkeys(t.num):
            counts[f] = counts.get(f, 0) + 1
    best = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
    if best[1] >= 2 and len(terms) > 1:
        f = best[0]
        group = [t for t in terms if f in t.num]
        rest = [t for t in terms if f not in t.num]
        inner = [replace(t, num=_drop_one(t.num, f)) for t in group]
        expr = g.Binary("*", f, build_sum(inner))
        return expr if not rest else g.Binary("+", expr, build_sum(rest))
    out = None
    for t in terms:
        mono, neg = _monomial(t)
        if out is None:
            out = g.Unary("neg", mono) if neg else mono
        else:
            out = g.Binary("-" if neg else "+", out, mono)
    return out


def _monomial(t: Term) -> tuple[g.Expr, bool]:
    c = t.coeff
    neg = c < 0
    c = abs(c)
    parts = list(t.num)
    if c != 1.0 or not parts:
        parts.insert(0, g.Const(c))
    e = product(parts)
    for d in t.den:
        e = g.Binary("/", e, d)
    return e, neg


def _drop_one(seq, x):
    seq = list(seq)
    seq.remove(x)
    return tuple(seq)


def _idx(e) -> list[str]:
    return list(g.expr_indices(e))


def _ordered(idx, order) -> list[str]:
    return [i for i in order if i in idx] + [i for i in idx if i not in order]


def _base(e) -> str:
    refs = list(g.expr_refs(e))
    head = refs[0].name if refs else "c"
    return f"{e.fn}_{head}" if isinstance(e, g.Unary) else f"{head}_f"


def drop_newly_dead(before: g.Graph, after: g.Graph) -> g.Graph:
    """Remove what the rewrite made dead (the old norm statements), but not dead code the
    user wrote: that is dce's business."""
    def names(gr):
        return {s.name for s, _ in gr.all_stmts()}
    dead_before = names(before) - names(DeadCode().apply(before))
    live_after = names(DeadCode().apply(after))
    keep = live_after | dead_before

    def sweep(block: g.Block) -> g.Block:
        stmts = []
        for s in block.stmts:
            if s.name not in keep:
                continue
            if isinstance(s.op, g.Repeat):
                s = replace(s, op=replace(s.op, body=sweep(s.op.body)))
            stmts.append(s)
        return replace(block, stmts=tuple(stmts))
    return after.with_body(sweep(after.body))


def run_rounds(graph: g.Graph, ctx_for, select=None) -> tuple[g.Graph, int]:
    """Apply the rule to every per-step contraction (or those `select` picks) until
    nothing moves; returns the graph and the number of contractions rewritten."""
    total = 0
    for _ in range(MAX_ROUNDS):
        rw = Rewriter(graph)
        n = 0
        for s in list(rw.info.defs.values()):
            if s.name in rw.info.weights or not is_contraction(s):
                continue
            if select is not None and not select(s):
                continue
            n += rw.defer(s, ctx_for(s))
        if n == 0:
            break
        graph = verify(rw.result())
        total += n
    return graph, total


@register_pass("defer-norm")
@dataclass(frozen=True)
class DeferNorm(Pass):
    """Move normalisation factors (1/z of a softmax, rsqrt(var) of a norm, its mean and
    bias terms, its gain) past the following contraction; see the module docstring."""

    def apply(self, graph: g.Graph) -> g.Graph:
        out, n = run_rounds(graph, lambda s: Ctx())
        if n == 0:
            raise EinpartError("defer-norm: nothing to defer: no contraction reads a value with a factor "
                               "that is constant over the contracted indices (a softmax's 1/z, a norm's "
                               "rsqrt, mean or gain)")
        return drop_newly_dead(graph, out)


__all__ = ["DeferNorm", "Rewriter", "Ctx", "Term", "run_rounds", "drop_newly_dead"]
