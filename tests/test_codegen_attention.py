"""Softmax attention as one jax.nn.dot_product_attention call (the `attention` lowering option).

- the matcher (einpart/ir/attention.py) finds exactly the chain of every example, in its
  grouped-query (llama), multiquery (palm) and multi-head (gpt2) forms and after
  defer-norm, and refuses a chain whose intermediate something else reads;
- generated code with attention="xla" gives the reference interpreter's logits for
  prefill and decode: replicated, heads split (the call on each device's heads), query
  positions split in prefill (the explicit mask), and plans that split s or k (the
  einsum code, no call);
- the source holds dot_product_attention exactly when expected, and the cudnn code
  differs from the xla code only in `implementation=` (cuDNN cannot run on CPU: this
  is what covers it); auto picks cudnn only on CUDA, for bf16 prefill.

8 simulated CPU devices: set in tests/conftest.py, before JAX starts.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import spec_path
from einpart.codegen import generate_source, replicated_plan, set_plan, simple_plan
from einpart.errors import EinpartError
from einpart.ir import parse, parse_file
from einpart.ir.attention import attention_chains
from einpart.ir.model import Reference
from einpart.ir.verify import index_sizes
from einpart.passes import run_pipeline
from test_codegen import assert_close, make_params

CALL = "jax.nn.dot_product_attention("
CHAIN = ("sc", "sm", "mx", "e", "z", "p", "o")
PROMPT_LEN, N_DECODE = 5, 3


def graph_of(name, pipeline=None):
    graph = parse_file(spec_path(name))
    return run_pipeline(graph, pipeline).graph if pipeline else graph


def prefill_and_decode(src: str) -> tuple[str, str]:
    start, mid = src.index("\ndef prefill("), src.index("\ndef decode(")
    return src[start:mid], src[mid:src.index("\ndef programs(")]


# ------------------------------------------------------------------ the matcher
@pytest.mark.parametrize("name,kv_heads,q_heads", [("llama", ("g",), ("r",)), ("palm", (), ("h",)),
                                                    ("gpt2", ("h",), ())])
def test_matcher_finds_the_chain_of_each_example(name, kv_heads, q_heads):
    (chain,) = attention_chains(graph_of(name))
    assert chain.members == CHAIN and not chain.deferred and chain.causal
    assert (chain.t, chain.s, chain.k, chain.batch) == ("t", "s", "k", "b")
    assert (chain.kv_heads, chain.q_heads) == (kv_heads, q_heads)
    assert chain.key.name == "kc" and chain.value.name == "vc" and chain.scale == 0.25


def test_matcher_finds_the_deferred_form():
    (chain,) = attention_chains(graph_of("llama", "defer-norm"))
    assert chain.deferred and chain.members == ("sc", "sm", "mx", "e", "z", "o_raw", "o")


def test_matcher_after_multiquery_groups():
    (chain,) = attention_chains(graph_of("gpt2", "multiquery{groups=2}"))
    assert len(chain.kv_heads) == 1 and len(chain.q_heads) == 1


LLAMA = spec_path("llama").read_text()
READ_AGAIN = {"sc": "sc[b, g, r, t, s]", "sm": "sm[b, g, r, t, s]", "mx": "mx[b, g, r, t]",
              "e": "e[b, g, r, t, s]", "z": "z[b, g, r, t]", "p": "p[b, g, r, t, s]"}


def llama_reading(name: str) -> str:
    """The llama spec with one more statement reading intermediate `name`, added to the residual."""
    extra = f"  extra[b, t] = sum({READ_AGAIN[name]})\n"
    text = LLAMA.replace("  attn[b, t, d] =", extra + "  attn[b, t, d] =")
    return text.replace("x1[b, t, d] = x[b, t, d] + attn[b, t, d]",
                        "x1[b, t, d] = x[b, t, d] + attn[b, t, d] + extra[b, t]")


@pytest.mark.parametrize("name", sorted(READ_AGAIN))
def test_matcher_refuses_an_intermediate_read_elsewhere(name):
    graph = parse(llama_reading(name))
    assert attention_chains(graph) == []
    assert CALL not in generate_source(replicated_plan(graph, {"x": 1}), attention="xla")


@pytest.mark.parametrize("sm,scale", [("sc[b, g, r, t, s] / sqrt(K) + causal(t, s)", 0.25),
                                      ("causal(t, s) + 0.5 * sc[b, g, r, t, s]", 0.5),
                                      ("sc[b, g, r, t, s] * rsqrt(K)", 0.25)])
def test_matcher_reads_the_scale(sm, scale):
    text = LLAMA.replace("sc[b, g, r, t, s] * rsqrt(K) + causal(t, s)", sm)
    (chain,) = attention_chains(parse(text))
    assert chain.scale == scale and chain.causal == ("causal" in sm)


@pytest.mark.parametrize("sm", ["sc[b, g, r, t, s] * temp[s] + causal(t, s)",         # not a constant
                                "sc[b, g, r, t, s] * rsqrt(K) + causal(s, t)",         # not the key's mask
                                "tanh(sc[b, g, r, t, s]) + causal(t, s)"])             # not a scale
def test_matcher_refuses_other_scores(sm):
    text = LLAMA.replace("sc[b, g, r, t, s] * rsqrt(K) + causal(t, s)", sm)
    text = text.replace("param attn_norm[d] {init=ones}", "param attn_norm[d] {init=ones}\n  param temp[s]")
    assert attention_chains(parse(text)) == []


# ------------------------------------------------------------------ generated code
def reference(graph, params):
    ref = Reference(graph, params)
    V = index_sizes(graph)[ref.axes.vocab]
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, V, (2, PROMPT_LEN)).astype(np.int32)
    steps = rng.integers(0, V, (2, N_DECODE)).astype(np.int32)
    state = ref.new_state(2)
    logits, state = ref.step(prompt, 0, state)
    want = [logits]
    for i in range(N_DECODE):
        logits, state = ref.step(steps[:, i:i + 1], PROMPT_LEN + i, state)
        want.append(logits)
    return prompt, steps, want


def check(planned, graph, layers="scan", calls=(1, 1)):
    """Run prefill and decode with attention="xla" against the reference; `calls`: fused calls per program."""
    from einpart.runtime import Executable
    params = make_params(graph)
    prompt, steps, want = reference(graph, params)
    ex = Executable(planned, layers=layers, weights=params, attention="xla")
    pre, dec = prefill_and_decode(ex.source())
    assert (pre.count(CALL), dec.count(CALL)) == calls
    assert_close(ex.prefill(prompt), want[0], "prefill")
    for i in range(N_DECODE):
        assert_close(ex.decode(steps[:, i], PROMPT_LEN + i), want[i + 1], f"decode step {i}")


@pytest.mark.parametrize("name", ["llama", "palm", "gpt2"])
def test_xla_attention_matches_reference_replicated(name):
    graph = graph_of(name)
    planned = replicated_plan(graph, {"x": 1})
    check(planned, graph)
    pre, dec = prefill_and_decode(generate_source(planned, attention="xla"))
    # prefill (T=8 of S=32 positions, at pos 0): the first 8 keys, causal; decode: keys up to pos
    assert "[:, :8]" in pre and "is_causal=True" in pre and "mask=" not in pre
    assert "key_value_seq_lengths=" in dec and "is_causal" not in dec


@pytest.mark.parametrize("name", ["llama", "palm"])
def test_xla_attention_matches_reference_heads_split(name):
    """Megatron-style: the heads split over x (s and k whole): one call on each device's heads."""
    graph = graph_of(name)
    check(simple_plan(graph, {"x": 2}), graph, layers="unroll")


