"""How fast XLA runs a decode step's products with int8 weights (issue 7): the
lowering choice behind `--int8` decode at small batch.

Eight layers of Llama-8B MLP products ([B,4096]x[4096,14336], then
[B,14336]x[14336,4096]), each layer's weights its own array (per-layer
storage, as layers=unroll stores them), timed for these forms:

  bf16        bf16 weights, one dot (the baseline of every row);
  i8-dot      int8 weights cast to bf16 inside the dot, as codegen.statements
              emits it (XLA fuses the cast into a Triton GEMM);
  i8-reduce   int8 weights, the product written as a broadcast multiply and a
              sum over the contracted axis (XLA fuses the cast, multiply and
              sum into one reduction kernel that reads the int8 bytes once).

Each row prints the median time of one call, the weight bytes per second it
reaches, its share of the HBM floor (weight bytes / measured copy bandwidth)
and its time against bf16 at the same batch.

    python benchmarks/int8_matvec.py [--batches 1,8,64] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan import device, versions, write_result  # noqa: E402

FORMS = ("bf16", "i8-dot", "i8-reduce")


def product(form: str, x, w):
    """x [B, d] times w [d, f] -> [B, f] bf16 in one of FORMS."""
    import jax.numpy as jnp
    if form == "bf16":
        return jnp.einsum("bd,df->bf", x, w, preferred_element_type=jnp.bfloat16)
    if form == "i8-dot":
        return jnp.einsum("bd,df->bf", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.bfloat16)
    prod = x[:, :, None].astype(jnp.float32) * w[None].astype(jnp.float32)
    return jnp.sum(prod, axis=1).astype(jnp.bfloat16)


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes per second of a device copy (read + write), the floor's bandwidth."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    return 2 * n_bytes / statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    shapes = [(args.d, args.f), (args.f, args.d)] * args.layers
    i8 = [jnp.asarray(rng.integers(-127, 128, s, dtype=np.int8)) for s in shapes]
    bf = [w.astype(jnp.bfloat16) for w in i8]
    bw = copy_bandwidth()
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        x = jnp.asarray(rng.standard_normal((b, args.d)) * 0.01, jnp.bfloat16)
        base = None
        for form in FORMS:
            ws = bf if form == "bf16" else i8

            def step(x, ws, form=form):
                for w in ws:
                    x = product(form, x, w) * (1.0 / 64)
                return x
            fn = jax.jit(step)
            jax.block_until_ready(fn(x, ws))
            ts = []
            for _ in range(args.calls):
                t = time.perf_counter()
                jax.block_until_ready(fn(x, ws))
                ts.append(time.perf_counter() - t)
            s = statistics.median(ts)
            n_bytes = sum(int(w.size) * w.dtype.itemsize for w in ws)
            base = s if form == "bf16" else base
            rows.append({"batch": b, "form": form, "ms": s * 1e3, "weight_bytes": n_bytes,
                         "tb_per_s": n_bytes / s / 1e12, "of_floor": n_bytes / bw / s, "vs_bf16": s / base})
    print(f"{'batch':>5}  {'form':10}  {'ms':>8}  {'TB/s':>6}  {'of floor':>8}  {'vs bf16':>7}")
    for r in rows:
        print(f"{r['batch']:5d}  {r['form']:10}  {r['ms']:8.3f}  {r['tb_per_s']:6.2f}  "
              f"{100 * r['of_floor']:7.1f}%  {r['vs_bf16']:6.2f}x")
    result = {"device": device(), "accelerator": jax.devices()[0].device_kind, "jax": jax.__version__, "versions": versions(),
              "command": " ".join(["python", "benchmarks/int8_matvec.py", *(argv or sys.argv[1:])]),
              "copy_bandwidth_tb_per_s": bw / 1e12, "layers": args.layers, "d": args.d, "f": args.f,
              "rows": rows}
    print("wrote", write_result(result, f"int8-matvec-{jax.devices()[0].platform}", args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
