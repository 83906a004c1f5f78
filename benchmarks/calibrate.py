"""Measure on the device what einpart's hardware presets assume, and write a
hardware file (TOML, the format einpart.passes.shard.hardware reads).

Measured: bf16 matmul peak (8192^3 and 16384^3 products chained in a loop,
random data, the best median), int8 matmul (int8 x int8 -> int32) where JAX lowers it,
HBM bandwidth as the best of a large device-to-device copy, a scale (bytes
read + written) and a read-only sum (bytes read), the cost of one kernel
(a chain of tiny products: kernel_s), the rate batch-1 products stream
their weights at (reported, not written to the file), and
with more than one device all-reduce / all-gather time over several sizes
through jax.shard_map, fitted to latency + bytes / bandwidth (the alpha-beta
model cost.py prices). With one device the links are not measured: the file
keeps the base preset's link and says so.

    python benchmarks/calibrate.py --base h200 --name h200 --out benchmarks/results
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

HERE = Path(__file__).resolve().parent


def median_time(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median wall seconds of fn() (which blocks until its result is ready)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def matmul_rate(jax, jnp, n: int, dtype, iters: int = 8, reps: int = 5) -> float:
    """FLOP/s (OP/s for int8) of n x n x n products on random operands: `iters`
    products chained in one compiled loop (each feeds the next, scaled back to
    unit size), so neither dispatch nor dead-code elimination enters the number."""
    ka, kb = jax.random.split(jax.random.key(n))
    integer = jnp.issubdtype(dtype, jnp.integer)
    if integer:
        a = jax.random.randint(ka, (n, n), -127, 128, jnp.int32).astype(dtype)
        x = jax.random.randint(kb, (n, n), -127, 128, jnp.int32).astype(dtype)
    else:
        a = jax.random.normal(ka, (n, n), dtype)
        x = jax.random.normal(kb, (n, n), dtype)

    def body(_, x):
        if integer:      # int8 x int8 -> int32, back to int8 (a cheap elementwise pass)
            y = jnp.dot(a, x, preferred_element_type=jnp.int32)
            return jnp.clip(y >> 12, -127, 127).astype(dtype)
        return (jnp.dot(a, x) * (1.0 / n ** 0.5)).astype(dtype)
    f = jax.jit(lambda a_, x: jax.lax.fori_loop(0, iters, body, x))
    t = median_time(lambda: f(a, x).block_until_ready(), reps, warmup=2)
    return iters * 2 * n ** 3 / t


def copy_bandwidth(jax, jnp, nbytes: int) -> dict:
    """Bytes/s moved through HBM three ways, over `nbytes` of data: a plain device-to-device
    copy (jnp.copy; bytes read + written), a scale into a new array (x * 1.5, read +
    written) and a read-only sum (bytes read). The largest is the ceiling: what a step
    that streams its weights can at best reach."""
    n = nbytes // 2
    x = jax.random.normal(jax.random.key(3), (n,), jnp.bfloat16)
    out = {}
    f = jax.jit(lambda x: jnp.copy(x))
    out["copy"] = 2 * nbytes / median_time(lambda: f(x).block_until_ready(), 20)
    f = jax.jit(lambda x: x * jnp.bfloat16(1.5))
    out["scale"] = 2 * nbytes / median_time(lambda: f(x).block_until_ready(), 20)
    f = jax.jit(lambda x: jnp.sum(x.reshape(-1, 4096), axis=0, dtype=jnp.float32))
    out["read"] = nbytes / median_time(lambda: f(x).block_until_ready(), 20)
    return out


def hlo_kernels(compiled) -> int:
    """Kernels an optimised HLO module launches: the fusions, library calls
    (custom-call: cuBLAS, cuDNN) and unfused dots of its entry computation."""
    text = compiled.as_text()
    entry = text[text.find("ENTRY"):]
    entry = entry[:entry.find("\n}")]
    ops = (" fusion(", " custom-call(", " dot(", " copy(")
    return sum(1 for line in entry.splitlines() if any(o in line for o in ops))


def kernel_overhead(jax, jnp, counts=(64, 512), width: int = 256) -> dict:
    """Seconds each kernel of a compiled program costs beyond its work: a chain of
    `n` tiny dependent products x <- x @ w ([1, width] x [width, width] f32, unrolled
    in one jit, each its own kernel: XLA does not fuse one product into the next),
    timed for two chain lengths, each call waited for. The slope per kernel is the
    per-kernel cost (launch, ramp-up, tail), what the cost model charges per kernel
    (hardware.py: kernel_s); the intercept `fixed_s` is one call's dispatch and wait,
    which a step loop that dispatches ahead (benchmarks/decode.py) mostly hides."""
    w = jax.random.normal(jax.random.key(5), (width, width), jnp.float32) / width ** 0.5
    x = jax.random.normal(jax.random.key(6), (1, width), jnp.float32)
    rows = []
    for n in counts:
        def chain(x, w, n=n):
            for _ in range(n):
                x = x @ w
            return x
        f = jax.jit(chain).lower(x, w).compile()
        t = median_time(lambda: f(x, w).block_until_ready(), 30, warmup=5)
        rows.append({"products": n, "kernels": hlo_kernels(f), "seconds": t})
    a, b = rows[0], rows[-1]
    per = (b["seconds"] - a["seconds"]) / max(b["kernels"] - a["kernels"], 1)
    return {"rows": rows, "per_kernel_s": per, "fixed_s": a["seconds"] - a["kernels"] * per}


def matvec_bandwidth(jax, jnp, d: int = 4096, f: int = 14336, pairs: int = 8,
                     per_kernel_s: float = 0.0, fixed_s: float = 0.0) -> dict:
    """Bytes/s of the weight reads of batch-1 products, as a decode step does them:
    `pairs` distinct [d, f] and [f, d] bf16 weights (f = 14336: Llama-8B's MLP shapes,
    117 MB each) in a chain x <- x @ w_a; x <- x @ w_b, unrolled in one jit. `raw` is
    weight bytes / time; `net` leaves out one call's fixed_s and per_kernel_s for each
    kernel the program launches (kernel_overhead): the rate a matvec streams at, to
    compare with the copy bandwidth."""
    keys = jax.random.split(jax.random.key(7), 2 * pairs)
    ws = [jax.random.normal(k, (d, f) if j % 2 == 0 else (f, d), jnp.bfloat16) * 0.01
          for j, k in enumerate(keys)]
    x = jax.random.normal(jax.random.key(8), (1, d), jnp.bfloat16)

    def chain(x, ws):
        for w in ws:
            x = x @ w
        return x
    fn = jax.jit(chain).lower(x, ws).compile()
    t = median_time(lambda: fn(x, ws).block_until_ready(), 20, warmup=3)
    nbytes = sum(w.size * 2 for w in ws)
    kernels = hlo_kernels(fn)
    net = t - fixed_s - kernels * per_kernel_s
    return {"shape": f"[1,{d}]x[{d},{f}] and [1,{f}]x[{f},{d}] bf16, {2 * pairs} products",
            "weight_bytes": nbytes, "kernels": kernels, "seconds": t, "raw": nbytes / t,
            "net": nbytes / net if net > 0 else None}


def collective_fit(jax, jnp, kind: str, sizes: list[int]) -> dict:
    """Seconds of `kind` (all_reduce / all_gather) over all devices for each size in bytes
    (per device), and the least-squares latency + bytes / bandwidth fit, where 'bytes'
    is what one device sends in a ring: 2(n-1)/n x size (all-reduce), (n-1) x size (gather)."""
    from jax.sharding import Mesh, PartitionSpec as P
    import numpy as np
    devs = jax.devices()
    n = len(devs)
    mesh = Mesh(np.array(devs), ("x",))
    rows = []
    for size in sizes:
        elems = size // 2
        x = jax.device_put(jnp.ones((n * elems,), jnp.bfloat16),
                           jax.sharding.NamedSharding(mesh, P("x")))
        if kind == "all_reduce":
            body, out = (lambda v: jax.lax.psum(v, "x")), P("x")
            sent = 2 * (n - 1) / n * size
        else:
            body, out = (lambda v: jax.lax.all_gather(v, "x", tiled=True)), P()
            sent = (n - 1) * size
        f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=out, check_vma=False))
        t = median_time(lambda: f(x).block_until_ready(), 20)
        rows.append({"bytes_per_device": size, "sent_bytes": sent, "seconds": t})
    xs = [r["sent_bytes"] for r in rows]
    ys = [r["seconds"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    lat = max(my - slope * mx, 0.0)
    # the fitted step latency: a ring collective takes (n-1) (gather) or 2(n-1) (reduce) steps
    steps = (2 if kind == "all_reduce" else 1) * (n - 1)
    return {"rows": rows, "bandwidth": 1.0 / slope if slope > 0 else None, "latency_total": lat,
            "latency_per_step": lat / steps}


def toml_value(v) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    return repr(float(v)) if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="h200", help="the preset whose unmeasured fields the file keeps")
    ap.add_argument("--name", default="h200")
    ap.add_argument("--copy-gib", type=float, default=4.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))

    import jax
    import jax.numpy as jnp
    from einpart.passes.shard.hardware import PRESETS, load_hardware

    base = PRESETS[args.base]
    dev = jax.devices()[0]
    gpu = jax.default_backend() != "cpu"
    big = 8192 if gpu else 512
    meas: dict = {"device": dev.device_kind, "devices": jax.device_count(), "backend": jax.default_backend(),
                  "jax": jax.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
                  "date": datetime.now(timezone.utc).isoformat()}
    bf16 = {f"{big}^3": matmul_rate(jax, jnp, big, jnp.bfloat16)}
    if gpu:
        bf16["16384^3"] = matmul_rate(jax, jnp, 16384, jnp.bfloat16)
    meas["matmul_bf16_flops"] = bf16
    peak = max(bf16.values())
    print(f"bf16 matmul: " + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in bf16.items()), flush=True)
    try:
        n8 = 16384 if gpu else big
        i8 = matmul_rate(jax, jnp, n8, jnp.int8)
        meas["matmul_int8_ops"] = {f"{n8}^3": i8}
        print(f"int8 matmul: {i8 / 1e12:.0f} TOP/s", flush=True)
    except Exception as e:   # a backend without an int8 product: say so, keep the preset's number
        i8 = None
        meas["matmul_int8_ops"] = f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print(f"int8 matmul: {meas['matmul_int8_ops']}", flush=True)
    nbytes = int(args.copy_gib * 2 ** 30) if gpu else 1 << 26
    ways = copy_bandwidth(jax, jnp, nbytes)
    hbm = max(ways.values())
    meas["hbm_bytes_per_s"] = {"bytes": nbytes, **ways}
    print(f"HBM over {nbytes / 2 ** 30:.1f} GiB: " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in ways.items()),
          flush=True)
    ko = kernel_overhead(jax, jnp)
    meas["kernel_overhead"] = ko
    print(f"kernel overhead: {ko['per_kernel_s'] * 1e6:.2f} us a kernel ({ko['rows'][0]['kernels']} and "
          f"{ko['rows'][-1]['kernels']} kernels), {ko['fixed_s'] * 1e6:.0f} us a call", flush=True)
    if gpu:
        meas["matvec"] = [matvec_bandwidth(jax, jnp, 4096, f, pairs, ko["per_kernel_s"], ko["fixed_s"])
                          for f, pairs in ((14336, 8), (4096, 16))]
        for m in meas["matvec"]:
            print(f"matvec {m['shape']}: {m['raw'] / 1e12:.2f} TB/s raw, "
                  f"{(m['net'] or 0) / 1e12:.2f} TB/s net of launches", flush=True)
    stats = dev.memory_stats() or {}
    meas["memory_stats_bytes_limit"] = stats.get("bytes_limit")

    link_note = f"links not measured: {jax.device_count()} device(s); the link is preset {base.name}'s"
    link = {"bandwidth": base.link.bandwidth, "latency": base.link.latency}
    if jax.device_count() > 1:
        sizes = [1 << p for p in range(16, (29 if gpu else 21), 2)]
        ar = collective_fit(jax, jnp, "all_reduce", sizes)
        ag = collective_fit(jax, jnp, "all_gather", sizes)
        meas["all_reduce"], meas["all_gather"] = ar, ag
        bws = [x["bandwidth"] for x in (ar, ag) if x["bandwidth"]]
        if bws:
            link = {"bandwidth": min(bws), "latency": max(ar["latency_per_step"], ag["latency_per_step"])}
            link_note = (f"links measured over {jax.device_count()} devices: all-reduce "
                         f"{ar['bandwidth'] / 1e9:.0f} GB/s, all-gather {ag['bandwidth'] / 1e9:.0f} GB/s")
        for k, x in (("all-reduce", ar), ("all-gather", ag)):
            for r in x["rows"]:
                print(f"{k} {r['bytes_per_device']:>10d} B/device: {r['seconds'] * 1e6:9.1f} us", flush=True)
    else:
        meas["all_reduce"] = meas["all_gather"] = "not measured: one device"
    print(link_note, flush=True)

    fields = {"name": args.name, "base": base.name, "flops_bf16": peak,
              "flops_int8": i8 if i8 else base.flops_int8, "hbm_bandwidth": hbm, "hbm_bytes": base.hbm_bytes,
              "kernel_s": max(ko["per_kernel_s"], 0.0)}
    lines = [f"# einpart hardware file, measured by benchmarks/calibrate.py on {meas['device']}",
             f"# ({meas['devices']} device(s), JAX {meas['jax']}, {meas['date']}).",
             f"# command: {meas['command']}",
             "# flops_bf16: best median of bf16 products on random data: "
             + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in bf16.items()),
             "# flops_int8: " + (f"int8 x int8 -> int32 products, {i8 / 1e12:.1f} TOP/s" if i8
                                 else f"not measured, preset {base.name}'s"),
             f"# hbm_bandwidth: the best of {nbytes / 2 ** 30:.1f} GiB moved as "
             + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in ways.items())
             + " (copy and scale count bytes read + written, read counts bytes read)",
             f"# hbm_bytes: preset {base.name}'s (capacity, not measured)",
             f"# kernel_s: per kernel of a chain of tiny products, {ko['rows'][0]['kernels']} vs "
             f"{ko['rows'][-1]['kernels']} kernels in one program",
             f"# {link_note}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in fields.items()]
    lines += ["", "[link]", f"bandwidth = {toml_value(float(link['bandwidth']))}",
              f"latency = {toml_value(float(link['latency']))}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toml_path = out / f"hardware-{args.name}.toml"
    toml_path.write_text("\n".join(lines) + "\n")
    hw = load_hardware(str(toml_path))          # the file must load as einpart reads it
    json_path = out / f"calibrate-{args.name}-{datetime.now():%Y%m%d-%H%M%S}.json"
    json_path.write_text(json.dumps(meas, indent=1))
    print(f"wrote {toml_path} ({hw.describe()}) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
