"""The int8-weight product kernel (einpart.runtime.kernels.int8_matmul), run in the
Pallas interpreter on CPU against a float64 product of the same inputs: shapes
that are not multiples of the blocks, split-K with both reductions, both int8
conversions, the jnp fallback, and the errors for shapes, dtypes and configs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from einpart.errors import EinpartError
from einpart.runtime.kernels import Int8MatmulConfig, default_config, int8_matmul, int8_matmul_reference
from einpart.runtime.kernels.int8_matmul import grid_programs, padded_rows


def operands(seed: int, m: int, k: int, n: int):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)  # the full int8 range, -128 included
    return x, w


def exact(x, w) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def assert_close(y, x, w):
    """bf16 output of an f32-accumulated product: within bf16 rounding of the exact product."""
    assert y.dtype == jnp.bfloat16 and y.shape == (x.shape[0], w.shape[1])
    ref = exact(x, w)
    got = np.asarray(y, np.float64)
    assert np.all(np.isfinite(got))
    scale = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64))
    # bf16 output rounding (2^-8 relative) plus f32 accumulation error, per element
    assert np.all(np.abs(got - ref) <= 2.0 ** -8 * np.abs(ref) + 1e-5 * scale + 1e-6), np.max(np.abs(got - ref))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 4e-3


CASES = [  # (m, k, n, config): K and N not multiples of the blocks, M below and above 16
    (1, 100, 70, Int8MatmulConfig(block_n=16, block_k=16, splits=1)),
    (3, 200, 50, Int8MatmulConfig(block_n=32, block_k=32, splits=3)),                   # uneven splits
    (17, 130, 33, Int8MatmulConfig(block_n=16, block_k=32, splits=2, reduce="atomic")),
    (64, 96, 40, Int8MatmulConfig(block_n=32, block_k=16, splits=4, convert="magic")),
    (5, 77, 19, Int8MatmulConfig(block_n=16, block_k=16, splits=3, convert="magic", reduce="atomic")),
    (2, 48, 24, None),                                                                   # default_config
    (1, 90, 40, Int8MatmulConfig(block_n=16, block_k=32, splits=2, mode="fma")),
    (1, 70, 20, Int8MatmulConfig(block_n=16, block_k=16, splits=3, mode="fma", convert="magic", reduce="atomic")),
]


@pytest.mark.parametrize("m,k,n,config", CASES)
def test_kernel_matches_exact_product(m, k, n, config):
    x, w = operands(m * 1000 + k, m, k, n)
    assert_close(int8_matmul(x, w, config, interpret=True), x, w)


def test_kernel_agrees_with_reference_under_jit():
    x, w = operands(7, 4, 72, 36)
    cfg = Int8MatmulConfig(block_n=16, block_k=16, splits=2)
    y = jax.jit(lambda x, w: int8_matmul(x, w, cfg, interpret=True))(x, w)
    ref = int8_matmul_reference(x, w)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=2 ** -7, atol=1e-2)


def test_fallback_on_cpu_is_the_reference():
    x, w = operands(3, 6, 40, 30)
    assert jax.default_backend() == "cpu"
    y = int8_matmul(x, w)
    assert_close(y, x, w)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(int8_matmul_reference(x, w), np.float32))


def test_default_config_fills_the_gpu_for_llama_shapes():
    for m in (1, 8, 64):
        for k, n in ((4096, 14336), (14336, 4096)):
            cfg = default_config(m, k, n)
            cfg.check()
            assert grid_programs(m, k, n, cfg) >= 96, (m, k, n, cfg)
    # the H200 sweep's winners (sweep2.json) for the two Llama-8B MLP shapes
    assert default_config(1, 4096, 14336) == Int8MatmulConfig(128, 128, 3, 4, 4)
    assert default_config(1, 14336, 4096) == Int8MatmulConfig(128, 256, 9, 4, 3)
    assert default_config(64, 4096, 14336) == Int8MatmulConfig(128, 256, 1, 4, 3)
    assert default_config(64, 14336, 4096) == Int8MatmulConfig(128, 256, 9, 4, 3)
    assert padded_rows(1) == 16 and padded_rows(17) == 32 and padded_rows(64) == 64


@pytest.mark.parametrize("x_shape,x_dtype,w_shape,w_dtype,message", [
    ((2, 8), jnp.bfloat16, (9, 4), jnp.int8,
     "int8_matmul: x [M, K] = (2, 8) and w [K, N] = (9, 4) disagree on K"),
    ((2, 8), jnp.float32, (8, 4), jnp.int8, "int8_matmul: x must be bfloat16 and w int8, got float32 and int8"),
    ((2, 8), jnp.bfloat16, (8, 4), jnp.bfloat16,
     "int8_matmul: x must be bfloat16 and w int8, got bfloat16 and bfloat16"),
    ((2, 2, 8), jnp.bfloat16, (8, 4), jnp.int8,
     "int8_matmul: x must be 2-D [M, K] and w 2-D [K, N], got shapes (2, 2, 8) and (8, 4)"),
    ((65, 8), jnp.bfloat16, (8, 4), jnp.int8,
     "int8_matmul: M = 65 rows is outside 1..64; the kernel is for decode-sized batches "
     "(use a plain dot for larger M)"),
    ((0, 8), jnp.bfloat16, (8, 4), jnp.int8,
     "int8_matmul: M = 0 rows is outside 1..64; the kernel is for decode-sized batches "
     "(use a plain dot for larger M)"),
    ((2, 8), jnp.bfloat16, (8, 0), jnp.int8, "int8_matmul: K = 8 and N = 0 must both be >= 1"),
])
def test_bad_operands(x_shape, x_dtype, w_shape, w_dtype, message):
    x, w = jnp.ones(x_shape, x_dtype), jnp.ones(w_shape, w_dtype)
    for call in (lambda: int8_matmul(x, w, interpret=True), lambda: int8_matmul(x, w),
                 lambda: int8_matmul_reference(x, w)):
        with pytest.raises(EinpartError) as e:
            call()
        assert str(e.value) == message


@pytest.mark.parametrize("config,message", [
    (Int8MatmulConfig(block_n=100), "int8_matmul: block_n = 100 must be a power of two >= 16"),
    (Int8MatmulConfig(block_k=8), "int8_matmul: block_k = 8 must be a power of two >= 16"),
    (Int8MatmulConfig(splits=0), "int8_matmul: splits = 0 must be an integer >= 1"),
    (Int8MatmulConfig(num_stages=0), "int8_matmul: num_stages = 0 must be an integer >= 1"),
    (Int8MatmulConfig(num_warps=3), "int8_matmul: num_warps = 3 must be one of 1, 2, 4, 8, 16"),
    (Int8MatmulConfig(convert="fast"), "int8_matmul: convert = 'fast' must be one of direct, magic"),
    (Int8MatmulConfig(reduce="tree"), "int8_matmul: reduce = 'tree' must be one of partials, atomic"),
    (Int8MatmulConfig(mode="simd"), "int8_matmul: mode = 'simd' must be one of dot, fma"),
    (Int8MatmulConfig(mode="fma"), "int8_matmul: mode 'fma' is for M = 1 (one row of x), got M = 2"),
    ((128, 128), "int8_matmul: config must be an Int8MatmulConfig, got tuple"),
])
def test_bad_config(config, message):
    x, w = operands(0, 2, 32, 32)
    with pytest.raises(EinpartError) as e:
        int8_matmul(x, w, config, interpret=True)
    assert str(e.value) == message
