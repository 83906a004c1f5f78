"""How fast a decode step's products run with int8 weights (issue 7): the
lowering choice behind `--int8` decode at small batch.

Eight layers of Llama-8B MLP products ([B,4096]x[4096,14336], then
[B,14336]x[14336,4096]), each layer's weights its own array (per-layer
storage, as layers=unroll stores them), timed for these forms:

  bf16        bf16 weights, one dot (the baseline of every row);
  i8-dot      int8 weights cast to bf16 inside the dot, as codegen.statements
              emits it (XLA fuses the cast into a Triton GEMM);
  i8-pallas   int8 weights through einpart.runtime.kernels.int8_matmul (a
              Pallas/Triton kernel streaming the int8 bytes; default config);
  i8-pallas-tuned  the same kernel with, per weight shape, the fastest config of
              this run's --sweep at the nearest swept batch (needs --sweep);
  i8-reduce   int8 weights, the product written as a broadcast multiply and a
              sum over the contracted axis (one XLA reduction kernel);
  i8-gemv     int8 weights through einpart.runtime.kernels.int8_gemv (the
              Pallas/Triton kernel with no dot, for M <= 8; default config);
  i8-gemv-tuned  the same with, per weight shape, the fastest config of this
              run's --gemv-sweep at the same batch (needs --gemv-sweep).

Timing: a burst of --calls calls is dispatched and blocked on once, and the
median over --bursts bursts of (burst time / calls) is reported, so host
dispatch and the wait are not counted per call (the bandwidth probes are timed
the same way). Each row prints the time of one call, the weight bytes per
second it reaches, its share of the HBM floor (weight bytes / the larger of the
measured copy and read-only bandwidths), its time against bf16 at the same batch, and its output's error
against the i8-dot output (same function: int8 weights, f32 accumulation).

--sweep first times the kernel's block configs on each product shape alone
(8 weights of that shape) at --sweep-batches, and stores them under "sweep";
the i8-pallas-tuned rows use its winners. --gemv-sweep does the same for the
int8_gemv kernel on each Llama-8B decode product shape (--gemv-shapes, enough
copies of the weight to pass 400 MB), at --gemv-batches, with the bf16 and i8-dot
products of the same shape timed beside it (stored under "gemv_sweep").

    python benchmarks/int8_matvec.py [--batches 1,8,64] [--sweep] [--out FILE]
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

from einpart.runtime.kernels.int8_gemv import MAX_ROWS as GEMV_MAX_ROWS  # noqa: E402

FORMS = ("bf16", "i8-dot", "i8-pallas", "i8-pallas-tuned", "i8-reduce", "i8-gemv", "i8-gemv-tuned")
# the products of a Llama-8B decode step: wq and wo, wk and wv, w_gate and w_up, w_down, the lm head
GEMV_SHAPES = "4096x4096,4096x1024,4096x14336,14336x4096,4096x128256"
# int8_gemv configs swept at M = 1 beside default_gemv_config (block_n, block_k, unroll, num_warps,
# num_stages, convert, layout, programs the K splits aim at)
GEMV_SWEEP = ((512, 16, 2, 8, 1, "magic", "i8", 1056), (512, 16, 4, 8, 1, "magic", "i8", 528),
              (256, 16, 8, 4, 1, "magic", "i8", 1056), (512, 16, 2, 8, 1, "magic", "i32", 528),
              (512, 32, 1, 8, 1, "magic", "i8", 528))
# at M > 1: the default only
GEMV_SWEEP_ROWS = ()


def product(form: str, x, w, config=None):
    """x [B, d] times w [d, f] -> [B, f] bf16 in one of FORMS."""
    import jax.numpy as jnp
    if form == "bf16":
        return jnp.einsum("bd,df->bf", x, w, preferred_element_type=jnp.bfloat16)
    if form == "i8-dot":
        return jnp.einsum("bd,df->bf", x, w.astype(jnp.bfloat16), preferred_element_type=jnp.bfloat16)
    if form in ("i8-pallas", "i8-pallas-tuned"):
        from einpart.runtime.kernels import int8_matmul
        return int8_matmul(x, w, config)
    if form in ("i8-gemv", "i8-gemv-tuned"):
        from einpart.runtime.kernels.int8_gemv import int8_gemv
        return int8_gemv(x, w, config)
    prod = x[:, :, None].astype(jnp.float32) * w[None].astype(jnp.float32)
    return jnp.sum(prod, axis=1).astype(jnp.bfloat16)


def burst_seconds(fn, args, calls: int, bursts: int) -> float:
    """Seconds per call: `calls` dispatched back to back, one block at the end."""
    import jax
    jax.block_until_ready(fn(*args))
    per = []
    for _ in range(bursts):
        t = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / calls)
    return statistics.median(per)


def hbm_bandwidth(calls: int, bursts: int, n_bytes: int = 1 << 30) -> dict:
    """Bytes per second through HBM two ways (as calibrate.copy_bandwidth, burst-timed):
    a copy-like scale (read + write) and a read-only sum (bytes read). The larger is
    the floor's bandwidth: a product streaming its weights only reads."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(3), (n_bytes // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1.5))
    read = jax.jit(lambda a: jnp.sum(a.reshape(-1, 4096), axis=0, dtype=jnp.float32))
    return {"copy": 2 * n_bytes / burst_seconds(copy, (a,), calls, bursts),
            "read": n_bytes / burst_seconds(read, (a,), calls, bursts)}


