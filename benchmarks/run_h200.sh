#!/bin/bash
# The device session for issue 7 on one H200 (device tool): calibrate, then the
# decode/prefill benchmark. Run from the checkout root with einpart importable;
# BASE (optional) is an older einpart checkout measured for comparison.
# Usage: OUT=dir bash benchmarks/run_h200.sh STAGE   (STAGE: 1, 2, ...)
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/hlo
stage=${1:-1}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv | tee -a "$OUT/run.log"
if [ "$stage" = 1 ]; then
  python3 benchmarks/calibrate.py --base h200 --name h200 --out "$OUT" 2>&1 | tee -a "$OUT/run.log" || exit 1
  HW="$OUT/hardware-h200.toml"
  if [ -n "$BASE" ]; then
    python3 benchmarks/decode.py --einpart "$BASE" --label base --batches 1,64 --prefill none --layers scan \
      --baseline "" --hardware "$HW" --dump-hlo /tmp/hlo --tag=-base --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  fi
  python3 benchmarks/decode.py --batches 1,64 --prefill 8x2048 --layers scan --int8 scan --baseline unroll,scan \
    --hardware "$HW" --dump-hlo /tmp/hlo --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  tar -czf "$OUT/hlo.tgz" -C /tmp hlo
fi
if [ "$stage" = 2 ]; then
  python3 benchmarks/calibrate.py --base h200 --name h200 --out "$OUT" 2>&1 | tee -a "$OUT/run.log" || exit 1
  HW="$OUT/hardware-h200.toml"
  python3 benchmarks/decode.py --batches 1,64 --prefill 8x2048 --layers unroll --int8 scan --baseline scan \
    --hardware "$HW" --dump-hlo /tmp/hlo --tag=-run2 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true python3 benchmarks/decode.py --label dsfusion --batches 1,64 \
    --prefill none --layers scan --baseline "" --hardware "$HW" --tag=-dsfusion --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  if [ -n "$BASE" ]; then
    python3 benchmarks/decode.py --einpart "$BASE" --label base --batches 64 --prefill none --layers scan \
      --baseline "" --hardware "$HW" --tag=-base --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  fi
  tar -czf "$OUT/hlo.tgz" -C /tmp hlo
fi
if [ "$stage" = 3 ]; then
  HW=benchmarks/results/hardware-h200.toml
  python3 benchmarks/decode.py --batches 1,64 --prefill 8x2048 --layers scan,unroll --int8 scan --baseline scan \
    --hardware "$HW" --tag=-run3 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  python3 benchmarks/decode.py --batches 1 --prefill none --layers "" --baseline unroll \
    --hardware "$HW" --tag=-plain-unroll --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$stage" = 4 ]; then
  python3 benchmarks/decode.py --batches 1 --prefill none --layers unroll --int8 unroll --baseline unroll \
    --hardware benchmarks/results/hardware-h200.toml --tag=-run4 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$stage" = 5 ]; then
  # the cache stored [b, g, s, k] (attention batches over leading axes), layers=auto (decode
  # unrolled, prefill scanned), XLA's autotuner off for compile time, int8 unrolled with its HLO
  HW=benchmarks/results/hardware-h200.toml
  timeout 250 python3 benchmarks/decode.py --batches 1,64 --prefill 8x2048 --layers scan,auto --cache-order bgsk \
    --baseline scan --hardware "$HW" --tag=-run5-bgsk --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 110 python3 benchmarks/decode.py --label autotune0 --batches 1 \
    --prefill none --layers auto --cache-order bgsk --baseline "" --hardware "$HW" --tag=-run5-autotune0 \
    --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  timeout 150 python3 benchmarks/decode.py --batches 1,64 --prefill none --layers "" --int8 auto --cache-order bgsk \
    --baseline "" --hardware "$HW" --dump-hlo /tmp/hlo --tag=-run5-int8 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  tar -czf "$OUT/hlo.tgz" -C /tmp hlo
  XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true timeout 70 python3 benchmarks/decode.py --label dsfusion \
    --batches 64 --prefill none --layers scan --cache-order bgsk --baseline "" --hardware "$HW" --tag=-run5-dsfusion \
    --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$stage" = 6 ]; then
  # layers=unroll with per-layer storage (each layer's weights and cache its own array), bf16 and
  # int8, against plain JAX unrolled (cache [b, g, s, k] like the spec)
  HW=benchmarks/results/hardware-h200.toml
  timeout 270 python3 benchmarks/decode.py --batches 1 --prefill none --layers unroll --int8 unroll \
    --baseline unroll --cache-order bgsk --hardware "$HW" --dump-hlo /tmp/hlo --tag=-run6-b1 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  timeout 300 python3 benchmarks/decode.py --batches 64 --prefill none --layers unroll --int8 unroll \
    --baseline unroll --cache-order bgsk --hardware "$HW" --dump-hlo /tmp/hlo --tag=-run6-b64 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  tar -czf "$OUT/hlo.tgz" -C /tmp hlo
