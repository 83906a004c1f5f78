"""einpart.frontend.trace: JAX functions -> IR.

Each traced graph must verify, survive print -> parse, and compute what the
JAX function computes when run by the reference interpreter. Unsupported
primitives must fail with an error naming the primitive and the user's line.
"""
from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einpart.errors import EinpartError
from einpart.frontend.trace import SUPPORTED, named_args, trace
from einpart.ir.interpret import run_step
from einpart.ir.parser import parse
from einpart.ir.printer import format_graph

RNG = np.random.default_rng(0)


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def run_traced(fn, *args, params=(), **kw):
    graph = trace(fn, *args, params=params, **kw)
    assert parse(format_graph(graph)) == graph
    ps, ins = named_args(fn, *args, params=params)
    outs, _ = run_step(graph, ps, ins, {})
    return graph, outs


def check(fn, *args, params=(), rtol=1e-5, atol=1e-5, **kw):
    graph, outs = run_traced(fn, *args, params=params, **kw)
    want = np.asarray(fn(*args))
    got = outs[graph.outputs[0]]
    np.testing.assert_allclose(got, want.reshape(got.shape), rtol=rtol, atol=atol)
    return graph


# ---------------------------------------------------------------- models
def mlp(x, w1, w2):
    return jax.nn.gelu(jnp.einsum("bd,df->bf", x, w1)) @ w2


def test_mlp_prints_as_a_person_would_write_it():
    graph = check(mlp, rand(2, 8), rand(8, 16), rand(16, 8), params=("w1", "w2"), axes={"x": "bd"})
    text = format_graph(graph)
    assert text.splitlines()[:5] == [
        "size B = 2, D = 8, A = 16, C = 8",
        "index b: B, d: D, a: A, c: C",
        "input x[b, d]",
        "param w1[d, a]",
        "param w2[a, c]",
    ]
    assert "y1[b, a] = x[b, d] * w1[d, a]" in text
    assert text.splitlines()[-2:] == ["out[b, c] = y2[b, a] * w2[a, c]", "output out"]


