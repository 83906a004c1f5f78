"""The jaxpr walker behind `trace`: one handler per JAX primitive.

Every array axis is a `_Dim`, a loop variable with a size; operations that
equate axes (elementwise ops, contracted and batch axes of dot_general) merge
the Dims' classes (union-find), and trace.py names each class at the end.
Values are `_Val`s: an IR expression whose Refs carry Dims instead of index
names, so elementwise chains stay one expression until a contraction, a
reduction, a second use or an output makes them a statement (`emit`).
Errors carry the user's file:line, taken from each equation's source_info.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jax._src import source_info_util as _siu  # the user frame of an equation (file:line)
from jax.extend import core as jcore

from ..errors import EinpartError
from ..ir import graph as g

_HERE = str(Path(__file__).resolve().parent)
_DTYPES = {"float32": "f32", "float64": "f64", "bfloat16": "bf16", "float16": "f16", "int32": "i32", "int8": "i8"}
_UNARY = {"exp": "exp", "log": "log", "tanh": "tanh", "logistic": "sigmoid", "sqrt": "sqrt", "rsqrt": "rsqrt",
          "abs": "abs", "neg": "neg"}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_IDENTITY = ("stop_gradient", "copy", "copy_p", "reduce_precision", "optimization_barrier")
_LAYOUT = ("convert_element_type", "broadcast_in_dim", "transpose", "reshape", "squeeze", "expand_dims")
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr")
SUPPORTED = "einsum (dot_general), elementwise arithmetic, exp/log/tanh/logistic/sqrt/rsqrt, " \
            "sum/max/min reductions, broadcasts, reshapes that add or drop size-1 axes, and transposes"


class _Class:
    """Union-find node: axes known to be one dimension. `first` orders classes for naming."""
    __slots__ = ("parent", "first", "hint")

    def __init__(self, first: int, hint: str | None):
        self.parent, self.first, self.hint = self, first, hint

    def root(self) -> "_Class":
        c = self
        while c.parent is not c:
            c.parent = c.parent.parent
            c = c.parent
        return c


class _Dim:
    """One loop variable (an axis of a value); identity matters, not equality."""
    __slots__ = ("id", "size", "cls")

    def __init__(self, id_: int, size: int, cls: _Class):
        self.id, self.size, self.cls = id_, size, cls


@dataclass
class _Val:
    """A traced value: an IR expression whose Refs carry _Dims instead of index names."""
    expr: object
    dims: tuple            # per array axis: a _Dim, or None for a size-1 axis made by broadcasting
    dtype: str = "f32"

    def is_ref(self) -> bool:
        return isinstance(self.expr, g.Ref) and self.expr.indices == tuple(d for d in self.dims if d is not None)


@dataclass
class _Stmt:
    name: str
    dims: tuple
    expr: object
    reduce: str | None
    dtype: str
    contraction: bool = False   # made by dot_general: stays an einsum (never turned into mean)
    auto: bool = True           # named y1, y2, ...: may be renamed after an output


def _leaf_dims(e) -> list:
    out: dict = {}
    for r in g.expr_refs(e):
        out.update(dict.fromkeys(r.indices))
    return list(out)


def _subst(e, m: dict):
    """Rename Dims in an expression, all at once (so a swap is a swap)."""
    if isinstance(e, g.Ref):
        return g.Ref(e.name, tuple(m.get(d, d) for d in e.indices))
    if isinstance(e, g.Unary):
        return g.Unary(e.fn, _subst(e.x, m))
    if isinstance(e, g.Binary):
        return g.Binary(e.op, _subst(e.lhs, m), _subst(e.rhs, m))
    return e


_FOLD = {"exp": np.exp, "log": np.log, "tanh": np.tanh, "sqrt": np.sqrt, "rsqrt": lambda x: 1 / np.sqrt(x),
         "abs": np.abs, "neg": np.negative, "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
         "+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}


def _fold(e):
    """Constant arithmetic is done now, in float32 as JAX would (`/ sqrt(4.0)` prints as `/ 2.0`)."""
    args = [e.x] if isinstance(e, g.Unary) else [e.lhs, e.rhs]
    if all(isinstance(a, g.Const) for a in args):
        with np.errstate(all="ignore"):
            value = float(_FOLD[e.fn if isinstance(e, g.Unary) else e.op](*[np.float32(a.value) for a in args]))
        if math.isfinite(value):
            return g.Const(value)
    return e


def _relu_diff(a, b):
    return g.Unary("relu", g.Binary("-", a, b))


def _where(source_info, outer: str) -> str:
    """file:line of the innermost user frame (not JAX, not einpart), else the enclosing call's."""
    tb = getattr(source_info, "traceback", None)
    if tb is not None:
        for fr in _siu.user_frames(tb):
            if not fr.file_name.startswith(_HERE):
                return f"{fr.file_name}:{fr.start_line}"
    return outer


