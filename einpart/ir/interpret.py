"""The reference interpreter: the semantics of a spec, in plain numpy.

Every later pass and the generated JAX code are checked against it. It runs
one step of the model: given tokens at positions pos .. pos+T-1 and the state
(KV cache), it returns the outputs and the next state. Prefill is a step at
pos=0 over the prompt; decode is a step with T=1. Sizes of the inputs' axes
are taken from the arrays, so one graph serves both.
"""
from __future__ import annotations

import numpy as np

from ..errors import EinpartError
from . import graph as g
from .shapes import decl_shapes
from .verify import index_sizes, resolve_sizes

try:  # bfloat16 for numpy, shipped with jax; used only to round stored values
    import ml_dtypes
    _BF16 = ml_dtypes.bfloat16
except ImportError:  # pragma: no cover
    _BF16 = None

SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


_UNARY = {
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "tanh": np.tanh, "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)), "silu": lambda x: x / (1.0 + np.exp(-x)),
    "gelu": gelu_tanh, "relu": lambda x: np.maximum(x, 0), "abs": np.abs, "neg": np.negative,
}


def round_to(x: np.ndarray, dtype: str, compute) -> np.ndarray:
    """Round a value through its storage dtype, as a device would store it.

    Floats stored as i8 round to nearest and saturate at +-127 (symmetric int8)."""
    if dtype == "i8" and np.issubdtype(np.asarray(x).dtype, np.floating):
        return np.clip(np.rint(x), -127, 127).astype(compute)
    if dtype == "bf16" and _BF16 is not None:
        return x.astype(_BF16).astype(compute)
    if dtype == "f16":
        return x.astype(np.float16).astype(compute)
    return x.astype(compute, copy=False)