def test_xla_attention_deferred_form_matches_reference():
    graph = graph_of("llama", "defer-norm")
    check(simple_plan(graph, {"x": 2}), graph)


def chain_split(graph, index, names=CHAIN):
    """The chain's statements `names` split over x on `index`."""
    return set_plan(graph, {"x": 2}, splits={n: {index: "x"} for n in names})


@pytest.mark.parametrize("name", ["llama", "palm"])
def test_xla_attention_query_positions_split(name):
    """t split in prefill: the call takes the causal mask with this shard's offset (decode drops the split)."""
    graph = graph_of(name)
    planned = chain_split(graph, "t")
    check(planned, graph)
    pre, dec = prefill_and_decode(generate_source(planned, attention="xla"))
    assert "mask=" in pre and "is_causal" not in pre and "key_value_seq_lengths=" in dec


@pytest.mark.parametrize("name", ["llama", "palm"])
def test_split_key_positions_fall_back_to_einsums(name):
    graph = graph_of(name)
    check(chain_split(graph, "s"), graph, calls=(0, 0))


def test_split_head_dim_falls_back_to_einsums():
    graph = graph_of("gpt2")
    src = generate_source(simple_plan(graph, {"x": 2, "y": 4}), attention="xla")     # k over y
    assert CALL not in src
    assert CALL not in generate_source(chain_split(graph, "k", ("sc", "o")), attention="xla")


