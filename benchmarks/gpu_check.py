"""Are the programs that the GPU benchmarks time right on the GPU? (issue 7)

The test suite checks every lowering against the reference interpreter on CPU;
this runs the ones that only a GPU takes (cuDNN attention, XLA's GPU fusions of
the per-layer and scanned loops, int8 products) on the device, on Llama
(examples/llama.ein) at small sizes with bf16 storage, and compares prefill and
three decode steps with the interpreter (numpy, float32 arithmetic with values
rounded through bf16 where the spec stores them). Baseline of each row: the
interpreter; the table shows the largest error relative to max |reference
logit|, and the same for scan + einsum (the lowering the CPU tests check most)
for scale. Exit status 1 when a row exceeds --tolerance.

    python benchmarks/gpu_check.py [--set D=256,...] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan import device, versions, write_result  # noqa: E402

# (layers, attention, extra pass, int8_matmul); int8_matmul="pallas" sends decode's int8 products
# (2 rows) through the int8_gemv kernel (codegen/int8_matmul.py); prefill's 128 rows keep XLA's
VARIANTS = [("scan", "einsum", "", "xla"), ("unroll", "einsum", "", "xla"), ("unroll", "cudnn", "", "xla"),
            ("unroll", "xla", "", "xla"), ("scan", "cudnn", "", "xla"), ("unroll", "einsum", "int8", "xla"),
            ("unroll", "einsum", "int8", "pallas"), ("scan", "einsum", "int8", "pallas"),
            ("auto", "auto", "int8", "auto")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="D=256,F=512,H=4,G=2,K=64,L=3,V=512,S=128")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--storage", default="bf16", choices=("bf16", "f32"),
                    help="weight storage (f32 for a CPU try-out: XLA's CPU has no bf16 x bf16 -> f32 dot)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax
    import numpy as np

    from einpart.ir.model import Reference, init_params
    from einpart.ir.parser import parse_file
    from einpart.passes import run_pipeline
    from einpart.passes.multiquery import transform_params
    from einpart.codegen import simple_plan
    from einpart.runtime import Executable
    from einpart.runtime.weights import NUMPY_DTYPE

    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    base = parse_file(ROOT / "examples" / "llama.ein", sizes)
    rng = np.random.default_rng(0)
    params = {n: (w * 4.0 if not np.all(w == 1) else w).astype(np.float32)
              for n, w in init_params(base, 0).items()}
    V = sizes["V"]
    batch = 2
    prompt = rng.integers(0, V, (batch, args.prompt)).astype(np.int32)
    steps = rng.integers(0, V, (batch, 3)).astype(np.int32)
    platform = jax.devices()[0].platform
    rows, want_cache = [], {}
    for layers, attention, extra, int8_matmul in VARIANTS:
        if attention == "cudnn" and platform != "gpu":
            continue
        pipeline = ",".join([p for p in ("int8" if extra == "int8" else "",
                                          "cast{dtype=bf16}" if args.storage == "bf16" else "") if p]) or "none"
        graph = run_pipeline(base, pipeline).graph if pipeline != "none" else base
        decl = {d.name: d.type.dtype for d, _ in graph.all_decls() if d.kind == "param"}
        p = {n: w.astype(NUMPY_DTYPE[decl[n]]) for n, w in transform_params(graph, params).items()}
        if pipeline not in want_cache:
            ref = Reference(graph, p)
            state = ref.new_state(batch)
            want = [ref.step(prompt, 0, state)]
            for i in range(steps.shape[1]):
                want.append(ref.step(steps[:, i:i + 1], args.prompt + i, want[-1][1]))
            want_cache[pipeline] = [w for w, _ in want]
        want = want_cache[pipeline]
        ex = Executable(simple_plan(graph, {"x": 1}), layers=layers, weights=p, attention=attention,
                        prefill_len=args.prompt, int8_matmul=int8_matmul)
        got = [np.asarray(ex.prefill(prompt), np.float64)]
        for i in range(steps.shape[1]):
            got.append(np.asarray(ex.decode(steps[:, i], args.prompt + i), np.float64))
        source = ex.source(batch, args.prompt)          # which products the kernel took, per program
        bodies = {prog: source[source.index(f"\ndef {prog}("):].split("\ndef ", 2)[1] for prog in ("prefill", "decode")}
        calls = {prog: b.count("int8_gemv(") + b.count("int8_gemv_siblings(") for prog, b in bodies.items()}
        errs = [float(np.abs(g - np.asarray(w, np.float64)).max() / np.abs(w).max()) for g, w in zip(got, want)]
        rows.append({"layers": layers, "attention": attention, "pipeline": pipeline, "int8_matmul": int8_matmul,
                     "gemv_calls": calls,
                     "prefill_rel_err": errs[0], "decode_rel_err": max(errs[1:]),
                     "ok": max(errs) <= args.tolerance})
    print(f"{'layers':7} {'attention':9} {'pipeline':24} {'int8 mm':7} {'gemv p/d':>8} {'prefill err':>11} {'decode err':>10}  ok")
    for r in rows:
        print(f"{r['layers']:7} {r['attention']:9} {r['pipeline']:24} {r['int8_matmul']:7} {r['gemv_calls']['prefill']:>3}/{r['gemv_calls']['decode']:<4} {r['prefill_rel_err']:11.2e} "
              f"{r['decode_rel_err']:10.2e}  {r['ok']}")
    result = {"device": device(), "accelerator": jax.devices()[0].device_kind, "jax": jax.__version__,
              "versions": versions(), "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
              "sizes": sizes, "tolerance": args.tolerance, "rows": rows}
    print("wrote", write_result(result, f"gpu-check-{platform}", args.out))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
