"""A softmax-attention chain that codegen computes as one cuDNN call
(einpart.passes.shard.fused_attention) is priced as that one kernel, on a graph
small enough to price by hand: hardware at 1 byte/s of HBM, 0.5 s a kernel, no
FLOP limit (FLOPs checked on their own), platform "cuda" unless said."""
from __future__ import annotations

from dataclasses import replace

import pytest

from einpart.errors import EinpartError
from einpart.ir.layout import stmt_split
from einpart.ir.parser import parse
from einpart.passes.shard.fused_attention import fused_attention
from einpart.passes.shard.report import price_graph
from test_cost_fusion import hw

# q [2, 4, 2, 8] and the output: 128 bf16 elements, 256 bytes each;
# keys and values [2, 8, 2, 8]: 256 elements, 512 bytes each
ATT = """
size B = 2, T = 4, S = 8, H = 2, K = 8
index b: B, t: T, s: S, h: H, k: K
input q[b, t, h, k] : bf16
input kk[b, s, h, k] : bf16
input v[b, s, h, k] : bf16
sc[b, h, t, s] = q[b, t, h, k] * kk[b, s, h, k]
sm[b, h, t, s] = sc[b, h, t, s] * rsqrt(K) + causal(t, s)
mx[b, h, t] = max(sm[b, h, t, s])
e[b, h, t, s] = exp(sm[b, h, t, s] - mx[b, h, t])
z[b, h, t] = sum(e[b, h, t, s])
p[b, h, t, s] = e[b, h, t, s] / z[b, h, t]
o[b, t, h, k] : bf16 = p[b, h, t, s] * v[b, s, h, k]
output o
"""
MEMBERS = ("sc", "sm", "mx", "e", "z", "p", "o")
GPU = replace(hw(kernel_s=0.5), platform="cuda")


def test_prefill_causal_call_reads_q_k_v_and_writes_the_output_only():
    """Prefill, causal, t whole: the call reads the first T = 4 of the 8 keys and skips
    the masked half. FLOPs: two products of 2 x (2*2*4*8*8) = 2048 each, times 4/8 keys
    times 1/2 = 1024. Bytes: q 256, k and v 512 x 4/8 each, the output 256 = 1024.
    One kernel; the other members cost nothing (no scores written)."""
    rep = price_graph(parse(ATT), GPU, "prefill", attention="cudnn")
    o = rep.stmt("o")
    assert (o.flops, o.memory_s, o.launch_s) == (1024.0, 1024.0, 0.5)
    assert all(rep.stmt(n).time_s == 0.0 for n in MEMBERS[:-1])
    assert rep.step_s == pytest.approx(1024 + 0.5)
    assert rep.activation_bytes == 256          # the output; no scores live
    assert rep.model_flops == 2 * 2048          # MFU counts the products in full


def test_without_the_prefill_causal_call_every_key_is_read_and_computed():
    """Outside the prefill program the causal mask is an explicit mask: all 8 keys,
    FLOPs 2 x 2048, bytes 256 + 512 + 512 + 256."""
    o = price_graph(parse(ATT), GPU, "decode", attention="cudnn").stmt("o")
    assert (o.flops, o.memory_s, o.launch_s) == (4096.0, 1536.0, 0.5)


def test_which_lowerings_fuse_follow_codegen():
    """auto fuses on CUDA with more than one query position, bf16; einsum (the
    default) and xla (whose call writes the scores) are priced statement by statement,
    as is auto on a CPU; a bad mode is codegen's error."""
    gr = parse(ATT)
    einsum = price_graph(gr, GPU, "prefill")
    assert einsum.step_s > 4 * 1024 and einsum.stmt("sc").memory_s > 0
    assert set(fused_attention(gr, "auto", GPU, "prefill")) == set(MEMBERS)
    assert fused_attention(gr, "xla", GPU, "prefill") == {}
    assert fused_attention(gr, "auto", replace(GPU, platform="cpu"), "prefill") == {}
    for mode in ("einsum", "xla"):
        assert price_graph(gr, GPU, "prefill", attention=mode).step_s == einsum.step_s
    one_query = parse(ATT.replace("T = 4", "T = 1"))
    assert fused_attention(one_query, "auto", GPU, "decode") == {}
    assert set(fused_attention(one_query, "cudnn", GPU, "decode")) == set(MEMBERS)
    with pytest.raises(EinpartError, match="attention must be one of einsum, xla, cudnn, auto, got 'flash'"):
        price_graph(gr, GPU, "prefill", attention="flash")


def test_a_chain_the_plan_splits_over_keys_is_not_fused():
    """On 2 devices with the keys s split, codegen keeps the einsum code (one local
    softmax per device is not the whole softmax): priced as statements."""
    from einpart.passes.shard import plan
    p = plan(parse(ATT), "x=2", GPU, "prefill", memory_limit=None, fix={"sc": {"s": ("x",)}})
    assert stmt_split(p.graph.stmt("sc"))["s"] == ("x",)
    assert fused_attention(p.graph, "cudnn", GPU, "prefill") == {}
    free = plan(parse(ATT), "x=2", GPU, "prefill", memory_limit=None, fix={"sc": {"b": ("x",)}})
    assert set(fused_attention(free.graph, "cudnn", GPU, "prefill")) == set(MEMBERS)
