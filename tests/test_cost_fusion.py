"""Fused elementwise statements, kernel launches, int8 weight casts and the scanned layer loop in the
cost model (einpart.passes.shard: fusion, cost, report), on graphs small enough
to price by hand: hardware at 1 byte/s of HBM and no FLOP limit, so a
statement's memory time is its byte count in seconds."""
from __future__ import annotations

from dataclasses import replace

import pytest

from einpart.errors import EinpartError
from einpart.ir.parser import parse
from einpart.passes.shard import plan
from einpart.passes.shard.cost import operand_reads
from einpart.passes.shard.fusion import fused_maps, lowering, weight_converts
from einpart.passes.shard.hardware import PRESETS, hardware_from_dict, load_hardware
from einpart.passes.shard.report import price_graph

# f32 everywhere (4 bytes); B = 4, D = 8, E = 16
SRC = """
size B = 4, D = 8, E = 16
index b: B, d: D, e: E
input x[b, d]
param g[d]
param w[d, e]
ms[b] = mean(x[b, d] * x[b, d])
h[b, d] = x[b, d] * rsqrt(ms[b] + 1e-05) * g[d]
y[b, e] = h[b, d] * w[d, e]
a[b, e] = y[b, e] * y[b, e]
s[b] = sum(a[b, e])
output s
"""


def hw(kernel_s: float = 0.0, link_bw: float = 1e9):
    return hardware_from_dict({"flops_bf16": 1e30, "flops_int8": 1e30, "hbm_bandwidth": 1.0, "hbm_bytes": 1e30,
                               "link": {"bandwidth": link_bw, "latency": 0.0}, "kernel_s": kernel_s})


def test_which_maps_fuse():
    """a feeds only a reduction: fused. h feeds a contraction (a GEMM reads its
    operands from HBM): written. s is no map."""
    assert set(fused_maps(parse(SRC))) == {"a"}
    # a map that is an output, or that a contraction reads, is written
    out = parse(SRC.replace("output s", "output s, a"))
    assert fused_maps(out) == {}
    into_dot = parse(SRC.replace("s[b] = sum(a[b, e])", "s[b] = a[b, e] * y[b, e]"))
    assert fused_maps(into_dot) == {}


def test_a_fused_map_costs_no_bytes_and_its_reader_reads_its_operands():
    rep = price_graph(parse(SRC), hw())
    mem = {s.name: s.memory_s for s in rep.stmts}
    # ms: x once (mean(x * x) reads x once) 4*8*4 = 128, result 16
    # h: x 128, ms 16, g 32, result 128;  y: h 128, w 8*16*4 = 512, result 256
    # a: fused, nothing;  s: reads y (a's operand, once) 256, result 16
    assert mem == {"ms": 144.0, "h": 304.0, "y": 896.0, "a": 0.0, "s": 272.0}
    assert rep.step_s == pytest.approx(144 + 304 + 896 + 272)


def test_operand_reads_follow_chains_of_fused_maps():
    gr = parse(SRC.replace("s[b] = sum(a[b, e])", "c[b, e] = a[b, e] + y[b, e]\ns[b] = sum(c[b, e])"))
    fused = fused_maps(gr)
    assert set(fused) == {"a", "c"}
    # s reads c = a + y = y * y + y: y, once
    assert operand_reads(gr.stmt("s"), gr.types(), fused) == [(("b", "e"), 4)]
    assert operand_reads(gr.stmt("s"), gr.types()) == [(("b", "e"), 4)]      # c itself, unfused


def test_kernel_cost_counts_every_kernel_but_fused_maps():
    """Four kernels (ms, h, y, s; the fused a launches none) at 0.5 s each."""
    gr = parse(SRC)
    base = price_graph(gr, hw()).step_s
    rep = price_graph(gr, hw(kernel_s=0.5))
    assert {s.name: s.launch_s for s in rep.stmts} == {"ms": 0.5, "h": 0.5, "y": 0.5, "a": 0.0, "s": 0.5}
    assert rep.launch_s == 2.0 and rep.step_s == pytest.approx(base + 2.0)


