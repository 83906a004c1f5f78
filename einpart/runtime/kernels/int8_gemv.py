"""y[M, N] = x[M, K] (bf16 or f32) @ w[K, N] (int8), f32 accumulation, for the few rows of a decode
step (M = 1..MAX_ROWS), as a Pallas (Triton) kernel with no tensor-core dot.

Why: at decode batch 1 a product is bound by reading its weight, and int8 weights
should halve that read. XLA's fused s8->bf16 GEMM and the tl.dot kernel of
int8_matmul.py both read int8 at about 2 TB/s (half of HBM; benchmarks/int8_matvec.py),
so int8 bought nothing. The dot pads x to 16 rows and (suspected in notes/pallas8.md,
not proven) takes the int8 tile through shared memory. This kernel has no dot. Each program owns
a [block_n] column strip and one K range, and per loop step loads `unroll` int8 tiles
[block_k, block_n]. It converts each tile to f32 in registers and adds x[k] * w[k, n]
elementwise into one f32 accumulator [block_k, block_n] per row of x. The K sum runs
once, after the loop, so the loop has no cross-thread traffic and no barrier.

Two weight views, both of the same bytes (no copy, no repacking at load time):
- "i8": tiles of int8 [block_k, block_n]; the conversion is a cast ("direct") or
  the f32 magic-number trick ("magic": (int32(v) + 0x4B000080) as f32 - (2**23 + 128)).
- "i32": the weight bitcast to int32 [K, N / 4] (4 adjacent columns per word). Each
  word is XORed with 0x80808080 (v + 128, as unsigned bytes), and byte i becomes
  f32 bits 0x4B000000 | byte, minus 2**23 + 128: shifts and masks on whole words, no
  per-byte sign extension. Accumulator i holds columns 4c + i: the kernel writes f32
  [splits, M, 4, N / 4] and the XLA epilogue sums and interleaves them.

Split-K: with `splits` > 1 each split writes f32 partials [splits, M, N], and XLA sums
them. That reduction fuses with the product's consumer (the int8 scale multiply).

On the H200 at M = 1 (benchmarks/int8_matvec.py) it reads int8 at 2.4 TB/s in the
Llama-8B MLP products and 3.3 TB/s in the lm head, and 8 layers of MLP products take
0.76x the bf16 GEMMs' time. At M = 2 it is slower than XLA's int8 GEMM (the per-row
accumulators' registers and FMAs), so codegen's int8_matmul="auto" uses it for one row.

On platforms other than GPU, with `interpret` False, the product runs as the jnp
reference (int8_gemv_reference). `interpret=True`, or the interpreted() context, runs
the Pallas kernel in the interpreter on any platform; the CPU tests do that.
"""
from __future__ import annotations

import contextlib
import dataclasses

from ...errors import EinpartError
from .int8_matmul import MAGIC, MAGIC_BITS, _next_pow2, check_operands

MAX_ROWS = 8
LAYOUTS = ("i8", "i32")
CONVERTS = ("direct", "magic")
TARGET_PROGRAMS = 528          # about four programs per multiprocessor of an H100/H200 (132)
FLIP = -0x7F7F7F80             # 0x80808080 as int32: XOR flips each byte's sign bit (v + 128)
EXP_BITS = 0x4B000000          # f32 bits of 2**23: OR a byte u into the mantissa -> 2**23 + u


