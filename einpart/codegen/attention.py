"""Softmax attention as one jax.nn.dot_product_attention call (the `attention` lowering option).

The einsum code computes a spec's attention chain (einpart.ir.attention) statement by
statement, so XLA materialises the float32 scores of every layer several times (about
4.3 GB per layer for Llama-8B prefill at 8 x 2048). Where the plan keeps the chain's
key positions s and head dim k whole on every device, each device's local computation
is a whole softmax over its own heads and queries, and this module emits one fused call
in place of the chain:

- "einsum": today's statement-by-statement code (no fused call);
- "xla": jax.nn.dot_product_attention(implementation='xla') for every chain the plan allows;
- "cudnn": the same call with implementation='cudnn' (cuDNN flash attention; NVIDIA GPUs,
  bf16 / f16 only: a float32 chain or an unsupported head dim is an error);
- "auto": cudnn on a CUDA platform for bf16 / f16 chains of more than one query position
  (prefill) with a head dim cuDNN takes on every GPU (a multiple of 8, at most 128); the
  einsum code everywhere else (CPU, float32, decode).

The "xla" and "cudnn" code differ only in the `implementation=` argument, so the tests
that run "xla" on CPU cover the cudnn code path up to JAX's kernel. The call's
arguments mirror the IR: the query as [B, T, N, H] with N = (key/value heads x query
heads per key/value head) (grouped-query: jax takes keys with fewer heads), keys and
values as [B, S, K, H]; `scale` the spec's constant; causal(t, s) (s <= pos + t) as
key_value_seq_lengths = pos + 1 for one query position (decode), is_causal=True in the
prefill program when t is not split (prefill runs at pos 0: Executable and Program call
it so, and there causal(t, s) is s <= t; the call then reads only the first T keys, so
T = S and top-left or bottom-right alignment of the causal mask cannot differ), and an
explicit boolean mask otherwise. A
mixin of StepProgram (program.py).
"""
from __future__ import annotations

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.attention import AttentionChain, attention_chains
from ..ir.layout import parts, plan_stmt, ref_layout, stmt_split
from .code import DTYPE_CODE, Val, one_line, tuple_code
from .names import number

ATTENTION_MODES = ("einsum", "xla", "cudnn", "auto")
LOW_FLOAT = ("bf16", "f16")
AUTO_MAX_HEAD_DIM = 128      # cuDNN flash attention takes up to 128 on every GPU, 256 from Hopper on