MEMORY = """
size B = 2, T = 4, S = 8, D = 16, K = 8, H = 2, V = 32
index b: B, t: T, s: S, d: D, k: K, h: H, v: V
input tokens[b, t] : i32
param embed[v, d]
param wq[d, h, k]
param mem_k[s, h, k]
param mem_v[s, h, k]
param wo[h, k, d]
x[b, t, d] = take(embed[v, d], tokens[b, t])
q[b, t, h, k] = x[b, t, d] * wq[d, h, k]
sc[b, h, t, s] = q[b, t, h, k] * mem_k[s, h, k]
mx[b, h, t] = max(sc[b, h, t, s])
e[b, h, t, s] = exp(sc[b, h, t, s] - mx[b, h, t])
z[b, h, t] = sum(e[b, h, t, s])
p[b, h, t, s] = e[b, h, t, s] / z[b, h, t]
o[b, t, h, k] = p[b, h, t, s] * mem_v[s, h, k]
attn[b, t, d] = o[b, t, h, k] * wo[h, k, d]
y[b, t, d] = x[b, t, d] + attn[b, t, d]
logits[b, t, v] = y[b, t, d] * embed[v, d]
output logits
"""


def test_unmasked_attention_to_a_memory_without_batch():
    """Keys shared by the batch (a learned memory), no mask, no scale: b is one more query head."""
    graph = parse(MEMORY)
    (chain,) = attention_chains(graph)
    assert (chain.masked, chain.causal, chain.scale, chain.batch) == (None, False, 1.0, None)
    assert chain.q_heads == ("b",) and chain.kv_heads == ("h",)
    check(chain_split(graph, "h", ("sc", "mx", "e", "z", "p", "o")), graph)


def test_intermediate_read_elsewhere_still_matches_reference():
    graph = parse(llama_reading("p"))
    check(replicated_plan(graph, {"x": 1}), graph, calls=(0, 0))


def test_bf16_xla_attention_matches_einsum_attention():
    from einpart.runtime import Executable
    graph = graph_of("llama")
    params = make_params(graph)
    prompt, steps, _ = reference(graph, params)
    planned = simple_plan(graph, {"x": 2})
    got = [Executable(planned, weights=params, dtype="bf16", attention=a) for a in ("xla", "einsum")]
    logits = [ex.prefill(prompt) for ex in got]
    for i in range(N_DECODE):
        logits += [ex.decode(steps[:, i], PROMPT_LEN + i) for ex in got]
    for a, b in zip(logits[::2], logits[1::2]):
        np.testing.assert_allclose(a, b, rtol=5e-2, atol=2e-2 * max(1.0, float(np.abs(b).max())))


# ------------------------------------------------------------------ the source
def bf16(name):
    return run_pipeline(graph_of(name), "cast{dtype=bf16}").graph


@pytest.mark.parametrize("name", ["llama", "palm"])
def test_cudnn_differs_from_xla_only_in_the_implementation(name):
    planned = simple_plan(bf16(name), {"x": 2})
    xla = generate_source(planned, attention="xla")
    cudnn = generate_source(planned, attention="cudnn")
    assert xla.count("implementation='xla'") == 2 and cudnn.count("implementation='cudnn'") == 2
    assert cudnn.replace("implementation='cudnn'", "implementation='xla'").replace(
        "attention=cudnn", "attention=xla") == xla


def test_auto_picks_cudnn_only_for_bf16_prefill_on_cuda():
    planned = simple_plan(bf16("llama"), {"x": 2})
    pre, dec = prefill_and_decode(generate_source(planned, attention="auto", platform="cuda"))
    assert pre.count("implementation='cudnn'") == 1 and CALL not in dec
    einsum = generate_source(planned)
    for platform in ("cpu", None):
        src = generate_source(planned, attention="auto", platform=platform)
        assert src.replace("attention=auto; ", "") == einsum
    f32 = simple_plan(graph_of("llama"), {"x": 2})
    assert CALL not in generate_source(f32, attention="auto", platform="cuda")


def test_einsum_is_the_codegen_default():
    planned = simple_plan(graph_of("llama"), {"x": 2})
    assert CALL not in generate_source(planned) and generate_source(planned) == generate_source(
        planned, attention="einsum")


