"""Hardware as data: what the cost model needs to know about a device and
its links, as presets with their sources, or from a small TOML/JSON file.

Per device: peak FLOP/s (bf16, int8), HBM bandwidth and capacity, and the
cost of one kernel launch (kernel_s: what a step pays per kernel beyond its
roofline; cost.stmt_kernels counts them), the bytes an int8 weight element
costs a GEMM that casts it as it reads it (int8_gemm_bytes: 1 where int8 is
read at full bandwidth; int8_gemv_bytes: the same for the Pallas GEMV kernel that
codegen's int8_matmul option uses at decode), and the JAX platform (what attention="auto" picks
on). Per mesh
axis: the link a collective along that axis runs over (bandwidth in bytes/s
that one device moves, and latency per collective step). How a collective
over several axes uses their links is `combine`:

  "min"  every collective runs at one device bandwidth whatever axes it
         spans (a switched fabric such as NVSwitch, where a GPU's NVLink
         ports serve any peer; also the simplification Pope et al. make for
         the TPU v4 torus: one "network bandwidth" for every collective);
  "sum"  a collective over several axes drives all their links at once
         (a torus, where each axis has its own links).

On GPU clusters `node_size` devices share a node; a mesh axis whose devices
span nodes (counting from the minor axis, as jax.make_mesh lays devices out)
uses `inter_node` instead of `link`.

A user file (TOML or JSON) has the same fields; `base = "h100"` starts from
a preset. Anything malformed is one EinpartError line naming the field.
"""
from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ...errors import EinpartError

GiB = 2 ** 30


@dataclass(frozen=True)
class Link:
    bandwidth: float   # bytes/s one device sends (and receives) in a collective on this axis
    latency: float     # seconds per step of a collective along this axis


@dataclass(frozen=True)
class Hardware:
    name: str
    flops_bf16: float          # peak FLOP/s per device, bf16 (and f32, treated as bf16 passes)
    flops_int8: float          # peak OP/s per device, int8 operands
    hbm_bandwidth: float       # bytes/s per device
    hbm_bytes: float           # capacity per device
    link: Link                 # the link of every mesh axis inside a node
    combine: str = "min"       # "min" (one bandwidth per collective) or "sum" (torus: axes add)
    node_size: int = 0         # devices per node; 0 = the whole mesh is one node
    inter_node: Link | None = None
    axes: tuple = ()           # ((mesh axis name, Link), ...): per-axis overrides
    kernel_s: float = 0.0      # seconds each kernel a step launches costs beyond its roofline
    convert_kernel: bool = False   # a stacked weight's slice that a product casts is a kernel of its own (XLA GPU, scan)
    int8_gemm_bytes: float = 1.0   # HBM bytes an int8 weight element costs a GEMM that casts it in its prologue
    int8_gemv_bytes: float = 1.0   # the same for the Pallas GEMV kernel (codegen int8_matmul="pallas"/"auto")
    platform: str = ""         # the JAX platform ("cuda", "tpu", "cpu"): what codegen's attention="auto" reads
    source: str = field(default="", compare=False)

    def axis_links(self, mesh) -> dict[str, Link]:
        """The link of every mesh axis: overrides, else inter-node for axes spanning nodes."""
        over = dict(self.axes)
        out: dict[str, Link] = {}
        inner = 1
        for name, size in reversed(tuple(mesh)):
            inner *= size
            spans = self.node_size > 0 and inner > self.node_size and size > 1
            out[name] = over.get(name) or (self.inter_node if spans and self.inter_node else self.link)
        return out

    def describe(self) -> str:
        return (f"{self.name}: {self.flops_bf16 / 1e12:g} TFLOP/s bf16, {self.flops_int8 / 1e12:g} TOP/s int8, "
                f"HBM {self.hbm_bytes / 1e9:.3g} GB at {self.hbm_bandwidth / 1e12:.3g} TB/s, "
                f"links {self.link.bandwidth / 1e9:g} GB/s ({self.combine})")