def rel_err(y, ref) -> float:
    import numpy as np
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def sweep(rng, args, bw: float) -> list[dict]:
    """Each SWEEP config of the kernel on each product shape alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from einpart.runtime.kernels import Int8MatmulConfig, default_config, int8_matmul
    from einpart.runtime.kernels.int8_matmul import TARGET_PROGRAMS, grid_programs
    rows = []
    for k, n in ((args.d, args.f), (args.f, args.d)):
        ws = [jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8)) for _ in range(args.layers)]
        n_bytes = args.layers * k * n
        for b in [int(v) for v in args.sweep_batches.split(",")]:
            x = jnp.asarray(rng.standard_normal((b, k)), jnp.bfloat16)
            ref = jnp.einsum("bk,kn->bn", x, ws[0].astype(jnp.bfloat16), preferred_element_type=jnp.float32)
            cfgs = [default_config(b, k, n)]
            for bn, bk, s, nw, st in SWEEP:
                s = s or max(1, min(-(-TARGET_PROGRAMS // -(-n // bn)), -(-k // bk) // 2))
                for conv, red in SWEEP_VARIANTS:
                    if s > 1 or red == "partials":
                        cfgs.append(Int8MatmulConfig(bn, bk, s, nw, st, conv, red))
            for bn, bk, nw, st, conv in SWEEP_FMA if b == 1 else ():
                s = max(1, min(-(-TARGET_PROGRAMS // -(-n // bn)), -(-k // bk) // 2))
                cfgs.append(Int8MatmulConfig(bn, bk, s, nw, st, conv, "atomic", "fma"))
            for cfg in cfgs:
                row = {"batch": b, "k": k, "n": n, "config": vars(cfg).copy(),
                       "programs": grid_programs(b, k, n, cfg)}
                try:
                    fn = jax.jit(lambda x, ws, cfg=cfg: tuple(int8_matmul(x, w, cfg) for w in ws))
                    row["rel_err"] = rel_err(fn(x, ws)[0], ref)
                    s = burst_seconds(fn, (x, ws), args.calls, args.bursts)
                    row.update(ms=s * 1e3, tb_per_s=n_bytes / s / 1e12, of_floor=n_bytes / bw / s)
                    print(f"sweep {k}x{n} b={b} {cfg}: {s * 1e3:.3f} ms {n_bytes / s / 1e12:.2f} TB/s "
                          f"err {row['rel_err']:.1e}", flush=True)
                except Exception as e:  # a config the lowering refuses stays in the table as an error
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"sweep {k}x{n} b={b} {cfg}: {row['error']}", flush=True)
                rows.append(row)
    return rows


def gemv_configs(b: int, k: int, n: int) -> list:
    """The int8_gemv configs swept for [b, k] x [k, n]."""
    import dataclasses
    from einpart.runtime.kernels.int8_gemv import Int8GemvConfig, default_gemv_config, split_for
    out = [default_gemv_config(b, k, n)]
    for bn, bk, un, nw, st, conv, lay, target in (GEMV_SWEEP if b == 1 else GEMV_SWEEP_ROWS):
        c = Int8GemvConfig(min(bn, max(16, 1 << (n - 1).bit_length())), bk, un, 1, nw, st, conv, lay)
        out.append(dataclasses.replace(c, splits=split_for(k, n, c, target)))
    return out


def gemv_sweep(args, bw: float) -> list[dict]:
    """bf16, i8-dot and each int8_gemv config on each --gemv-shapes product alone."""
    import jax
    import jax.numpy as jnp
    from einpart.runtime.kernels.int8_gemv import gemv_programs, int8_gemv
    rows = []
    weights = {}
    for shape in args.gemv_shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        copies = max(2, min(32, -(-400_000_000 // (k * n))))
        keys = jax.random.split(jax.random.key(7), copies)
        ws = [jax.random.randint(kk, (k, n), -127, 128, jnp.int8) for kk in keys]
        weights[k, n] = (ws, [w.astype(jnp.bfloat16) for w in ws])
    for b in [int(v) for v in args.gemv_batches.split(",")]:     # batch outer: M = 1 done first
        for (k, n), (ws, bfs) in weights.items():
            copies, n_bytes = len(ws), len(ws) * k * n
            x = jax.random.normal(jax.random.key(b), (b, k), jnp.bfloat16)
            ref = jnp.einsum("bk,kn->bn", x, ws[0].astype(jnp.bfloat16), preferred_element_type=jnp.float32)
            cands = [("bf16", None), ("i8-dot", None)] + [("i8-gemv", c) for c in gemv_configs(b, k, n)]
            for form, cfg in cands:
                row = {"batch": b, "k": k, "n": n, "form": form, "copies": copies}
                if cfg is not None:
                    row.update(config=vars(cfg).copy(), programs=gemv_programs(k, n, cfg))
                try:
                    if form == "i8-gemv":
                        fn = jax.jit(lambda x, ws, cfg=cfg: tuple(int8_gemv(x, w, cfg) for w in ws))
                    else:
                        fn = jax.jit(lambda x, ws, form=form: tuple(product(form, x, w) for w in ws))
                    wl = bfs if form == "bf16" else ws
                    row["rel_err"] = rel_err(fn(x, wl)[0], ref)
                    t = burst_seconds(fn, (x, wl), args.calls, args.bursts)
                    nb = n_bytes * (2 if form == "bf16" else 1)
                    row.update(ms=t * 1e3, tb_per_s=nb / t / 1e12, of_floor=nb / bw / t)
                    print(f"gemv-sweep {k}x{n} b={b} {form} {cfg or ''}: {t * 1e3 / copies:.4f} ms/product "
                          f"{nb / t / 1e12:.2f} TB/s err {row['rel_err']:.1e}", flush=True)
                except Exception as e:  # a config the lowering refuses stays in the table as an error
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    print(f"gemv-sweep {k}x{n} b={b} {form} {cfg}: {row['error']}", flush=True)
                rows.append(row)
    return rows


def gemv_tuned(rows: list[dict], k: int, n: int, b: int):
    """The fastest swept int8_gemv config for [b, k] x [k, n] (same batch, else the nearest)."""
    from einpart.runtime.kernels.int8_gemv import Int8GemvConfig, default_gemv_config
    ok = [r for r in rows if r["k"] == k and r["n"] == n and r["form"] == "i8-gemv" and "ms" in r]
    if not ok:
        return default_gemv_config(b, k, n)
    near = min(abs(r["batch"] - b) for r in ok)
    best = min((r for r in ok if abs(r["batch"] - b) == near), key=lambda r: r["ms"])
    return Int8GemvConfig(**best["config"])


def tuned_config(rows: list[dict], k: int, n: int, b: int):
    """The fastest swept config for [b, k] x [k, n]: among the swept batches with
    the same padded rows as b (else all), the nearest; "fma" only for b = 1."""
    from einpart.runtime.kernels import Int8MatmulConfig
    from einpart.runtime.kernels.int8_matmul import padded_rows
    ok = [r for r in rows if r["k"] == k and r["n"] == n and "ms" in r
          and (b == 1 or r["config"]["mode"] != "fma")]
    same = [r for r in ok if padded_rows(r["batch"]) == padded_rows(b)] or ok
    near = min(abs(r["batch"] - b) for r in same)
    best = min((r for r in same if abs(r["batch"] - b) == near), key=lambda r: r["ms"])
    return Int8MatmulConfig(**best["config"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--calls", type=int, default=20, help="calls per timed burst")
    ap.add_argument("--bursts", type=int, default=5, help="timed bursts (the median is reported)")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's block configs")
    ap.add_argument("--sweep-batches", default="1,64")
    ap.add_argument("--gemv-sweep", action="store_true", help="time int8_gemv configs per decode product shape")
    ap.add_argument("--gemv-shapes", default=GEMV_SHAPES)
    ap.add_argument("--gemv-batches", default="1,2,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    forms = [f for f in args.forms.split(",") if f]
    bad = [f for f in forms if f not in FORMS]
    if bad or "bf16" not in forms:
        ap.error(f"--forms takes bf16 and any of {', '.join(FORMS[1:])}; got {args.forms}")
    if "i8-pallas-tuned" in forms and not args.sweep:
        ap.error("--forms i8-pallas-tuned needs --sweep (it uses the sweep's fastest configs)")
    if "i8-gemv-tuned" in forms and not args.gemv_sweep:
        ap.error("--forms i8-gemv-tuned needs --gemv-sweep (it uses the sweep's fastest configs)")
    rng = np.random.default_rng(0)
    shapes = [(args.d, args.f), (args.f, args.d)] * args.layers
    # drawn on the device (host draws of ~1 GB of int8 cost device-session seconds)
    i8 = [jax.random.randint(jax.random.key(i), s, -127, 128, jnp.int8) for i, s in enumerate(shapes)]
    bf = [w.astype(jnp.bfloat16) for w in i8]
    hbm = hbm_bandwidth(args.calls, args.bursts)
    bw = max(hbm.values())
    print("HBM " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in hbm.items()), flush=True)
    swept = sweep(rng, args, bw) if args.sweep else []
    gswept = gemv_sweep(args, bw) if args.gemv_sweep else []
    rows = []
    for b in [int(v) for v in args.batches.split(",")]:
        x = jnp.asarray(rng.standard_normal((b, args.d)) * 0.01, jnp.bfloat16)
        base = ref = None
        for form in forms:
            ws = bf if form == "bf16" else i8
            if form.startswith("i8-gemv") and b > GEMV_MAX_ROWS:
                continue    # the kernel is for M <= its MAX_ROWS

            tuned = {}
            if form == "i8-pallas-tuned":
                tuned = {s: tuned_config(swept, *s, b) for s in set(shapes)}
            if form == "i8-gemv-tuned":
                tuned = {s: gemv_tuned(gswept, *s, b) for s in set(shapes)}

            def step(x, ws, form=form, tuned=tuned):
                for w in ws:
                    x = product(form, x, w, tuned.get(tuple(w.shape))) * (1.0 / 64)
                return x
            fn = jax.jit(step)
            row = {"batch": b, "form": form}
            if tuned:
                row["configs"] = {f"{k}x{n}": vars(c).copy() for (k, n), c in tuned.items()}
            try:
                out = fn(x, ws)
                ref = out if form == "i8-dot" else ref
                s = burst_seconds(fn, (x, ws), args.calls, args.bursts)
            except Exception as e:  # e.g. the kernel does not lower on this platform
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(b, form, row["error"], flush=True)
                rows.append(row)
                continue
            n_bytes = sum(int(w.size) * w.dtype.itemsize for w in ws)
            base = s if form == "bf16" else base
            row.update(ms=s * 1e3, weight_bytes=n_bytes, tb_per_s=n_bytes / s / 1e12, of_floor=n_bytes / bw / s,
                       vs_bf16=s / base, err_vs_i8_dot=rel_err(out, ref) if ref is not None else None)
            rows.append(row)
    print(f"{'batch':>5}  {'form':15}  {'ms':>8}  {'TB/s':>6}  {'of floor':>8}  {'vs bf16':>7}  {'err':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['batch']:5d}  {r['form']:15}  {r['error'][:60]}")
            continue
        err = "" if r["err_vs_i8_dot"] is None else f"{r['err_vs_i8_dot']:.1e}"
        print(f"{r['batch']:5d}  {r['form']:15}  {r['ms']:8.3f}  {r['tb_per_s']:6.2f}  "
              f"{100 * r['of_floor']:7.1f}%  {r['vs_bf16']:6.2f}x  {err:>7}")
    result = {"device": device(), "accelerator": jax.devices()[0].device_kind, "jax": jax.__version__, "versions": versions(),
              "command": " ".join(["python", "benchmarks/int8_matvec.py", *(argv or sys.argv[1:])]),
              "timing": f"median over {args.bursts} bursts of {args.calls} calls, one block per burst",
              "hbm_tb_per_s": {k: v / 1e12 for k, v in hbm.items()}, "floor_bandwidth_tb_per_s": bw / 1e12,
              "layers": args.layers, "d": args.d, "f": args.f,
              "rows": rows, "sweep": swept, "gemv_sweep": gswept}
    print("wrote", write_result(result, f"int8-matvec-{jax.devices()[0].platform}", args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