def test_a_fused_map_read_through_a_collective_is_written():
    """On 2 devices with a split e-wise and s split b-wise, s reads a through an
    all_to_all, which needs a written buffer: a's unfused cost (its half of a, 128
    bytes, and of y, 128) plus one kernel, charged on s's operand; the planner's
    edge charges the same (objective = re-priced objective = report)."""
    p = plan(parse(SRC), "x=2", hw(kernel_s=0.5, link_bw=1.0), "prefill", memory_limit=None,
             fix={"a": {"e": ("x",)}, "s": {"b": ("x",)}})
    rep = p.phases["prefill"]
    s = rep.stmt("s")
    assert [d for d, _ in s.collectives] == ["all_to_all(x: e->b) on a"]
    assert s.fusion_s == pytest.approx(128 + 128 + 0.5)
    assert rep.stmt("a").memory_s == 0.0 and rep.stmt("a").launch_s == 0.0
    assert p.objective == pytest.approx(rep.step_s, rel=1e-9)
    assert p.stats["objective_repriced"] == pytest.approx(rep.step_s, rel=1e-9)


LAYERS = """
size B = 2, D = 8, L = 3
index b: B, d: D, e: D, l: L
input x[b, d]
xl[b, e] = repeat l (u = x) {
  param gain[d]
  param w[d, e]
  y[b, e] = u[b, d] * w[d, e]
  z[b, e] = y[b, e] * gain[e]
  yield z
}
output xl
"""


def test_scanned_layers_pay_a_copy_of_every_stacked_weight_a_product_reads():
    """lax.scan copies each layer's w (8 x 8 x 4 = 256 bytes) out of the stack: a read
    and a write and a kernel per layer, 3 layers. The gain, read elementwise, is not
    copied (the slice fuses into its reader)."""
    gr = parse(LAYERS)
    unrolled = price_graph(gr, hw(kernel_s=0.5))
    scanned = price_graph(gr, hw(kernel_s=0.5), layers="scan")
    copies = [s for s in scanned.stmts if s.name.endswith("@scan")]
    assert [(c.name, c.memory_s, c.launch_s, c.count) for c in copies] == [("w@scan", 512.0, 0.5, 3)]
    assert scanned.step_s == pytest.approx(unrolled.step_s + 3 * (512 + 0.5))
    with pytest.raises(EinpartError, match="price_graph: layers must be one of unroll, scan, got 'loop'"):
        price_graph(gr, hw(), layers="loop")


def test_hardware_kernel_cost_field(tmp_path):
    f = tmp_path / "gpu.toml"
    f.write_text('base = "h200"\nkernel_s = 3e-6\n')
    assert load_hardware(str(f)).kernel_s == 3e-6
    assert PRESETS["h200"].kernel_s == 1.9e-6 and PRESETS["tpu-v4"].kernel_s == 0.0
    f.write_text('base = "h200"\nkernel_s = -1\n')
    with pytest.raises(EinpartError, match="field 'kernel_s' must not be negative, got -1"):
        load_hardware(str(f))
    f.write_text('base = "tpu-v4"\nconvert_kernel = true\n')
    assert load_hardware(str(f)).convert_kernel and not PRESETS["tpu-v4"].convert_kernel
    f.write_text('base = "tpu-v4"\nconvert_kernel = 1\n')
    with pytest.raises(EinpartError, match="field 'convert_kernel' must be true or false, got 1"):
        load_hardware(str(f))


INT8 = """
size B = 2, D = 8, E = 16
index b: B, d: D, e: E
input x[b, d] : bf16
param w[d, e] : i8
y[b, e] : bf16 = x[b, d] * w[d, e]
output y
"""


@pytest.mark.parametrize("layers", ["unroll", "scan"])
def test_an_int8_weight_of_its_own_is_cast_in_the_gemm_at_int8_gemm_bytes(layers):
    """w is its own array (not a layer stack), so XLA casts it inside the GEMM: no
    kernel of its own, whatever the layer loop; each of its 128 int8 elements costs
    the hardware's int8_gemm_bytes (1.5 here; 1 by default: the int8 byte)."""
    x_and_out = 2 * 8 * 2 + 2 * 16 * 2                              # bf16 x and y
    for h, per in ((replace(hw(kernel_s=0.5), convert_kernel=True, int8_gemm_bytes=1.5), 1.5), (hw(0.5), 1.0)):
        y = price_graph(parse(INT8), h, layers=layers).stmt("y")
        assert y.memory_s == x_and_out + 128 * per and y.launch_s == 0.5
    assert weight_converts(parse(INT8)) == {"y": {"w": 2}}
    low = lowering(parse(INT8), replace(hw(), convert_kernel=True, int8_gemm_bytes=1.5), layers)
    assert low.converts == {} and low.casts == {"y": {"w": 1.5}}