# ---------------------------------------------------------------- presets
# TPU v4. Compute, HBM: Cloud TPU v4 documentation ("Peak compute per chip
# 275 teraflops (bf16 or int8)", "HBM2 capacity and bandwidth 32 GiB,
# 1200 GBps"), the constants Pope et al. 2022 ("Efficiently Scaling
# Transformer Inference", arXiv 2211.05102, sec. 2/3) use: 275 TFLOP/s,
# 32 GiB HBM at 1.2 TB/s and a 270 GB/s interconnect in a 3D torus. Their
# closed forms (1D weight-stationary 2BLE/bw, 2D 8BLE/(sqrt(n) bw)) price
# every collective at that one bandwidth, whatever axes it spans: combine
# "min". The scaling book (jax-ml.github.io/scaling-book/tpus) gives the
# per-link figures behind it: 4.5e10 B/s one way, 9e10 bidirectional per
# axis with wraparound, 3 axes = 2.7e11: preset "tpu-v4-torus" prices that
# physical torus (combine "sum"). Latency: an assumed 1 us per step (Pope et
# al. leave latency out of the closed forms). No kernel cost (kernel_s = 0):
# the paper prices none, and none was measured on a TPU here.
TPU_V4 = Hardware(
    name="tpu-v4", flops_bf16=275e12, flops_int8=275e12, hbm_bandwidth=1.2e12, hbm_bytes=32 * GiB,
    link=Link(270e9, 1e-6), combine="min", platform="tpu",
    source="Cloud TPU v4 docs; Pope et al. 2022 (arXiv 2211.05102) sec. 2-3")
TPU_V4_TORUS = replace(TPU_V4, name="tpu-v4-torus", link=Link(90e9, 1e-6), combine="sum",
                       source="scaling book, 'How to think about TPUs': ICI 9e10 B/s bidirectional per axis")
# H100 / H200 SXM. Dense tensor-core peaks (NVIDIA's datasheets list twice
# these "with sparsity"): 989 TFLOP/s bf16, 1979 TOP/s int8; HBM 80 GB at
# 3.35 TB/s (H100 SXM), 141 GB at 4.8 TB/s (H200 SXM); the scaling book's
# GPU table (jax-ml.github.io/scaling-book/gpus) agrees. NVLink 4 through
# NVSwitch: 900 GB/s bidirectional per GPU = 450 GB/s each way, to any peer
# in the 8-GPU node (combine "min"). Between nodes: one 400 Gb/s NDR
# InfiniBand NIC per GPU = 50 GB/s. Latencies are assumed (2 us NVLink step,
# 5 us InfiniBand step). Kernel cost (kernel_s): the H200's measured 1.9 us
# (below), not measured on an H100 (same Hopper chip, driver and XLA path).
# convert_kernel: under lax.scan XLA on GPU slices a stacked int8 weight and
# casts it to bf16 in a kernel of its own that writes the bf16 copy the GEMM
# then reads (H200 HLO, benchmarks/results/convert-h200-20261202.json).
# int8_gemm_bytes: a weight stored as its own array (layers="unroll",
# per-layer storage) is cast inside the Triton GEMM (HLO gemm_fusion_dot with
# parameter s8[4096,14336]), and that GEMM reads int8 at under half the bytes
# per second of bf16: 8 layers of [B,4096]x[4096,14336] and back took 1.170x
# (B=1), 0.824x (B=8) and 0.959x (B=64) the bf16 GEMMs' time on one H200, each
# form timed as bursts of calls (benchmarks/int8_matvec.py,
# results/int8-matvec-h200-pallas8-sweep2.json; the first run, timed call by
# call, had about 0.35 ms of dispatch in every figure and gave 0.974x), so an
# int8 element costs 2 x 1.170 = 2.34 bf16-rate bytes (the B=1 row, decode's).
# The H100 takes the H200's figure (same Hopper GEMM path; not measured on an H100).
# int8_gemv_bytes: the Pallas GEMV kernel (codegen int8_matmul, runtime/kernels/int8_gemv.py)
# took 0.758x the bf16 GEMMs' time at B=1 on the same workload (0.364 vs 0.481 ms,
# results/int8-matvec-h200-int8kernel2.json), so 2 x 0.758 = 1.52 bf16-rate bytes.
H100 = Hardware(
    name="h100", flops_bf16=989e12, flops_int8=1979e12, hbm_bandwidth=3.35e12, hbm_bytes=80e9,
    link=Link(450e9, 2e-6), combine="min", node_size=8, inter_node=Link(50e9, 5e-6), kernel_s=1.9e-6,
    convert_kernel=True, int8_gemm_bytes=2.34, int8_gemv_bytes=1.52, platform="cuda",
    source="NVIDIA H100 SXM datasheet (dense); scaling book GPU chapter; kernel_s, int8_gemm_bytes, "
           "int8_gemv_bytes: the H200's")
