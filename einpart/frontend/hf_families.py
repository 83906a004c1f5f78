"""The model families `import-hf` knows: for each, the spec text and the weight plan.

A plan is rows of (einpart param, HF source tensors, transform). Why rows and
not code that copies weights: the same rows let hf.py check every HF tensor's
shape against config.json before a byte is written, write the weights one
layer at a time, and write mapping.json, so the three cannot disagree. The
spec texts follow examples/llama.ein and examples/gpt2.ein line for line
(same names), with sizes, rope theta and norm epsilon from the config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EinpartError

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
RUN_SIZES = {"B": 1, "T": 8, "S": 64}
DTYPES = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class Source:
    """One HF tensor ('{l}' stands for the layer) and the shape the config implies for it."""
    name: str
    shape: tuple[int, ...]
    why: str   # the config fields behind `shape`, for error messages


@dataclass(frozen=True)
class Target:
    """One einpart param: its per-layer shape, its HF sources and how they become it."""
    name: str
    shape: tuple[int, ...]
    stacked: bool
    sources: tuple[Source, ...]
    transform: str
    fn: Callable = lambda w: w


@dataclass
class Plan:
    family: str
    sizes: dict[str, int]
    spec: str
    targets: list[Target]
    notes: list[str] = field(default_factory=list)


class Config:
    """config.json with errors that name the file and the field."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise EinpartError(f"{path.parent}: no config.json (expected a Hugging Face model folder)") from None
        except (OSError, ValueError) as e:
            raise EinpartError(f"{path}: cannot read config: {e}") from None
        if not isinstance(self.data, dict):
            raise EinpartError(f"{path}: cannot read config: not a JSON object")

    def get(self, key, default=None):
        value = self.data.get(key)
        return default if value is None else value

    def int(self, key, default=None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise EinpartError(f"{self.path}: '{key}' must be a positive integer, got {value!r}")
        return value

    def fail(self, message: str) -> EinpartError:
        return EinpartError(f"{self.path}: {message}")


def _rope_theta(cfg: Config) -> float:
    """rope_theta from transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise cfg.fail(f"rope type '{kind}' is not supported (einpart's rope is the default, unscaled one)")
    return float(params.get("rope_theta") or cfg.get("rope_theta", 10000.0))


def _param(name: str, axes: str, dt: str, init: str = "") -> str:
    return f"  param {name}[{axes}]{dt}{init}"


def _llama_plan(cfg: Config, dt: str) -> Plan:
    fam = cfg.get("model_type")
    D, F, L, V = (cfg.int(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    H = cfg.int("num_attention_heads")
    G = cfg.int("num_key_value_heads", H)
    K = cfg.int("head_dim", D // H)
    if H % G:
        raise cfg.fail(f"num_attention_heads = {H} is not a multiple of num_key_value_heads = {G}")
    R = H // G
    eps, theta = float(cfg.get("rms_norm_eps", 1e-6)), _rope_theta(cfg)
    if cfg.get("hidden_act", "silu") != "silu":
        raise cfg.fail(f"hidden_act '{cfg.get('hidden_act')}' is not supported (the {fam} family uses silu)")
    if cfg.get("mlp_bias", False):
        raise cfg.fail("mlp_bias = true is not supported")
    if cfg.get("use_sliding_window", False):
        raise cfg.fail("use_sliding_window = true is not supported (einpart's attention is fully causal)")
    qkv_bias = fam == "qwen2" or bool(cfg.get("attention_bias", False))
    o_bias = fam == "llama" and bool(cfg.get("attention_bias", False))
    tied = bool(cfg.get("tie_word_embeddings", False))
    notes = []
    window = cfg.get("sliding_window")
    if fam == "mistral" and window:
        notes.append(f"sliding_window = {window} is not modelled: logits are exact while the context S <= {window}")
    sizes = dict(RUN_SIZES, D=D, F=F, H=H, G=G, K=K, L=L, V=V)

    p = "model.layers.{l}."
    hk, gk = "num_attention_heads * head_dim", "num_key_value_heads * head_dim"
    targets = [Target("embed", (V, D), False, (Source("model.embed_tokens.weight", (V, D), "vocab_size, hidden_size"),),
                      "as is"),
               Target("norm_f", (D,), False, (Source("model.norm.weight", (D,), "hidden_size"),), "as is")]
    if not tied:
        targets.append(Target("unembed", (D, V), False, (Source("lm_head.weight", (V, D), "vocab_size, hidden_size"),),
                              "transposed: [v, d] -> [d, v]", lambda w: w.T))
    layer = [
        Target("attn_norm", (D,), True, (Source(p + "input_layernorm.weight", (D,), "hidden_size"),), "as is"),
        Target("wq", (D, G, R, K), True, (Source(p + "self_attn.q_proj.weight", (H * K, D), f"{hk}, hidden_size"),),
               "transposed and split: [(g r k), d] -> [d, g, r, k]; query head g * R + r uses key-value head g",
               lambda w: w.T.reshape(D, G, R, K)),
        Target("wk", (D, G, K), True, (Source(p + "self_attn.k_proj.weight", (G * K, D), f"{gk}, hidden_size"),),
               "transposed and split: [(g k), d] -> [d, g, k]", lambda w: w.T.reshape(D, G, K)),
        Target("wv", (D, G, K), True, (Source(p + "self_attn.v_proj.weight", (G * K, D), f"{gk}, hidden_size"),),
               "transposed and split: [(g k), d] -> [d, g, k]", lambda w: w.T.reshape(D, G, K)),
    ]
    if qkv_bias:
        layer += [
            Target("bq", (G, R, K), True, (Source(p + "self_attn.q_proj.bias", (H * K,), hk),),
                   "split: [(g r k)] -> [g, r, k]", lambda b: b.reshape(G, R, K)),
            Target("bk", (G, K), True, (Source(p + "self_attn.k_proj.bias", (G * K,), gk),),
                   "split: [(g k)] -> [g, k]", lambda b: b.reshape(G, K)),
            Target("bv", (G, K), True, (Source(p + "self_attn.v_proj.bias", (G * K,), gk),),
                   "split: [(g k)] -> [g, k]", lambda b: b.reshape(G, K))]
    layer.append(Target("wo", (G, R, K, D), True,
                        (Source(p + "self_attn.o_proj.weight", (D, H * K), f"hidden_size, {hk}"),),
                        "transposed and split: [d, (g r k)] -> [g, r, k, d]", lambda w: w.T.reshape(G, R, K, D)))
    if o_bias:
        layer.append(Target("bo", (D,), True, (Source(p + "self_attn.o_proj.bias", (D,), "hidden_size"),), "as is"))
    layer += [
        Target("mlp_norm", (D,), True, (Source(p + "post_attention_layernorm.weight", (D,), "hidden_size"),), "as is"),
        Target("w_gate", (D, F), True, (Source(p + "mlp.gate_proj.weight", (F, D), "intermediate_size, hidden_size"),),
               "transposed: [f, d] -> [d, f]", lambda w: w.T),
        Target("w_up", (D, F), True, (Source(p + "mlp.up_proj.weight", (F, D), "intermediate_size, hidden_size"),),
               "transposed: [f, d] -> [d, f]", lambda w: w.T),
        Target("w_down", (F, D), True, (Source(p + "mlp.down_proj.weight", (D, F), "hidden_size, intermediate_size"),),
               "transposed: [d, f] -> [f, d]", lambda w: w.T)]

    def proj(name, axes, w, bias):  # q = h1 * wq, or with a bias (as in examples/gpt2.ein): qp = h1 * wq; q = qp + bq
        if not bias:
            return [f"  {name}[b, t, {axes}] = h1[b, t, d] * {w}[d, {axes}]"]
        return [f"  {w[1]}p[b, t, {axes}] = h1[b, t, d] * {w}[d, {axes}]",
                f"  {name}[b, t, {axes}] = {w[1]}p[b, t, {axes}] + b{w[1]}[{axes}]"]

    unembed = "embed[v, d]" if tied else "unembed[d, v]"
    lines = [
        f"# {fam} checkpoint imported by `einpart import-hf` (weights.safetensors, sources in mapping.json).",
        "# RMSNorm, rotary embeddings, grouped-query attention (G key-value heads, each shared by",
        "# R = H / G query heads), SwiGLU MLP" + (", q/k/v biases" if qkv_bias else "") +
        ("; output tied to the token embedding." if tied else "."),
        "# B, T, S are run sizes (batch, query positions, cache length): --set B=4,S=2048 at use.",
        *[f"# Note: {n}" for n in notes],
        f"size B = 1, T = 8, S = 64, D = {D}, F = {F}, H = {H}, G = {G}, R = H / G, K = {K}, L = {L}, V = {V}",
        "index b: B, t: T, s: S, d: D, f: F, g: G, r: R, k: K, l: L, v: V",
        "",
        "input tokens[b, t] : i32",
        f"param embed[v, d]{dt}",
        f"param norm_f[d]{dt} {{init=ones}}",
        *([] if tied else [f"param unembed[d, v]{dt}"]),
        "",
        "x0[b, t, d] = take(embed[v, d], tokens[b, t])",
        "xl[b, t, d] = repeat l (x = x0) {",
        _param("attn_norm", "d", dt, " {init=ones}"), _param("wq", "d, g, r, k", dt),
        _param("wk", "d, g, k", dt), _param("wv", "d, g, k", dt),
        *([_param("bq", "g, r, k", dt, " {init=zeros}"), _param("bk", "g, k", dt, " {init=zeros}"),
           _param("bv", "g, k", dt, " {init=zeros}")] if qkv_bias else []),
        _param("wo", "g, r, k, d", dt), *([_param("bo", "d", dt, " {init=zeros}")] if o_bias else []),
        _param("mlp_norm", "d", dt, " {init=ones}"), _param("w_gate", "d, f", dt), _param("w_up", "d, f", dt),
        _param("w_down", "f, d", dt),
        "  state k_cache[b, s, g, k]",
        "  state v_cache[b, s, g, k]",
        "",
        "  ms1[b, t] = mean(x[b, t, d] * x[b, t, d])",
        f"  h1[b, t, d] = x[b, t, d] * rsqrt(ms1[b, t] + {eps!r}) * attn_norm[d]",
        *proj("q", "g, r, k", "wq", qkv_bias),
        *proj("kn", "g, k", "wk", qkv_bias),
        *proj("vn", "g, k", "wv", qkv_bias),
        f"  qr[b, t, g, r, k] = rope(q[b, t, g, r, k], t, k, {theta!r})",
        f"  kr[b, t, g, k] = rope(kn[b, t, g, k], t, k, {theta!r})",
        "  kc[b, s, g, k] = write(k_cache[b, s, g, k], kr[b, t, g, k])",
        "  vc[b, s, g, k] = write(v_cache[b, s, g, k], vn[b, t, g, k])",
        "  sc[b, g, r, t, s] = qr[b, t, g, r, k] * kc[b, s, g, k]",
        "  sm[b, g, r, t, s] = sc[b, g, r, t, s] * rsqrt(K) + causal(t, s)",
        "  mx[b, g, r, t] = max(sm[b, g, r, t, s])",
        "  e[b, g, r, t, s] = exp(sm[b, g, r, t, s] - mx[b, g, r, t])",
        "  z[b, g, r, t] = sum(e[b, g, r, t, s])",
        "  p[b, g, r, t, s] = e[b, g, r, t, s] / z[b, g, r, t]",
        "  o[b, t, g, r, k] = p[b, g, r, t, s] * vc[b, s, g, k]",
        "  attn[b, t, d] = o[b, t, g, r, k] * wo[g, r, k, d]",
        "  x1[b, t, d] = x[b, t, d] + attn[b, t, d]" + (" + bo[d]" if o_bias else ""),
        "  ms2[b, t] = mean(x1[b, t, d] * x1[b, t, d])",
        f"  h2[b, t, d] = x1[b, t, d] * rsqrt(ms2[b, t] + {eps!r}) * mlp_norm[d]",
        "  gate[b, t, f] = h2[b, t, d] * w_gate[d, f]",
        "  up[b, t, f] = h2[b, t, d] * w_up[d, f]",
        "  act[b, t, f] = silu(gate[b, t, f]) * up[b, t, f]",
        "  mlp[b, t, d] = act[b, t, f] * w_down[f, d]",
        "  x2[b, t, d] = x1[b, t, d] + mlp[b, t, d]",
        "  yield x2",
        "}",
        "msf[b, t] = mean(xl[b, t, d] * xl[b, t, d])",
        f"hf[b, t, d] = xl[b, t, d] * rsqrt(msf[b, t] + {eps!r}) * norm_f[d]",
        f"logits[b, t, v] = hf[b, t, d] * {unembed}",
        "output logits",
    ]
    return Plan(fam, sizes, "\n".join(lines) + "\n", targets + layer, notes)


def _gpt2_plan(cfg: Config, dt: str) -> Plan:
    D, H, L, V, P = (cfg.int(k) for k in ("n_embd", "n_head", "n_layer", "vocab_size", "n_positions"))
    F = cfg.int("n_inner", 4 * D)
    if D % H:
        raise cfg.fail(f"n_embd = {D} is not a multiple of n_head = {H}")
    K = D // H
    eps = float(cfg.get("layer_norm_epsilon", 1e-5))
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise cfg.fail(f"activation_function '{act}' is not supported (einpart's gelu is the tanh form: gelu_new)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if bool(cfg.get(key, ok)) != ok:
            raise cfg.fail(f"{key} = {str(not ok).lower()} is not supported")
    tied = bool(cfg.get("tie_word_embeddings", True))
    S = min(RUN_SIZES["S"], P)
    sizes = dict(RUN_SIZES, S=S, P=P, D=D, F=F, H=H, K=K, L=L, V=V)

    p = "transformer.h.{l}."

    def split(i):
        return lambda w: w[:, i * D:(i + 1) * D].reshape(D, H, K)

    def split_b(i):
        return lambda b: b[i * D:(i + 1) * D].reshape(H, K)

    qkv = Source(p + "attn.c_attn.weight", (D, 3 * D), "n_embd, 3 * n_embd")
    qkv_b = Source(p + "attn.c_attn.bias", (3 * D,), "3 * n_embd")
    vec = lambda name: (Source(name, (D,), "n_embd"),)  # noqa: E731
    targets = [Target("wte", (V, D), False, (Source("transformer.wte.weight", (V, D), "vocab_size, n_embd"),), "as is"),
               Target("wpe", (P, D), False, (Source("transformer.wpe.weight", (P, D), "n_positions, n_embd"),), "as is"),
               Target("lnf_g", (D,), False, vec("transformer.ln_f.weight"), "as is"),
               Target("lnf_b", (D,), False, vec("transformer.ln_f.bias"), "as is")]
    if not tied:
        targets.append(Target("unembed", (D, V), False, (Source("lm_head.weight", (V, D), "vocab_size, n_embd"),),
                              "transposed: [v, d] -> [d, v]", lambda w: w.T))
    layer = [Target("ln1_g", (D,), True, vec(p + "ln_1.weight"), "as is"),
             Target("ln1_b", (D,), True, vec(p + "ln_1.bias"), "as is")]
    for i, n in enumerate("qkv"):
        layer.append(Target(f"w{n}", (D, H, K), True, (qkv,), f"Conv1D [in, out]: columns {i}D..{i + 1}D of c_attn, "
                            f"split: [d, (h k)] -> [d, h, k]", split(i)))
    for i, n in enumerate("qkv"):
        layer.append(Target(f"b{n}", (H, K), True, (qkv_b,), f"entries {i}D..{i + 1}D of c_attn's bias, "
                            f"split: [(h k)] -> [h, k]", split_b(i)))
    layer += [
        Target("wo", (H, K, D), True, (Source(p + "attn.c_proj.weight", (D, D), "n_embd, n_embd"),),
               "Conv1D [in, out], split: [(h k), d] -> [h, k, d]", lambda w: w.reshape(H, K, D)),
        Target("bo", (D,), True, vec(p + "attn.c_proj.bias"), "as is"),
        Target("ln2_g", (D,), True, vec(p + "ln_2.weight"), "as is"),
        Target("ln2_b", (D,), True, vec(p + "ln_2.bias"), "as is"),
        Target("w_fc", (D, F), True, (Source(p + "mlp.c_fc.weight", (D, F), "n_embd, n_inner"),),
               "Conv1D [in, out]: as is"),
        Target("b_fc", (F,), True, (Source(p + "mlp.c_fc.bias", (F,), "n_inner"),), "as is"),
        Target("w_proj", (F, D), True, (Source(p + "mlp.c_proj.weight", (F, D), "n_inner, n_embd"),),
               "Conv1D [in, out]: as is"),
        Target("b_proj", (D,), True, vec(p + "mlp.c_proj.bias"), "as is")]
    spec = _GPT2.format(S=S, P=P, D=D, F=F, H=H, K=K, L=L, V=V, eps=repr(eps), dt=dt,
                        unembed="wte[v, d]" if tied else "unembed[d, v]",
                        unembed_decl="" if tied else f"param unembed[d, v]{dt}\n")
    return Plan("gpt2", sizes, spec, targets + layer)


_GPT2 = """\
# gpt2 checkpoint imported by `einpart import-hf` (weights.safetensors, sources in mapping.json).
# Learned position embeddings, LayerNorm with bias, GELU (tanh) MLP, multi-head attention with biases.
# B, T, S are run sizes (batch, query positions, cache length <= P): --set B=4,S=1024 at use.
size B = 1, T = 8, S = {S}, P = {P}, D = {D}, F = {F}, H = {H}, K = {K}, L = {L}, V = {V}
index b: B, t: T, s: S, p: P, d: D, f: F, h: H, k: K, l: L, v: V

input tokens[b, t] : i32
param wte[v, d]{dt}
param wpe[p, d]{dt}
param lnf_g[d]{dt} {{init=ones}}
param lnf_b[d]{dt} {{init=zeros}}
{unembed_decl}
tok[b, t, d] = take(wte[v, d], tokens[b, t])
pe[t, d] = take(wpe[p, d], position(t))
x0[b, t, d] = tok[b, t, d] + pe[t, d]
xl[b, t, d] = repeat l (x = x0) {{
  param ln1_g[d]{dt} {{init=ones}}
  param ln1_b[d]{dt} {{init=zeros}}
  param wq[d, h, k]{dt}
  param wk[d, h, k]{dt}
  param wv[d, h, k]{dt}
  param bq[h, k]{dt} {{init=zeros}}
  param bk[h, k]{dt} {{init=zeros}}
  param bv[h, k]{dt} {{init=zeros}}
  param wo[h, k, d]{dt}
  param bo[d]{dt} {{init=zeros}}
  param ln2_g[d]{dt} {{init=ones}}
  param ln2_b[d]{dt} {{init=zeros}}
  param w_fc[d, f]{dt}
  param b_fc[f]{dt} {{init=zeros}}
  param w_proj[f, d]{dt}
  param b_proj[d]{dt} {{init=zeros}}
  state k_cache[b, s, h, k]
  state v_cache[b, s, h, k]

  mu1[b, t] = mean(x[b, t, d])
  xc1[b, t, d] = x[b, t, d] - mu1[b, t]
  var1[b, t] = mean(xc1[b, t, d] * xc1[b, t, d])
  h1[b, t, d] = xc1[b, t, d] * rsqrt(var1[b, t] + {eps}) * ln1_g[d] + ln1_b[d]
  qp[b, t, h, k] = h1[b, t, d] * wq[d, h, k]
  kp[b, t, h, k] = h1[b, t, d] * wk[d, h, k]
  vp[b, t, h, k] = h1[b, t, d] * wv[d, h, k]
  q[b, t, h, k] = qp[b, t, h, k] + bq[h, k]
  kn[b, t, h, k] = kp[b, t, h, k] + bk[h, k]
  vn[b, t, h, k] = vp[b, t, h, k] + bv[h, k]
  kc[b, s, h, k] = write(k_cache[b, s, h, k], kn[b, t, h, k])
  vc[b, s, h, k] = write(v_cache[b, s, h, k], vn[b, t, h, k])
  sc[b, h, t, s] = q[b, t, h, k] * kc[b, s, h, k]
  sm[b, h, t, s] = sc[b, h, t, s] * rsqrt(K) + causal(t, s)
  mx[b, h, t] = max(sm[b, h, t, s])
  e[b, h, t, s] = exp(sm[b, h, t, s] - mx[b, h, t])
  z[b, h, t] = sum(e[b, h, t, s])
  p[b, h, t, s] = e[b, h, t, s] / z[b, h, t]
  o[b, t, h, k] = p[b, h, t, s] * vc[b, s, h, k]
  ao[b, t, d] = o[b, t, h, k] * wo[h, k, d]
  x1[b, t, d] = x[b, t, d] + ao[b, t, d] + bo[d]
  mu2[b, t] = mean(x1[b, t, d])
  xc2[b, t, d] = x1[b, t, d] - mu2[b, t]
  var2[b, t] = mean(xc2[b, t, d] * xc2[b, t, d])
  h2[b, t, d] = xc2[b, t, d] * rsqrt(var2[b, t] + {eps}) * ln2_g[d] + ln2_b[d]
  fc[b, t, f] = h2[b, t, d] * w_fc[d, f]
  act[b, t, f] = gelu(fc[b, t, f] + b_fc[f])
  mo[b, t, d] = act[b, t, f] * w_proj[f, d]
  x2[b, t, d] = x1[b, t, d] + mo[b, t, d] + b_proj[d]
  yield x2
}}
muf[b, t] = mean(xl[b, t, d])
xcf[b, t, d] = xl[b, t, d] - muf[b, t]
varf[b, t] = mean(xcf[b, t, d] * xcf[b, t, d])
hf[b, t, d] = xcf[b, t, d] * rsqrt(varf[b, t] + {eps}) * lnf_g[d] + lnf_b[d]
logits[b, t, v] = hf[b, t, d] * {unembed}
output logits
"""


PLANS = {"llama": _llama_plan, "mistral": _llama_plan, "qwen2": _llama_plan, "gpt2": _gpt2_plan}
