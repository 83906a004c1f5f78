"""int8: weight-only int8 quantisation (Pope et al. 2022, section 3.5).

A matmul weight `w[d, f]` becomes three param-only statements, which the
runtime evaluates once at load time (so only `w_i8` and `w_scale` reach the
device, and the weight stays int8 in device memory):

    w_amax[f] = max(abs(w[d, f]))              # per output channel
    w_scale[f] = w_amax[f] / 127.0 + 1e-30     # (the 1e-30 keeps an all-zero channel finite)
    w_i8[d, f] : i8 = w[d, f] / w_scale[f]     # an i8 store rounds to nearest, saturates at 127

Output channels are the weight's axes that its contraction does not sum
over, so the scale is constant under the sum and moves past it by the same
rule as defer-norm (the same engine does it): `y = sum_d(x * w_i8) * w_scale`.
The matmul reads int8 values and the float scale touches only its output,
which is what lets a device widen int8 inside the matmul.

Which weights. `weights=(wq,wk)` names them; by default every matmul weight:
a float parameter (or param-only result, e.g. a gain folded in by
defer-norm) that a per-step contraction multiplies with activations, whose
every per-step use is such a contraction summing over the same axes (one
scale per channel must serve all of them). Embeddings (read by take) and
1-D gains are left alone. A name given in `weights` may also be a parameter
that defer-norm folded into a derived weight: the derived weight is
quantised. Asking for a weight that cannot be quantised is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import EinpartError
from ..ir import graph as g
from .defer_norm import Ctx, Term, drop_newly_dead, run_rounds
from .manager import Pass, register_pass
from .rewrite_util import GraphInfo, Namer, contracted, edit_graph, is_contraction, rename_expr

QMAX = 127.0
EPS = 1e-30


@dataclass(frozen=True)
class MatmulWeight:
    name: str
    uses: tuple[str, ...]            # per-step contractions reading it
    summed: frozenset                # positions of its axes those contractions sum over
    why_not: str | None              # None when it can be quantised


def matmul_weights(graph: g.Graph) -> dict[str, MatmulWeight]:
    """Every weight some per-step contraction multiplies with activations, and whether
    int8 can quantise it (why_not says why not)."""
    info = GraphInfo(graph)
    uses: dict[str, list[tuple[str, frozenset]]] = {}
    for s in info.defs.values():
        if s.name in info.weights or not is_contraction(s):
            continue
        refs = [f for f in g.product_factors(s.op.expr) if isinstance(f, g.Ref)]
        if all(r.name in info.weights for r in refs):
            continue
        C = set(contracted(s))
        for r in refs:
            if r.name in info.weights:
                uses.setdefault(r.name, []).append((s.name, frozenset(k for k, i in enumerate(r.indices) if i in C)))
    out = {}
    for name, us in uses.items():
        typ = info.types[name]
        summed = {p for _, p in us}
        use_names = tuple(dict.fromkeys(n for n, _ in us))
        other = [r for r in info.step_readers(name) if r not in use_names]
        takes = [r for r in other if isinstance(info.defs[r].op, g.Take)]
        why = None
        if typ.dtype not in g.FLOAT_DTYPES:
            why = f"it is already {typ.dtype}"
        elif len(typ.axes) < 2:
            why = "it has one axis (a gain or bias, not a matmul weight)"
        elif takes:
            why = f"it is an embedding table (read by take() in '{takes[0]}')"
        elif other:
            why = f"'{other[0]}' also reads it elementwise"
        elif len(summed) > 1:
            why = f"its uses ({', '.join(use_names)}) sum over different axes: no one per-channel scale fits"
        elif len(next(iter(summed))) == len(typ.axes):
            why = "its contraction sums over every axis: it has no output channel"
        out[name] = MatmulWeight(name, use_names, next(iter(summed)), why)
    return out


def _derived_from(info: GraphInfo, name: str) -> set[str]:
    """Param-only statements computed (transitively) from `name`."""
    out, todo = set(), [name]
    while todo:
        n = todo.pop()
        for r in info.readers.get(n, []):
            if r in info.weights and r not in out:
                out.add(r)
                todo.append(r)
    return out


def choose(graph: g.Graph, names: tuple[str, ...]) -> list[MatmulWeight]:
    mm = matmul_weights(graph)
    ok = sorted(n for n, w in mm.items() if w.why_not is None)
    listing = ", ".join(ok) or "none"
    if not names:
        if not ok:
            raise EinpartError("int8: the spec has no matmul weights to quantise (a matmul weight is a float "
                               "parameter contracted with activations; embeddings read by take() and 1-D gains "
                               "are left alone)")
        return [mm[n] for n in ok]
    info = GraphInfo(graph)
    chosen: dict[str, MatmulWeight] = {}
    for n in names:
        if n in mm:
            if mm[n].why_not:
                raise EinpartError(f"int8: cannot quantise '{n}': {mm[n].why_not}")
            chosen[n] = mm[n]
            continue
        if n not in info.types:
            raise EinpartError(f"int8: unknown weight '{n}' (matmul weights: {listing})")
        derived = sorted(d for d in _derived_from(info, n) if d in mm and mm[d].why_not is None)
        if n not in info.weights or len(info.types[n].axes) < 2 or not derived:
            raise EinpartError(f"int8: '{n}' is not a matmul weight (matmul weights: {listing})")
        chosen.update((d, mm[d]) for d in derived)  # wq -> wq_attn_norm after defer-norm folded a gain
    return list(chosen.values())


@register_pass("int8")
@dataclass(frozen=True)
class Int8(Pass):
    """Weight-only int8 with per-output-channel scales moved past the matmul."""
    weights: tuple[str, ...] = ()

    def apply(self, graph: g.Graph) -> g.Graph:
        chosen = choose(graph, self.weights)
        info = GraphInfo(graph)
        name = Namer(info.names)
        add: dict[str, list[g.Statement]] = {}
        views = {}
        for w in chosen:
            typ = info.types[w.name]
            idx = typ.indices
            chan = tuple(i for k, i in enumerate(idx) if k not in w.summed)
            amax, scale, q = name(f"{w.name}_amax"), name(f"{w.name}_scale"), name(f"{w.name}_i8")
            read = g.Ref(w.name, idx)
            add.setdefault(info.block_of[w.name], []).extend([
                g.Statement(amax, g.tensor_type(chan), g.Compute(g.Unary("abs", read), "max")),
                g.Statement(scale, g.tensor_type(chan), g.Compute(
                    g.Binary("+", g.Binary("/", g.Ref(amax, chan), g.Const(QMAX)), g.Const(EPS)))),
                g.Statement(q, g.TensorType(typ.axes, "i8"), g.Compute(g.Binary("/", read, g.Ref(scale, chan)))),
            ])
            views[w.name] = _view(idx, chan, q, scale)
        quantised = edit_graph(graph, add=add)
        uses = {u for w in chosen for u in w.uses}
        # the scale leaves the sum by the defer rule; look through nothing else
        out, n = run_rounds(quantised, lambda s: Ctx(through_maps=False, override=views),
                            select=lambda s: s.name in uses)
        uses_left = [u for u in uses if out.stmt(u) is not None and is_contraction(out.stmt(u))]
        if n < len(uses) or uses_left:  # pragma: no cover - the rule always moves a channel scale
            raise EinpartError(f"int8: could not move the scale out of {', '.join(sorted(uses_left))}")
        return drop_newly_dead(graph, out)


def _view(idx, chan, q, scale):
    """How the rule sees a quantised weight read: w[..] == w_i8[..] * w_scale[channels]."""
    def view(ref: g.Ref) -> list[Term]:
        mapping = dict(zip(idx, ref.indices))
        return [Term(1.0, (g.Ref(q, ref.indices), rename_expr(g.Ref(scale, chan), mapping)))]
    return view