def test_cudnn_refuses_float32():
    planned = simple_plan(graph_of("llama"), {"x": 2})
    with pytest.raises(EinpartError) as e:
        generate_source(planned, attention="cudnn")
    assert str(e.value) == ("attention='cudnn' needs bf16 or f16 attention inputs, but 'o' reads qr, kc and vc in "
                            "f32 (store them in bf16, e.g. --dtype bf16, or use attention='auto' or 'xla')")


def test_cudnn_refuses_cpu():
    from einpart.runtime import Executable
    with pytest.raises(EinpartError) as e:
        Executable(simple_plan(bf16("llama"), {"x": 2}), attention="cudnn")
    assert str(e.value) == ("attention='cudnn' runs on NVIDIA GPUs only; this mesh is on cpu "
                            "(use attention='auto', 'xla' or 'einsum')")


def test_unknown_attention_mode():
    planned = simple_plan(graph_of("llama"), {"x": 2})
    with pytest.raises(EinpartError) as e:
        generate_source(planned, attention="flash")
    assert str(e.value) == "attention must be one of einsum, xla, cudnn, auto, got 'flash'"


def test_compile_option_and_grad_through_the_fused_call():
    """einpart.compile(attention="xla"): the program holds the call; logits and the gradient of
    prefill with respect to the weights equal the einsum program's."""
    import jax
    import einpart
    progs = {a: einpart.compile(spec_path("llama"), mesh="2", plan="simple", attention=a) for a in ("xla", "einsum")}
    assert CALL in progs["xla"].source and CALL not in progs["einsum"].source
    tokens = np.random.default_rng(3).integers(0, 256, (2, 8)).astype(np.int32)
    weights = progs["einsum"].weights()

    def loss(program):
        return lambda w: jax.numpy.sum(jax.numpy.sin(program.prefill(tokens, params=w)[0]))
    got, want = (jax.jit(jax.value_and_grad(loss(progs[a])))(weights) for a in ("xla", "einsum"))
    assert_close(got[0], want[0], "loss")
    for name in want[1]:
        g, w = np.asarray(got[1][name]), np.asarray(want[1][name])
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(float(np.abs(w).max()), 1e-6), err_msg=name)
    assert float(np.abs(np.asarray(got[1]["wq"])).max()) > 0      # the gradient reaches the query weights
    with pytest.raises(EinpartError, match="attention must be one of einsum, xla, cudnn, auto, got 'fused'"):
        einpart.compile(spec_path("llama"), mesh="2", plan="simple", attention="fused")


def split_chain_plan(graph, mesh, split):
    """Every statement of the chain split as `split` (index -> mesh axes), everything else replicated."""
    (chain,) = attention_chains(graph)
    return set_plan(graph, mesh, splits={m: dict(split) for m in chain.members})


@pytest.mark.parametrize("name,pipeline,mesh,split", [
    ("llama", None, {"x": 2, "y": 2}, {"b": ("x",), "g": ("y",)}),
    ("llama", None, {"x": 2, "y": 2}, {"r": ("y",)}),
    ("palm", None, {"x": 2, "y": 4}, {"h": ("x",), "t": ("y",)}),
    ("gpt2", "defer-norm", {"x": 2, "y": 4}, {"t": ("x", "y")})])
def test_xla_attention_under_chain_splits(name, pipeline, mesh, split):
    """Batch, key/value heads, query heads and query positions split (t over two axes): each
    device's call sees its own heads and positions (offsets in the mask)."""
    graph = graph_of(name, pipeline)
    check(split_chain_plan(graph, mesh, split), graph)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "palm", "gpt2"])
@pytest.mark.parametrize("pipeline", [None, "defer-norm"])
def test_xla_attention_under_random_chain_splits(name, pipeline):
    import random
    graph = graph_of(name, pipeline)
    (chain,) = attention_chains(graph)
    idx = index_sizes(graph)
    roles = [i for i in (chain.batch, chain.t) + chain.kv_heads + chain.q_heads if i]
    rng = random.Random(f"{name}-{pipeline}")
    for mesh in ({"x": 2, "y": 2}, {"x": 2, "y": 4}):
        for _ in range(3):
            split: dict = {}
            for axis, size in mesh.items():
                i = rng.choice(roles + [None])
                if i and idx[i] % (size * int(np.prod([mesh[a] for a in split.get(i, ())]))) == 0:
                    split[i] = split.get(i, ()) + (axis,)
            check(split_chain_plan(graph, mesh, split), graph)