def find_control_flow(jaxpr, outer: str) -> EinpartError | None:
    """The first while/cond anywhere (calls included): reported before the ops computing its predicate."""
    for eqn in jaxpr.eqns:
        where = _where(eqn.source_info, outer)
        if eqn.primitive.name in ("while", "cond"):
            return _unsupported(eqn.primitive.name, where)
        for inner in jcore.jaxprs_in_params(eqn.params):
            found = find_control_flow(inner, where)
            if found is not None:
                return found
    return None


def _fail(where: str, message: str) -> EinpartError:
    return EinpartError(f"{where}: error: {message}")


def _unsupported(prim: str, where: str) -> EinpartError:
    if prim in ("while", "cond"):
        return _fail(where, f"cannot trace '{prim}': data-dependent control flow has no einsum form")
    if prim == "scan":
        return _fail(where, "cannot trace 'scan': write the loop as a Python loop, which unrolls when traced")
    return _fail(where, f"cannot trace '{prim}': einpart traces {SUPPORTED}")


class _Tracer:
    def __init__(self):
        self.count = 0
        self.decls: list[tuple[str, str, tuple, str]] = []   # kind, name, dims, dtype
        self.stmts: list[_Stmt] = []
        self.names: set[str] = set()
        self.n_stmt = 0

    # -- dimensions ---------------------------------------------------------
    def fresh(self, size: int, *likes: _Dim, hint: str | None = None) -> _Dim:
        d = _Dim(self.count, int(size), _Class(self.count, hint))
        self.count += 1
        for other in likes:
            a, b = d.cls.root(), other.cls.root()
            if a is not b:
                lo, hi = (a, b) if a.first < b.first else (b, a)
                hi.parent = lo
                lo.hint = lo.hint or hi.hint
        return d

    # -- statements ---------------------------------------------------------
    def emit(self, dims: tuple, expr, reduce: str | None, dtype: str, where: str) -> _Val:
        real = tuple(d for d in dims if d is not None)
        if not real:
            raise _fail(where, "the result is a scalar; einpart tensors keep at least one axis")
        leaves = _leaf_dims(expr)
        for i, d in enumerate(dims):
            if d is not None and d not in leaves:
                raise _fail(where, f"axis {i} (size {d.size}) is a broadcast that no operand supplies; "
                                   f"einpart cannot materialise it")
        while True:
            self.n_stmt += 1
            name = f"y{self.n_stmt}"
            if name not in self.names:
                break
        self.names.add(name)
        self.stmts.append(_Stmt(name, real, expr, reduce, dtype))
        return _Val(g.Ref(name, real), dims, dtype)

    def materialize(self, v: _Val, where: str) -> _Val:
        return v if v.is_ref() else self.emit(v.dims, v.expr, None, v.dtype, where)

    def shared(self, v: _Val, uses: int, where: str) -> _Val:
        """A value used more than once becomes a statement (if it can), so work is not repeated."""
        if isinstance(v, _Lazy):
            return v
        if uses > 1 and not v.is_ref() and not isinstance(v.expr, g.Const):
            leaves = _leaf_dims(v.expr)
            if all(d is None or d in leaves for d in v.dims) and any(d is not None for d in v.dims):
                return self.materialize(v, where)
        return v

    # -- jaxprs -------------------------------------------------------------
    def run(self, jaxpr, consts, ins: list[_Val], outer: str) -> list[_Val]:
        uses = Counter(v for e in jaxpr.eqns for v in e.invars if isinstance(v, jcore.Var))
        uses.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
        env = {}
        for var, c in zip(jaxpr.constvars, consts):
            env[var] = self.constant(c, var, jaxpr, outer)
        for var, v in zip(jaxpr.invars, ins):
            env[var] = self.shared(v, uses[var], outer)
        for eqn in jaxpr.eqns:
            where = _where(eqn.source_info, outer)
            vals = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, vals, where)
            for var, v in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    if not isinstance(v, _Lazy):
                        v.dtype = _DTYPES.get(str(var.aval.dtype), str(var.aval.dtype))
                    env[var] = self.shared(v, uses[var], where)
        return [self.read(env, v) for v in jaxpr.outvars]

    def read(self, env, var) -> _Val:
        if isinstance(var, jcore.Literal):
            return _Val(g.Const(float(np.asarray(var.val))), (), _DTYPES.get(str(var.aval.dtype), "f32"))
        return env[var]

    def constant(self, c, var, jaxpr, outer: str) -> _Val:
        """A captured constant: a scalar or a uniform fill becomes a Const; an array is an error."""
        arr = np.asarray(c)
        flat = arr.reshape(-1)
        if arr.dtype.kind == "f" and (flat.size == 0 or np.all(flat == flat[0])):
            dims = tuple(None if n == 1 else self.fresh(n) for n in arr.shape)
            return _Val(g.Const(float(flat[0]) if flat.size else 0.0), dims)
        where = next((_where(e.source_info, outer) for e in jaxpr.eqns if var in e.invars), outer)
        return _Lazy(_fail(where, f"the function captures a constant array of shape {tuple(arr.shape)}; "
                                  f"pass it as an argument so that it becomes an input or param"))

    def eqn(self, eqn, vals: list, where: str) -> list[_Val]:
        prim = eqn.primitive.name
        if prim in _CALLS:
            inner = next((p for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if (p := eqn.params.get(k)) is not None),
                         None)
            if isinstance(inner, jcore.ClosedJaxpr):
                return self.run(inner.jaxpr, inner.consts, vals, where)
            if isinstance(inner, jcore.Jaxpr):
                return self.run(inner, [], vals, where)
            raise _unsupported(prim, where)
        if prim in _IDENTITY:
            return list(vals)
        handler = getattr(self, "p_" + prim, None)
        if handler is None and prim not in _UNARY and prim not in _BINARY:
            raise _unsupported(prim, where)
        for v in vals:
            if isinstance(v, _Lazy):
                raise v.error
            if v.dtype not in g.FLOAT_DTYPES and prim not in _LAYOUT:
                raise _fail(where, f"cannot trace '{prim}' on {v.dtype} values: einpart computes in floats")
        if prim in _UNARY:
            (x,) = vals
            return [_Val(_fold(g.Unary(_UNARY[prim], x.expr)), x.dims)]
        if prim in _BINARY:
            (a, b), dims = self.combine(vals, where)
            return [_Val(_fold(g.Binary(_BINARY[prim], a, b)), dims)]
        return handler(eqn, vals, where)

    # -- elementwise --------------------------------------------------------
    def combine(self, vals: list[_Val], where: str) -> tuple[list, tuple]:
        """Line operands up axis by axis (numpy broadcasting of size-1 axes); unify equal axes."""
        rank = max(len(v.dims) for v in vals)
        if any(len(v.dims) not in (0, rank) for v in vals):
            raise _fail(where, "operands of different ranks")
        maps = [{} for _ in vals]
        dims = []
        for i in range(rank):
            real = [(k, v.dims[i]) for k, v in enumerate(vals) if v.dims and v.dims[i] is not None]
            if not real:
                dims.append(None)
                continue
            if len({d.size for _, d in real}) > 1:
                raise _fail(where, "broadcasts an argument's size-1 axis against a longer one; "
                                   "reshape the argument instead")
            nd = self.fresh(real[0][1].size, *[d for _, d in real])
            for k, d in real:
                maps[k][d] = nd
            dims.append(nd)
        return [_subst(v.expr, m) for v, m in zip(vals, maps)], tuple(dims)

    def p_max(self, eqn, vals, where):
        return [self.minmax(vals, where, -math.inf, lambda a, b: g.Binary("+", b, _relu_diff(a, b)))]

    def p_min(self, eqn, vals, where):
        return [self.minmax(vals, where, math.inf, lambda a, b: g.Binary("-", a, _relu_diff(a, b)))]

    def minmax(self, vals, where, neutral: float, general) -> _Val:
        """max(x, -inf) = x; max(x, 0) = relu(x); otherwise b + relu(a - b) (min: a - relu(a - b))."""
        (a, b), dims = self.combine(vals, where)
        for x, y in ((a, b), (b, a)):
            if isinstance(y, g.Const) and y.value == neutral:
                return _Val(x, dims)
            if isinstance(y, g.Const) and y.value == 0.0 and neutral < 0:
                return _Val(g.Unary("relu", x), dims)
        return _Val(general(a, b), dims)

    def p_square(self, eqn, vals, where):
        return [_Val(g.Binary("*", vals[0].expr, vals[0].expr), vals[0].dims)]

    def p_integer_pow(self, eqn, vals, where):
        return [self.power(vals[0], eqn.params["y"], where)]

    def p_pow(self, eqn, vals, where):
        y = vals[1].expr
        if isinstance(y, g.Const) and not vals[1].dims:
            if y.value in (0.5, -0.5):
                return [_Val(g.Unary("sqrt" if y.value > 0 else "rsqrt", vals[0].expr), vals[0].dims)]
            if float(y.value).is_integer():
                return [self.power(vals[0], int(y.value), where)]
        raise _fail(where, "cannot trace 'pow': only constant exponents (integers, 0.5, -0.5) are supported")

    def power(self, x: _Val, y: int, where: str) -> _Val:
        if y == 0:
            return _Val(g.Const(1.0), x.dims)
        e = x.expr
        for _ in range(abs(y) - 1):
            e = g.Binary("*", e, x.expr)
        return _Val(g.Binary("/", g.Const(1.0), e) if y < 0 else e, x.dims)

    def p_exp2(self, eqn, vals, where):
        return [_Val(g.Unary("exp", g.Binary("*", vals[0].expr, g.Const(math.log(2.0)))), vals[0].dims)]

    def p_convert_element_type(self, eqn, vals, where):
        (x,) = vals
        new = _DTYPES.get(str(np.dtype(eqn.params["new_dtype"])))
        if new not in g.FLOAT_DTYPES or x.dtype not in g.FLOAT_DTYPES:
            raise _fail(where, f"cannot trace 'convert_element_type' from {x.dtype} to "
                               f"{new or eqn.params['new_dtype']}: only float casts are supported")
        if new == x.dtype:
            return [x]
        return [self.emit(x.dims, x.expr, None, new, where)]

    # -- contractions and reductions ------------------------------------------
    def p_dot_general(self, eqn, vals, where):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        # an operand that is a plain read (transposed or not) is used as it is; an expression is a statement first
        lhs, rhs = (v if isinstance(v.expr, g.Ref) else self.materialize(v, where) for v in vals)
        lmap, rmap = {}, {}

        def pair(dl, dr):
            if dl is None and dr is None:
                return None
            nd = self.fresh((dl or dr).size, *[d for d in (dl, dr) if d is not None])
            if dl is not None:
                lmap[dl] = nd
            if dr is not None:
                rmap[dr] = nd
            return nd

        dims = [pair(lhs.dims[a], rhs.dims[b]) for a, b in zip(lb, rb)]
        contracted = [pair(lhs.dims[a], rhs.dims[b]) for a, b in zip(lc, rc)]
        for val, m, skip in ((lhs, lmap, set(lc) | set(lb)), (rhs, rmap, set(rc) | set(rb))):
            for i, d in enumerate(val.dims):
                if i not in skip:
                    dims.append(None if d is None else m.setdefault(d, self.fresh(d.size, d)))
        expr = g.Binary("*", _subst(lhs.expr, lmap), _subst(rhs.expr, rmap))
        if any(c is not None for c in contracted):
            out = self.emit(tuple(dims), expr, "sum", lhs.dtype, where)
            self.stmts[-1].contraction = True
            return [out]
        return [_Val(expr, tuple(dims), lhs.dtype)]

    def reduction(self, vals, axes, how: str, where: str) -> _Val:
        (x,) = vals
        keep = tuple(d for i, d in enumerate(x.dims) if i not in axes)
        leaves = _leaf_dims(x.expr)
        expr = g.Unary("neg", x.expr) if how == "min" else x.expr
        covered = False
        for i in axes:
            d = x.dims[i]
            if d is not None and d in leaves:
                covered = True
            elif d is not None and how == "sum":  # summing a pure broadcast multiplies by its size
                expr = g.Binary("*", expr, g.Const(float(d.size)))
        if covered and all(d is None for d in keep):  # fails where used: `if x.sum() > 0` is reported as control flow
            return _Lazy(_fail(where, "the result is a scalar; einpart tensors keep at least one axis"))
        out = self.emit(keep, expr, "sum" if how == "sum" else "max", x.dtype, where) if covered else _Val(expr, keep)
        return _Val(g.Unary("neg", out.expr), keep) if how == "min" else out

    def p_reduce_sum(self, eqn, vals, where):
        return [self.reduction(vals, tuple(eqn.params["axes"]), "sum", where)]

    def p_reduce_max(self, eqn, vals, where):
        return [self.reduction(vals, tuple(eqn.params["axes"]), "max", where)]

    def p_reduce_min(self, eqn, vals, where):
        return [self.reduction(vals, tuple(eqn.params["axes"]), "min", where)]

    # -- layout -------------------------------------------------------------
    def p_transpose(self, eqn, vals, where):
        (x,) = vals
        return [_Val(x.expr, tuple(x.dims[p] for p in eqn.params["permutation"]), x.dtype)]

    def p_broadcast_in_dim(self, eqn, vals, where):
        x = vals[0]
        shape, bdims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        in_shape = eqn.invars[0].aval.shape
        dims: list = [None] * len(shape)
        for i, od in enumerate(bdims):
            d = x.dims[i]
            if in_shape[i] == shape[od]:
                dims[od] = d
            elif d is None:
                dims[od] = self.fresh(shape[od])
            else:
                raise _fail(where, "broadcasts an argument's size-1 axis against a longer one; "
                                   "reshape the argument instead")
        for od, n in enumerate(shape):
            if od not in bdims:
                dims[od] = None if n == 1 else self.fresh(n)
        return [_Val(x.expr, tuple(dims), x.dtype)]

    def p_reshape(self, eqn, vals, where):
        if eqn.params.get("dimensions") is not None:
            raise _unsupported("reshape", where)
        return [self.reshape(eqn, vals[0], where)]

    def p_squeeze(self, eqn, vals, where):
        return [self.reshape(eqn, vals[0], where)]

    def p_expand_dims(self, eqn, vals, where):
        return [self.reshape(eqn, vals[0], where)]

    def reshape(self, eqn, x: _Val, where: str) -> _Val:
        """Only size-1 axes may come or go; merging or splitting axes has no IR form."""
        old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if [n for n in old if n != 1] != [n for n in new if n != 1]:
            raise _fail(where, f"cannot trace 'reshape' {list(old)} -> {list(new)}: it merges or splits axes, "
                               f"which einpart's IR cannot express; give the arguments the split shape")
        kept = iter(d for d, n in zip(x.dims, old) if n != 1)
        dims = tuple(None if n == 1 else next(kept) for n in new)
        leaves = _leaf_dims(x.expr)
        if any(d is not None and n == 1 and d in leaves for d, n in zip(x.dims, old)):
            # an argument's own size-1 axis disappears: sum over it (a sum of one element)
            return self.emit(dims, x.expr, "sum", x.dtype, where)
        return _Val(x.expr, dims, x.dtype)


class _Lazy:
    """A value that fails when used (a captured constant array), so the error names the line that uses it."""

    def __init__(self, error: EinpartError):
        self.error = error
        self.dims = ()
        self.expr = None

    def is_ref(self):
        return False