def attention(x, wq, wk, wv):
    q, k, v = x @ wq, x @ wk, x @ wv
    scores = jnp.einsum("tk,sk->ts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return jax.nn.softmax(scores, axis=-1) @ v


def test_softmax_attention_one_head_uses_two_roles_of_one_sequence():
    graph = check(attention, rand(5, 8), rand(8, 4), rand(8, 4), rand(8, 4), params=("wq", "wk", "wv"),
                  axes={"x": "td"})
    text = format_graph(graph)
    assert "index t: T, t2: T" in text  # queries and keys range over one sequence: one size, two indices
    assert "[t, t2] = " in text and "max(" in text and "exp(" in text
    assert "/ 2.0" in text  # sqrt(4) folded


def rmsnorm_linear(x, g, w):
    ms = jnp.mean(x * x, axis=-1, keepdims=True)
    return (x * jax.lax.rsqrt(ms + 1e-6) * g) @ w


def test_rmsnorm_linear_uses_mean():
    graph = check(rmsnorm_linear, rand(2, 3, 8), rand(8), rand(8, 6), params=("g", "w"), axes={"x": "btd"})
    text = format_graph(graph)
    assert "y1[b, t] = mean(x[b, t, d] * x[b, t, d])" in text
    assert "rsqrt(y1[b, t] + 9.99999997" in text


def two_layers(x, layers, unembed):
    heads, size = layers[0]["wq"].shape[1:]
    for p in layers:  # a Python loop: unrolled by tracing
        h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * p["norm"]
        q = jnp.einsum("td,dhk->thk", h, p["wq"])
        k = jnp.einsum("td,dhk->thk", h, p["wk"])
        v = jnp.einsum("td,dhk->thk", h, p["wv"])
        a = jax.nn.softmax(jnp.einsum("thk,shk->hts", q, k) * size ** -0.5, axis=-1)
        x = x + jnp.einsum("hts,shk,hkd->td", a, v, p["wo"])
        x = x + jax.nn.silu(x @ p["w_up"]) @ p["w_down"]
    return x @ unembed


def test_two_layer_model_written_with_a_python_loop():
    d, f, h, k = 8, 16, 2, 4
    layers = [dict(norm=1 + 0.1 * rand(d), wq=rand(d, h, k), wk=rand(d, h, k), wv=rand(d, h, k),
                   wo=0.3 * rand(h, k, d), w_up=0.3 * rand(d, f), w_down=0.3 * rand(f, d)) for _ in range(2)]
    graph = check(two_layers, rand(5, d), layers, rand(d, 11), params=("layers", "unembed"), axes={"x": "td"},
                  rtol=1e-4, atol=1e-4)
    decls = {d.name: d.kind for d in graph.body.decls}
    assert decls["x"] == "input" and decls["layers_1_wq"] == "param" and decls["unembed"] == "param"
    text = format_graph(graph)
    assert text.count("mean(") == 2 and text.count("index t: T, t2: T") == 1
    assert format_graph(trace(two_layers, rand(5, d), layers, rand(d, 11), params=("layers", "unembed"),
                              axes={"x": "td"})) == text  # deterministic


# ----------------------------------------------------------- small cases
def test_transposes_broadcasts_and_max():
    def f(x, y):
        z = x.T[:, :, None] * y[None, None, :] + jnp.maximum(x, 0.0).T[:, :, None]
        return jnp.max(z, axis=1) - jnp.min(z, axis=0).sum(0)[None, :] + jnp.maximum(x.sum(0), 1.0)[:, None]
    graph = check(f, rand(3, 4), rand(5))
    assert "relu(" in format_graph(graph)


def test_square_input_added_to_its_transpose():
    check(lambda x: x + x.T + jnp.square(x) ** 3, rand(4, 4))


def test_size_one_axes_made_by_broadcasting_are_dropped():
    graph, outs = run_traced(lambda x: jnp.sum(x, axis=1, keepdims=True), rand(3, 4))
    assert outs["out"].shape == (3,)


def test_several_outputs_and_names():
    def f(a, b):
        return a * b, jnp.exp(a)
    graph = trace(f, rand(3), rand(3), names=["p", "q"], outputs=["prod", "ea"])
    assert graph.outputs == ("prod", "ea")
    assert [d.name for d in graph.body.decls] == ["p", "q"]


def test_an_output_read_by_another_output():
    def f(x):
        y = x @ x.T
        return y, y * 2.0, x
    graph, outs = run_traced(f, rand(3, 4))
    assert graph.outputs == ("out0", "out1", "out2")
    np.testing.assert_allclose(outs["out1"], 2 * outs["out0"])
    assert "out1[a, a2] = out0[a, a2] * 2.0" in format_graph(graph)


# ---------------------------------------------------------------- errors
def where(fn, marker: str) -> str:
    """file:line of the line of fn containing marker."""
    lines, start = inspect.getsourcelines(fn)
    line = next(start + i for i, text in enumerate(lines) if marker in text)
    return f"{fn.__code__.co_filename}:{line}"


def uses_cumsum(x):
    y = x * 2.0
    return jnp.cumsum(y, axis=0)


def uses_sort(x):
    return jnp.sort(x, axis=0)


def uses_while(x):
    return jax.lax.while_loop(lambda c: c[0, 0] < 10.0, lambda c: c * 2.0, x)


def uses_cond(x):
    return jax.lax.cond(x[0, 0] > 0.0, lambda: x, lambda: -x)


def uses_scatter(x):
    return x.at[0].set(1.0)


def uses_python_if(x):
    if x.sum() > 0:
        return x
    return -x


def merges_axes(x):
    return x.reshape(12)


CONST = np.arange(4, dtype=np.float32)


def captures_array(x):
    return x * CONST


TAIL = f"einpart traces {SUPPORTED}"


@pytest.mark.parametrize("fn, marker, message", [
    (uses_cumsum, "jnp.cumsum", f"cannot trace 'cumsum': {TAIL}"),
    (uses_sort, "jnp.sort", f"cannot trace 'sort': {TAIL}"),
    (uses_while, "while_loop", "cannot trace 'while': data-dependent control flow has no einsum form"),
    (uses_cond, "lax.cond", "cannot trace 'cond': data-dependent control flow has no einsum form"),
    (uses_scatter, ".set(", f"cannot trace 'scatter': {TAIL}"),
    (uses_python_if, "if x", "data-dependent control flow: Python 'if', 'while' or int() on a traced value "
                             "cannot be traced"),
    (merges_axes, "x.reshape", "cannot trace 'reshape' [3, 4] -> [12]: it merges or splits axes, which einpart's "
                             "IR cannot express; give the arguments the split shape"),
    (captures_array, "x * CONST", "the function captures a constant array of shape (4,); pass it as an argument so "
                              "that it becomes an input or param"),
])
def test_unsupported_code_is_named_with_its_line(fn, marker, message):
    with pytest.raises(EinpartError) as e:
        trace(fn, rand(3, 4))
    assert str(e.value) == f"{where(fn, marker)}: error: {message}"


def test_supported_list_is_what_the_message_says():
    assert SUPPORTED == ("einsum (dot_general), elementwise arithmetic, exp/log/tanh/logistic/sqrt/rsqrt, "
                         "sum/max/min reductions, broadcasts, reshapes that add or drop size-1 axes, and transposes")


def test_integer_arithmetic_and_infinities_are_refused():
    with pytest.raises(EinpartError, match=r"cannot trace 'mul' on i32 values: einpart computes in floats$"):
        trace(lambda x: x * 2, np.arange(3, dtype=np.int32))
    with pytest.raises(EinpartError, match=r"trace: cannot print non-finite constant inf; einpart constants are finite$"):
        trace(lambda x: x - jnp.inf, rand(3))


def test_bad_arguments():
    with pytest.raises(EinpartError, match=r"trace: no argument named 'w' \(arguments: x\)"):
        trace(lambda x: x * 2.0, rand(3), params=("w",))
    with pytest.raises(EinpartError, match=r"argument 'n' is a scalar"):
        trace(lambda x, n: x * n, rand(3), 2.0, names=["x", "n"])