INT8_LAYERS = """
size B = 2, D = 8, L = 3
index b: B, d: D, e: D, l: L
input x[b, d] : bf16
xl[b, e] : bf16 = repeat l (u = x) {
  param w[d, e] : i8
  y[b, e] : bf16 = u[b, d] * w[d, e]
  yield y
}
output xl
"""


def test_a_stacked_int8_weight_under_scan_is_cast_by_a_kernel_that_writes_it():
    """Per layer y reads u (32 bytes) and writes y (32). Unrolled (each layer's w its own
    array) the GEMM casts w: 64 elements at int8_gemm_bytes 1.5, one kernel. Scanned,
    on hardware with convert_kernel, the slice of the stack is cast by a kernel of its
    own: w read (64), its bf16 copy written (128) and read by the GEMM (128), two
    kernels, and that kernel is the layer's copy (no w@scan row). Without
    convert_kernel the scan copies the int8 slice (2 x 64 bytes, a kernel) and the GEMM
    casts it as it reads it."""
    gr = parse(INT8_LAYERS)
    gpu = replace(hw(kernel_s=0.5), convert_kernel=True, int8_gemm_bytes=1.5)
    rows = lambda rep: [(s.name, s.memory_s, s.launch_s, s.count) for s in rep.stmts]   # noqa: E731
    assert rows(price_graph(gr, gpu)) == [("y", 32 + 96 + 32, 0.5, 3)]
    assert rows(price_graph(gr, gpu, layers="scan")) == [("y", 32 + 64 + 128 + 128 + 32, 1.0, 3)]
    other = replace(gpu, convert_kernel=False)
    assert rows(price_graph(gr, other, layers="scan")) == [("w@scan", 128, 0.5, 3), ("y", 32 + 96 + 32, 0.5, 3)]
    assert lowering(gr, gpu, "scan").converts == {"y": {"w": 2}} and lowering(gr, gpu, "scan").casts == {}


def test_int8_matmul_pallas_prices_the_gemv_kernel():
    """With int8_matmul="pallas" codegen computes y with the Pallas GEMV (2 rows): w's 128
    elements cost int8_gemv_bytes (0.75 here) in place of int8_gemm_bytes, one kernel;
    stacked under a scan, the kernel reads an int8 copy of the slice (64 read, 64
    written, 64 read by the kernel, two kernels). "auto" takes the kernel on a CUDA
    platform for one row only (codegen.int8_matmul.AUTO_MAX_ROWS); "xla" and "auto" off
    CUDA price the GEMM as before; the planner's default is "xla"."""
    gpu = replace(hw(kernel_s=0.5), convert_kernel=True, int8_gemm_bytes=1.5, int8_gemv_bytes=0.75)
    cuda = replace(gpu, platform="cuda")
    one_row = INT8.replace("size B = 2,", "size B = 1,")
    for src, rows_ in ((INT8, 2), (one_row, 1)):
        x_and_out = rows_ * 8 * 2 + rows_ * 16 * 2
        for mode, h, per in (("pallas", gpu, 0.75), ("auto", cuda, 0.75 if rows_ == 1 else 1.5), ("auto", gpu, 1.5),
                             ("xla", cuda, 1.5)):
            y = price_graph(parse(src), h, int8_matmul=mode).stmt("y")
            assert (y.memory_s, y.launch_s) == (x_and_out + 128 * per, 0.5), (mode, rows_)
    assert lowering(parse(INT8), gpu, int8_matmul="pallas").casts == {"y": {"w": 0.75}}
    gr = parse(INT8_LAYERS)
    rows = lambda rep: [(s.name, s.memory_s, s.launch_s, s.count) for s in rep.stmts]   # noqa: E731
    assert rows(price_graph(gr, gpu, int8_matmul="pallas")) == [("y", 32 + 64 * 0.75 + 32, 0.5, 3)]
    assert rows(price_graph(gr, gpu, layers="scan", int8_matmul="pallas")) == [("y", 32 + 64 * 3 + 32, 1.0, 3)]
    with pytest.raises(EinpartError, match="int8_matmul must be one of xla, pallas, auto, got 'cuda'"):
        price_graph(gr, gpu, int8_matmul="cuda")


SIBLINGS = """
size B = 1, D = 8, E = 16
index b: B, d: D, e: E
input x[b, d] : bf16
param w1[d, e] : i8
param w2[d, e] : i8
param w3[e, d] : i8
y1[b, e] : bf16 = x[b, d] * w1[d, e]
y2[b, e] : bf16 = x[b, d] * w2[d, e]
a[b, e] : bf16 = y1[b, e] * y2[b, e]
z[b, d] = a[b, e] * w3[e, d]
output z
"""


