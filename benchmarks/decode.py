"""Llama through einpart against plain JAX, on one accelerator, in one run.

Measures, for the same bf16 weights: prefill MFU at B x P tokens and decode
ms/token at several batches with a full context, each as a ratio to a plain
JAX implementation (benchmarks/plain_llama.py, scanned and unrolled) and as a
fraction of the roofline (measured matmul peak; weight + KV-cache bytes over
measured HBM bandwidth). Writes JSON with device, versions and command.

    python benchmarks/decode.py --preset 8b --batches 1,8,64 --context 2048 \\
        --prefill 8x2048 --layers unroll,scan --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PRESETS = {
    "8b": "D=4096,F=14336,H=32,G=8,K=128,L=32,V=128256",
    "1b": "D=2048,F=8192,H=32,G=8,K=64,L=16,V=128256",
    "tiny": "D=256,F=512,H=8,G=2,K=32,L=2,V=1024",
}


def timed(fn, reps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def calibrate(jax, jnp):
    """Measured ceilings: bf16 matmul FLOP/s and HBM bytes/s (read + write)."""
    n = 8192 if jax.default_backend() != "cpu" else 1024
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t = statistics.median(timed(lambda: mm(a, b).block_until_ready(), 10))
    peak = 2 * n ** 3 / t
    m = (1 << 30) if jax.default_backend() != "cpu" else (1 << 24)
    x = jax.random.normal(key, (m,), jnp.float32)
    cp = jax.jit(lambda x: x * 1.0001)
    t = statistics.median(timed(lambda: cp(x).block_until_ready(), 10))
    return peak, 2 * 4 * m / t


def random_weights(expected: dict, dtype, seed: int = 0) -> dict:
    """Random (not zero) weights, fast: one random block tiled over each tensor."""
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 20) * 0.02).astype(dtype)
    gains = (1.0 + rng.standard_normal(1 << 16) * 0.02).astype(dtype)
    out = {}
    for name, (shape, _) in expected.items():
        gain = name.endswith("norm") or name == "norm_f"
        out[name] = np.resize(gains if gain else block, shape)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prefill", default="8x2048", help="BxP, or 'none'")
    ap.add_argument("--layers", default="unroll,scan")
    ap.add_argument("--baseline", default="unroll,scan")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from einpart.ir.parser import parse_file
    from einpart.ir.shapes import DTYPE_BYTES, decl_shapes
    from einpart.passes import run_pipeline
    from einpart.runtime.executable import Executable
    from einpart.runtime.weights import NUMPY_DTYPE, expected_params
    from plain_llama import make_step

    batches = [int(b) for b in args.batches.split(",") if b]
    sets = dict(kv.split("=") for kv in PRESETS[args.preset].split(","))
    sizes = {k: int(v) for k, v in sets.items()} | {"S": args.context, "B": batches[0], "T": 1}
    graph = parse_file(HERE.parent / "examples" / "llama.ein", sizes=sizes)
    graph = run_pipeline(graph, "cast{dtype=bf16}").graph       # bf16 weights and cache
    info = decl_shapes(graph)
    weight_bytes = sum(i.nbytes for i in info.values() if i.decl.kind == "param")
    n_matmul = sum(i.size for n, i in info.items() if i.decl.kind == "param" and len(i.shape) >= 2 and n != "embed")
    L, D, G, K, H = (sizes[k] for k in "LDGKH")

    device = jax.devices()[0]
    peak, hbm = calibrate(jax, jnp)
    print(f"device {device.device_kind}: matmul {peak / 1e12:.0f} TFLOP/s, HBM {hbm / 1e12:.2f} TB/s", flush=True)
    weights = random_weights(expected_params(graph), NUMPY_DTYPE["bf16"])
    rows = []
    results = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
               "numpy": np.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
               "date": datetime.now(timezone.utc).isoformat(), "preset": args.preset, "sizes": sizes,
               "matmul_peak_flops": peak, "hbm_bytes_per_s": hbm, "weight_bytes": weight_bytes, "rows": rows}
    prefill_b, prefill_p = (None, None)
    if args.prefill != "none":
        prefill_b, prefill_p = (int(x) for x in args.prefill.split("x"))

    def kv_bytes(b):
        return 2 * L * b * args.context * G * K * DTYPE_BYTES["bf16"]

    for layers in [x for x in args.layers.split(",") if x]:
        start = time.perf_counter()
        ex = Executable(graph, {"x": 1}, layers=layers, weights=weights, compile=False,
                        prefill_len=prefill_p or 1)
        build_s = time.perf_counter() - start
        for b in batches:
            start = time.perf_counter()
            prog = ex.compiled("decode", b)
            compile_s = time.perf_counter() - start
            module = ex.module(b, ex.prefill_len)
            state = ex.new_state(b)
            tok = ex._put(np.random.default_rng(b).integers(0, sizes["V"], (b, 1)).astype(np.int32),
                          module.INPUT_SPECS["decode"][ex.axes.tokens])
            pos = ex._put(np.asarray(args.context - 8, np.int32), P())
            holder = {"state": state}

            def step():
                outs, holder["state"] = prog(ex.params, holder["state"], {ex.axes.tokens: tok}, pos)
                return outs

            def run_steps():
                for _ in range(args.steps):
                    outs = step()
                jax.block_until_ready((outs, holder["state"]))
            t = statistics.median(timed(run_steps, 3, warmup=1)) / args.steps
            floor = (weight_bytes + kv_bytes(b)) / hbm
            rows.append({"impl": f"einpart-{layers}", "phase": "decode", "batch": b, "ms": t * 1e3,
                         "floor_ms": floor * 1e3, "compile_s": compile_s, "build_s": build_s})
            print(f"einpart {layers:6s} decode b={b:<3d} {t * 1e3:8.2f} ms  floor {floor * 1e3:.2f} ms "
                  f"(compile {compile_s:.1f} s)", flush=True)
            del holder, state
        if prefill_b:
            start = time.perf_counter()
            prog = ex.compiled("prefill", prefill_b, prefill_p)
            compile_s = time.perf_counter() - start
            module = ex.module(prefill_b, prefill_p)
            holder = {"state": ex.new_state(prefill_b)}
            tok = ex._put(np.random.default_rng(0).integers(0, sizes["V"], (prefill_b, prefill_p)).astype(np.int32),
                          module.INPUT_SPECS["prefill"][ex.axes.tokens])
            pos = ex._put(np.asarray(0, np.int32), P())

            def run_prefill():
                outs, holder["state"] = prog(ex.params, holder["state"], {ex.axes.tokens: tok}, pos)
                jax.block_until_ready(outs)
            t = statistics.median(timed(run_prefill, 5))
            flops = 2 * n_matmul * prefill_b * prefill_p + 4 * L * prefill_b * prefill_p * prefill_p * H * K
            rows.append({"impl": f"einpart-{layers}", "phase": "prefill", "batch": prefill_b, "tokens": prefill_p,
                         "ms": t * 1e3, "mfu": flops / t / peak, "compile_s": compile_s})
            print(f"einpart {layers:6s} prefill {prefill_b}x{prefill_p} {t * 1e3:8.1f} ms  "
                  f"{100 * flops / t / peak:.1f}% of measured peak", flush=True)
            del holder
        del ex   # frees its weights and caches before the next variant

    params = jax.device_put(weights) if args.baseline else None
    for mode in [x for x in args.baseline.split(",") if x]:
        fn = jax.jit(make_step(scan=(mode == "scan")), donate_argnums=(1,))
        for b in batches:
            shape = (L, b, args.context, G, K)
            holder = {"state": {"k_cache": jnp.zeros(shape, jnp.bfloat16), "v_cache": jnp.zeros(shape, jnp.bfloat16)}}
            tok = jnp.asarray(np.random.default_rng(b).integers(0, sizes["V"], (b, 1)).astype(np.int32))
            pos = jnp.int32(args.context - 8)
            start = time.perf_counter()
            compiled = fn.lower(params, holder["state"], tok, pos).compile()
            compile_s = time.perf_counter() - start

            def run_steps():
                for _ in range(args.steps):
                    outs, holder["state"] = compiled(params, holder["state"], tok, pos)
                jax.block_until_ready((outs, holder["state"]))
            t = statistics.median(timed(run_steps, 3, warmup=1)) / args.steps
            floor = (weight_bytes + kv_bytes(b)) / hbm
            rows.append({"impl": f"plain-{mode}", "phase": "decode", "batch": b, "ms": t * 1e3,
                         "floor_ms": floor * 1e3, "compile_s": compile_s})
            print(f"plain   {mode:6s} decode b={b:<3d} {t * 1e3:8.2f} ms  floor {floor * 1e3:.2f} ms "
                  f"(compile {compile_s:.1f} s)", flush=True)
            del holder
        if prefill_b:
            shape = (L, prefill_b, args.context, G, K)
            holder = {"state": {"k_cache": jnp.zeros(shape, jnp.bfloat16), "v_cache": jnp.zeros(shape, jnp.bfloat16)}}
            tok = jnp.asarray(np.random.default_rng(0).integers(0, sizes["V"], (prefill_b, prefill_p)).astype(np.int32))
            compiled = fn.lower(params, holder["state"], tok, jnp.int32(0)).compile()

            def run_prefill():
                outs, holder["state"] = compiled(params, holder["state"], tok, jnp.int32(0))
                jax.block_until_ready(outs)
            t = statistics.median(timed(run_prefill, 5))
            flops = 2 * n_matmul * prefill_b * prefill_p + 4 * L * prefill_b * prefill_p * prefill_p * H * K
            rows.append({"impl": f"plain-{mode}", "phase": "prefill", "batch": prefill_b, "tokens": prefill_p,
                         "ms": t * 1e3, "mfu": flops / t / peak})
            print(f"plain   {mode:6s} prefill {prefill_b}x{prefill_p} {t * 1e3:8.1f} ms  "
                  f"{100 * flops / t / peak:.1f}% of measured peak", flush=True)
            del holder

    best_plain = {}
    for r in rows:
        if r["impl"].startswith("plain"):
            k = (r["phase"], r["batch"])
            best_plain[k] = min(best_plain.get(k, float("inf")), r["ms"])
    print(f"\n{'impl':<16}{'phase':<9}{'batch':>6}{'ms':>10}{'vs best plain':>15}{'of roofline':>13}")
    for r in rows:
        base = best_plain.get((r["phase"], r["batch"]))
        r["ratio_to_best_plain"] = r["ms"] / base if base else None
        roof = r.get("floor_ms", 0) / r["ms"] if r["phase"] == "decode" else r["mfu"]
        r["fraction_of_roofline"] = roof
        ratio = f"{r['ratio_to_best_plain']:.2f}x" if base else "-"
        print(f"{r['impl']:<16}{r['phase']:<9}{r['batch']:>6}{r['ms']:>10.2f}{ratio:>15}{100 * roof:>12.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = device.device_kind.replace(" ", "-").lower()
    path = out / f"decode-{args.preset}-{kind}{args.tag}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