def check_attention_mode(attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise EinpartError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got '{attention}'")
    return attention


class AttentionEmitter:
    """Chooses the chains to fuse (select_attention) and emits each one's call (attention)."""

    def plan_problem(self, chain: AttentionChain) -> str | None:
        """Why the plan keeps this chain from being one local softmax, or None."""
        stmts = {s.name: s for s, _ in self.graph.all_stmts()}
        # the statement that reads the value (the output's contraction, or o_raw in the deferred form)
        value_stmt = chain.weighted if chain.deferred else chain.out
        for name in chain.members:
            s = stmts[name]
            split = stmt_split(s)
            for i in (chain.s, chain.k):
                if split.get(i):
                    return f"'{name}' splits {i} over {', '.join(split[i])}"
            comm = plan_stmt(s, self.types, split)
            if comm.reduce:
                return f"'{name}' reduces across devices"
            if comm.result and name != chain.out:
                return f"'{name}' is moved after it is computed"
            for r, moves in comm.operands:
                outer = (name == chain.scores and r in (chain.query, chain.key)) or (
                    name == value_stmt and r == chain.value)
                if moves and not outer:
                    return f"'{name}' moves its operand {r.name}"
        return None

    def chain_dtype(self, chain: AttentionChain) -> str:
        """The dtype the call computes in: the low float dtype of query, key or value, else f32."""
        dts = [self.types[r.name].dtype for r in (chain.query, chain.key, chain.value)]
        return next((d for d in dts if d in LOW_FLOAT), "f32")

    def chain_local(self, chain: AttentionChain, index: str) -> int:
        split = stmt_split(self.graph.stmt(chain.scores))
        return self.idx[index] // parts(tuple(split.get(index, ())), self.mesh)

    def implementation(self, chain: AttentionChain) -> str | None:
        """'xla' / 'cudnn' for a chain this program fuses, None for the einsum code."""
        if self.attention_mode == "einsum" or self.plan_problem(chain) is not None:
            return None
        if self.attention_mode == "xla":
            return "xla"
        dtype, head = self.chain_dtype(chain), self.chain_local(chain, chain.k)
        if self.attention_mode == "cudnn":
            if dtype not in LOW_FLOAT:
                raise EinpartError(f"attention='cudnn' needs bf16 or f16 attention inputs, but '{chain.out}' "
                                   f"reads {chain.query.name}, {chain.key.name} and {chain.value.name} in {dtype} "
                                   f"(store them in bf16, e.g. --dtype bf16, or use attention='auto' or 'xla')")
            if head % 8 or head > 256:
                raise EinpartError(f"attention='cudnn' needs a head dim that is a multiple of 8 and at most 256; "
                                   f"'{chain.out}' has {chain.k}={head} on each device")
            return "cudnn"
        # auto: cuDNN where it is known to work and to pay (prefill on a CUDA GPU), einsums elsewhere
        if (self.platform == "cuda" and dtype in LOW_FLOAT and self.chain_local(chain, chain.t) > 1
                and head % 8 == 0 and head <= AUTO_MAX_HEAD_DIM):
            return "cudnn"
        return None

    def select_attention(self) -> dict[str, tuple[AttentionChain, str]]:
        """member statement name -> (its chain, implementation), for the chains this program fuses."""
        out = {}
        if self.attention_mode == "einsum" or (self.attention_mode == "auto" and self.platform != "cuda"):
            return out
        for chain in attention_chains(self.graph):
            impl = self.implementation(chain)
            if impl is not None:
                for name in chain.members:
                    out[name] = (chain, impl)
        return out

    def moved_operand(self, stmt_name: str, ref: g.Ref) -> Val:
        """One operand of a chain statement, moved into that statement's split (as operands() does)."""
        s = self.graph.stmt(stmt_name)
        comm = plan_stmt(s, self.types, stmt_split(s))
        moves = next(m for r, m in comm.operands if r == ref)
        src = self.vals[ref.name]
        return self.moves(Val(src.var, ref.indices, ref_layout(ref, self.types[ref.name]), src.dtype), moves, src.var)

    def attention(self, s: g.Statement, chain: AttentionChain, impl: str) -> None:
        """The chain's output `s` as one jax.nn.dot_product_attention call on the local blocks."""
        w, ns = self.w, self.ns
        split = stmt_split(self.graph.stmt(chain.scores))
        dtype = self.chain_dtype(chain)
        n = {i: self.chain_local(chain, i) for i in chain.query.indices + (chain.s,)}
        lead = (chain.batch,) if chain.batch else ()
        dims = (chain.t,) + chain.kv_heads + chain.q_heads + (chain.k,)      # the query's, as BTNH groups them
        kv_dims = (chain.s,) + chain.kv_heads + (chain.k,)
        B = n[chain.batch] if chain.batch else 1
        G = 1
        for i in chain.kv_heads:
            G *= n[i]
        N = G
        for i in chain.q_heads:
            N *= n[i]
        w(f"# softmax attention {one_line(', '.join(chain.members))}: one fused call (attention={self.attention_mode}); "
          f"local [B, T, N, H] = [{B}, {n[chain.t]}, {N}, {n[chain.k]}], keys [{B}, {n[chain.s]}, {G}, {n[chain.k]}]")
        q = self.moved_operand(chain.scores, chain.query)
        k = self.moved_operand(chain.scores, chain.key)
        v = self.moved_operand(chain.weighted if chain.deferred else chain.out, chain.value)
        names = {}
        for role, val, order, shape in (("q", q, lead + dims, (B, n[chain.t], N, n[chain.k])),
                                        ("k", k, lead + kv_dims, (B, n[chain.s], G, n[chain.k])),
                                        ("v", v, lead + kv_dims, (B, n[chain.s], G, n[chain.k]))):
            code = self.transpose(val.var, val.indices, order)
            if not chain.batch:
                code = f"{code}[None]"
            if val.dtype != dtype:
                code = f"{code}.astype({DTYPE_CODE[dtype]})"
            names[role] = ns.fresh(f"attn_{role}")
            w(f"{names[role]} = jnp.reshape({code}, {tuple_code(shape)})")
        mask_args = ""
        if chain.causal:
            off, n_t = self.offset(chain.t, split)
            if n_t == 1:       # one query position (decode): keys up to pos (+ the shard's offset)
                kv_len = ns.fresh("kv_len")
                w(f"{kv_len} = jnp.full(({B},), pos + {off + ' + ' if off else ''}1, jnp.int32)"
                  f"  # causal({chain.t}, {chain.s}): keys s <= pos")
                mask_args = f", key_value_seq_lengths={kv_len}"
            elif off is None and self.name == "prefill":
                w(f"# causal({chain.t}, {chain.s}) is s <= pos + t; prefill runs at pos 0, where it is s <= t")
                if n_t < n[chain.s]:    # only the first T keys are seen: T = S for the call (no alignment question)
                    w(f"{names['k']}, {names['v']} = {names['k']}[:, :{n_t}], {names['v']}[:, :{n_t}]"
                      f"  # the keys s < T")
                mask_args = ", is_causal=True"
            else:
                mask = ns.fresh(f"mask_{chain.t}_{chain.s}")
                w(f"{mask} = ((jnp.arange({n[chain.s]}))[None, :] <= ({self.positions(chain.t, split, True)})"
                  f"[:, None])[None, None]  # causal({chain.t}, {chain.s}): [1, 1, {chain.t}, {chain.s}]")
                mask_args = f", mask={mask}"
        var = ns.tensor(s.name)
        call = (f"jax.nn.dot_product_attention({names['q']}, {names['k']}, {names['v']}, "
                f"scale={number(chain.scale)}{mask_args}, implementation='{impl}')")
        if dtype == "f32":      # float32 products at full precision, as the einsum code's HIGHEST
            w("with jax.default_matmul_precision('highest'):")
            w(f"    {var} = {call}")
        else:
            w(f"{var} = {call}")
        w(f"{var} = jnp.reshape({var}, {tuple_code((B,) + tuple(n[i] for i in dims))}){'' if chain.batch else '[0]'}")
        if lead + dims != s.type.indices:
            w(f"{var} = {self.transpose(var, lead + dims, s.type.indices)}")
        self.finish(s, var, plan_stmt(s, self.types, stmt_split(s)), dtype)
