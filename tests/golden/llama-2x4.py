"""einpart: llama.ein lowered to jax.shard_map.

mesh x=2, y=4; layers=scan; sizes B=2, T=8, S=32, D=64, F=160, H=4, G=2, R=2, K=16, L=2, V=256; decode: one query position.
Generated code: do not edit. Every collective is one that
einpart.ir.layout.plan_stmt prescribes for the statement above it.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

F32 = jnp.float32
HIGHEST = lax.Precision.HIGHEST
NEG_INF = -1e+30
MESH = (('x', 2), ('y', 4))

# the weights as given (a file, or random init); prepare() turns them into STEP_PARAM_SPECS
PARAM_SPECS = {
    'embed': P(('x', 'y')),
    'norm_f': P(),
    'unembed': P(None, ('x', 'y')),
    'attn_norm': P(),
    'wq': P(None, None, 'x'),
    'wk': P(None, None, 'x'),
    'wv': P(None, None, 'x'),
    'wo': P(None, 'x'),
    'mlp_norm': P(),
    'w_gate': P(None, None, ('x', 'y')),
    'w_up': P(None, None, ('x', 'y')),
    'w_down': P(None, ('x', 'y')),
}
PREPARED_SPECS = {
}
# weights and states stored as a tuple of per-layer arrays (name: layers); the
# runtime splits the stacked weights as given (and as prepared) into them
PER_LAYER = {}
# what prefill and decode read: weights as given, or prepared at load time
STEP_PARAM_SPECS = {
    'embed': P(('x', 'y')),
    'norm_f': P(),
    'unembed': P(None, ('x', 'y')),
    'attn_norm': P(),
    'wq': P(None, None, 'x'),
    'wk': P(None, None, 'x'),
    'wv': P(None, None, 'x'),
    'wo': P(None, 'x'),
    'mlp_norm': P(),
    'w_gate': P(None, None, ('x', 'y')),
    'w_up': P(None, None, ('x', 'y')),
    'w_down': P(None, ('x', 'y')),
}
STATE_SPECS = {
    'k_cache': P(None, None, 'x'),
    'v_cache': P(None, None, 'x'),
}
INPUT_SPECS = {
    'prefill': {'tokens': P()},
    'decode': {'tokens': P()},
}
INPUT_SHAPES = {
    'prefill': {'tokens': (2, 8)},
    'decode': {'tokens': (2, 1)},
}
OUTPUT_SPECS = {
    'prefill': {'logits': P(None, None, ('x', 'y'))},
    'decode': {'logits': P(None, None, ('x', 'y'))},
}


def prepare(params):
    """Weight preparation (param-only statements), run once at load time: params -> prepared."""
    t_embed = params['embed']
    t_norm_f = params['norm_f']
    t_unembed = params['unembed']
    t_attn_norm_all = params['attn_norm']
    t_wq_all = params['wq']
    t_wk_all = params['wk']
    t_wv_all = params['wv']
    t_wo_all = params['wo']
    t_mlp_norm_all = params['mlp_norm']
    t_w_gate_all = params['w_gate']
    t_w_up_all = params['w_up']
    t_w_down_all = params['w_down']
    return {}


def prefill(params, state, inputs, pos):
    """The prefill step (T=8): one shard_map body over local blocks. pos is the position of the first token."""
    # global sizes: b=2, t=8, s=32, d=64, f=160, g=2, r=2, k=16, l=2, v=256
    t_tokens = inputs['tokens']  # input tokens[b, t] : i32: local (2, 8)
    t_embed = params['embed']  # param embed[v@(x, y), d]: local (32, 64)
    t_norm_f = params['norm_f']  # param norm_f[d]: local (64,)
    t_unembed = params['unembed']  # param unembed[d, v@(x, y)]: local (64, 32)
    t_attn_norm_all = params['attn_norm']  # param attn_norm[d] x l: local (2, 64)
    t_wq_all = params['wq']  # param wq[d, g@x, r, k] x l: local (2, 64, 1, 2, 16)
    t_wk_all = params['wk']  # param wk[d, g@x, k] x l: local (2, 64, 1, 16)
    t_wv_all = params['wv']  # param wv[d, g@x, k] x l: local (2, 64, 1, 16)
    t_wo_all = params['wo']  # param wo[g@x, r, k, d] x l: local (2, 1, 2, 16, 64)
    t_mlp_norm_all = params['mlp_norm']  # param mlp_norm[d] x l: local (2, 64)
    t_w_gate_all = params['w_gate']  # param w_gate[d, f@(x, y)] x l: local (2, 64, 20)
    t_w_up_all = params['w_up']  # param w_up[d, f@(x, y)] x l: local (2, 64, 20)
    t_w_down_all = params['w_down']  # param w_down[f@(x, y), d] x l: local (2, 20, 64)
    t_k_cache_all = state['k_cache']  # state k_cache[b, g@x, s, k] x l: local (2, 2, 1, 32, 16)
    t_v_cache_all = state['v_cache']  # state v_cache[b, g@x, s, k] x l: local (2, 2, 1, 32, 16)
    # x0[b, t, d] = take(embed[v, d], tokens[b, t]) {split=[v(x, y)]}
    ids_v = t_tokens - lax.axis_index(('x', 'y')) * 32  # ids of the rows this shard holds
    hit_v = (ids_v >= 0) & (ids_v < 32)
    t_x0 = jnp.take(t_embed, jnp.clip(ids_v, 0, 31), axis=0)
    t_x0 = jnp.where(hit_v[:, :, None], t_x0, 0)
    t_x0 = lax.psum(t_x0, ('x', 'y'))
    # xl[b, t, d] = repeat l (x = x0)
    def layer_xl(carry1, xs):
        """One layer (l = i_l): xl carries x [b=2, t=8, d=64] and the stacked state, written in place."""
        t_x, (t_k_cache_all, t_v_cache_all) = carry1
        i_l, (t_attn_norm, t_wq, t_wk, t_wv, t_wo, t_mlp_norm, t_w_gate, t_w_up, t_w_down) = xs
        # ms1[b, t] = mean(x[b, t, d] * x[b, t, d])
        t_ms1 = jnp.sum(t_x * t_x, axis=(2,))
        t_ms1 = t_ms1 / 64.0
        # h1[b, t, d] = x[b, t, d] * rsqrt(ms1[b, t] + 1e-05) * attn_norm[d]
        t_h1 = (t_x * lax.rsqrt(t_ms1[:, :, None] + 1e-05)) * t_attn_norm[None, None, :]
        # q[b, t, g@x, r, k] = h1[b, t, d] * wq[d, g, r, k] {split=[g(x)]}
        t_q = jnp.einsum('abc,cdef->abdef', t_h1, t_wq, preferred_element_type=F32, precision=HIGHEST)
        # kn[b, t, g@x, k] = h1[b, t, d] * wk[d, g, k] {split=[g(x)]}
        t_kn = jnp.einsum('abc,cde->abde', t_h1, t_wk, preferred_element_type=F32, precision=HIGHEST)
        # vn[b, t, g@x, k] = h1[b, t, d] * wv[d, g, k] {split=[g(x)]}
        t_vn = jnp.einsum('abc,cde->abde', t_h1, t_wv, preferred_element_type=F32, precision=HIGHEST)
        # qr[b, t, g@x, r, k] = rope(q[b, t, g, r, k], t, k, 500000.0) {split=[g(x)]}
        ang_t = (pos + jnp.arange(8)).astype(F32)[:, None] * (500000.0 ** (jnp.arange(8, dtype=F32) * -0.125))[None, :]
        cos = jnp.concatenate([jnp.cos(ang_t)] * 2, axis=1)  # [t, k]
        sin = jnp.concatenate([jnp.sin(ang_t)] * 2, axis=1)
        lo, hi = jnp.split(t_q, 2, axis=4)
        t_qr = t_q * cos[None, :, None, None, :] + jnp.concatenate([-hi, lo], axis=4) * sin[None, :, None, None, :]
        # kr[b, t, g@x, k] = rope(kn[b, t, g, k], t, k, 500000.0) {split=[g(x)]}
        ang_t1 = (pos + jnp.arange(8)).astype(F32)[:, None] * (500000.0 ** (jnp.arange(8, dtype=F32) * -0.125))[None, :]
        cos1 = jnp.concatenate([jnp.cos(ang_t1)] * 2, axis=1)  # [t, k]
        sin1 = jnp.concatenate([jnp.sin(ang_t1)] * 2, axis=1)
        lo1, hi1 = jnp.split(t_kn, 2, axis=3)
        t_kr = t_kn * cos1[None, :, None, :] + jnp.concatenate([-hi1, lo1], axis=3) * sin1[None, :, None, :]
        # kc[b, g@x, s, k] = write(k_cache[b, g, s, k], kr[b, t, g, k]) {split=[g(x)]}
        t_k_cache_all_1 = lax.dynamic_update_slice(t_k_cache_all, jnp.transpose(t_kr, (0, 2, 1, 3))[None], (i_l, 0, 0, pos, 0))  # in place: layer i_l, position pos
        t_k_cache_new = lax.dynamic_index_in_dim(t_k_cache_all_1, i_l, 0, keepdims=False)
        t_kc = t_k_cache_new
        # vc[b, g@x, s, k] = write(v_cache[b, g, s, k], vn[b, t, g, k]) {split=[g(x)]}
        t_v_cache_all_1 = lax.dynamic_update_slice(t_v_cache_all, jnp.transpose(t_vn, (0, 2, 1, 3))[None], (i_l, 0, 0, pos, 0))  # in place: layer i_l, position pos
        t_v_cache_new = lax.dynamic_index_in_dim(t_v_cache_all_1, i_l, 0, keepdims=False)
        t_vc = t_v_cache_new
        # sc[b, g@x, r, t, s] = qr[b, t, g, r, k] * kc[b, g, s, k] {split=[g(x)]}
        t_sc = jnp.einsum('abcde,acfe->acdbf', t_qr, t_kc, preferred_element_type=F32, precision=HIGHEST)
        # sm[b, g@x, r, t, s] = sc[b, g, r, t, s] * rsqrt(K) + causal(t, s) {split=[g(x)]}
        mask_t_s = jnp.where((jnp.arange(32))[None, :] <= (pos + jnp.arange(8))[:, None], 0.0, NEG_INF).astype(F32)  # [t, s]
        t_sm = (t_sc * lax.rsqrt(16.0)) + mask_t_s[None, None, None, :, :]
        # mx[b, g@x, r, t] = max(sm[b, g, r, t, s]) {split=[g(x)]}
        t_mx = jnp.max(t_sm, axis=(4,))
        # e[b, g@x, r, t, s] = exp(sm[b, g, r, t, s] - mx[b, g, r, t]) {split=[g(x)]}
        t_e = jnp.exp(t_sm - t_mx[:, :, :, :, None])
        # z[b, g@x, r, t] = sum(e[b, g, r, t, s]) {split=[g(x)]}
        t_z = jnp.sum(t_e, axis=(4,))
        # p[b, g@x, r, t, s] = e[b, g, r, t, s] / z[b, g, r, t] {split=[g(x)]}
        t_p = t_e / t_z[:, :, :, :, None]
        # o[b, t, g@x, r, k] = p[b, g, r, t, s] * vc[b, g, s, k] {split=[g(x)]}
        t_o = jnp.einsum('abcde,abef->adbcf', t_p, t_vc, preferred_element_type=F32, precision=HIGHEST)
        # attn[b, t, d] = o[b, t, g, r, k] * wo[g, r, k, d] {split=[g(x)]}
        t_attn = jnp.einsum('abcde,cdef->abf', t_o, t_wo, preferred_element_type=F32, precision=HIGHEST)
        t_attn = lax.psum(t_attn, 'x')
        # x1[b, t, d] = x[b, t, d] + attn[b, t, d]
        t_x1 = t_x + t_attn
        # ms2[b, t] = mean(x1[b, t, d] * x1[b, t, d])
        t_ms2 = jnp.sum(t_x1 * t_x1, axis=(2,))
        t_ms2 = t_ms2 / 64.0
        # h2[b, t, d] = x1[b, t, d] * rsqrt(ms2[b, t] + 1e-05) * mlp_norm[d]
        t_h2 = (t_x1 * lax.rsqrt(t_ms2[:, :, None] + 1e-05)) * t_mlp_norm[None, None, :]
        # gate[b, t, f@(x, y)] = h2[b, t, d] * w_gate[d, f] {split=[f(x, y)]}
        t_gate = jnp.einsum('abc,cd->abd', t_h2, t_w_gate, preferred_element_type=F32, precision=HIGHEST)
        # up[b, t, f@(x, y)] = h2[b, t, d] * w_up[d, f] {split=[f(x, y)]}
        t_up = jnp.einsum('abc,cd->abd', t_h2, t_w_up, preferred_element_type=F32, precision=HIGHEST)
        # act[b, t, f@(x, y)] = silu(gate[b, t, f]) * up[b, t, f] {split=[f(x, y)]}
        t_act = jax.nn.silu(t_gate) * t_up
        # mlp[b, t, d] = act[b, t, f] * w_down[f, d] {split=[f(x, y)]}
        t_mlp = jnp.einsum('abc,cd->abd', t_act, t_w_down, preferred_element_type=F32, precision=HIGHEST)
        t_mlp = lax.psum(t_mlp, ('x', 'y'))
        # x2[b, t, d] = x1[b, t, d] + mlp[b, t, d]
        t_x2 = t_x1 + t_mlp
        return (t_x2, (t_k_cache_all_1, t_v_cache_all_1)), None
    (t_xl, (t_k_cache_next, t_v_cache_next)), _ = lax.scan(layer_xl, (t_x0, (t_k_cache_all, t_v_cache_all)), (jnp.arange(2, dtype=jnp.int32), (t_attn_norm_all, t_wq_all, t_wk_all, t_wv_all, t_wo_all, t_mlp_norm_all, t_w_gate_all, t_w_up_all, t_w_down_all)))
    # msf[b, t] = mean(xl[b, t, d] * xl[b, t, d])
    t_msf = jnp.sum(t_xl * t_xl, axis=(2,))
    t_msf = t_msf / 64.0
    # hf[b, t, d] = xl[b, t, d] * rsqrt(msf[b, t] + 1e-05) * norm_f[d]
    t_hf = (t_xl * lax.rsqrt(t_msf[:, :, None] + 1e-05)) * t_norm_f[None, None, :]
    # logits[b, t, v@(x, y)] = hf[b, t, d] * unembed[d, v] {split=[v(x, y)]}
    t_logits = jnp.einsum('abc,cd->abd', t_hf, t_unembed, preferred_element_type=F32, precision=HIGHEST)
    return {'logits': t_logits}, {'k_cache': t_k_cache_next, 'v_cache': t_v_cache_next}


def decode(params, state, inputs, pos):
    """The decode step (T=1): one shard_map body over local blocks. pos is the position of the first token."""
    # global sizes: b=2, t=1, s=32, d=64, f=160, g=2, r=2, k=16, l=2, v=256
    t_tokens = inputs['tokens']  # input tokens[b, t] : i32: local (2, 1)
    t_embed = params['embed']  # param embed[v@(x, y), d]: local (32, 64)
    t_norm_f = params['norm_f']  # param norm_f[d]: local (64,)
    t_unembed = params['unembed']  # param unembed[d, v@(x, y)]: local (64, 32)
    t_attn_norm_all = params['attn_norm']  # param attn_norm[d] x l: local (2, 64)
    t_wq_all = params['wq']  # param wq[d, g@x, r, k] x l: local (2, 64, 1, 2, 16)
    t_wk_all = params['wk']  # param wk[d, g@x, k] x l: local (2, 64, 1, 16)
    t_wv_all = params['wv']  # param wv[d, g@x, k] x l: local (2, 64, 1, 16)
    t_wo_all = params['wo']  # param wo[g@x, r, k, d] x l: local (2, 1, 2, 16, 64)
    t_mlp_norm_all = params['mlp_norm']  # param mlp_norm[d] x l: local (2, 64)
    t_w_gate_all = params['w_gate']  # param w_gate[d, f@(x, y)] x l: local (2, 64, 20)
    t_w_up_all = params['w_up']  # param w_up[d, f@(x, y)] x l: local (2, 64, 20)
    t_w_down_all = params['w_down']  # param w_down[f@(x, y), d] x l: local (2, 20, 64)
    t_k_cache_all = state['k_cache']  # state k_cache[b, g@x, s, k] x l: local (2, 2, 1, 32, 16)
    t_v_cache_all = state['v_cache']  # state v_cache[b, g@x, s, k] x l: local (2, 2, 1, 32, 16)
    # x0[b, t, d] = take(embed[v, d], tokens[b, t]) {split=[v(x, y)]}
    ids_v = t_tokens - lax.axis_index(('x', 'y')) * 32  # ids of the rows this shard holds
    hit_v = (ids_v >= 0) & (ids_v < 32)
    t_x0 = jnp.take(t_embed, jnp.clip(ids_v, 0, 31), axis=0)
    t_x0 = jnp.where(hit_v[:, :, None], t_x0, 0)
    t_x0 = lax.psum(t_x0, ('x', 'y'))
    # xl[b, t, d] = repeat l (x = x0)
    def layer_xl(carry1, xs):
        """One layer (l = i_l): xl carries x [b=2, t=1, d=64] and the stacked state, written in place."""
        t_x, (t_k_cache_all, t_v_cache_all) = carry1
        i_l, (t_attn_norm, t_wq, t_wk, t_wv, t_wo, t_mlp_norm, t_w_gate, t_w_up, t_w_down) = xs
        # ms1[b, t] = mean(x[b, t, d] * x[b, t, d])
        t_ms1 = jnp.sum(t_x * t_x, axis=(2,))
        t_ms1 = t_ms1 / 64.0
        # h1[b, t, d] = x[b, t, d] * rsqrt(ms1[b, t] + 1e-05) * attn_norm[d]
        t_h1 = (t_x * lax.rsqrt(t_ms1[:, :, None] + 1e-05)) * t_attn_norm[None, None, :]
        # q[b, t, g@x, r, k] = h1[b, t, d] * wq[d, g, r, k] {split=[g(x)]}
        t_q = jnp.einsum('abc,cdef->abdef', t_h1, t_wq, preferred_element_type=F32, precision=HIGHEST)
        # kn[b, t, g@x, k] = h1[b, t, d] * wk[d, g, k] {split=[g(x)]}
        t_kn = jnp.einsum('abc,cde->abde', t_h1, t_wk, preferred_element_type=F32, precision=HIGHEST)
        # vn[b, t, g@x, k] = h1[b, t, d] * wv[d, g, k] {split=[g(x)]}
        t_vn = jnp.einsum('abc,cde->abde', t_h1, t_wv, preferred_element_type=F32, precision=HIGHEST)
        # qr[b, t, g@x, r, k] = rope(q[b, t, g, r, k], t, k, 500000.0) {split=[g(x)]}
        ang_t = (pos + jnp.arange(1)).astype(F32)[:, None] * (500000.0 ** (jnp.arange(8, dtype=F32) * -0.125))[None, :]
        cos = jnp.concatenate([jnp.cos(ang_t)] * 2, axis=1)  # [t, k]
        sin = jnp.concatenate([jnp.sin(ang_t)] * 2, axis=1)
        lo, hi = jnp.split(t_q, 2, axis=4)
        t_qr = t_q * cos[None, :, None, None, :] + jnp.concatenate([-hi, lo], axis=4) * sin[None, :, None, None, :]
        # kr[b, t, g@x, k] = rope(kn[b, t, g, k], t, k, 500000.0) {split=[g(x)]}
        ang_t1 = (pos + jnp.arange(1)).astype(F32)[:, None] * (500000.0 ** (jnp.arange(8, dtype=F32) * -0.125))[None, :]
        cos1 = jnp.concatenate([jnp.cos(ang_t1)] * 2, axis=1)  # [t, k]
        sin1 = jnp.concatenate([jnp.sin(ang_t1)] * 2, axis=1)
        lo1, hi1 = jnp.split(t_kn, 2, axis=3)
        t_kr = t_kn * cos1[None, :, None, :] + jnp.concatenate([-hi1, lo1], axis=3) * sin1[None, :, None, :]
        # kc[b, g@x, s, k] = write(k_cache[b, g, s, k], kr[b, t, g, k]) {split=[g(x)]}
        t_k_cache_all_1 = lax.dynamic_update_slice(t_k_cache_all, jnp.transpose(t_kr, (0, 2, 1, 3))[None], (i_l, 0, 0, pos, 0))  # in place: layer i_l, position pos
        t_k_cache_new = lax.dynamic_index_in_dim(t_k_cache_all_1, i_l, 0, keepdims=False)
        t_kc = t_k_cache_new
        # vc[b, g@x, s, k] = write(v_cache[b, g, s, k], vn[b, t, g, k]) {split=[g(x)]}
        t_v_cache_all_1 = lax.dynamic_update_slice(t_v_cache_all, jnp.transpose(t_vn, (0, 2, 1, 3))[None], (i_l, 0, 0, pos, 0))  # in place: layer i_l, position pos
        t_v_cache_new = lax.dynamic_index_in_dim(t_v_cache_all_1, i_l, 0, keepdims=False)
        t_vc = t_v_cache_new
        # sc[b, g@x, r, t, s] = qr[b, t, g, r, k] * kc[b, g, s, k] {split=[g(x)]}
        t_sc = jnp.einsum('abcde,acfe->acdbf', t_qr, t_kc, preferred_element_type=F32, precision=HIGHEST)
        # sm[b, g@x, r, t, s] = sc[b, g, r, t, s] * rsqrt(K) + causal(t, s) {split=[g(x)]}
        mask_t_s = jnp.where((jnp.arange(32))[None, :] <= (pos + jnp.arange(1))[:, None], 0.0, NEG_INF).astype(F32)  # [t, s]
        t_sm = (t_sc * lax.rsqrt(16.0)) + mask_t_s[None, None, None, :, :]
        # mx[b, g@x, r, t] = max(sm[b, g, r, t, s]) {split=[g(x)]}
        t_mx = jnp.max(t_sm, axis=(4,))
        # e[b, g@x, r, t, s] = exp(sm[b, g, r, t, s] - mx[b, g, r, t]) {split=[g(x)]}
        t_e = jnp.exp(t_sm - t_mx[:, :, :, :, None])
        # z[b, g@x, r, t] = sum(e[b, g, r, t, s]) {split=[g(x)]}
        t_z = jnp.sum(t_e, axis=(4,))
        # p[b, g@x, r, t, s] = e[b, g, r, t, s] / z[b, g, r, t] {split=[g(x)]}
        t_p = t_e / t_z[:, :, :, :, None]
        # o[b, t, g@x, r, k] = p[b, g, r, t, s] * vc[b, g, s, k] {split=[g(x)]}
        t_o = jnp.einsum('abcde,abef->adbcf', t_p, t_vc, preferred_element_type=F32, precision=HIGHEST)
        # attn[b, t, d] = o[b, t, g, r, k] * wo[g, r, k, d] {split=[g(x)]}
        t_attn = jnp.einsum('abcde,cdef->abf', t_o, t_wo, preferred_element_type=F32, precision=HIGHEST)
        t_attn = lax.psum(t_attn, 'x')
        # x1[b, t, d] = x[b, t, d] + attn[b, t, d]
        t_x1 = t_x + t_attn
        # ms2[b, t] = mean(x1[b, t, d] * x1[b, t, d])
        t_ms2 = jnp.sum(t_x1 * t_x1, axis=(2,))
        t_ms2 = t_ms2 / 64.0
        # h2[b, t, d] = x1[b, t, d] * rsqrt(ms2[b, t] + 1e-05) * mlp_norm[d]
        t_h2 = (t_x1 * lax.rsqrt(t_ms2[:, :, None] + 1e-05)) * t_mlp_norm[None, None, :]
        # gate[b, t, f@(x, y)] = h2[b, t, d] * w_gate[d, f] {split=[f(x, y)]}
        t_gate = jnp.einsum('abc,cd->abd', t_h2, t_w_gate, preferred_element_type=F32, precision=HIGHEST)
        # up[b, t, f@(x, y)] = h2[b, t, d] * w_up[d, f] {split=[f(x, y)]}
        t_up = jnp.einsum('abc,cd->abd', t_h2, t_w_up, preferred_element_type=F32, precision=HIGHEST)
        # act[b, t, f@(x, y)] = silu(gate[b, t, f]) * up[b, t, f] {split=[f(x, y)]}
        t_act = jax.nn.silu(t_gate) * t_up
        # mlp[b, t, d] = act[b, t, f] * w_down[f, d] {split=[f(x, y)]}
        t_mlp = jnp.einsum('abc,cd->abd', t_act, t_w_down, preferred_element_type=F32, precision=HIGHEST)
        t_mlp = lax.psum(t_mlp, ('x', 'y'))
        # x2[b, t, d] = x1[b, t, d] + mlp[b, t, d]
        t_x2 = t_x1 + t_mlp
        return (t_x2, (t_k_cache_all_1, t_v_cache_all_1)), None
    (t_xl, (t_k_cache_next, t_v_cache_next)), _ = lax.scan(layer_xl, (t_x0, (t_k_cache_all, t_v_cache_all)), (jnp.arange(2, dtype=jnp.int32), (t_attn_norm_all, t_wq_all, t_wk_all, t_wv_all, t_wo_all, t_mlp_norm_all, t_w_gate_all, t_w_up_all, t_w_down_all)))
    # msf[b, t] = mean(xl[b, t, d] * xl[b, t, d])
    t_msf = jnp.sum(t_xl * t_xl, axis=(2,))
    t_msf = t_msf / 64.0
    # hf[b, t, d] = xl[b, t, d] * rsqrt(msf[b, t] + 1e-05) * norm_f[d]
    t_hf = (t_xl * lax.rsqrt(t_msf[:, :, None] + 1e-05)) * t_norm_f[None, None, :]
    # logits[b, t, v@(x, y)] = hf[b, t, d] * unembed[d, v] {split=[v(x, y)]}
    t_logits = jnp.einsum('abc,cd->abd', t_hf, t_unembed, preferred_element_type=F32, precision=HIGHEST)
    return {'logits': t_logits}, {'k_cache': t_k_cache_next, 'v_cache': t_v_cache_next}


def programs(mesh):
    """shard_map functions over `mesh`: prepare (params -> prepared), prefill and decode ((step params, state, inputs, pos) -> (outputs, next state))."""
    return {
        'prepare': jax.shard_map(prepare, mesh=mesh, in_specs=(PARAM_SPECS,), out_specs=PREPARED_SPECS, check_vma=False),
        'prefill': jax.shard_map(prefill, mesh=mesh, in_specs=(STEP_PARAM_SPECS, STATE_SPECS, INPUT_SPECS['prefill'], P()), out_specs=(OUTPUT_SPECS['prefill'], STATE_SPECS), check_vma=False),
        'decode': jax.shard_map(decode, mesh=mesh, in_specs=(STEP_PARAM_SPECS, STATE_SPECS, INPUT_SPECS['decode'], P()), out_specs=(OUTPUT_SPECS['decode'], STATE_SPECS), check_vma=False),
    }
