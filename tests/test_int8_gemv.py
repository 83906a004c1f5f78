"""The int8 GEMV kernel (einpart/runtime/kernels/int8_gemv.py) in the Pallas interpreter.

- every config form (both weight views, both conversions, K splits, unrolled tiles, masked
  K and N edges, 1..MAX_ROWS rows, bf16 and float32 x) computes x @ w: checked against a
  float64 product (bf16 results within one bf16 rounding, float32 results to 1e-5);
- off the GPU, without `interpret`, it is the jnp reference; interpreted() switches the
  kernel on for code that calls it with no argument (the generated programs);
- split_for keeps whole loop steps per split and the grid near its target;
- bad operands and configs raise EinpartError with exact messages;
- int8_gemv_siblings (several weights sharing x, one launch) computes each x @ w_i: checked
  against float64 products for weights of different widths (masked strip edges inside the
  shared output), split and unsplit, both views, several rows; its jaxpr holds one
  pallas_call; its default config covers the group's strips; bad groups get exact messages.
"""
from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from einpart.errors import EinpartError
from einpart.runtime.kernels.int8_gemv import (MAX_ROWS, TARGET_PROGRAMS, Int8GemvConfig, default_gemv_config,
                                               default_siblings_config, gemv_programs, int8_gemv, int8_gemv_reference,
                                               int8_gemv_siblings, interpreted, split_for)


def operands(m, k, n, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed + 31 * m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)   # -128 too: the conversions cover all bytes
    return x, w


def check_product(y, x, w):
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = np.asarray(y, np.float64)
    assert got.shape == want.shape
    if y.dtype == jnp.bfloat16:      # f32 accumulation, one bf16 rounding of the result
        bound = 2.0 ** -8 * np.abs(want) + 1e-5 * np.abs(want).max()
    else:
        bound = 1e-5 * np.abs(want).max()
    assert np.all(np.abs(got - want) <= bound), float(np.abs(got - want).max())


CASES = [  # (m, k, n, config)
    (1, 256, 512, Int8GemvConfig(256, 16, 4, 2)),                                   # no masks, 2 splits
    (1, 256, 512, Int8GemvConfig(256, 16, 4, 2, convert="direct")),
    (1, 256, 512, Int8GemvConfig(256, 16, 4, 4, layout="i32")),
    (3, 200, 300, Int8GemvConfig(64, 8, 2, 3)),                                     # K and N edges masked
    (2, 100, 136, Int8GemvConfig(64, 16, 2, 2, layout="i32")),                      # i32 view with edges
    (MAX_ROWS, 64, 96, Int8GemvConfig(32, 8, 1, 1, num_warps=2)),                   # one split: y stored directly
    (5, 96, 64, Int8GemvConfig(16, 32, 3, 5)),                                      # more splits than steps hold
]


@pytest.mark.parametrize("m,k,n,cfg", CASES, ids=[f"m{c[0]}-{c[1]}x{c[2]}-{c[3].layout}-{c[3].convert}"
                                                   for c in CASES])
def test_kernel_computes_the_product(m, k, n, cfg):
    x, w = operands(m, k, n)
    check_product(int8_gemv(x, w, cfg, interpret=True), x, w)


def test_float32_activations_and_output_dtype():
    x, w = operands(2, 128, 256, jnp.float32)
    y = int8_gemv(x, w, Int8GemvConfig(128, 16, 2, 2), interpret=True)
    assert y.dtype == jnp.float32
    check_product(y, x, w)
    xb, _ = operands(2, 128, 256)
    yf = int8_gemv(xb, w, Int8GemvConfig(128, 16, 2, 1), out_dtype=jnp.float32, interpret=True)
    assert yf.dtype == jnp.float32
    check_product(yf, xb, w)


