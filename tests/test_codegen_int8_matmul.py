"""int8 weight products through the Pallas GEMV kernel (the `int8_matmul` lowering option,
einpart/codegen/int8_matmul.py).

- generated code with int8_matmul="pallas", its kernels run in the Pallas interpreter
  (kernels.int8_gemv.interpreted), gives the reference interpreter's logits for prefill
  and decode, scanned and unrolled, on a mesh that splits the weights: with batch 1 the
  prompt's 5 rows go through the kernel too, with batch 2 (10 rows) prefill keeps the
  einsums; products that share their activation (q / kn / vn, gate / up) run as one
  int8_gemv_siblings call where the plan leaves their weights in place (the simple plans,
  on 2 and 4 devices), and as single calls where it moves them (the random plan);
- in a bf16 spec the kernel program agrees with the einsum program;
- the source holds the calls (and the one import) exactly when expected: "xla" and auto
  off CUDA are the einsum code, auto on CUDA uses the kernel for one local row only
  (decode at batch 1), a product whose weight does not lead with its summed axes keeps
  the einsum;
- bad modes raise EinpartError with exact messages.

8 simulated CPU devices: set in tests/conftest.py, before JAX starts.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import spec_path
from einpart.codegen import generate_source, random_plan, simple_plan
from einpart.codegen.int8_matmul import (KERNEL_IMPORT, KERNEL_MAX_ROWS, gemv_form, kernel_calls, kernel_statements,
                                         sibling_groups)
from einpart.codegen.lower import split_prepare
from einpart.errors import EinpartError
from einpart.ir import graph as g
from einpart.ir import parse
from einpart.ir.model import Reference
from einpart.passes import run_pipeline
from test_codegen import assert_close, make_params

CALL = "int8_gemv("
SIBLINGS = "int8_gemv_siblings("
LLAMA = spec_path("llama").read_text()
PROMPT_LEN = 5


def int8_llama(batch: int, pipeline: str = "int8"):
    """(the rewritten graph, its params) for llama at `batch`."""
    from einpart.passes.multiquery import transform_params
    text = LLAMA.replace("size B = 2,", f"size B = {batch},")
    graph = run_pipeline(parse(text), pipeline).graph
    return graph, transform_params(graph, make_params(parse(text)))


def programs(src: str) -> tuple[str, str]:
    start, mid = src.index("\ndef prefill("), src.index("\ndef decode(")
    return src[start:mid], src[mid:src.index("\ndef programs(")]


def calls_in(src: str) -> int:
    return src.count(CALL) + src.count(SIBLINGS)


CASES = [(1, "scan", "simple"), (2, "scan", "simple"), (2, "unroll", "random"), (1, "unroll", "simple2x2")]


@pytest.mark.parametrize("batch,layers,plan", CASES, ids=[f"b{b}-{lay}-{p}" for b, lay, p in CASES])
def test_kernel_program_matches_reference(batch, layers, plan):
    from einpart.runtime import Executable
    from einpart.runtime.kernels.int8_gemv import interpreted
    graph, params = int8_llama(batch)
    ref = Reference(graph, params)
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, 256, (batch, PROMPT_LEN)).astype(np.int32)
    steps = rng.integers(0, 256, (batch, 2)).astype(np.int32)
    state = ref.new_state(batch)
    planned = {"random": lambda: random_plan(graph, {"x": 2, "y": 2}, seed=5),
               "simple": lambda: simple_plan(graph, {"x": 2}),
               "simple2x2": lambda: simple_plan(graph, {"x": 2, "y": 2})}[plan]()
    with interpreted():        # the kernel runs in the Pallas interpreter (traced at compile time)
        ex = Executable(planned, weights=params, layers=layers, int8_matmul="pallas", prefill_len=PROMPT_LEN)
        srcs = programs(ex.source())
        # llama's 7 weight products in the layer body (a loop over the layers' arrays when unrolled) and
        # the lm head in decode; in prefill as many as the plan leaves at most 8 local rows (all at batch 1);
        # q / kn / vn and gate / up one call each unless the plan moves their weights
        pgs = [split_prepare(ex._programs_for(batch, ex.prefill_len)[p])[0] for p in ("prefill", "decode")]
        assert [calls_in(p) for p in srcs] == [kernel_calls(pg, "pallas", None) for pg in pgs]
        assert [len(kernel_statements(pg, "pallas", None)) for pg in pgs][1] == 8
        groups = {m for m, _ in sibling_groups(pgs[1], "pallas", None).values()}
        if plan == "random":
            assert not groups and srcs[1].count(CALL) == 8 and SIBLINGS not in srcs[1]
        else:
            assert groups == {("kn_raw", "q_raw", "vn_raw"), ("gate_raw", "up_raw")}
            assert srcs[1].count(SIBLINGS) == 2 and srcs[1].count(CALL) == 3     # + wo, w_down, lm head
            assert srcs[0].count(SIBLINGS) == (2 if batch == 1 else 0)
        want, state = ref.step(prompt, 0, state)
        assert_close(ex.prefill(prompt), want, "prefill")
        for i in range(2):
            want, state = ref.step(steps[:, i:i + 1], PROMPT_LEN + i, state)
            assert_close(ex.decode(steps[:, i], PROMPT_LEN + i), want, f"decode {i}")


def test_bf16_kernel_program_matches_einsum_program():
    from einpart.runtime import Executable
    from einpart.runtime.kernels.int8_gemv import interpreted
    graph, params = int8_llama(2)
    planned = simple_plan(graph, {"x": 2})
    steps = np.random.default_rng(3).integers(0, 256, (2, 3)).astype(np.int32)
    with interpreted():
        got = [Executable(planned, weights=params, layers="scan", dtype="bf16", int8_matmul=m)
               for m in ("pallas", "xla")]
        assert CALL in got[0].source() and CALL not in got[1].source()
        logits = [ex.prefill(steps[:, :1].repeat(8, axis=1)) for ex in got]
        for i in range(3):
            logits += [ex.decode(steps[:, i], 8 + i) for ex in got]
    for a, b in zip(logits[::2], logits[1::2]):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=2e-2 * max(1.0, float(np.abs(b).max())))


def test_source_holds_the_kernel_exactly_when_expected():
    graph, _ = int8_llama(2, "int8,cast{dtype=bf16}")
    planned = simple_plan(graph, {"x": 2})
    xla = generate_source(planned)
    assert CALL not in xla and KERNEL_IMPORT not in xla and xla == generate_source(planned, int8_matmul="xla")
    for platform in ("cpu", None):          # auto off CUDA: the einsum code
        src = generate_source(planned, int8_matmul="auto", platform=platform)
        assert src.replace("int8_matmul=auto; ", "") == xla
    pallas = generate_source(planned, int8_matmul="pallas")
    pre, dec = programs(pallas)
    assert pallas.count(KERNEL_IMPORT + ", int8_gemv_siblings\n") == 1 and calls_in(pre) == 0
    assert dec.count(CALL) == 3 and dec.count(SIBLINGS) == 2     # wo, w_down, lm head; q / kn / vn, gate / up
    assert ("t_gate_raw, t_up_raw = int8_gemv_siblings(t_h2.astype(jnp.bfloat16).reshape(2, 64), "
            "(t_w_gate_i8.reshape(64, 80), t_w_up_i8.reshape(64, 80)), out_dtype=jnp.bfloat16)\n") in dec
    assert "t_gate_raw = t_gate_raw.reshape((2, 1, 80))\n" in dec and "t_up_raw = t_up_raw.reshape((2, 1, 80))\n" in dec
    assert dec.count("# (computed by the int8_gemv_siblings call of") == 3   # up_raw; two of kn_raw, q_raw, vn_raw
    # auto on CUDA: the kernel for one local row (AUTO_MAX_ROWS: it lost to the i8 dot at 2 on an H200)
    auto = generate_source(planned, int8_matmul="auto", platform="cuda")
    assert auto.replace("int8_matmul=auto; ", "") == xla
    one, _ = int8_llama(1, "int8,cast{dtype=bf16}")
    one = simple_plan(one, {"x": 2})
    auto, forced = (programs(generate_source(one, int8_matmul=m, platform="cuda")) for m in ("auto", "pallas"))
    assert auto[1].replace("=auto)", "=pallas)") == forced[1] and calls_in(auto[1]) == 5   # decode: the same calls
    assert calls_in(auto[0]) == 0 and calls_in(forced[0]) == 5  # prefill's 8 rows: einsums under auto
    # no int8 weights: nothing to route
    plain = simple_plan(run_pipeline(parse(LLAMA), "cast{dtype=bf16}").graph, {"x": 2})
    assert CALL not in generate_source(plain, int8_matmul="pallas")


def test_rows_over_the_limit_keep_the_einsum():
    graph, _ = int8_llama(KERNEL_MAX_ROWS + 1, "int8,cast{dtype=bf16}")
    planned = simple_plan(graph, {"x": 1})
    assert CALL not in generate_source(planned, int8_matmul="pallas")
    assert CALL not in generate_source(planned, int8_matmul="auto", platform="cuda")


def test_gemv_form():
    ref = g.Ref
    local = {"b": 2, "d": 8, "f": 6, "g": 2, "k": 3}
    # x[b, d] * w[d, f] -> [b, f]
    assert gemv_form((ref("x", ("b", "d")), ref("w", ("d", "f"))), ["bf16", "i8"], ("b", "f"), local) == (
        0, 1, ("b",), ("d",), ("f",), 2, 8, 6)
    # w[g, k, d] * o[b, g, k] -> [b, d]: weight first, two summed axes
    assert gemv_form((ref("w", ("g", "k", "d")), ref("o", ("b", "g", "k"))), ["i8", "f32"], ("b", "d"), local) == (
        1, 0, ("b",), ("g", "k"), ("d",), 2, 6, 8)
    # the weight's summed axis last: no [K, N] view without a copy
    assert gemv_form((ref("x", ("b", "d")), ref("w", ("f", "d"))), ["bf16", "i8"], ("b", "f"), local) is None
    # an index shared by both and kept (a batched product), and two int8 factors
    assert gemv_form((ref("x", ("b", "d")), ref("w", ("d", "b"))), ["bf16", "i8"], ("b",), local) is None
    assert gemv_form((ref("x", ("b", "d")), ref("w", ("d", "f"))), ["i8", "i8"], ("b", "f"), local) is None


def test_kernel_limit_matches_the_kernel():
    from einpart.runtime.kernels.int8_gemv import MAX_ROWS
    assert KERNEL_MAX_ROWS == MAX_ROWS


def test_unknown_int8_matmul_mode():
    from einpart.runtime import Executable
    graph, params = int8_llama(2)
    planned = simple_plan(graph, {"x": 2})
    msg = "int8_matmul must be one of xla, pallas, auto, got 'triton'"
    with pytest.raises(EinpartError) as e:
        generate_source(planned, int8_matmul="triton")
    assert str(e.value) == msg
    with pytest.raises(EinpartError) as e:
        Executable(planned, weights=params, int8_matmul="triton", compile=False)
    assert str(e.value) == msg
    import einpart
    with pytest.raises(EinpartError) as e:
        einpart.compile(spec_path("llama"), mesh="2", plan="simple", int8_matmul="triton")
    assert str(e.value) == msg
