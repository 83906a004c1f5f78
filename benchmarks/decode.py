"""Llama through einpart against plain JAX, on one accelerator, in one run.

Measures, for the same bf16 weights: prefill MFU at B x P tokens and decode
ms/token at several batches with a full context, each as a ratio to a plain
JAX implementation (benchmarks/plain_llama.py, scanned and unrolled), as a
fraction of the floor (weights + KV-cache bytes over the measured copy
bandwidth; FLOPs over the measured matmul peak, both measured in this run by
benchmarks/calibrate.py's functions) and against the time the planner's cost
model predicts (einpart.passes.shard.report.price_graph on the very program
graph that runs, with --hardware, e.g. the calibrated h200 preset). Also the
compile time from spec text to ready executables (parse, passes, codegen,
XLA for prefill and decode). Writes JSON with device, versions and command.

    python benchmarks/decode.py --preset 8b --batches 1,64 --context 2048 \\
        --prefill 8x2048 --layers scan,unroll --hardware h200 --out benchmarks/results

--attention einsum,cudnn runs each variant once per attention lowering (codegen/attention.py:
einsum, xla, cudnn, auto); rows of a mode other than einsum are named with it (einpart-scan-cudnn).
"""
from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

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


def kernel_calls(source: str, program: str) -> int:
    """How many int8 kernel calls (int8_gemv, and int8_gemv_siblings for products that share
    their activation; codegen/int8_matmul.py) a generated program makes."""
    start = source.index(f"\ndef {program}(")
    body = source[start:source.index("\ndef ", start + 1)]
    return body.count("int8_gemv(") + body.count("int8_gemv_siblings(")


def attention_used(source: str, program: str) -> str:
    """How a generated program computes attention: the fused calls' implementations, else einsum."""
    start = source.index(f"\ndef {program}(")
    end = source.find("\n\n\ndef ", start + 1)
    body = source[start:end if end >= 0 else None]
    impls = sorted(set(re.findall(r"implementation='(\w+)'", body)))
    return ",".join(impls) or "einsum"


def dump(path: Path | None, name: str, compiled) -> None:
    """The optimised HLO of a compiled program, gzipped (for diffing einpart against plain JAX)."""
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / f"{name}.hlo.txt.gz", "wt") as f:
        f.write(compiled.as_text())


def generate_rows(ex, name: str, vocab: int, n: int, floor_s: float, batch: int, predicted_s: float) -> list:
    """ms per generated token of ex.generate at `batch` (8-token prompts), greedy, from
    ex.timing's decode time: one compiled call per token (steps_per_call=1, a host
    round trip per token) and 32 per call; the first run of each compiles. The 32-step
    rows carry the cost model's decode step as their prediction (it prices no host
    round trip, which the one-step rows pay)."""
    import numpy as np
    prompt = np.random.default_rng(batch).integers(0, vocab, (batch, 8)).astype(np.int32)
    rows, tokens = [], {}
    for spc in (1, 32):
        ex.generate(prompt, n, steps_per_call=spc)
        runs = []
        for _ in range(3):
            before = (ex.timing.decode_s, ex.timing.decode_steps)
            tokens[spc] = ex.generate(prompt, n, steps_per_call=spc)
            runs.append((ex.timing.decode_s - before[0]) / (ex.timing.decode_steps - before[1]))
        t = statistics.median(runs)
        rows.append({"impl": name, "phase": f"gen-spc{spc}", "batch": batch, "ms": t * 1e3, "tokens": n,
                     "floor_ms": floor_s * 1e3, "vs_host_loop": t * 1e3 / rows[0]["ms"] if rows else 1.0})
        print(f"{name:22s} generate b={batch} {n} tokens, {spc:2d} steps per call: {t * 1e3:8.2f} ms/token",
              flush=True)
    rows[-1]["predicted_ms"] = predicted_s * 1e3
    rows[-1]["same_tokens"] = bool((tokens[1] == tokens[32]).all())
    print(f"{name:22s} 32 steps per call / host loop: {rows[-1]['vs_host_loop']:.2f}x, same tokens: "
          f"{rows[-1]['same_tokens']}", flush=True)
    return rows


