"""The example specs against hand-written numpy models.

GPT-2, Llama and PaLM are written below the way one would write them by hand
(norm functions, fused-head projections, a per-layer loop over the stacked
weights, a KV cache [L, B, S, ...] updated in place each step), without any
of einpart's code. They take the params dict of `init_params` as it is (same
names and shapes) and must agree with the reference interpreter on prefill,
on greedy decode steps (state carried), on the final KV caches, and on
`Reference.generate`, at float32 and at float64.

Tolerances (`assert_close`): |got - want| <= atol * max(1, max|want|) + rtol * |want|,
i.e. atol is taken relative to the scale of the compared tensor.
float32: rtol 1e-4, atol 1e-5. The two sides evaluate the same function in
float32 in different orders (np.einsum with optimize=True against matmuls
over fused heads, a -1e30 mask against -inf, different rotary-angle
formulas). With the x10 weights the logits are O(5) and each side, alone,
lies up to ~7e-6 (~1e-6 of the logits' scale) from the float64 result: that
is float32 conditioning, not a semantic gap, and near-zero logits inherit it
as absolute error, hence the scaled atol. Observed worst case over every
float32 comparison here: 0.13 of the tolerance. float64: rtol 1e-10, atol
1e-12; observed worst case 1e-3 of the tolerance (differences ~1e-14), so
this pins the semantics to rounding error: an eps of 1e-6 instead of 1e-5,
rope theta off by 0.1%, erf-GELU for tanh-GELU all fail it. The negative
controls at the end show the float32 comparison rejects a 5% change of one
weight (by 50-300x) and the interleaved rotary layout.

Weights. Stock init (normal(0, 0.02)) gives nearly uniform attention and
small logits, under which many semantic mistakes are invisible, so most
cases also scale the weight matrices by 10 and draw the ones-/zeros-init
gains and biases at random (`make_params`); `test_scaled_weights_make_attention_peaked`
checks that this regime really has peaked attention.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from conftest import spec_path
from einpart.ir import parse_file
from einpart.ir.model import Reference, init_params

F32_TOL = dict(rtol=1e-4, atol=1e-5)
F64_TOL = dict(rtol=1e-10, atol=1e-12)
BATCH, PROMPT_LEN, N_DECODE = 2, 5, 5


# ---------------------------------------------------------------- building blocks
def layer_norm(x, gain, bias=None, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * gain
    return y if bias is None else y + bias


def rms_norm(x, weight, eps=1e-5):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x * (1.0 / (1.0 + np.exp(-x)))


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def rope_tables(positions, head_dim, theta, dtype):
    """HF-Llama style cos/sin tables [T, head_dim], frequencies tiled twice."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    freqs = np.outer(np.asarray(positions, np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_every_two(x):
    """GPT-J / Mesh-TF interleaved pairs: only for the negative control."""
    out = np.empty_like(x)
    out[..., 0::2] = -x[..., 1::2]
    out[..., 1::2] = x[..., 0::2]
    return out