# H200: measured on one NVIDIA H200 (device tool, JAX 0.11.2, 2026-12-02) by
# benchmarks/calibrate.py, file benchmarks/results/hardware-h200.toml: bf16
# 8192^3 products on random data 722 TFLOP/s (datasheet 989), int8 1068 TOP/s
# (datasheet 1979), HBM 3.69 TB/s as a 4 GiB device-to-device copy (datasheet
# 4.8). Capacity and NVLink are the datasheet's (links not measured: one GPU).
# kernel_s: 1.90 us a kernel, the slope of a chain of 64 vs 512 tiny dependent
# products in one program (benchmarks/calibrate.py kernel_overhead, same
# device and day: benchmarks/results/kernels-h200-20261202-0747.json).
H200 = replace(H100, name="h200", flops_bf16=722.5e12, flops_int8=1068.4e12, hbm_bandwidth=3.69e12,
               hbm_bytes=141e9, kernel_s=1.9e-6,
               source="measured: benchmarks/results/hardware-h200.toml (benchmarks/calibrate.py); "
                      "capacity and links: NVIDIA H200 SXM datasheet")
# A CPU "mesh" of simulated devices for tests: made-up, round numbers.
CPU = Hardware(
    name="cpu", flops_bf16=1e11, flops_int8=1e11, hbm_bandwidth=2e10, hbm_bytes=16e9,
    link=Link(1e10, 1e-5), combine="min", platform="cpu", source="round numbers for tests")

PRESETS = {h.name: h for h in (TPU_V4, TPU_V4_TORUS, H100, H200, CPU)}

_NUMBERS = ("flops_bf16", "flops_int8", "hbm_bandwidth", "hbm_bytes")
_KNOWN = set(_NUMBERS) | {"name", "base", "link", "combine", "node_size", "inter_node", "axes", "kernel_s",
                          "convert_kernel", "int8_gemm_bytes", "int8_gemv_bytes", "platform"}