def plain_generate_ms(jax, step, params, state, token, pos: int, n: int, steps: int = 32) -> float:
    """ms per token of plain JAX generating n tokens greedily with `steps` decode steps
    per jitted call (a lax.fori_loop feeding each argmax back, the cache donated), the
    same loop einpart's steps_per_call=32 runs; the median of 3 after a compiling run."""
    import jax.numpy as jnp
    from jax import lax

    def loop(params, state, token, pos):
        def body(i, carry):
            state, token, out = carry
            logits, state = step(params, state, token[:, None], pos + i)
            token = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
            return state, token, lax.dynamic_update_slice(out, token[:, None], (0, i))
        out = jnp.zeros((token.shape[0], steps), jnp.int32)
        state, _, out = lax.fori_loop(0, steps, body, (state, token, out))
        return out, state
    fn = jax.jit(loop, donate_argnums=(1,))
    holder = {"state": state}

    def run():
        tok = token
        for c in range(n // steps):
            chunk, holder["state"] = fn(params, holder["state"], tok, jnp.int32(pos + c * steps))
            tok = jnp.asarray(np.asarray(chunk)[:, -1])      # to the host and back, as einpart's loop does
    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (n // steps * steps) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    ap.add_argument("--set", default="", help="size overrides after the preset, e.g. L=4 (a probe)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prefill", default="8x2048", help="BxP, or 'none'")
    ap.add_argument("--layers", default="scan,unroll")
    ap.add_argument("--attention", default="einsum", help="attention lowerings, e.g. einsum,cudnn")
    ap.add_argument("--baseline", default="unroll,scan")
    ap.add_argument("--int8", default="", help="layer modes to run again with the int8 pass (weights int8)")
    ap.add_argument("--int8-matmul", default="xla",
                    help="int8 product lowerings for the --int8 rows, e.g. xla,pallas (codegen/int8_matmul.py); "
                         "rows of one other than xla are named with it (einpart-int8-unroll-pallas)")
    ap.add_argument("--hardware", default="h200", help="preset or file the predicted times are priced on")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="also time Executable.generate of N tokens (ms per step) at each batch, one call per "
                         "token (the host loop) against 32 decode steps per compiled call "
                         "(runtime/decode_loop.py); plain JAX runs the same 32-step loop")
    ap.add_argument("--einpart", default=str(HERE.parent), help="the einpart checkout to import")
    ap.add_argument("--label", default="einpart", help="name of the einpart rows")
    ap.add_argument("--dump-hlo", default="", help="folder for optimised HLO of decode programs")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--cache-order", default="", choices=("", "bsgk", "bgsk"),
                    help="store the KV cache in this index order (a probe: rewrites the spec's cache "
                         "declarations and the plain baseline's; default: the spec's)")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.einpart)

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from calibrate import copy_bandwidth, matmul_rate
    from einpart.codegen.lower import split_prepare
    from einpart.ir.parser import parse
    from einpart.ir.shapes import DTYPE_BYTES, decl_shapes
    from einpart.passes import run_pipeline
    from einpart.codegen.lower import resolve_layers
    from einpart.passes.shard.report import price_graph
    from einpart.runtime.executable import Executable
    from einpart.runtime.weights import NUMPY_DTYPE, expected_params
    from plain_llama import make_step

    dump_dir = Path(args.dump_hlo) if args.dump_hlo else None
    batches = [int(b) for b in args.batches.split(",") if b]
    sets = dict(kv.split("=") for kv in PRESETS[args.preset].split(","))
    sets.update(dict(kv.split("=") for kv in args.set.split(",") if kv))
    sizes = {k: int(v) for k, v in sets.items()} | {"S": args.context, "B": batches[0], "T": 1}
    spec_path = Path(args.einpart) / "examples" / "llama.ein"

    spec_text = spec_path.read_text()
    if args.cache_order:
        order = ", ".join(args.cache_order)
        for name in ("k_cache", "v_cache", "kc", "vc"):       # whichever order the spec has
            for have in ("b, s, g, k", "b, g, s, k"):
                spec_text = spec_text.replace(f"{name}[{have}]", f"{name}[{order}]")

    def build_graph(int8: bool):
        graph = parse(spec_text, str(spec_path), sizes=sizes)
        return run_pipeline(graph, ("int8," if int8 else "") + "cast{dtype=bf16}").graph

    graph = build_graph(False)
    info = decl_shapes(graph)
    weight_bytes = sum(i.nbytes for i in info.values() if i.decl.kind == "param")
    n_matmul = sum(i.size for n, i in info.items() if i.decl.kind == "param" and len(i.shape) >= 2 and n != "embed")
    L, D, G, K, H = (sizes[k] for k in "LDGKH")

    device = jax.devices()[0]
    gpu = jax.default_backend() != "cpu"
    peak = matmul_rate(jax, jnp, 8192 if gpu else 512, jnp.bfloat16)
    hbm_ways = copy_bandwidth(jax, jnp, (4 << 30) if gpu else (1 << 24))
    hbm = max(hbm_ways.values())
    print(f"device {device.device_kind}, JAX {jax.__version__}: matmul {peak / 1e12:.0f} TFLOP/s, "
          f"HBM {hbm / 1e12:.2f} TB/s (" + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in hbm_ways.items())
          + f"); predictions priced on {args.hardware}", flush=True)
    weights = random_weights(expected_params(graph), NUMPY_DTYPE["bf16"])
    rows = []
    results = {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
               "numpy": np.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
               "date": datetime.now(timezone.utc).isoformat(), "preset": args.preset, "sizes": sizes,
               "hardware": args.hardware, "matmul_peak_flops": peak, "hbm_bytes_per_s": hbm, "hbm_ways": hbm_ways,
               "weight_bytes": weight_bytes, "rows": rows}
    prefill_b, prefill_p = (None, None)
    if args.prefill != "none":
        prefill_b, prefill_p = (int(x) for x in args.prefill.split("x"))

    def kv_bytes(b):
        return 2 * L * b * args.context * G * K * DTYPE_BYTES["bf16"]

    def prefill_flops(b, p):
        return 2 * n_matmul * b * p + 4 * L * b * p * p * H * K

    modes = [a for a in args.attention.split(",") if a]
    variants = [(m, False, a, "xla") for m in args.layers.split(",") if m for a in modes] + [
        (m, True, a, im) for m in args.int8.split(",") if m for a in modes
        for im in args.int8_matmul.split(",") if im]
    for layers, int8, attention, int8_matmul in variants:
        name = (f"{args.label}{'-int8' if int8 else ''}-{layers}" + ("" if attention == "einsum" else f"-{attention}")
                + ("" if int8_matmul == "xla" else f"-{int8_matmul}"))
        start = time.perf_counter()
        g8 = build_graph(int8)
        ex = Executable(g8, {"x": 1}, layers=layers, weights=weights, compile=False, prefill_len=prefill_p or 1,
                        attention=attention, int8_matmul=int8_matmul)
        jax.block_until_ready(ex.params)
        build_s = time.perf_counter() - start
        step_weight_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(ex.params))
        ready = {"build_s": build_s}
        for b in batches:
            start = time.perf_counter()
            prog = ex.compiled("decode", b)
            compile_s = time.perf_counter() - start
            dump(dump_dir, f"{name}-decode-b{b}", prog)
            pg = split_prepare(ex._programs_for(b, ex.prefill_len)["decode"])[0]
            used = attention_used(ex.source(b, ex.prefill_len), "decode")
            predicted = price_graph(pg, args.hardware, "decode", layers=resolve_layers(layers, pg),
                                    attention=used, int8_matmul=int8_matmul).step_s
            module = ex.module(b, ex.prefill_len)
            tok = ex._put(np.random.default_rng(b).integers(0, sizes["V"], (b, 1)).astype(np.int32),
                          module.INPUT_SPECS["decode"][ex.axes.tokens])
            pos = ex._put(np.asarray(args.context - 8, np.int32), P())
            holder = {"state": ex.new_state(b)}

            def run_steps():
                for _ in range(args.steps):
                    outs, holder["state"] = prog(ex.params, holder["state"], {ex.axes.tokens: tok}, pos)
                jax.block_until_ready((outs, holder["state"]))
            t = statistics.median(timed(run_steps, 3, warmup=1)) / args.steps
            floor = (step_weight_bytes + kv_bytes(b)) / hbm
            rows.append({"impl": name, "phase": "decode", "batch": b, "ms": t * 1e3, "floor_ms": floor * 1e3,
                         "predicted_ms": predicted * 1e3, "compile_s": compile_s, "build_s": build_s,
                         "step_weight_bytes": step_weight_bytes,
                         "attention": used, "int8_matmul": int8_matmul,
                         "int8_kernel_calls": kernel_calls(ex.source(b, ex.prefill_len), "decode")})
            if b == batches[0]:
                ready["decode_s"] = compile_s
            print(f"{name:22s} decode b={b:<3d} {t * 1e3:8.2f} ms  floor {floor * 1e3:.2f} ms  predicted "
                  f"{predicted * 1e3:.2f} ms (compile {compile_s:.1f} s; attention {rows[-1]['attention']}; "
                  f"{rows[-1]['int8_kernel_calls']} int8 kernel calls)",
                  flush=True)
            del holder
            if args.generate:
                rows += generate_rows(ex, name, sizes["V"], args.generate, floor, b, predicted)
        if prefill_b:
            start = time.perf_counter()
            prog = ex.compiled("prefill", prefill_b, prefill_p)
            compile_s = time.perf_counter() - start
            ready["prefill_s"] = compile_s
            pg = split_prepare(ex._programs_for(prefill_b, prefill_p)["prefill"])[0]
            used = attention_used(ex.source(prefill_b, prefill_p), "prefill")
            predicted = price_graph(pg, args.hardware, "prefill", layers=resolve_layers(layers, pg),
                                    attention=used, int8_matmul=int8_matmul).step_s
            module = ex.module(prefill_b, prefill_p)
            holder = {"state": ex.new_state(prefill_b)}
            tok = ex._put(np.random.default_rng(0).integers(0, sizes["V"], (prefill_b, prefill_p)).astype(np.int32),
                          module.INPUT_SPECS["prefill"][ex.axes.tokens])
            pos = ex._put(np.asarray(0, np.int32), P())

            def run_prefill():
                outs, holder["state"] = prog(ex.params, holder["state"], {ex.axes.tokens: tok}, pos)
                jax.block_until_ready(outs)
            t = statistics.median(timed(run_prefill, 5))
            flops = prefill_flops(prefill_b, prefill_p)
            rows.append({"impl": name, "phase": "prefill", "batch": prefill_b, "tokens": prefill_p,
                         "ms": t * 1e3, "mfu": flops / t / peak, "floor_ms": flops / peak * 1e3,
                         "predicted_ms": predicted * 1e3, "compile_s": compile_s,
                         "attention": used})
            print(f"{name:22s} prefill {prefill_b}x{prefill_p} {t * 1e3:8.1f} ms  {100 * flops / t / peak:.1f}% "
                  f"of measured peak  predicted {predicted * 1e3:.1f} ms (compile {compile_s:.1f} s; attention "
                  f"{rows[-1]['attention']})", flush=True)
            del holder
        ready["total_s"] = sum(ready.values())
        results.setdefault("spec_to_ready_s", {})[name] = ready
        print(f"{name:22s} spec to ready (build {build_s:.1f} s + decode b={batches[0]} + prefill compile): "
              f"{ready['total_s']:.1f} s", flush=True)
        del ex   # frees its weights and caches before the next variant

    params = jax.device_put(weights) if args.baseline else None
    for mode in [x for x in args.baseline.split(",") if x]:
        bgsk = args.cache_order != "bsgk"      # the spec's order by default: [b, g, s, k]
        fn = jax.jit(make_step(scan=(mode == "scan"), cache_order=args.cache_order or "bgsk"), donate_argnums=(1,))

        def cache_shape(b):
            return (L, b, G, args.context, K) if bgsk else (L, b, args.context, G, K)
        for b in batches:
            shape = cache_shape(b)
            holder = {"state": {"k_cache": jnp.zeros(shape, jnp.bfloat16), "v_cache": jnp.zeros(shape, jnp.bfloat16)}}
            tok = jnp.asarray(np.random.default_rng(b).integers(0, sizes["V"], (b, 1)).astype(np.int32))
            pos = jnp.int32(args.context - 8)
            start = time.perf_counter()
            compiled = fn.lower(params, holder["state"], tok, pos).compile()
            compile_s = time.perf_counter() - start
            dump(dump_dir, f"plain-{mode}-decode-b{b}", compiled)

            def run_steps():
                for _ in range(args.steps):
                    outs, holder["state"] = compiled(params, holder["state"], tok, pos)
                jax.block_until_ready((outs, holder["state"]))
            t = statistics.median(timed(run_steps, 3, warmup=1)) / args.steps
            floor = (weight_bytes + kv_bytes(b)) / hbm
            rows.append({"impl": f"plain-{mode}", "phase": "decode", "batch": b, "ms": t * 1e3,
                         "floor_ms": floor * 1e3, "compile_s": compile_s})
            print(f"plain-{mode:16s} decode b={b:<3d} {t * 1e3:8.2f} ms  floor {floor * 1e3:.2f} ms "
                  f"(compile {compile_s:.1f} s)", flush=True)
            del holder
            if args.generate:
                state = {"k_cache": jnp.zeros(shape, jnp.bfloat16), "v_cache": jnp.zeros(shape, jnp.bfloat16)}
                ms = plain_generate_ms(jax, make_step(scan=(mode == "scan"), cache_order=args.cache_order or "bgsk"),
                                       params, state, tok[:, 0], 8, args.generate)
                rows.append({"impl": f"plain-{mode}", "phase": "gen-spc32", "batch": b, "ms": ms,
                             "tokens": args.generate, "floor_ms": floor * 1e3})
                print(f"plain-{mode:16s} generate b={b} {args.generate} tokens, 32 steps per call: {ms:8.2f} "
                      f"ms/token", flush=True)
                del state
        if prefill_b:
            shape = cache_shape(prefill_b)
            holder = {"state": {"k_cache": jnp.zeros(shape, jnp.bfloat16), "v_cache": jnp.zeros(shape, jnp.bfloat16)}}
            tok = jnp.asarray(np.random.default_rng(0).integers(0, sizes["V"], (prefill_b, prefill_p)).astype(np.int32))
            start = time.perf_counter()
            compiled = fn.lower(params, holder["state"], tok, jnp.int32(0)).compile()
            compile_s = time.perf_counter() - start

            def run_prefill():
                outs, holder["state"] = compiled(params, holder["state"], tok, jnp.int32(0))
                jax.block_until_ready(outs)
            t = statistics.median(timed(run_prefill, 5))
            flops = prefill_flops(prefill_b, prefill_p)
            rows.append({"impl": f"plain-{mode}", "phase": "prefill", "batch": prefill_b, "tokens": prefill_p,
                         "ms": t * 1e3, "mfu": flops / t / peak, "floor_ms": flops / peak * 1e3,
                         "compile_s": compile_s})
            print(f"plain-{mode:16s} prefill {prefill_b}x{prefill_p} {t * 1e3:8.1f} ms  "
                  f"{100 * flops / t / peak:.1f}% of measured peak (compile {compile_s:.1f} s)", flush=True)
            del holder

    best_plain = {}
    for r in rows:
        if r["impl"].startswith("plain"):
            k = (r["phase"], r["batch"])
            best_plain[k] = min(best_plain.get(k, float("inf")), r["ms"])
    print(f"\n{'impl':<22}{'phase':<9}{'batch':>6}{'ms':>10}{'floor ms':>10}{'of floor':>10}"
          f"{'vs plain':>10}{'predicted':>11}{'pred/meas':>11}")
    for r in rows:
        base = best_plain.get((r["phase"], r["batch"]))
        r["ratio_to_best_plain"] = r["ms"] / base if base else None
        r["fraction_of_floor"] = r["floor_ms"] / r["ms"]
        ratio = f"{r['ratio_to_best_plain']:.2f}x" if base else "-"
        pred = r.get("predicted_ms")
        r["predicted_over_measured"] = pred / r["ms"] if pred else None
        ps = f"{pred:.2f}" if pred else "-"
        pm = f"{pred / r['ms']:.2f}" if pred else "-"
        print(f"{r['impl']:<22}{r['phase']:<9}{r['batch']:>6}{r['ms']:>10.2f}{r['floor_ms']:>10.2f}"
              f"{100 * r['fraction_of_floor']:>9.1f}%{ratio:>10}{ps:>11}{pm:>11}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = device.device_kind.replace(" ", "-").lower()
    path = out / f"decode-{args.preset}-{kind}{args.tag}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