@dataclasses.dataclass(frozen=True)
class Int8GemvConfig:
    """Tile sizes and launch parameters of the GEMV kernel (see default_gemv_config)."""
    block_n: int = 256        # output columns per program (int8 columns, also in the "i32" view)
    block_k: int = 16         # K rows per tile
    unroll: int = 4           # tiles loaded per loop step (bytes in flight per program)
    splits: int = 1           # K ranges (programs along K)
    num_warps: int = 4
    num_stages: int = 1
    convert: str = "magic"    # "i8" view only: "direct" cast or "magic" f32 bits
    layout: str = "i8"        # "i8" tiles, or "i32" words of 4 columns

    def check(self) -> None:
        if self.layout not in LAYOUTS:
            raise EinpartError(f"int8_gemv: layout = {self.layout!r} must be one of {', '.join(LAYOUTS)}")
        if self.convert not in CONVERTS:
            raise EinpartError(f"int8_gemv: convert = {self.convert!r} must be one of {', '.join(CONVERTS)}")
        low = 64 if self.layout == "i32" else 16
        for name, lo in (("block_n", low), ("block_k", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo or v & (v - 1):
                raise EinpartError(f"int8_gemv: {name} = {v!r} must be a power of two >= {lo}")
        if not isinstance(self.num_warps, int) or self.num_warps not in (1, 2, 4, 8, 16):
            raise EinpartError(f"int8_gemv: num_warps = {self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        for name in ("unroll", "splits", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise EinpartError(f"int8_gemv: {name} = {v!r} must be an integer >= 1")


def split_for(k: int, n: int, cfg: Int8GemvConfig, target: int = TARGET_PROGRAMS) -> int:
    """Splits of K that bring the grid near `target` programs: the largest divisor of
    the K step count whose grid stays at or under it (at least 1), so that every split
    holds whole steps and the loads need no K mask when K divides into steps."""
    return _splits_for_strips(k, -(-n // cfg.block_n), cfg, target)


def _splits_for_strips(k: int, strips: int, cfg: Int8GemvConfig, target: int = TARGET_PROGRAMS) -> int:
    steps = -(-k // (cfg.block_k * cfg.unroll))
    best = 1
    for s in range(1, steps + 1):
        if steps % s == 0 and strips * s <= max(target, strips):
            best = s
    return best


def default_gemv_config(m: int, k: int, n: int) -> Int8GemvConfig:
    """The config for [m, k] x [k, n]: 512-column strips, 8 warps, one 32-row tile a
    step (16 rows for 2 rows of x, 8 for 3..4, 4 above: the per-row accumulators'
    registers), K splits until the grid holds about TARGET_PROGRAMS programs.

    From the H200 sweeps of the Llama-8B decode shapes at M = 1 (benchmarks/results/
    int8-matvec-h200-int8kernel{1,2}-sweep.log): in sweep 2 this config was within
    0.0006 ms of the fastest config of each shape and the fastest for 4096 x 1024
    (0.0074 ms) and the lm head 4096 x 128256 (0.159 ms, 3.3 TB/s); the MLP products
    took 0.024-0.025 ms (2.4 TB/s) against 0.032 for bf16. The default the decode run
    of sweep 2 used (16-row tiles, 2 a step; 256 columns and 4 warps below 2**25
    elements) took 0.0141 ms for 4096 x 1024 and 0.176 for the lm head."""
    block_n = min(512, max(16, _next_pow2(n)))
    block_k = 32 if m == 1 else max(4, 32 // _next_pow2(m))
    base = Int8GemvConfig(block_n=block_n, block_k=block_k, unroll=1, num_warps=8)
    return dataclasses.replace(base, splits=split_for(k, n, base))


def _check_operands(x, w) -> tuple[int, int, int]:
    import jax.numpy as jnp
    return check_operands("int8_gemv", x, w, (jnp.bfloat16, jnp.float32), "bfloat16 or float32", MAX_ROWS,
                          "decode batches of a few rows (use a dot for more)")


def int8_gemv_reference(x, w, out_dtype=None):
    """The jnp product the kernel computes: a bf16 x times w cast to bf16 (exact), a
    float32 x times w cast to float32 at full precision; float32 accumulation."""
    import jax
    import jax.numpy as jnp
    _check_operands(x, w)
    y = jnp.einsum("mk,kn->mn", x, w.astype(x.dtype), preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    return y.astype(out_dtype or x.dtype)


def int8_gemv(x, w, config: Int8GemvConfig | None = None, *, out_dtype=None, interpret: bool | None = None):
    """x [M, K] (bf16 or f32) @ w [K, N] int8 -> [M, N] in `out_dtype` (default x's dtype),
    f32 accumulation, 1 <= M <= MAX_ROWS.

    On GPU the Pallas/Triton kernel with `config` (default: default_gemv_config);
    elsewhere int8_gemv_reference, unless `interpret` (default: the interpreted()
    context's setting) runs the kernel in the Pallas interpreter. Usable inside jax.jit
    and inside a shard_map body (on each device's local blocks)."""
    m, k, n = _check_operands(x, w)
    cfg = config if config is not None else default_gemv_config(m, k, n)
    return _gemv(x, (w,), m, k, (n,), cfg, out_dtype, interpret)[0]


def int8_gemv_siblings(x, ws, config: Int8GemvConfig | None = None, *, out_dtype=None,
                       interpret: bool | None = None) -> tuple:
    """(x @ w for w in ws): several int8 weights [K, N_i] that share one activation x [M, K]
    (Llama's q / k / v projections of one normed input, the MLP's gate and up), in ONE
    kernel launch, without concatenating the weights.

    Why: at decode batch 1 the small products are launch- and ramp-bound (4096 x 1024 takes
    7-14 us on an H200 for 4 MB of int8), and each product's split-K partials need their
    own XLA sum. Here one grid covers every weight's column strips: a program picks its
    weight by its strip id (one pl.when branch per weight, each on its own ref, passed
    whole), and all partials land in one f32 array [splits, M, sum N_i] at each weight's
    column offset, summed by one XLA reduction and sliced per weight. One config for the
    group (default: default_gemv_config of the widest weight's strips and the group's
    total strips). Same numerics as int8_gemv per weight; the same platform rules."""
    if not isinstance(ws, (tuple, list)) or not ws:
        raise EinpartError(f"int8_gemv_siblings: ws must be a non-empty tuple of int8 weights, got {type(ws).__name__}")
    shapes = [_check_operands(x, w) for w in ws]
    m, k = shapes[0][:2]
    ns = tuple(n for _, _, n in shapes)
    cfg = config if config is not None else default_siblings_config(m, k, ns)
    return _gemv(x, tuple(ws), m, k, ns, cfg, out_dtype, interpret)


def default_siblings_config(m: int, k: int, ns: tuple) -> Int8GemvConfig:
    """default_gemv_config for a group of weights [k, n] for n in `ns`: the strip width of
    the widest one, K splits for the group's total strip count (about TARGET_PROGRAMS)."""
    base = dataclasses.replace(default_gemv_config(m, k, max(ns)), splits=1)
    strips = sum(-(-n // base.block_n) for n in ns)
    return dataclasses.replace(base, splits=_splits_for_strips(k, strips, base))


def _gemv(x, ws, m, k, ns, cfg, out_dtype, interpret):
    import jax
    import jax.numpy as jnp
    if not isinstance(cfg, Int8GemvConfig):
        raise EinpartError(f"int8_gemv: config must be an Int8GemvConfig, got {type(cfg).__name__}")
    cfg.check()
    for n in ns:
        if cfg.layout == "i32" and n % 4:
            raise EinpartError(f"int8_gemv: layout 'i32' needs N divisible by 4 (4 columns per word), got N = {n}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    interpret = _INTERPRET[-1] if interpret is None else interpret
    if not (interpret or jax.default_backend() == "gpu"):
        return tuple(int8_gemv_reference(x, w, out_dtype) for w in ws)
    return _pallas_gemv(x, ws, m, k, ns, cfg, interpret, out_dtype)


_INTERPRET = [False]


@contextlib.contextmanager
def interpreted():
    """Within this context int8_gemv runs its Pallas kernel in the interpreter on any
    platform (the CPU tests of generated code that calls it)."""
    _INTERPRET.append(True)
    try:
        yield
    finally:
        _INTERPRET.pop()


def _pallas_gemv(x, ws, m, k, ns, cfg: Int8GemvConfig, interpret: bool, out_dtype):
    """The kernel over the weights `ws` ([k, n] for n in `ns`) that share x: one grid of
    (all weights' column strips, K splits); weight i owns strips first[i] .. first[i + 1]
    and writes output columns off[i] .. off[i] + ns[i] (one output for all). With one
    weight there is no branch: the plain GEMV."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    words = cfg.layout == "i32"
    per = 4 if words else 1                      # int8 columns per loaded element
    bk, un = cfg.block_k, cfg.unroll
    bn = cfg.block_n // per                      # loaded elements per row of a tile
    nws = [n // per for n in ns]                 # loaded elements per row of each w
    counts = [-(-nw // bn) for nw in nws]        # column strips of each w
    first = [sum(counts[:i]) for i in range(len(ns) + 1)]
    offs = [sum(nws[:i]) for i in range(len(ns))]  # each w's first output element
    strips, nw_all, n_all = first[-1], sum(nws), sum(ns)
    group = bk * un                              # K rows per loop step
    steps_total = -(-k // group)
    steps = -(-steps_total // min(cfg.splits, steps_total))
    splits = -(-steps_total // steps)
    k_mask = splits * steps * group != k
    # f32 partials [splits, M, per, N / per] summed by XLA: with split-K, and always for the "i32"
    # view (accumulator i holds columns 4c + i, which the XLA epilogue interleaves)
    partial = splits > 1 or words
    xt = x.T                                     # [K, M]: a row of x loads as a [block_k, 1] column
    wvs = [jax.lax.bitcast_convert_type(w.reshape(k, nw, 4), jnp.int32) if words else w
           for w, nw in zip(ws, nws)]

    def convert(t):
        """A loaded tile -> list of (f32 tile, column offset within the word)."""
        if words:
            u = t ^ jnp.int32(FLIP)
            return [(jax.lax.bitcast_convert_type(((u >> (8 * i)) & 0xFF) | EXP_BITS, jnp.float32) - MAGIC, i)
                    for i in range(4)]
        if cfg.convert == "magic":
            return [(jax.lax.bitcast_convert_type(t.astype(jnp.int32) + MAGIC_BITS, jnp.float32) - MAGIC, 0)]
        return [(t.astype(jnp.float32), 0)]

    def strip(x_ref, w_ref, o_ref, j, s, nw, off):
        """Strip j of the weight w_ref ([k, nw] elements), K split s, into output columns off + ..."""
        n_mask = -(-nw // bn) * bn != nw
        c0 = j * bn
        cols = c0 + jnp.arange(bn)
        col_ok = cols < nw

        def body(i, accs):
            accs = list(accs)
            for u in range(un):
                k0 = (s * steps + i) * group + u * bk
                if k_mask:
                    k_ok = (k0 + jnp.arange(bk)) < k
                    t = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(c0, bn)],
                                   mask=k_ok[:, None] & col_ok[None, :] if n_mask else k_ok[:, None], other=0)
                elif n_mask:
                    t = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(c0, bn)], mask=col_ok[None, :], other=0)
                else:
                    t = plgpu.load(w_ref.at[pl.ds(k0, bk), pl.ds(c0, bn)])
                parts = convert(t)
                for r in range(m):
                    xs = x_ref.at[pl.ds(k0, bk), pl.ds(r, 1)]
                    xr = (plgpu.load(xs, mask=k_ok[:, None], other=0.0) if k_mask else plgpu.load(xs))
                    xr = xr.astype(jnp.float32)
                    for f, (wf, _) in enumerate(parts):
                        a = r * per + f
                        accs[a] = accs[a] + xr * wf
            return tuple(accs)

        init = tuple(jnp.zeros((bk, bn), jnp.float32) for _ in range(m * per))
        accs = jax.lax.fori_loop(0, steps, body, init)
        for r in range(m):
            for i in range(per):
                y = jnp.sum(accs[r * per + i], axis=0)
                # rows as length-1 slices: an integer index on a stored ref fails in the interpreter
                if partial:   # [splits, M, per, N / per] f32
                    dst = o_ref.at[pl.ds(s, 1), pl.ds(r, 1), pl.ds(i, 1), pl.ds(off + c0, bn)]
                    val = y[None, None, None, :]
                else:         # [M, N] in out_dtype
                    dst, val = o_ref.at[pl.ds(r, 1), pl.ds(off + c0, bn)], y.astype(out_dtype)[None, :]
                if n_mask:
                    plgpu.store(dst, val, mask=jnp.broadcast_to(col_ok, val.shape))
                else:
                    plgpu.store(dst, val)

    def kernel(x_ref, *refs):
        w_refs, o_ref = refs[:-1], refs[-1]
        j = pl.program_id(0)
        s = pl.program_id(1)
        if len(w_refs) == 1:
            return strip(x_ref, w_refs[0], o_ref, j, s, nws[0], 0)
        for i, w_ref in enumerate(w_refs):    # each program runs the one branch of its weight
            @pl.when((j >= first[i]) & (j < first[i + 1]))
            def _(i=i, w_ref=w_ref):
                strip(x_ref, w_ref, o_ref, j - first[i], s, nws[i], offs[i])

    out_shape = jax.ShapeDtypeStruct((splits, m, per, nw_all) if partial else (m, n_all),
                                     jnp.float32 if partial else out_dtype)
    params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    name = f"int8_gemv_m{m}_{cfg.layout}_n{cfg.block_n}_k{bk}x{un}_s{splits}" + (f"_w{len(ws)}" if len(ws) > 1 else "")
    y = pl.pallas_call(kernel, out_shape=out_shape, grid=(strips, splits), interpret=interpret,
                       compiler_params=params, name=name)(xt, *wvs)
    if partial:
        y = y.sum(axis=0).transpose(0, 2, 1).reshape(m, n_all).astype(out_dtype)
    if len(ws) == 1:
        return (y,)
    return tuple(y[:, o * per:o * per + n] for o, n in zip(offs, ns))


def gemv_programs(k: int, n: int, cfg: Int8GemvConfig) -> int:
    """How many programs the kernel launches for [., k] x [k, n] with this config."""
    steps_total = -(-k // (cfg.block_k * cfg.unroll))
    steps = -(-steps_total // min(cfg.splits, steps_total))
    return -(-n // cfg.block_n) * (-(-steps_total // steps))
