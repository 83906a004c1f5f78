"""y[M, N] = x[M, K] (bf16) @ w[K, N] (int8) -> bf16, f32 accumulation, for
decode-sized M (1..64), as a Pallas (Triton) kernel that reads the int8 weight once.

Why: at decode the product is bound by reading the weight. XLA casts int8 to
bf16 inside its GEMM but runs it no faster than the bf16 GEMM (issue 7,
benchmarks/int8_matvec.py), so int8 weights bought nothing. This kernel streams
the int8 bytes: each program owns a [block_n] column strip and a range of K
(split-K when N alone gives too few programs to fill the GPU), loads
[block_k, block_n] int8 tiles with masks (any K and N, no padded copy of w),
converts them to bf16 in registers and accumulates x_tile @ w_tile in f32 on the
tensor cores. Rows of x are masked up to Mp = max(16, next power of two >= M),
since the Triton dot needs at least 16 rows. With split-K, each split writes an
f32 partial [splits, M, N] and one XLA reduction sums them into bf16.

On platforms other than GPU (and whenever `interpret` is False there) the
product runs as the plain jnp reference; `interpret=True` runs the Pallas kernel
in the interpreter on any platform (the CPU tests do).
"""
from __future__ import annotations

import dataclasses
import math

from ...errors import EinpartError

MAX_ROWS = 64
# Programs wanted in flight: about two per multiprocessor of an H100/H200 (132).
TARGET_PROGRAMS = 264
CONVERTS = ("direct", "magic")
REDUCES = ("partials", "atomic")
MODES = ("dot", "fma")
# 2**23 + 128 as f32 bits: (int8 v) + MAGIC_BITS, read as f32, is 2**23 + 128 + v exactly.
MAGIC_BITS = 0x4B000080
MAGIC = 8388736.0


