"""The price of a softmax-attention chain that codegen computes as one cuDNN call.

With attention="cudnn" (or "auto" on a CUDA GPU, for prefill) codegen
(einpart.codegen.attention) replaces a matched chain (einpart.ir.attention:
scores, mask, max, exp, sum, normalise, weighted sum) by one
jax.nn.dot_product_attention(implementation='cudnn') call: cuDNN's flash
attention, one kernel that reads q, k and v, keeps the scores in on-chip
memory and writes the output only. With the prefill program's causal mask
(is_causal=True: t is whole and the call reads only the first T keys) it
skips the blocks the mask hides, about half of both products.

So such a chain costs, as one kernel (`attention_cost`):
  FLOPs   both products, 2 x 2 x (query points x keys x head dim), halved
          under the prefill causal mask, over the keys the call reads;
  bytes   q, k, v (the keys the call reads) and the output;
and its other members cost nothing (no scores are written).

Which chains are fused is codegen's own decision, asked of it here
(AttentionEmitter.implementation: the same matcher and plan checks), so the
model prices what runs. implementation='xla' is priced as the statements
it stands for: XLA's dot_product_attention writes the scores as the einsum
code does.
"""
from __future__ import annotations

import math

from ...ir import graph as g
from ...ir import layout as lay
from ...ir.attention import AttentionChain
from ...ir.shapes import DTYPE_BYTES
from ...ir.verify import index_sizes, resolve_sizes
from .cost import local_bytes, stmt_flops


def fused_attention(graph: g.Graph, attention: str, hw, phase: str = "") -> dict:
    """member statement name -> its chain, for every chain the program `phase` of this
    graph computes as one cuDNN call under codegen's attention lowering `attention`
    on `hw` (its platform decides "auto"). Bad modes get codegen's EinpartError."""
    from ...codegen.attention import AttentionEmitter, check_attention_mode

    class Selector(AttentionEmitter):
        """The codegen mixin's selection over a graph, without a program to emit."""

    check_attention_mode(attention)
    if attention == "einsum":
        return {}
    sel = Selector()
    sel.graph, sel.types, sel.name = graph, graph.types(), phase
    sel.mesh = dict(graph.mesh or (("x", 1),))
    sel.idx = index_sizes(graph, resolve_sizes(graph))
    sel.attention_mode, sel.platform = attention, hw.platform
    return {name: chain for name, (chain, impl) in sel.select_attention().items() if impl == "cudnn"}


def causal_skip(chain: AttentionChain, split: dict, phase: str, t_local: int) -> bool:
    """Whether the call runs with is_causal=True, as codegen.attention emits it: a causal
    chain in the prefill program with t whole and more than one query position."""
    return chain.causal and phase == "prefill" and not split.get(chain.t) and t_local > 1


def attention_cost(chain: AttentionChain, stmts: dict, types: dict, idx: dict, mesh_size: dict,
                   phase: str) -> tuple[float, float]:
    """(FLOPs, HBM bytes) one device spends on the fused call (module docstring)."""
    split = lay.stmt_split(stmts[chain.scores])
    value_stmt = stmts[chain.weighted if chain.deferred else chain.out]

    def local(i):
        return idx[i] / math.prod(mesh_size[a] for a in split.get(i, ()))

    t_n, s_n = local(chain.t), local(chain.s)
    causal = causal_skip(chain, split, phase, int(t_n))
    keys = min(t_n, s_n) if causal else s_n                 # the call reads only the first T keys
    share = keys / s_n * (0.5 if causal else 1.0)
    flops = (stmt_flops(stmts[chain.scores], idx, split, mesh_size)
             + stmt_flops(value_stmt, idx, lay.stmt_split(value_stmt), mesh_size)) * share
    nbytes = 0.0
    for ref, frac in ((chain.query, 1.0), (chain.key, keys / s_n), (chain.value, keys / s_n)):
        nbytes += frac * local_bytes(ref.indices, idx, split, mesh_size, DTYPE_BYTES[types[ref.name].dtype])
    out = stmts[chain.out]
    nbytes += local_bytes(out.type.indices, idx, lay.stmt_split(out), mesh_size, DTYPE_BYTES[out.type.dtype])
    return flops, nbytes