def bind_sizes(graph: g.Graph, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Sizes of the graph with those fixed by the input arrays' shapes."""
    overrides: dict[str, int] = {}
    size_of_index = graph.index_size_names()
    for d in graph.body.decls:
        if d.kind != "input":
            continue
        if d.name not in inputs:
            raise EinpartError(f"missing input '{d.name}'")
        shape = np.shape(inputs[d.name])
        if len(shape) != len(d.type.axes):
            raise EinpartError(f"input '{d.name}' has shape {shape}, expected {len(d.type.axes)} axes "
                               f"[{', '.join(d.type.indices)}]")
        for i, n in zip(d.type.indices, shape):
            overrides[size_of_index[i]] = int(n)
    return resolve_sizes(graph, overrides) | overrides


class _Eval:
    def __init__(self, graph, sizes, pos, compute):
        self.graph = graph
        self.sizes = sizes
        self.idx = index_sizes(graph, sizes)
        self.pos = int(pos)
        self.compute = compute
        self.new_state: dict[str, np.ndarray] = {}

    def align(self, arr: np.ndarray, have: tuple[str, ...], want: tuple[str, ...]) -> np.ndarray:
        """Transpose arr (axes named `have`) to the order of `want`, inserting size-1 axes."""
        order = [have.index(i) for i in want if i in have]
        arr = np.transpose(arr, order) if order != list(range(arr.ndim)) else arr
        shape = [self.idx[i] if i in have else 1 for i in want]
        return arr.reshape(shape)

    def expr(self, e, env, axes):
        if isinstance(e, g.Ref):
            return self.align(env[e.name], e.indices, axes)
        if isinstance(e, g.Const):
            return self.compute(e.value)
        if isinstance(e, g.SizeVal):
            return self.compute(self.sizes[e.name])
        if isinstance(e, g.Causal):
            t = np.arange(self.idx[e.t])[:, None]
            s = np.arange(self.idx[e.s])[None, :]
            mask = np.where(s <= self.pos + t, 0.0, g.NEG_INF).astype(self.compute)
            return self.align(mask, (e.t, e.s), axes)
        if isinstance(e, g.Unary):
            with np.errstate(over="ignore"):
                return _UNARY[e.fn](self.expr(e.x, env, axes))
        if isinstance(e, g.Binary):
            a, b = self.expr(e.lhs, env, axes), self.expr(e.rhs, env, axes)
            return {"+": np.add, "-": np.subtract, "*": np.multiply, "/": np.divide}[e.op](a, b)
        raise TypeError(e)

    def compute_op(self, s: g.Statement, op: g.Compute, env) -> np.ndarray:
        out = s.type.indices
        factors = g.product_factors(op.expr)
        if op.reduce == "sum" and factors is not None and all(isinstance(f, g.Ref) for f in factors):
            letters = {i: chr(ord("a") + n) for n, i in enumerate(g.expr_indices(op.expr))}
            spec = ",".join("".join(letters[i] for i in f.indices) for f in factors)
            spec += "->" + "".join(letters[i] for i in out)
            return np.einsum(spec, *[env[f.name] for f in factors], optimize=True)
        axes = g.expr_indices(op.expr)
        val = np.broadcast_to(self.expr(op.expr, env, axes), [self.idx[i] for i in axes])
        red = tuple(n for n, i in enumerate(axes) if i not in out)
        if op.reduce is not None:
            val = {"sum": np.sum, "max": np.max, "mean": np.mean}[op.reduce](val, axis=red)
            axes = tuple(i for i in axes if i in out)
        return self.align(val, axes, out)

    def take(self, s, op: g.Take, env):
        table = env[op.table.name]
        looked = next(i for i in op.table.indices if i not in s.type.indices)
        ax = op.table.indices.index(looked)
        if isinstance(op.ids, g.Position):
            ids = self.pos + np.arange(self.idx[op.ids.index])
            ids_axes = (op.ids.index,)
        else:
            ids = np.asarray(env[op.ids.name])
            ids_axes = op.ids.indices
        n = table.shape[ax]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise EinpartError(f"take(): id {int(ids.max() if ids.max() >= n else ids.min())} out of range "
                               f"for '{op.table.name}' axis {looked} of size {n} (statement '{s.name}')")
        val = np.take(table, ids, axis=ax)  # axes: table[:ax] + ids + table[ax+1:]
        rest = op.table.indices
        have = rest[:ax] + ids_axes + rest[ax + 1:]
        return self.align(val, have, s.type.indices)

    def write(self, s, op: g.Write, env):
        cache = env[op.cache.name]
        new = env[op.new.name]
        s_idx = next(i for i in op.cache.indices if i not in op.new.indices)
        t_idx = next(i for i in op.new.indices if i not in op.cache.indices)
        n_new, n_cache = self.idx[t_idx], self.idx[s_idx]
        if self.pos + n_new > n_cache:
            raise EinpartError(f"write to '{op.cache.name}': positions {self.pos}..{self.pos + n_new - 1} "
                               f"are past the cache length {n_cache}")
        order = tuple(t_idx if i == s_idx else i for i in op.cache.indices)
        upd = self.align(new, op.new.indices, order)
        out = cache.copy()
        where = [slice(None)] * cache.ndim
        where[op.cache.indices.index(s_idx)] = slice(self.pos, self.pos + n_new)
        out[tuple(where)] = upd
        self.new_state[op.cache.name] = out
        return self.align(out, op.cache.indices, s.type.indices)

    def rope(self, s, op: g.Rope, env):
        x = env[op.x.name]
        axes = op.x.indices
        n_at, n_pair = self.idx[op.at], self.idx[op.pair]
        half = n_pair // 2
        inv_freq = op.theta ** (-np.arange(half, dtype=np.float64) * 2.0 / n_pair)
        ang = (self.pos + np.arange(n_at, dtype=np.float64))[:, None] * inv_freq[None, :]
        cos = np.concatenate([np.cos(ang)] * 2, axis=1).astype(self.compute)
        sin = np.concatenate([np.sin(ang)] * 2, axis=1).astype(self.compute)
        k_ax = axes.index(op.pair)
        x1, x2 = np.split(x, 2, axis=k_ax)
        rot = np.concatenate([-x2, x1], axis=k_ax)
        cos = self.align(cos, (op.at, op.pair), axes)
        sin = self.align(sin, (op.at, op.pair), axes)
        return self.align(x * cos + rot * sin, axes, s.type.indices)

    def block(self, block: g.Block, env: dict):
        for s in block.stmts:
            op = s.op
            if isinstance(op, g.Compute):
                val = self.compute_op(s, op, env)
            elif isinstance(op, g.Take):
                val = self.take(s, op, env)
            elif isinstance(op, g.Write):
                val = self.write(s, op, env)
            elif isinstance(op, g.Rope):
                val = self.rope(s, op, env)
            elif isinstance(op, g.Repeat):
                val = self.repeat(op, env)
            else:  # pragma: no cover
                raise TypeError(op)
            env[s.name] = round_to(np.asarray(val), s.type.dtype, self.compute)

    def repeat(self, op: g.Repeat, env: dict):
        carry = env[op.init]
        stacked_states: dict[str, list] = {d.name: [] for d in op.body.decls if d.kind == "state"}
        for layer in range(self.idx[op.index]):
            inner = dict(env)
            for d in op.body.decls:
                inner[d.name] = self.stacked[d.name][layer]
            inner[op.carry] = carry
            self.block(op.body, inner)
            carry = inner[op.result]
            for name in stacked_states:
                stacked_states[name].append(self.new_state.pop(name))
        for name, layers in stacked_states.items():
            self.new_state[name] = np.stack(layers)
        return carry


def run_step(graph: g.Graph, params: dict, inputs: dict, state: dict, pos: int = 0,
             dtype=np.float32) -> tuple[dict, dict]:
    """One model step. Returns ({output: array}, {state: next array})."""
    compute = np.dtype(dtype).type
    sizes = bind_sizes(graph, inputs)
    ev = _Eval(graph, sizes, pos, compute)
    shapes = decl_shapes(graph, sizes)
    env: dict[str, np.ndarray] = {}
    ev.stacked = {}
    for name, info in shapes.items():
        kind = info.decl.kind
        source = {"param": params, "input": inputs, "state": state}[kind]
        if name not in source:
            raise EinpartError(f"missing {kind} '{name}'")
        arr = np.asarray(source[name])
        if arr.shape != info.shape:
            raise EinpartError(f"{kind} '{name}' has shape {arr.shape}, expected {info.shape} "
                               f"[{', '.join(info.axes)}]")
        if kind != "input":
            arr = round_to(arr, info.decl.type.dtype, compute)
        if info.stacked is None:
            env[name] = arr
        else:
            ev.stacked[name] = arr
    ev.block(graph.body, env)
    return {name: env[name] for name in graph.outputs}, ev.new_state
