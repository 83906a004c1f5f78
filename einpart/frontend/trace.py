"""JAX function -> einpart IR, through its jaxpr.

Why a jaxpr: `jax.make_jaxpr` already flattens the user's Python (loops
unroll, helpers and `jit`s inline, `jnp.einsum` becomes `dot_general` plus
transposes), so the tracer translates a few dozen primitives, not Python.

Why dimensions are unified rather than named up front: every array axis the
tracer meets is a `_Dim`, a loop variable with a size. Operations that equate
axes (elementwise ops, contracted and batch axes of `dot_general`) merge the
Dims' classes (union-find). At the end each class becomes one size (upper
case) and one index (lower case), so `--set` on a traced graph changes every
axis that is the same dimension and nothing else. When one tensor needs two
axes of one class (attention scores over one sequence, [t, t2]), the second
role gets an alias index over the same size; IR reads name axes positionally,
so a tensor may be read under any alias of its class.

Why elementwise work stays lazy: an op builds an expression tree and only a
contraction, a reduction, a value used twice, or an output becomes a
statement, so `x * rsqrt(mean(x * x) + eps) * g` prints as the two statements
a person would write, not eight.

Size-1 axes made by broadcasting (`keepdims=True`, `x[:, None]`) are not IR
axes: they are dropped, so an output of shape [2, 1] becomes a tensor [a].
"""
from __future__ import annotations

import inspect
import math
import re
import traceback

import jax
import numpy as np
from jax._src import source_info_util as _siu

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.parser import parse
from ..ir.printer import format_graph
from ._jaxpr import _DTYPES, _HERE, SUPPORTED, _Class, _fail, _Lazy, _leaf_dims, _Stmt, _Tracer, _Val, find_control_flow

__all__ = ["trace", "named_args", "SUPPORTED"]


def _sanitize(name: str) -> str:
    name = re.sub(r"\W", "_", name).strip("_") or "x"
    if name[0].isdigit():
        name = "x" + name
    return name + "_" if name in g.RESERVED else name


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return f"_{getattr(k, attr)}"
    return f"_{k}"


