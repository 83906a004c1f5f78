"""Plain JAX Llama, written as a user would: the baseline einpart is measured
against. It reads the same weights dict einpart uses (stacked [L, ...]) so
both run on identical data, bf16 weights and cache, f32 norms and softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def rms_norm(x, g, eps=1e-5):
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * g.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta):
    k = x.shape[-1]
    inv = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)
    ang = positions[:, None].astype(jnp.float32) * inv[None, :]          # [T, K/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 3) + (k,)
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, -1)
    return (x32 * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(x.dtype)


def layer(x, w, kcs, vcs, i, pos, theta, cache_order="bsgk"):
    """Decoder layer i; the stacked caches kcs/vcs [L, B, S, G, K] ([L, B, G, S, K] with
    cache_order="bgsk") are updated in place (one dynamic_update_slice each) at positions
    pos..pos+T-1."""
    B, T, _ = x.shape
    positions = pos + jnp.arange(T)
    h = rms_norm(x, w["attn_norm"])
    q = jnp.einsum("btd,dgrk->btgrk", h, w["wq"])
    k = jnp.einsum("btd,dgk->btgk", h, w["wk"])
    v = jnp.einsum("btd,dgk->btgk", h, w["wv"])
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    zero = jnp.zeros((), jnp.int32)
    c = "bsgk" if cache_order == "bsgk" else "bgsk"
    if cache_order == "bgsk":
        at = (i, zero, zero, pos, zero)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    else:
        at = (i, zero, pos, zero, zero)
    kcs = lax.dynamic_update_slice(kcs, k[None].astype(kcs.dtype), at)
    vcs = lax.dynamic_update_slice(vcs, v[None].astype(vcs.dtype), at)
    kc, vc = kcs[i], vcs[i]
    S = kc.shape[c.index("s")]
    s = jnp.einsum(f"btgrk,{c}->bgrts", q, kc, preferred_element_type=jnp.float32) / jnp.sqrt(q.shape[-1] * 1.0)
    mask = jnp.arange(S)[None, :] <= positions[:, None]
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(x.dtype)
    o = jnp.einsum(f"bgrts,{c}->btgrk", p, vc)
    x = x + jnp.einsum("btgrk,grkd->btd", o, w["wo"])
    h = rms_norm(x, w["mlp_norm"])
    act = jax.nn.silu(h @ w["w_gate"]) * (h @ w["w_up"])
    return x + act @ w["w_down"], kcs, vcs


LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


def make_step(theta: float = 500000.0, scan: bool = False, cache_order: str = "bsgk"):
    """step(params, state, tokens, pos) -> (logits [B,T,V] f32, state); state donated by the caller."""
    def step(params, state, tokens, pos):
        x = params["embed"][tokens]
        layers = {k: params[k] for k in LAYER_KEYS}
        kcs, vcs = state["k_cache"], state["v_cache"]
        if scan:
            def body(carry, xs):
                x, kcs, vcs = carry
                w, i = xs
                return layer(x, w, kcs, vcs, i, pos, theta, cache_order), None
            n = kcs.shape[0]
            (x, kcs, vcs), _ = lax.scan(body, (x, kcs, vcs), (layers, jnp.arange(n, dtype=jnp.int32)))
        else:
            for i in range(kcs.shape[0]):
                w = {k: v[i] for k, v in layers.items()}
                x, kcs, vcs = layer(x, w, kcs, vcs, jnp.int32(i), pos, theta, cache_order)
        x = rms_norm(x, params["norm_f"])
        logits = jnp.einsum("btd,dv->btv", x, params["unembed"], preferred_element_type=jnp.float32)
        return logits, {"k_cache": kcs, "v_cache": vcs}
    return step