def test_default_config_under_jit():
    x, w = operands(1, 512, 768)
    cfg = default_gemv_config(1, 512, 768)
    y = jax.jit(lambda x, w: int8_gemv(x, w, interpret=True))(x, w)
    check_product(y, x, w)
    assert gemv_programs(512, 768, cfg) == -(-768 // cfg.block_n) * cfg.splits


def test_off_gpu_it_is_the_reference_and_interpreted_switches_the_kernel_on():
    x, w = operands(2, 64, 48)
    cfg = Int8GemvConfig(16, 8, 1, 1)
    np.testing.assert_array_equal(np.asarray(int8_gemv(x, w, cfg)), np.asarray(int8_gemv_reference(x, w)))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x, w: int8_gemv(x, w, cfg))(x, w))
    with interpreted():
        assert "pallas_call" in str(jax.make_jaxpr(lambda x, w: int8_gemv(x, w, cfg))(x, w))
        check_product(int8_gemv(x, w, cfg), x, w)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x, w: int8_gemv(x, w, cfg))(x, w))
    xf, _ = operands(2, 64, 48, jnp.float32)
    np.testing.assert_allclose(np.asarray(int8_gemv(xf, w)), np.asarray(xf, np.float64) @ np.asarray(w, np.float64),
                               rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("k,n", [(4096, 4096), (14336, 4096), (4096, 14336), (4096, 1024), (4096, 128256)])
def test_split_for_keeps_whole_steps(k, n):
    cfg = default_gemv_config(1, k, n)
    steps = -(-k // (cfg.block_k * cfg.unroll))
    assert steps % cfg.splits == 0
    strips = -(-n // cfg.block_n)
    assert strips * cfg.splits <= max(528, strips)
    assert split_for(k, n, cfg, target=1) == 1


BAD_OPERANDS = [
    ((4, 8), (8,), jnp.bfloat16, "int8_gemv: x must be 2-D [M, K] and w 2-D [K, N], got shapes (4, 8) and (8,)"),
    ((4, 8), (8, 16), jnp.float16, "int8_gemv: x must be bfloat16 or float32 and w int8, got float16 and int8"),
    ((4, 8), (9, 16), jnp.bfloat16, "int8_gemv: x [M, K] = (4, 8) and w [K, N] = (9, 16) disagree on K"),
    ((9, 8), (8, 16), jnp.bfloat16, "int8_gemv: M = 9 rows is outside 1..8; the kernel is for decode batches "
                                    "of a few rows (use a dot for more)"),
    ((0, 8), (8, 16), jnp.bfloat16, "int8_gemv: M = 0 rows is outside 1..8; the kernel is for decode batches "
                                    "of a few rows (use a dot for more)"),
]


@pytest.mark.parametrize("xs,ws,dtype,msg", BAD_OPERANDS)
def test_bad_operands(xs, ws, dtype, msg):
    x = jnp.zeros(xs, dtype)
    w = jnp.zeros(ws, jnp.int8)
    with pytest.raises(EinpartError) as e:
        int8_gemv(x, w)
    assert str(e.value) == msg


BAD_CONFIGS = [
    (Int8GemvConfig(layout="i4"), "int8_gemv: layout = 'i4' must be one of i8, i32"),
    (Int8GemvConfig(convert="fast"), "int8_gemv: convert = 'fast' must be one of direct, magic"),
    (Int8GemvConfig(block_n=96), "int8_gemv: block_n = 96 must be a power of two >= 16"),
    (Int8GemvConfig(block_n=32, layout="i32"), "int8_gemv: block_n = 32 must be a power of two >= 64"),
    (Int8GemvConfig(block_k=0), "int8_gemv: block_k = 0 must be a power of two >= 1"),
    (Int8GemvConfig(num_warps=3), "int8_gemv: num_warps = 3 must be one of 1, 2, 4, 8, 16"),
    (Int8GemvConfig(unroll=0), "int8_gemv: unroll = 0 must be an integer >= 1"),
    (Int8GemvConfig(splits=0), "int8_gemv: splits = 0 must be an integer >= 1"),
]


@pytest.mark.parametrize("cfg,msg", BAD_CONFIGS, ids=[m.split(":")[1].split("=")[0].strip() for _, m in BAD_CONFIGS])
def test_bad_configs(cfg, msg):
    x, w = operands(1, 64, 64)
    with pytest.raises(EinpartError) as e:
        int8_gemv(x, w, cfg)
    assert str(e.value) == msg


def test_config_type_and_i32_columns():
    x, w = operands(1, 64, 66)
    with pytest.raises(EinpartError) as e:
        int8_gemv(x, w, {"block_n": 64})
    assert str(e.value) == "int8_gemv: config must be an Int8GemvConfig, got dict"
    with pytest.raises(EinpartError) as e:
        int8_gemv(x, w, Int8GemvConfig(64, layout="i32"))
    assert str(e.value) == "int8_gemv: layout 'i32' needs N divisible by 4 (4 columns per word), got N = 66"


SIBLING_CASES = [  # (m, k, widths, config)
    (1, 256, (512, 128, 128), None),                                               # q / k / v shaped, default
    (2, 200, (300, 64, 136), Int8GemvConfig(64, 8, 2, 3)),                         # K and N edges inside the output
    (1, 256, (256, 136), Int8GemvConfig(64, 16, 2, 4, layout="i32")),             # i32 view, a masked strip
    (3, 64, (40, 24), Int8GemvConfig(32, 8, 1, 1)),                                # one split: y stored directly
]


@pytest.mark.parametrize("m,k,ns,cfg", SIBLING_CASES, ids=[f"m{c[0]}-{c[1]}x{'+'.join(map(str, c[2]))}"
                                                           for c in SIBLING_CASES])
def test_siblings_compute_each_product(m, k, ns, cfg):
    x, _ = operands(m, k, 8)
    ws = [operands(m, k, n, seed=i)[1] for i, n in enumerate(ns)]
    ys = int8_gemv_siblings(x, tuple(ws), cfg, interpret=True)
    assert len(ys) == len(ws)
    for y, w in zip(ys, ws):
        check_product(y, x, w)
    yf = int8_gemv_siblings(x, tuple(ws), cfg, out_dtype=jnp.float32, interpret=True)
    for y, w in zip(yf, ws):
        assert y.dtype == jnp.float32
        check_product(y, x, w)


def test_siblings_are_one_launch_and_the_default_config_covers_the_group():
    x, _ = operands(1, 512, 8)
    ws = tuple(operands(1, 512, n, seed=n)[1] for n in (1024, 256, 256))
    jaxpr = str(jax.make_jaxpr(lambda x, *ws: int8_gemv_siblings(x, ws, interpret=True))(x, *ws))
    assert jaxpr.count("pallas_call[") == 1
    cfg = default_siblings_config(1, 512, (1024, 256, 256))
    assert cfg == default_gemv_config(1, 512, 2048) and cfg.block_n == 512
    strips = 2 + 1 + 1
    assert strips * cfg.splits <= TARGET_PROGRAMS and (512 // 32) % cfg.splits == 0
    # Llama-8B q / k / v: 12 strips of 512 columns, 32 splits (384 programs)
    assert default_siblings_config(1, 4096, (4096, 1024, 1024)).splits == 32
    # one weight: the same call as int8_gemv
    np.testing.assert_array_equal(np.asarray(int8_gemv_siblings(x, ws[:1], interpret=True)[0]),
                                  np.asarray(int8_gemv(x, ws[0], interpret=True)))
    # off the GPU without interpret: the reference for each weight
    for y, w in zip(int8_gemv_siblings(x, ws), ws):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(int8_gemv_reference(x, w)))


def test_bad_sibling_groups():
    x, w = operands(1, 64, 64)
    with pytest.raises(EinpartError) as e:
        int8_gemv_siblings(x, ())
    assert str(e.value) == "int8_gemv_siblings: ws must be a non-empty tuple of int8 weights, got tuple"
    with pytest.raises(EinpartError) as e:
        int8_gemv_siblings(x, w)
    assert str(e.value) == "int8_gemv_siblings: ws must be a non-empty tuple of int8 weights, got ArrayImpl"
    with pytest.raises(EinpartError) as e:
        int8_gemv_siblings(x, (w, jnp.zeros((32, 64), jnp.int8)))
    assert str(e.value) == "int8_gemv: x [M, K] = (1, 64) and w [K, N] = (32, 64) disagree on K"
    with pytest.raises(EinpartError) as e:
        int8_gemv_siblings(x, (w, operands(1, 64, 66)[1]), Int8GemvConfig(64, layout="i32"))
    assert str(e.value) == "int8_gemv: layout 'i32' needs N divisible by 4 (4 columns per word), got N = 66"