@dataclasses.dataclass(frozen=True)
class Int8MatmulConfig:
    """Tile sizes and launch parameters of the kernel (see default_config)."""
    block_n: int = 128
    block_k: int = 256
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3
    convert: str = "direct"   # "direct": int8 -> bf16 cast; "magic": via f32 bits (integer add, float sub)
    reduce: str = "partials"  # split-K: "partials" [splits, M, N] f32 summed by XLA; "atomic": f32 atomic adds
    mode: str = "dot"         # "dot": tensor-core dot of Mp rows; "fma": M = 1 only, f32 FMAs, no dot

    def check(self) -> None:
        if self.convert not in CONVERTS:
            raise EinpartError(f"int8_matmul: convert = {self.convert!r} must be one of {', '.join(CONVERTS)}")
        if self.mode not in MODES:
            raise EinpartError(f"int8_matmul: mode = {self.mode!r} must be one of {', '.join(MODES)}")
        if self.reduce not in REDUCES:
            raise EinpartError(f"int8_matmul: reduce = {self.reduce!r} must be one of {', '.join(REDUCES)}")
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise EinpartError(f"int8_matmul: {name} = {v!r} must be a power of two >= 16")
        if not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16):
            raise EinpartError(f"int8_matmul: num_warps = {self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        for name in ("splits", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise EinpartError(f"int8_matmul: {name} = {v!r} must be an integer >= 1")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_rows(m: int) -> int:
    """Rows the kernel computes for M rows of x: the Triton dot needs >= 16."""
    return max(16, _next_pow2(m))


def default_config(m: int, k: int, n: int) -> Int8MatmulConfig:
    """A config for [m, k] x [k, n], fitted to the H200 sweep of the two Llama-8B MLP
    shapes (benchmarks/results/int8-matvec-h200-pallas8-sweep2.json): 128-wide column
    strips; 128-deep K tiles for Mp <= 16 unless K >= 8192, else 256; K splits until the
    grid holds about TARGET_PROGRAMS programs (each still >= 2 K tiles), except for
    Mp > 16 when the column strips alone nearly fill the GPU (>= 96), where the f32
    partials of a split cost more than the extra programs buy."""
    mp = padded_rows(m)
    block_n = min(128, max(16, _next_pow2(n)))
    block_k = min(128 if mp <= 16 and k < 8192 else 256, max(16, _next_pow2(k)))
    n_blocks = -(-n // block_n)
    k_steps = -(-k // block_k)
    splits = max(1, min(-(-TARGET_PROGRAMS // n_blocks), k_steps // 2))
    if mp > 16 and n_blocks >= 96:
        splits = 1
    return Int8MatmulConfig(block_n=block_n, block_k=block_k, splits=splits,
                            num_warps=4, num_stages=4 if block_k <= 128 else 3)


def check_operands(kernel: str, x, w, x_dtypes: tuple, x_what: str, max_rows: int, too_many: str
                   ) -> tuple[int, int, int]:
    """(M, K, N) of x [M, K] times an int8 w [K, N] for `kernel`, or an EinpartError
    naming what is wrong; x's dtype one of `x_dtypes` (described as `x_what`), at most
    `max_rows` rows (`too_many` says what to use instead). Shared by both int8 kernels."""
    if len(x.shape) != 2 or len(w.shape) != 2:
        raise EinpartError(f"{kernel}: x must be 2-D [M, K] and w 2-D [K, N], "
                           f"got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in x_dtypes or w.dtype != "int8":
        raise EinpartError(f"{kernel}: x must be {x_what} and w int8, got {x.dtype} and {w.dtype}")
    m, k = x.shape
    k2, n = w.shape
    if k != k2:
        raise EinpartError(f"{kernel}: x [M, K] = {tuple(x.shape)} and w [K, N] = {tuple(w.shape)} "
                           f"disagree on K")
    if k < 1 or n < 1:
        raise EinpartError(f"{kernel}: K = {k} and N = {n} must both be >= 1")
    if not 1 <= m <= max_rows:
        raise EinpartError(f"{kernel}: M = {m} rows is outside 1..{max_rows}; the kernel is for {too_many}")
    return m, k, n


def _check_operands(x, w) -> tuple[int, int, int]:
    import jax.numpy as jnp
    return check_operands("int8_matmul", x, w, (jnp.bfloat16,), "bfloat16", MAX_ROWS,
                          "decode-sized batches (use a plain dot for larger M)")


def int8_matmul_reference(x, w):
    """The pure-jnp product: w cast to bf16, f32 accumulation, bf16 result."""
    import jax.numpy as jnp
    _check_operands(x, w)
    y = jnp.einsum("mk,kn->mn", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return y.astype(jnp.bfloat16)


def _use_kernel(interpret: bool) -> bool:
    import jax
    return interpret or jax.default_backend() == "gpu"


def int8_matmul(x, w, config: Int8MatmulConfig | None = None, *, interpret: bool = False):
    """x [M, K] bf16 @ w [K, N] int8 -> [M, N] bf16 (f32 accumulation), 1 <= M <= 64.

    On GPU, the Pallas/Triton kernel with `config` (default: default_config);
    elsewhere int8_matmul_reference, unless `interpret` runs the kernel in the
    Pallas interpreter. Usable inside jax.jit (shapes are static)."""
    m, k, n = _check_operands(x, w)
    cfg = config if config is not None else default_config(m, k, n)
    if not isinstance(cfg, Int8MatmulConfig):
        raise EinpartError(f"int8_matmul: config must be an Int8MatmulConfig, got {type(cfg).__name__}")
    cfg.check()
    if cfg.mode == "fma" and m != 1:
        raise EinpartError(f"int8_matmul: mode 'fma' is for M = 1 (one row of x), got M = {m}")
    if not _use_kernel(interpret):
        return int8_matmul_reference(x, w)
    return _pallas_product(x, w, m, k, n, cfg, interpret)


def _pallas_product(x, w, m, k, n, cfg: Int8MatmulConfig, interpret: bool):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    mp, bn, bk = padded_rows(m), cfg.block_n, cfg.block_k
    n_blocks = -(-n // bn)
    k_steps = -(-k // bk)
    steps = -(-k_steps // min(cfg.splits, k_steps))  # K tiles per split
    splits = -(-k_steps // steps)                      # splits that hold any K
    partial = splits > 1

    atomic = partial and cfg.reduce == "atomic"
    fma = cfg.mode == "fma"

    def kernel(x_ref, w_ref, o_ref, *aliased):
        j = pl.program_id(0)
        s = pl.program_id(1)
        n0 = j * bn
        rows = jnp.arange(mp)
        cols = n0 + jnp.arange(bn)
        row_ok = rows < m
        col_ok = cols < n

        def body(i, acc):
            k0 = (s * steps + i) * bk
            ks = k0 + jnp.arange(bk)
            k_ok = ks < k
            if fma:  # row 0 loaded as [1, bk] (the Triton lowering has no slice of a loaded tile)
                xt = plgpu.load(x_ref.at[pl.ds(0, 1), pl.ds(k0, bk)], mask=k_ok[None, :], other=0.0)
            else:
                xt = plgpu.load(x_ref.at[pl.ds(0, mp), pl.ds(k0, bk)],
                                mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)],
                            mask=k_ok[:, None] & col_ok[None, :], other=0)
            if cfg.convert == "magic":
                wf = jax.lax.bitcast_convert_type(wt.astype(jnp.int32) + MAGIC_BITS, jnp.float32) - MAGIC
            else:
                wf = wt.astype(jnp.float32 if fma else jnp.bfloat16)
            if fma:  # M == 1: elementwise FMAs into a [bk, bn] accumulator, summed over K once at the end
                return acc + xt.astype(jnp.float32).reshape(bk, 1) * wf
            return acc + jnp.dot(xt, wf.astype(jnp.bfloat16), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bk, bn) if fma else (mp, bn), jnp.float32))
        if fma:
            acc = jnp.where(rows[:, None] == 0, jnp.sum(acc, axis=0)[None, :], 0.0)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if atomic:
            o_ref = aliased[0]
            plgpu.atomic_add(o_ref, (pl.ds(0, mp), pl.ds(n0, bn)), acc)  # padded: needs no mask
        elif partial:
            plgpu.store(o_ref.at[s, pl.ds(0, mp), pl.ds(n0, bn)], acc, mask=out_mask)
        else:
            plgpu.store(o_ref.at[pl.ds(0, mp), pl.ds(n0, bn)], acc.astype(jnp.bfloat16), mask=out_mask)

    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    name = f"int8_matmul_m{mp}_n{bn}_k{bk}_s{splits}"
    if atomic:  # a zeroed f32 [Mp, n_blocks * bn] goes in as operand 2 and comes back as the result
        padded = (mp, n_blocks * bn)
        call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(padded, jnp.float32), grid=(n_blocks, splits),
                              input_output_aliases={2: 0}, interpret=interpret, compiler_params=params, name=name)
        return call(x, w, jnp.zeros(padded, jnp.float32))[:m, :n].astype(jnp.bfloat16)
    out_shape = (jax.ShapeDtypeStruct((splits, m, n), jnp.float32) if partial
                 else jax.ShapeDtypeStruct((m, n), jnp.bfloat16))
    call = pl.pallas_call(kernel, out_shape=out_shape, grid=(n_blocks, splits), interpret=interpret,
                          compiler_params=params, name=name)
    y = call(x, w)
    return y.sum(axis=0).astype(jnp.bfloat16) if partial else y


def grid_programs(m: int, k: int, n: int, cfg: Int8MatmulConfig) -> int:
    """How many programs the kernel launches for this shape and config."""
    k_steps = -(-k // cfg.block_k)
    steps = -(-k_steps // min(cfg.splits, k_steps))
    return math.ceil(n / cfg.block_n) * (-(-k_steps // steps))