def apply_rope(x, cos, sin, style="half"):
    """x [B, T, heads, head_dim]; cos/sin [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    if style == "half":
        return x * cos + rotate_half(x) * sin
    # interleaved: frequency i drives the pair (2i, 2i+1)
    half = x.shape[-1] // 2
    cos = np.repeat(cos[..., :half], 2, axis=-1)
    sin = np.repeat(sin[..., :half], 2, axis=-1)
    return x * cos + rotate_every_two(x) * sin


def attention(q, k, v, pos):
    """Causal attention of queries at pos..pos+T-1 over keys 0..n-1.

    q [B, T, H, K]; k, v [B, n, H, K] with n = pos + T. Returns [B, T, H, K]
    and the probabilities [B, H, T, n]."""
    T, head_dim = q.shape[1], q.shape[-1]
    n = k.shape[1]
    qh, kh, vh = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = qh @ kh.swapaxes(-1, -2) / math.sqrt(head_dim)
    allowed = np.tril(np.ones((T, n), dtype=bool), k=pos)  # key s allowed iff s <= pos + t
    probs = softmax(np.where(allowed, scores, -np.inf))
    return (probs @ vh).transpose(0, 2, 1, 3), probs


# ---------------------------------------------------------------- the models
class Model:
    """Common plumbing: weights cast to one dtype, a zeroed cache, greedy decoding."""

    def __init__(self, params, dtype=np.float32, rope_style="half"):
        self.dtype = np.dtype(dtype)
        self.w = {name: np.array(value, dtype=self.dtype) for name, value in params.items()}
        self.rope_style = rope_style
        self.probs = []  # attention probabilities of the last call, per layer

    def cache_shape(self, batch, max_len):  # pragma: no cover - overridden
        raise NotImplementedError

    def new_cache(self, batch, max_len):
        shape = self.cache_shape(batch, max_len)
        return {"k_cache": np.zeros(shape, self.dtype), "v_cache": np.zeros(shape, self.dtype)}

    def __call__(self, tokens, pos, cache):
        tokens = np.asarray(tokens)
        assert pos + tokens.shape[1] <= cache["k_cache"].shape[self.seq_axis], "cache too short"
        self.probs = []
        logits = self.forward(tokens, pos, cache)
        assert logits.dtype == self.dtype, f"{logits.dtype} leaked in"
        return logits

    def generate(self, prompt, max_new, max_len):
        prompt = np.asarray(prompt)
        cache = self.new_cache(prompt.shape[0], max_len)
        logits = self(prompt, 0, cache)
        history, out, pos = [logits], [], prompt.shape[1]
        for i in range(max_new):
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt)
            if i + 1 < max_new:
                logits = self(nxt[:, None], pos, cache)
                history.append(logits)
                pos += 1
        return np.stack(out, axis=1), history, cache


class GPT2(Model):
    seq_axis = 3   # [layer, batch, head, position, k]
    def cache_shape(self, batch, max_len):
        n_layers, _, heads, head_dim = self.w["wq"].shape
        return (n_layers, batch, heads, max_len, head_dim)   # head-major, as the spec stores it

    def forward(self, tokens, pos, cache):
        w = self.w
        B, T = tokens.shape
        n_layers, D, H, K = w["wq"].shape
        x = w["wte"][tokens] + w["wpe"][pos:pos + T]
        for l in range(n_layers):
            h = layer_norm(x, w["ln1_g"][l], w["ln1_b"][l])
            q = (h @ w["wq"][l].reshape(D, H * K) + w["bq"][l].reshape(H * K)).reshape(B, T, H, K)
            k = (h @ w["wk"][l].reshape(D, H * K) + w["bk"][l].reshape(H * K)).reshape(B, T, H, K)
            v = (h @ w["wv"][l].reshape(D, H * K) + w["bv"][l].reshape(H * K)).reshape(B, T, H, K)
            cache["k_cache"][l, :, :, pos:pos + T] = k.transpose(0, 2, 1, 3)
            cache["v_cache"][l, :, :, pos:pos + T] = v.transpose(0, 2, 1, 3)
            n = pos + T
            o, p = attention(q, cache["k_cache"][l, :, :, :n].transpose(0, 2, 1, 3),
                             cache["v_cache"][l, :, :, :n].transpose(0, 2, 1, 3), pos)
            self.probs.append(p)
            x = x + o.reshape(B, T, H * K) @ w["wo"][l].reshape(H * K, D) + w["bo"][l]
            h = layer_norm(x, w["ln2_g"][l], w["ln2_b"][l])
            x = x + gelu_tanh(h @ w["w_fc"][l] + w["b_fc"][l]) @ w["w_proj"][l] + w["b_proj"][l]
        return layer_norm(x, w["lnf_g"], w["lnf_b"]) @ w["wte"].T


class Llama(Model):
    seq_axis = 3
    theta = 500000.0

    def cache_shape(self, batch, max_len):
        n_layers, _, kv_heads, head_dim = self.w["wk"].shape
        return (n_layers, batch, kv_heads, max_len, head_dim)   # head-major, as the spec stores it

    def forward(self, tokens, pos, cache):
        w = self.w
        B, T = tokens.shape
        n_layers, D, G, R, K = w["wq"].shape
        H = G * R  # query head g*R + r reads key/value head g (HF repeat_kv)
        cos, sin = rope_tables(pos + np.arange(T), K, self.theta, self.dtype)
        x = w["embed"][tokens]
        for l in range(n_layers):
            h = rms_norm(x, w["attn_norm"][l])
            q = (h @ w["wq"][l].reshape(D, H * K)).reshape(B, T, H, K)
            k = (h @ w["wk"][l].reshape(D, G * K)).reshape(B, T, G, K)
            v = (h @ w["wv"][l].reshape(D, G * K)).reshape(B, T, G, K)
            q = apply_rope(q, cos, sin, self.rope_style)
            k = apply_rope(k, cos, sin, self.rope_style)
            cache["k_cache"][l, :, :, pos:pos + T] = k.transpose(0, 2, 1, 3)
            cache["v_cache"][l, :, :, pos:pos + T] = v.transpose(0, 2, 1, 3)
            n = pos + T
            keys = np.repeat(cache["k_cache"][l, :, :, :n].transpose(0, 2, 1, 3), R, axis=2)
            values = np.repeat(cache["v_cache"][l, :, :, :n].transpose(0, 2, 1, 3), R, axis=2)
            o, p = attention(q, keys, values, pos)
            self.probs.append(p)
            x = x + o.reshape(B, T, H * K) @ w["wo"][l].reshape(H * K, D)
            h = rms_norm(x, w["mlp_norm"][l])
            x = x + (silu(h @ w["w_gate"][l]) * (h @ w["w_up"][l])) @ w["w_down"][l]
        return rms_norm(x, w["norm_f"]) @ w["unembed"]


class PaLM(Model):
    seq_axis = 2   # [layer, batch, position, k]
    theta = 10000.0

    def cache_shape(self, batch, max_len):
        n_layers, _, head_dim = self.w["wk"].shape
        return (n_layers, batch, max_len, head_dim)

    def forward(self, tokens, pos, cache):
        w = self.w
        B, T = tokens.shape
        n_layers, D, H, K = w["wq"].shape
        cos, sin = rope_tables(pos + np.arange(T), K, self.theta, self.dtype)
        x = w["embed"][tokens]
        for l in range(n_layers):
            h = layer_norm(x, w["norm"][l])  # one norm, no bias, feeds both branches
            q = (h @ w["wq"][l].reshape(D, H * K)).reshape(B, T, H, K)
            k = h @ w["wk"][l]  # multiquery: one key/value head [B, T, K]
            v = h @ w["wv"][l]
            q = apply_rope(q, cos, sin, self.rope_style)
            k = apply_rope(k[:, :, None, :], cos, sin, self.rope_style)[:, :, 0, :]
            cache["k_cache"][l, :, pos:pos + T] = k
            cache["v_cache"][l, :, pos:pos + T] = v
            n = pos + T
            keys = np.broadcast_to(cache["k_cache"][l, :, :n, None, :], (B, n, H, K))
            values = np.broadcast_to(cache["v_cache"][l, :, :n, None, :], (B, n, H, K))
            o, p = attention(q, keys, values, pos)
            self.probs.append(p)
            attn = o.reshape(B, T, H * K) @ w["wo"][l].reshape(H * K, D)
            mlp = (silu(h @ w["w_gate"][l]) * (h @ w["w_up"][l])) @ w["w_down"][l]
            x = x + attn + mlp
        return layer_norm(x, w["norm_f"]) @ w["embed"].T


MODELS = {"gpt2": GPT2, "llama": Llama, "palm": PaLM}
NAMES = sorted(MODELS)


# ---------------------------------------------------------------- harness
@functools.lru_cache(maxsize=None)
def _graph(name, sizes=()):
    return parse_file(spec_path(name), sizes=dict(sizes) or None)


def graph_of(name, sizes=None):
    return _graph(name, tuple(sorted((sizes or {}).items())))


def make_params(graph, seed, scale):
    """init_params, then (scale != 1) matrices times `scale`, gains 1 + N(0, .2), biases N(0, .2)."""
    params = init_params(graph, seed)
    if scale == 1:
        return params
    rng = np.random.default_rng(10_000 + seed)
    out = {}
    for name, w in params.items():
        if np.all(w == 1):
            w = 1.0 + 0.2 * rng.standard_normal(w.shape)
        elif np.all(w == 0):
            w = 0.2 * rng.standard_normal(w.shape)
        else:
            w = w * scale
        out[name] = w.astype(np.float32)
    return out


def params_vocab(params):
    return next(w for n, w in params.items() if n in ("wte", "embed")).shape[0]


def prompt_for(params, seed, batch=BATCH, length=PROMPT_LEN):
    return np.random.default_rng(seed).integers(0, params_vocab(params), size=(batch, length)).astype(np.int32)


def assert_close(got, want, tol, what):
    """allclose with atol relative to the scale of `want`: |got - want| <= atol * max(1, max|want|) + rtol * |want|."""
    want = np.asarray(want)
    atol = tol["atol"] * max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=tol["rtol"], atol=atol, err_msg=what)


def run_against_reference(name, graph, params, dtype, tol, seed, batch=BATCH, n_decode=N_DECODE):
    """Prefill then n_decode greedy steps on both sides; compare logits, tokens and caches."""
    ref = Reference(graph, params, dtype=dtype)
    mine = MODELS[name](params, dtype)
    prompt = prompt_for(params, seed, batch)
    ref_state = ref.new_state(batch)
    seq = mine.seq_axis
    cache = mine.new_cache(batch, ref_state["k_cache"].shape[seq])
    assert set(ref_state) == set(cache)
    for key in cache:
        assert ref_state[key].shape == cache[key].shape, key

    ref_logits, ref_state = ref.step(prompt, 0, ref_state)
    my_logits = mine(prompt, 0, cache)
    assert ref_logits.shape == my_logits.shape == (batch, PROMPT_LEN, params_vocab(params))
    assert ref_logits.dtype == dtype
    assert_close(ref_logits, my_logits, tol, f"{name}: prefill logits")
    pos, tokens = PROMPT_LEN, []
    for step in range(n_decode):
        nxt = my_logits[:, -1].argmax(-1).astype(np.int32)
        np.testing.assert_array_equal(ref_logits[:, -1].argmax(-1), nxt, err_msg=f"{name}: greedy token {step}")
        tokens.append(nxt)
        ref_logits, ref_state = ref.step(nxt[:, None], pos, ref_state)
        my_logits = mine(nxt[:, None], pos, cache)
        assert ref_logits.shape == (batch, 1, params_vocab(params))
        assert_close(ref_logits, my_logits, tol, f"{name}: decode logits at pos {pos}")
        pos += 1
    for key in cache:
        assert_close(ref_state[key], cache[key], tol, f"{name}: final {key}")
    # the caches hold exactly positions 0..pos-1; the rest is still zero
    later, held = (slice(None),) * seq + (slice(pos, None),), (slice(None),) * seq + (slice(0, pos),)
    assert np.all(cache["k_cache"][later] == 0) and np.all(ref_state["k_cache"][later] == 0)
    assert np.abs(cache["k_cache"][held]).min() > 0
    return np.stack(tokens, axis=1), mine


# ---------------------------------------------------------------- tests
CASES = [(0, 1.0), (1, 10.0), (2, 10.0)]  # (seed, matrix scale)


@pytest.mark.parametrize("seed,scale", CASES, ids=[f"seed{s}-x{int(c)}" for s, c in CASES])
@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_decode_f32(name, seed, scale):
    graph = graph_of(name)
    params = make_params(graph, seed, scale)
    tokens, _ = run_against_reference(name, graph, params, np.float32, F32_TOL, seed)
    assert tokens.shape == (BATCH, N_DECODE)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_decode_f64(name, seed):
    graph = graph_of(name)
    params = make_params(graph, seed, 10.0)
    run_against_reference(name, graph, params, np.float64, F64_TOL, seed)


@pytest.mark.parametrize("name", NAMES)
def test_generate_matches_hand_written_greedy(name):
    graph = graph_of(name)
    params = make_params(graph, 4, 10.0)
    prompt = prompt_for(params, 4)
    ref = Reference(graph, params)
    ref_tokens, ref_history = ref.generate(prompt, N_DECODE + 1)
    mine = MODELS[name](params)
    my_tokens, my_history, _ = mine.generate(prompt, N_DECODE + 1, ref.new_state(BATCH)["k_cache"].shape[mine.seq_axis])
    assert ref_tokens.shape == (BATCH, N_DECODE + 1)
    np.testing.assert_array_equal(ref_tokens, my_tokens)
    assert len(ref_history) == len(my_history) == N_DECODE + 1
    for i, (a, b) in enumerate(zip(ref_history, my_history)):
        assert_close(a, b, F32_TOL, f"{name}: generate step {i}")
    # the rows differ (different prompts), so batching is exercised
    assert not np.array_equal(my_tokens[0], my_tokens[1])


OVERRIDES = {
    "gpt2": {"D": 32, "H": 2, "K": 8, "F": 48, "L": 3, "V": 97, "S": 16, "P": 16},
    "llama": {"D": 32, "H": 4, "G": 1, "K": 8, "F": 48, "L": 3, "V": 97, "S": 16},  # R = H / G = 4
    "palm": {"D": 48, "H": 3, "K": 8, "F": 40, "L": 1, "V": 97, "S": 16},
}


@pytest.mark.parametrize("name", NAMES)
def test_size_overrides(name):
    sizes = OVERRIDES[name]
    graph = graph_of(name, sizes)
    params = make_params(graph, 5, 10.0)
    # the overrides reach the weights' shapes (layer-stacked where declared in the repeat)
    L, D, K = sizes["L"], sizes["D"], sizes["K"]
    expect = {
        "gpt2": {"wte": (97, D), "wpe": (16, D), "wq": (L, D, 2, K), "w_fc": (L, D, 48)},
        "llama": {"embed": (97, D), "wq": (L, D, 1, 4, K), "wk": (L, D, 1, K), "unembed": (D, 97)},
        "palm": {"embed": (97, D), "wq": (L, D, 3, K), "wk": (L, D, K), "w_up": (L, D, 40)},
    }[name]
    for pname, shape in expect.items():
        assert params[pname].shape == shape, pname
    # batch 3: the batch size comes from the prompt, not the spec
    tokens, _ = run_against_reference(name, graph, params, np.float32, F32_TOL, 5, batch=3)
    assert tokens.shape == (3, N_DECODE)


@pytest.mark.parametrize("name", NAMES)
def test_scaled_weights_make_attention_peaked(name):
    """Sanity of the test regime: stock init attends ~uniformly, the scaled weights do not."""
    graph = graph_of(name)
    prompt_len = 16
    peaks = {}
    for scale in (1.0, 10.0):
        params = make_params(graph, 6, scale)
        mine = MODELS[name](params)
        prompt = prompt_for(params, 6, length=prompt_len)
        mine(prompt, 0, mine.new_cache(BATCH, 32))
        last_row = np.stack([p[:, :, -1, :] for p in mine.probs])  # the last query sees all 16 keys
        peaks[scale] = last_row.max(-1).mean()
    assert peaks[1.0] < 1.2 / prompt_len  # nearly uniform (measured ~1.05 / 16)
    assert peaks[10.0] > 0.3  # concentrated on a few keys (measured ~0.5)


# ---------------------------------------------------------------- negative controls
def prefill_logits(model, prompt, max_len=32):
    return model(prompt, 0, model.new_cache(prompt.shape[0], max_len))


@pytest.mark.parametrize("name", NAMES)
def test_negative_control_one_weight(name):
    """A small change to one weight of the first layer is caught by the float32 comparison."""
    graph = graph_of(name)
    params = make_params(graph, 1, 10.0)
    prompt = prompt_for(params, 1)
    ref_logits, _ = Reference(graph, params).step(prompt, 0, Reference(graph, params).new_state(BATCH))
    assert_close(ref_logits, prefill_logits(MODELS[name](params), prompt), F32_TOL, "unperturbed")
    bad = dict(params)
    bad["wv"] = params["wv"].copy()
    bad["wv"][(0,) * bad["wv"].ndim] += 0.01  # ~5% of one weight's typical size
    with pytest.raises(AssertionError):
        assert_close(ref_logits, prefill_logits(MODELS[name](bad), prompt), F32_TOL, "perturbed")


@pytest.mark.parametrize("name", ["llama", "palm"])
def test_negative_control_rope_convention(name):
    """The interleaved (GPT-J) rotary layout is distinguishable from the half-split one."""
    graph = graph_of(name)
    params = make_params(graph, 1, 10.0)
    prompt = prompt_for(params, 1)
    ref = Reference(graph, params)
    ref_logits, _ = ref.step(prompt, 0, ref.new_state(BATCH))
    with pytest.raises(AssertionError):
        assert_close(ref_logits, prefill_logits(MODELS[name](params, rope_style="interleaved"), prompt),
                     F32_TOL, "interleaved rope")
    if name == "llama":  # theta 500000 is honoured, not the default 10000
        class Llama10k(Llama):
            theta = 10000.0
        with pytest.raises(AssertionError):
            assert_close(ref_logits, prefill_logits(Llama10k(params), prompt), F32_TOL, "theta")