def test_int8_products_that_share_their_activation_are_one_kernel():
    """y1 and y2 read the same x: codegen computes both with one int8_gemv_siblings call
    (codegen.int8_matmul.sibling_groups), so y2 launches no kernel of its own; each still
    reads its weight (128 elements at int8_gemv_bytes) and x. z (another input) is a call
    of its own. Through XLA's GEMM (or off the kernel path) each product is a kernel."""
    gpu = replace(hw(kernel_s=0.5), convert_kernel=True, int8_gemm_bytes=1.5, int8_gemv_bytes=0.75)
    graph = parse(SIBLINGS)
    x_and_out = 8 * 2 + 16 * 2
    assert lowering(graph, gpu, int8_matmul="pallas").shared == {"y2"}
    assert lowering(graph, gpu, int8_matmul="xla").shared == set()
    rep = price_graph(graph, gpu, int8_matmul="pallas")
    assert (rep.stmt("y1").launch_s, rep.stmt("y2").launch_s, rep.stmt("z").launch_s) == (0.5, 0.0, 0.5)
    assert rep.stmt("y1").memory_s == rep.stmt("y2").memory_s == x_and_out + 128 * 0.75
    xla = price_graph(graph, gpu, int8_matmul="xla")
    assert (xla.stmt("y1").launch_s, xla.stmt("y2").launch_s) == (0.5, 0.5)
    assert xla.launch_s - rep.launch_s == 0.5


def test_int8_gemm_bytes_is_the_measured_int8_matvec_ratio(tmp_path):
    """The H100/H200 presets' and the calibrated file's int8_gemm_bytes are twice the
    fused int8 GEMM's time over the bf16 GEMM's at batch 1 (benchmarks/int8_matvec.py
    on an H200, timed as bursts of calls); a bad value is one error line."""
    import json
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    rows = json.loads((results / "int8-matvec-h200-pallas8-sweep2.json").read_text())["rows"]
    ratio = next(r["vs_bf16"] for r in rows if r["batch"] == 1 and r["form"] == "i8-dot")
    assert PRESETS["h200"].int8_gemm_bytes == PRESETS["h100"].int8_gemm_bytes == round(2 * ratio, 2)
    assert load_hardware(str(results / "hardware-h200.toml")).int8_gemm_bytes == round(2 * ratio, 2)
    assert PRESETS["tpu-v4"].int8_gemm_bytes == PRESETS["cpu"].int8_gemm_bytes == 1.0
    # the Pallas GEMV's figure, from the same benchmark's i8-gemv row (codegen int8_matmul)
    rows = json.loads((results / "int8-matvec-h200-int8kernel2.json").read_text())["rows"]
    gemv = next(r["vs_bf16"] for r in rows if r["batch"] == 1 and r["form"] == "i8-gemv")
    assert PRESETS["h200"].int8_gemv_bytes == PRESETS["h100"].int8_gemv_bytes == round(2 * gemv, 2)
    assert load_hardware(str(results / "hardware-h200.toml")).int8_gemv_bytes == round(2 * gemv, 2)
    assert PRESETS["cpu"].int8_gemv_bytes == 1.0
    f = tmp_path / "gpu.toml"
    f.write_text('base = "h200"\nint8_gemm_bytes = 0\n')
    with pytest.raises(EinpartError, match="field 'int8_gemm_bytes' must be positive, got 0"):
        load_hardware(str(f))
    f.write_text('base = "h200"\nplatform = 1\n')
    with pytest.raises(EinpartError, match=r"field 'platform' must be a string \(cuda, tpu, cpu\), got 1"):
        load_hardware(str(f))
    f.write_text('base = "h200"\nplatform = "rocm"\n')
    assert load_hardware(str(f)).platform == "rocm" and PRESETS["h200"].platform == "cuda"


def test_prepared_int8_weights_are_cast_as_their_step_params_are():
    """The planner sees int8 weights as preparation statements, the step program as
    params (split_prepare): both price the same casts."""
    from einpart.codegen.prepare import split_prepare
    from einpart.ir.parser import parse_file
    from einpart.passes import run_pipeline
    graph = run_pipeline(parse_file("examples/llama.ein"), "int8,cast{dtype=bf16}").graph
    planned, step = weight_converts(graph), weight_converts(split_prepare(graph)[0])
    assert planned == step and planned["gate_raw"] == {"w_gate_i8": 2} and len(planned) == 8