fi
if [ "$stage" = 7 ]; then
  # int8 products at decode batch (the lowering choice), unrolled prefill with per-layer storage
  # (compile time, speed), and fused cuDNN attention for prefill
  HW=benchmarks/results/hardware-h200.toml
  timeout 150 python3 benchmarks/int8_matvec.py --batches 1,8,64 --out "$OUT/int8-matvec-h200.json" 2>&1 | tee -a "$OUT/run.log"
  timeout 400 python3 benchmarks/decode.py --batches 1 --prefill 8x2048 --layers unroll --attention einsum,auto \
    --baseline scan --hardware "$HW" --tag=-run7 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$stage" = 8 ]; then
  # the GPU-only lowerings against the reference; generate with 32 decode steps per compiled call
  HW=benchmarks/results/hardware-h200.toml
  timeout 110 python3 benchmarks/gpu_check.py --out "$OUT/gpu-check-h200.json" 2>&1 | tee -a "$OUT/run.log"
  timeout 140 python3 benchmarks/decode.py --batches 1 --prefill none --layers auto --baseline "" --generate 64 \
    --hardware "$HW" --tag=-run8 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$stage" = 9 ]; then
  # generate with 32 decode steps per compiled call at b=1 and b=64, bf16 and int8, against plain JAX
  # running the same 32-step loop; then compile time and speed at 64 layers (AUTO_UNROLL_LAYERS)
  HW=benchmarks/results/hardware-h200.toml
  timeout 220 python3 benchmarks/decode.py --batches 1,64 --prefill none --layers unroll --int8 unroll --baseline "" \
    --generate 64 --hardware "$HW" --tag=-run9 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  timeout 200 python3 benchmarks/decode.py --batches 1,64 --prefill none --layers "" --baseline unroll \
    --generate 64 --hardware "$HW" --tag=-run9-plain --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
  timeout 170 python3 benchmarks/decode.py --set L=64 --batches 1 --prefill 8x2048 --layers unroll,scan --baseline "" \
    --steps 10 --hardware "$HW" --tag=-run9-L64 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
if [ "$stage" = 10 ]; then
  # int8 weight products through the Pallas GEMV kernel (codegen int8_matmul=auto: the kernel at decode
  # batch 1, XLA's int8 GEMM at 64) against int8_matmul=xla and bf16, one step per call and generate;
  # gpu_check first: the kernel's numerics on the GPU against the reference interpreter
  HW=benchmarks/results/hardware-h200.toml
  timeout 90 python3 benchmarks/gpu_check.py --out "$OUT/gpu-check-h200-run10.json" 2>&1 | tee -a "$OUT/run.log"
  timeout 240 python3 benchmarks/decode.py --batches 1 --prefill none --layers unroll --int8 unroll \
    --int8-matmul xla,auto --baseline "" --generate 64 --hardware "$HW" --tag=-run10 --out "$OUT" 2>&1 | tee -a "$OUT/run.log"
fi