def _leaves(fn, args, names) -> list[tuple[str, str, object]]:
    """(leaf name, argument name, array) for every leaf, in jaxpr invar order."""
    if names is None:
        try:
            params = [p.name for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            params = []
        names = params[:len(args)] + [f"arg{i}" for i in range(len(params), len(args))]
    names = list(names)
    if len(names) != len(args):
        raise EinpartError(f"trace: {len(names)} names for {len(args)} arguments")
    out, seen = [], set()
    for arg_name, a in zip(names, args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            name = base = _sanitize(arg_name + "".join(_key(k) for k in path))
            n = 1
            while name in seen:
                n += 1
                name = f"{base}_{n}"
            seen.add(name)
            out.append((name, arg_name, leaf))
    return out


def named_args(fn, *args, names=None, params=()) -> tuple[dict, dict]:
    """The example arguments under their declaration names: (params, inputs), for run_step."""
    ps, ins = {}, {}
    for name, arg_name, leaf in _leaves(fn, args, names):
        (ps if arg_name in params or name in params else ins)[name] = np.asarray(leaf)
    return ps, ins


def _use_mean(stmts: list[_Stmt], outputs: set[str]) -> None:
    """sum(x) / n, where n counts the summed elements, becomes mean(x): it then follows --set."""
    for s in stmts:
        if s.reduce != "sum" or s.name in outputs or s.contraction:
            continue
        n = math.prod(d.size for d in _leaf_dims(s.expr) if d not in s.dims)
        ok = [True]

        def scan(e, parent_ok):
            if isinstance(e, g.Ref):
                if e.name == s.name and not parent_ok:
                    ok[0] = False
            elif isinstance(e, g.Unary):
                scan(e.x, False)
            elif isinstance(e, g.Binary):
                good = e.op == "/" and isinstance(e.rhs, g.Const) and e.rhs.value == float(n)
                scan(e.lhs, good)
                scan(e.rhs, False)

        def fix(e):
            if isinstance(e, g.Binary):
                if e.op == "/" and isinstance(e.lhs, g.Ref) and e.lhs.name == s.name:
                    return e.lhs
                return g.Binary(e.op, fix(e.lhs), fix(e.rhs))
            if isinstance(e, g.Unary):
                return g.Unary(e.fn, fix(e.x))
            return e

        users = [t for t in stmts if any(r.name == s.name for r in g.expr_refs(t.expr))]
        for t in users:
            scan(t.expr, False)
        if users and ok[0]:
            s.reduce = "mean"
            for t in users:
                t.expr = fix(t.expr)


def _build(tr: _Tracer, outputs: list[str], source: str) -> g.Graph:
    """Name every class (sizes upper case, indices lower case, aliases a2, a3...) and print the graph."""
    _use_mean(tr.stmts, set(outputs))
    all_dims = [d for _, _, dims, _ in tr.decls for d in dims]
    for s in tr.stmts:
        all_dims += list(s.dims) + _leaf_dims(s.expr)
    roots: dict[_Class, None] = {}
    for d in sorted(all_dims, key=lambda d: d.cls.root().first):
        roots.setdefault(d.cls.root())
    taken: set[str] = set()
    auto = (c + (str(n) if n else "") for n in range(1000) for c in "abcdefghijklmnopqrstuvwxyz")
    aliases: dict[_Class, list[str]] = {}
    for r in roots:
        name = r.hint if r.hint and r.hint not in taken and r.hint.upper() not in taken else None
        while name is None or name in taken or name.upper() in taken:
            name = next(auto)
        taken |= {name, name.upper()}
        aliases[r] = [name]
    used: dict[str, None] = {}

    def names_for(dims) -> dict:
        got: dict = {}
        for d in dims:
            if d in got:
                continue
            r = d.cls.root()
            have = set(got.values())
            pick = next((n for n in aliases[r] if n not in have), None)
            k = len(aliases[r])
            while pick is None:
                k += 1
                cand = f"{aliases[r][0]}{k}"
                if cand not in taken:
                    taken.add(cand)
                    aliases[r].append(cand)
                    pick = cand
            got[d] = pick
            used[pick] = None
        return got

    def expr_of(e, m):
        if isinstance(e, g.Ref):
            return g.Ref(e.name, tuple(m[d] for d in e.indices))
        if isinstance(e, g.Unary):
            return g.Unary(e.fn, expr_of(e.x, m))
        if isinstance(e, g.Binary):
            return g.Binary(e.op, expr_of(e.lhs, m), expr_of(e.rhs, m))
        return e

    decls = []
    for kind, name, dims, dtype in tr.decls:
        m = names_for(dims)
        decls.append(g.Decl(kind, name, g.tensor_type([m[d] for d in dims], dtype)))
    stmts = []
    for s in tr.stmts:
        m = names_for(list(s.dims) + _leaf_dims(s.expr))
        stmts.append(g.Statement(s.name, g.tensor_type([m[d] for d in s.dims], s.dtype),
                                 g.Compute(expr_of(s.expr, m), s.reduce)))
    sizes = [g.SizeDecl(ns[0].upper(), g.SizeLit(next(d.size for d in all_dims if d.cls.root() is r)))
             for r, ns in aliases.items() if any(n in used for n in ns)]
    indices = [g.IndexDecl(n, ns[0].upper()) for r, ns in aliases.items() for n in ns if n in used]
    graph = g.Graph(tuple(sizes), tuple(indices), g.Block(tuple(decls), tuple(stmts)), tuple(outputs))
    try:
        text = format_graph(graph)
    except ValueError as e:  # an inf or nan constant left in the graph
        raise EinpartError(f"trace: {e}; einpart constants are finite") from None
    return parse(text, file=source)


def _python_error(e: Exception) -> EinpartError:
    """A JAX tracing error raised by the user's Python (an `if` on a traced value) -> file:line."""
    where = "<unknown>"
    for fr in traceback.extract_tb(e.__traceback__):
        if _siu.is_user_filename(fr.filename) and not fr.filename.startswith(_HERE):
            where = f"{fr.filename}:{fr.lineno}"
    if isinstance(e, jax.errors.ConcretizationTypeError):
        return _fail(where, "data-dependent control flow: Python 'if', 'while' or int() on a traced value "
                            "cannot be traced")
    return _fail(where, f"cannot trace: {type(e).__name__} (a traced value was used outside JAX)")


def trace(fn, *example_args, names=None, params=(), axes=None, outputs=None) -> g.Graph:
    """Turn a JAX function into a verified einpart Graph.

    names:   the arguments' names (default: fn's parameter names); pytree
             arguments give one declaration per leaf (`layers_0_w1`).
    params:  argument (or leaf) names declared `param`; the rest are `input`.
    axes:    optional index names per leaf, e.g. {"x": "btd"}: the class of each
             axis takes that name (size: upper case); others are invented.
    outputs: names of the results (default `out`, or `out0, out1, ...`).
    Feed the interpreter with `named_args(fn, *example_args, params=...)`.
    """
    leaves = _leaves(fn, example_args, names)
    axes = dict(axes or {})
    known = {n for n, _, _ in leaves} | {a for _, a, _ in leaves}
    for n in list(params) + list(axes):
        if n not in known:
            raise EinpartError(f"trace: no argument named '{n}' (arguments: {', '.join(sorted(known))})")
    try:
        closed = jax.make_jaxpr(fn)(*example_args)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
        raise _python_error(e) from None
    try:
        where = f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (TypeError, OSError):
        where = "<unknown>"
    tr = _Tracer()
    control = find_control_flow(closed.jaxpr, where)
    if control is not None:
        raise control
    ins = []
    for name, arg_name, leaf in leaves:
        arr = np.asarray(leaf) if not hasattr(leaf, "shape") else leaf
        dtype = _DTYPES.get(str(arr.dtype))
        if dtype is None or not arr.shape:
            what = f"dtype {arr.dtype}" if dtype is None else "a scalar (einpart tensors have at least one axis)"
            raise _fail(where, f"argument '{name}' is {what}; close over it or pass an array")
        hint = axes.get(name, axes.get(arg_name))
        if hint is not None and len(hint) != len(arr.shape):
            raise EinpartError(f"trace: axes for '{name}' name {len(hint)} axes, but it has {len(arr.shape)}")
        dims = tuple(tr.fresh(n, hint=_sanitize(hint[i]).lower() if hint else None) for i, n in enumerate(arr.shape))
        kind = "param" if (name in params or arg_name in params) else "input"
        tr.decls.append((kind, name, dims, dtype))
        tr.names.add(name)
        ins.append(_Val(g.Ref(name, dims), dims, dtype))
    results = tr.run(closed.jaxpr, closed.consts, ins, where)
    out_names = list(outputs) if outputs is not None else (
        ["out"] if len(results) == 1 else [f"out{i}" for i in range(len(results))])
    if len(out_names) != len(results):
        raise EinpartError(f"trace: {len(out_names)} output names for {len(results)} results")
    renamed: dict[str, str] = {}
    for name, v in zip(out_names, results):
        if isinstance(v, _Lazy):
            raise v.error
        if name in tr.names or not re.fullmatch(r"[A-Za-z_]\w*", name) or name in g.RESERVED:
            raise EinpartError(f"trace: '{name}' cannot name an output (taken, reserved or not a name)")
        v = _Val(_renamed(v.expr, renamed), v.dims, v.dtype)  # earlier outputs may have renamed what it reads
        stmt = None
        if v.is_ref():
            stmt = next((s for s in tr.stmts if s.name == v.expr.name and s.auto), None)
        if stmt is None:  # an expression, a transposed read, an argument or another output: a new statement
            tr.emit(v.dims, v.expr, None, v.dtype, where)
            stmt = tr.stmts[-1]
        renamed[stmt.name] = name
        for s in tr.stmts:
            s.expr = _renamed(s.expr, {stmt.name: name})
        stmt.name, stmt.auto = name, False
        tr.names.add(name)
    return _build(tr, list(out_names), f"<trace {getattr(fn, '__name__', 'fn')}>")


def _renamed(e, names: dict):
    if isinstance(e, g.Ref):
        return g.Ref(names.get(e.name, e.name), e.indices)
    if isinstance(e, g.Unary):
        return g.Unary(e.fn, _renamed(e.x, names))
    if isinstance(e, g.Binary):
        return g.Binary(e.op, _renamed(e.lhs, names), _renamed(e.rhs, names))
    return e