def load_hardware(spec) -> Hardware:
    """A preset name, a path to a .toml/.json file, or a Hardware."""
    if isinstance(spec, Hardware):
        return spec
    text = str(spec).strip()
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if not path.exists():
        raise EinpartError(f"hardware '{text}': not a preset ({', '.join(PRESETS)}) nor a file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EinpartError(f"hardware file {path}: cannot read it ({type(e).__name__})") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise EinpartError(f"hardware file {path}: not valid {kind}: {str(e).splitlines()[0]}") from None
    return hardware_from_dict(data, where=f"hardware file {path}")


def _num(where: str, key: str, value, positive=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EinpartError(f"{where}: field '{key}' must be a number, got {value!r}")
    if positive and value <= 0:
        raise EinpartError(f"{where}: field '{key}' must be positive, got {value!r}")
    if not positive and value < 0:
        raise EinpartError(f"{where}: field '{key}' must not be negative, got {value!r}")
    return float(value)


def _link(where: str, key: str, value, default: Link | None) -> Link:
    if not isinstance(value, dict):
        raise EinpartError(f"{where}: field '{key}' must be a table with bandwidth and latency")
    extra = set(value) - {"bandwidth", "latency"}
    if extra:
        raise EinpartError(f"{where}: unknown field '{key}.{sorted(extra)[0]}' (a link has bandwidth, latency)")
    if default is None and "bandwidth" not in value:
        raise EinpartError(f"{where}: field '{key}.bandwidth' is missing")
    bw = _num(where, f"{key}.bandwidth", value["bandwidth"]) if "bandwidth" in value else default.bandwidth
    lat = (_num(where, f"{key}.latency", value["latency"], positive=False) if "latency" in value
           else (default.latency if default else 0.0))
    return Link(bw, lat)


def hardware_from_dict(data: dict, where: str = "hardware") -> Hardware:
    if not isinstance(data, dict):
        raise EinpartError(f"{where}: expected a table of fields")
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise EinpartError(f"{where}: unknown field '{unknown[0]}' (fields: {', '.join(sorted(_KNOWN))})")
    base = None
    if "base" in data:
        if data["base"] not in PRESETS:
            raise EinpartError(f"{where}: field 'base' must name a preset ({', '.join(PRESETS)}), got {data['base']!r}")
        base = PRESETS[data["base"]]
    kw: dict = {}
    for key in _NUMBERS:
        if key in data:
            kw[key] = _num(where, key, data[key])
        elif base is None:
            raise EinpartError(f"{where}: field '{key}' is missing")
    if "name" in data and not isinstance(data["name"], str):
        raise EinpartError(f"{where}: field 'name' must be a string")
    kw["name"] = data.get("name", base.name + "-custom" if base else "custom")
    if "link" in data:
        kw["link"] = _link(where, "link", data["link"], base.link if base else None)
    elif base is None:
        raise EinpartError(f"{where}: field 'link' is missing (a table with bandwidth and latency)")
    if "combine" in data:
        if data["combine"] not in ("min", "sum"):
            raise EinpartError(f"{where}: field 'combine' must be \"min\" or \"sum\", got {data['combine']!r}")
        kw["combine"] = data["combine"]
    if "node_size" in data:
        ns = data["node_size"]
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 0:
            raise EinpartError(f"{where}: field 'node_size' must be a non-negative integer, got {ns!r}")
        kw["node_size"] = ns
    if "kernel_s" in data:
        kw["kernel_s"] = _num(where, "kernel_s", data["kernel_s"], positive=False)
    if "convert_kernel" in data:
        if not isinstance(data["convert_kernel"], bool):
            raise EinpartError(f"{where}: field 'convert_kernel' must be true or false, got {data['convert_kernel']!r}")
        kw["convert_kernel"] = data["convert_kernel"]
    if "int8_gemm_bytes" in data:
        kw["int8_gemm_bytes"] = _num(where, "int8_gemm_bytes", data["int8_gemm_bytes"])
    if "int8_gemv_bytes" in data:
        kw["int8_gemv_bytes"] = _num(where, "int8_gemv_bytes", data["int8_gemv_bytes"])
    if "platform" in data:
        if not isinstance(data["platform"], str):
            raise EinpartError(f"{where}: field 'platform' must be a string (cuda, tpu, cpu), got {data['platform']!r}")
        kw["platform"] = data["platform"]
    if "inter_node" in data:
        kw["inter_node"] = _link(where, "inter_node", data["inter_node"], base.inter_node if base else None)
    if "axes" in data:
        if not isinstance(data["axes"], dict):
            raise EinpartError(f"{where}: field 'axes' must be a table of mesh axis -> link")
        default = kw.get("link") or (base.link if base else None)
        kw["axes"] = tuple(sorted((str(k), _link(where, f"axes.{k}", v, default)) for k, v in data["axes"].items()))
    kw["source"] = where
    if base is not None:
        return replace(base, **kw)
    names = {f.name for f in fields(Hardware)}
    return Hardware(**{k: v for k, v in kw.items() if k in names})
