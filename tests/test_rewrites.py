"""The model rewrites: defer-norm (exact algebra), int8 (bounded error),
multiquery / grouped-query (exact on weights whose heads agree within a
group), checked on the reference interpreter for every example, alone and
in pipelines, plus the exact messages for rewrites that cannot apply.

Weights for the int8 bounds ("realistic" scale, so the error is meaningful):
variance-preserving matmul weights, std 1/sqrt(fan-in), fan-in = the axes
the matmul sums over; gains 1 + 0.1 N(0,1), biases 0.02 N(0,1); vocabulary
tables std 4/sqrt(D), so logits have std ~4; the output table is tied to the
input embedding (as GPT-2 and PaLM are in their specs, and Llama 3.2 1B/3B),
which gives the peaked next-token distributions of a trained model instead of
the near-ties of independent random tables.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from einpart.errors import EinpartError
from einpart.ir import graph as g, parse
from einpart.ir.analysis import param_only
from einpart.ir.model import Reference, init_params
from einpart.ir.shapes import decl_shapes
from einpart.ir.verify import index_sizes, stmt_inputs
from einpart.passes import parse_pipeline, run_pipeline
from einpart.passes import defer_norm, int8, multiquery  # noqa: F401  (registers the passes)
from einpart.passes.int8 import matmul_weights
from einpart.passes.multiquery import transform_params
from einpart.passes.rewrite_util import weight_bytes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["gpt2", "llama", "palm"]
BIG = {"gpt2": {"D": 768, "F": 3072, "H": 12, "K": 64, "L": 12, "V": 50257, "P": 1024},
       "llama": {"D": 4096, "F": 14336, "H": 32, "G": 8, "K": 128, "L": 32, "V": 128256},
       "palm": {"D": 18432, "F": 73728, "H": 48, "K": 256, "L": 118, "V": 256000}}
TINY = """
size B = 2, T = 4, V = 16, D = 8
index b: B, t: T, v: V, d: D
input tokens[b, t] : i32
param embed[v, d]
x[b, t, d] = take(embed[v, d], tokens[b, t])
logits[b, t, v] = x[b, t, d] * embed[v, d]
output logits
"""


@functools.lru_cache(maxsize=None)
def spec(name: str, **sizes) -> g.Graph:
    return parse((EXAMPLES / f"{name}.ein").read_text(), file=f"{name}.ein", sizes=sizes or None)


@functools.lru_cache(maxsize=None)
def piped(name: str, pipeline: str) -> g.Graph:
    return run_pipeline(spec(name), pipeline).graph


def noisy_params(graph, seed=0):
    """Default init with the ones/zeros of gains and biases perturbed, so folding them is tested."""
    p = init_params(graph, seed)
    rng = np.random.default_rng(seed + 1)
    for d, _ in graph.all_decls():
        if d.kind == "param" and isinstance(g.attr(d.attrs, "init"), g.Sym):
            p[d.name] = (p[d.name] + 0.1 * rng.standard_normal(p[d.name].shape)).astype(np.float32)
    return p


def realistic_params(graph, seed=0):
    """Weights of realistic scale (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ext = index_sizes(graph)
    mm = matmul_weights(graph)
    out = {}
    for n, info in decl_shapes(graph).items():
        if info.decl.kind != "param":
            continue
        init = g.attr(info.decl.attrs, "init")
        z = rng.standard_normal(info.shape)
        if isinstance(init, g.Sym):
            v = 1 + 0.1 * z if init.name == "ones" else 0.02 * z
        elif "v" in info.decl.type.indices or n not in mm:  # vocabulary and position tables
            v = z * 4.0 / np.sqrt(ext["d"])
        else:
            v = z / np.sqrt(np.prod([ext[info.decl.type.indices[k]] for k in mm[n].summed]))
        out[n] = v.astype(np.float32)
    if "unembed" in out:
        out["unembed"] = out["embed"].T.copy()
    return out


def teacher_forced(graph, params, tokens, prompt=8, dtype=np.float32):
    """Logits of a prefill of tokens[:, :prompt], then one decode step per further token."""
    ref = Reference(graph, params, dtype)
    state = ref.new_state(tokens.shape[0])
    logits, state = ref.step(tokens[:, :prompt], 0, state)
    out = [logits]
    for i in range(prompt, tokens.shape[1]):
        logits, state = ref.step(tokens[:, i:i + 1], i, state)
        out.append(logits)
    return np.concatenate(out, axis=1)


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


def tokens(n=2, length=13, seed=5):
    return np.random.default_rng(seed).integers(0, 256, (n, length))


def body(graph):
    return next(s.op.body for s in graph.body.stmts if isinstance(s.op, g.Repeat))


# ------------------------------------------------------------------ defer-norm
@pytest.mark.parametrize("name", NAMES)
def test_defer_norm_is_exact_on_prefill_and_decode(name):
    before, after = spec(name), piped(name, "defer-norm")
    p = noisy_params(before)
    toks = tokens()  # prefill of 8, then 5 decode steps
    assert rel_err(teacher_forced(before, p, toks), teacher_forced(after, p, toks)) < 2e-5
    f64 = [teacher_forced(gr, p, toks, dtype=np.float64) for gr in (before, after)]
    assert rel_err(*f64) < 1e-12  # the algebra is exact


@pytest.mark.parametrize("name,norm_outputs,consumers", [
    ("gpt2", ["h1", "h2", "hf"], ["qp", "kp", "vp", "fc", "logits"]),
    # llama: up's 1/rms goes on past w_down too (silu(gate) * up_raw . w_down, then scaled)
    ("llama", ["h1", "h2", "hf", "up", "act"], ["q", "kn", "vn", "gate", "mlp", "logits"]),
    ("palm", ["h1", "hf"], ["q", "kn", "vn", "gate", "up", "logits"]),
])
def test_defer_norm_moves_every_norm_and_softmax(name, norm_outputs, consumers):
    out = piped(name, "defer-norm")
    weights = param_only(out)
    for n in norm_outputs:  # every consumer reads past the norm, so it is gone
        assert out.stmt(n) is None
    for n in consumers:  # y = rsqrt(..) * (y_raw [- mu * colsum]) [+ b . W]: a map over a raw matmul
        s = out.stmt(n)
        assert s.op.reduce is None
        raw = [r.name for r in g.expr_refs(s.op.expr) if r.name.endswith("_raw")]
        assert raw and out.stmt(raw[0]).op.reduce == "sum"
        assert any(r.name.startswith("rsqrt_") for r in g.expr_refs(s.op.expr))
        derived = [r.name for r in g.expr_refs(s.op.expr) if r.name in weights]
        if name != "llama":  # LayerNorm: the mean term meets a precomputed column sum
            assert any(d.endswith("_sum") for d in derived), n
    # softmax: o = (e . v) / z
    o = out.stmt("o").op.expr
    assert isinstance(o, g.Binary) and o.op == "/" and o.rhs.name == "z"
    assert [r.name for r in g.expr_refs(out.stmt(o.lhs.name).op.expr)] == ["e", "vc"]


def test_defer_norm_folds_gain_into_weight_but_not_into_a_shared_table():
    out = piped("llama", "defer-norm")
    assert out.stmt("wq_attn_norm") is not None and "wq_attn_norm" in param_only(out)
    assert [r.name for r in g.expr_refs(out.stmt("q_raw").op.expr)] == ["x", "wq_attn_norm"]
    gpt2 = piped("gpt2", "defer-norm")  # wte is also the embedding: no second copy of it
    assert [r.name for r in g.expr_refs(gpt2.stmt("logits_raw").op.expr)] == ["xl", "lnf_g", "wte"]
    assert {"wq_ln1_b_sum", "wte_lnf_b_sum"} <= param_only(gpt2)  # biases became b . W


def test_defer_norm_with_nothing_to_defer_is_an_error():
    msg = ("defer-norm: nothing to defer: no contraction reads a value with a factor that is constant "
           "over the contracted indices (a softmax's 1/z, a norm's rsqrt, mean or gain)")
    with pytest.raises(EinpartError) as e:
        parse_pipeline("defer-norm")[0].apply(parse(TINY))
    assert str(e.value) == msg
    with pytest.raises(EinpartError, match="pass 'defer-norm' failed .*nothing to defer"):
        run_pipeline(spec("palm"), "defer-norm,defer-norm")


# ------------------------------------------------------------------ int8
def int8_quality(name, pipeline, float_pipeline=None, seed=0):
    """(min cosine of teacher-forced logits, prompts of 10 whose 8 greedy tokens all agree),
    against the float model (the spec, or the spec after float_pipeline)."""
    base = piped(name, float_pipeline) if float_pipeline else spec(name)
    quant = piped(name, pipeline)
    p0 = realistic_params(spec(name), seed)
    p, pq = transform_params(base, p0), transform_params(quant, p0)
    prompts = np.random.default_rng(seed + 10).integers(0, 256, (10, 8))
    tf, _ = Reference(base, p).generate(prompts, 8)
    tq, _ = Reference(quant, pq).generate(prompts, 8)
    path = np.concatenate([prompts, tf[:, :-1]], axis=1)
    a, b = teacher_forced(base, p, path), teacher_forced(quant, pq, path)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return float(cos.min()), int((tf == tq).all(axis=1).sum())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("pipeline", ["int8", "defer-norm,int8", "int8,defer-norm"])
def test_int8_error_bounds(name, pipeline):
    cos, agree = int8_quality(name, pipeline)
    assert cos >= 0.999 and agree >= 8, (cos, agree)


@pytest.mark.parametrize("name,expect", [
    ("gpt2", {"wq", "wk", "wv", "wo", "w_fc", "w_proj"}),            # not wte/wpe (take), not gains
    ("llama", {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "unembed"}),
    ("palm", {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}),  # not the tied embedding
])
def test_int8_quantises_matmul_weights_and_keeps_them_int8(name, expect):
    out = piped(name, "int8")
    assert {s.name.removesuffix("_i8") for s, _ in out.all_stmts() if s.name.endswith("_i8")} == expect
    weights = param_only(out)
    step = [s for s, _ in out.all_stmts() if s.name not in weights and not isinstance(s.op, g.Repeat)]
    for w in expect:
        assert out.stmt(f"{w}_i8").type.dtype == "i8"
        assert not [s for s in step if w in stmt_inputs(s)]  # per-step work reads only w_i8 and w_scale
        users = [s for s in step if f"{w}_i8" in stmt_inputs(s)]
        assert users and all(u.op.reduce == "sum" for u in users)  # the matmul reads int8 values ...
        scaled = [s for s in step if f"{w}_scale" in stmt_inputs(s)]
        assert scaled and all(s.op.reduce is None for s in scaled)  # ... and the scale its output


def test_int8_weight_selection():
    out = run_pipeline(spec("llama"), "int8{weights=(wq,wk)}").graph
    assert {s.name for s, _ in out.all_stmts() if s.name.endswith("_i8")} == {"wq_i8", "wk_i8"}
    # after defer-norm the gain is folded into wq: naming wq quantises the folded weight
    out = run_pipeline(spec("llama"), "defer-norm,int8{weights=(wq)}").graph
    assert {s.name for s, _ in out.all_stmts() if s.name.endswith("_i8")} == {"wq_attn_norm_i8"}


def test_int8_halves_weight_bytes():
    """Stored weights (what a step reads, param-only results included) at real sizes."""
    ratios = {}
    for name in NAMES:
        base = spec(name, **BIG[name])
        quant = run_pipeline(base, "int8").graph
        ratios[name] = weight_bytes(quant, float_dtype="bf16") / weight_bytes(base, float_dtype="bf16")
    assert 0.50 < ratios["palm"] < 0.51 and 0.52 < ratios["llama"] < 0.54  # the embedding stays bf16
    assert 0.6 < ratios["gpt2"] < 0.7  # GPT-2 small: the tied 50257 x 768 table is a third of it


@pytest.mark.parametrize("text,pipeline,message", [
    (TINY, "int8", "int8: the spec has no matmul weights to quantise (a matmul weight is a float parameter "
                   "contracted with activations; embeddings read by take() and 1-D gains are left alone)"),
    ("llama", "int8{weights=(wq,nope)}", "int8: unknown weight 'nope' (matmul weights: unembed, w_down, "
                                         "w_gate, w_up, wk, wo, wq, wv)"),
    ("palm", "int8{weights=(embed)}", "int8: cannot quantise 'embed': it is an embedding table (read by "
                                      "take() in 'x0')"),
    ("llama", "int8{weights=(attn_norm)}", "int8: 'attn_norm' is not a matmul weight (matmul weights: "
                                           "unembed, w_down, w_gate, w_up, wk, wo, wq, wv)"),
])
def test_int8_bad_requests(text, pipeline, message):
    graph = parse(text) if text == TINY else spec(text)
    with pytest.raises(EinpartError) as e:
        parse_pipeline(pipeline)[0].apply(graph)
    assert str(e.value) == message


# ------------------------------------------------------------------ multiquery
def grouped_params(graph, groups, kv_axis, seed=0, dtype=np.float64):
    """Random weights whose key/value heads agree within each of `groups` groups."""
    p = {k: v.astype(dtype) for k, v in noisy_params(graph, seed).items()}
    for d, owner in graph.all_decls():
        if d.kind == "param" and kv_axis in d.type.indices and d.name in ("wk", "wv", "bk", "bv"):
            ax = d.type.indices.index(kv_axis) + (owner is not None)
            a = np.moveaxis(p[d.name], ax, 0)
            n = a.shape[0] // groups
            a = np.repeat(a[::n], n, axis=0)
            p[d.name] = np.moveaxis(a, 0, ax).copy()
    return p


@pytest.mark.parametrize("name,groups,kv_axis", [
    ("gpt2", 1, "h"), ("gpt2", 2, "h"), ("llama", 1, "g"),
    ("gpt2", 4, "h"), ("llama", 2, "g"),  # groups = key/value heads: the identity up to naming
])
def test_multiquery_pools_heads(name, groups, kv_axis):
    before = spec(name)
    after = piped(name, f"multiquery{{groups={groups}}}")
    p = grouped_params(before, groups, kv_axis)
    toks = tokens()
    a = teacher_forced(before, p, toks, dtype=np.float64)
    b = teacher_forced(after, transform_params(after, p), toks, dtype=np.float64)
    assert rel_err(a, b) < 1e-12
    # the KV cache shrinks by the number of heads pooled together
    sb, sa = decl_shapes(before), decl_shapes(after)
    kv_heads = index_sizes(before)[kv_axis]
    assert sb["k_cache"].size == sa["k_cache"].size * kv_heads // groups
    assert sb["v_cache"].size == sa["v_cache"].size * kv_heads // groups


def test_multiquery_graph_runs_and_records_the_reshape():
    out = piped("gpt2", "multiquery{groups=1}")
    assert g.attr(out.decl("wq").attrs, "stored_as") == (g.Sym("d"), g.Sym("h"), g.Sym("k"))
    assert out.decl("wq").type.indices == ("d", "g", "r", "k")
    assert out.stmt("wk_pool").op.reduce == "mean" and "wk_pool" in param_only(out)
    logits = teacher_forced(out, init_params(out), tokens())  # weights drawn in the new shapes
    assert np.isfinite(logits).all()
    with pytest.raises(EinpartError, match=r"param 'wq' has shape \(2, 64, 64\); expected \(2, 64, 4, 16\)"):
        transform_params(out, {"wq": np.zeros((2, 64, 64))})


@pytest.mark.parametrize("name,sizes,groups,message", [
    ("gpt2", {"H": 8}, 3, "multiquery{groups=3}: 3 does not divide 8 heads"),
    ("palm", {}, 1, "multiquery{groups=1}: the spec is already multiquery (one key/value head shared by "
                    "all 4 query heads); there is nothing to pool"),
    ("llama", {}, 4, "multiquery{groups=4}: 4 groups cannot be pooled from 2 key/value heads (4 must divide 2)"),
    ("gpt2", {}, 0, "multiquery{groups=0}: groups must be at least 1"),
])
def test_multiquery_bad_requests(name, sizes, groups, message):
    with pytest.raises(EinpartError) as e:
        parse_pipeline(f"multiquery{{groups={groups}}}")[0].apply(spec(name, **sizes))
    assert str(e.value) == message


def test_multiquery_needs_attention():
    with pytest.raises(EinpartError, match="multiquery: found no attention"):
        parse_pipeline("multiquery")[0].apply(parse(TINY))


def test_multiquery_twice_is_already_multiquery():
    with pytest.raises(EinpartError, match="already multiquery"):
        run_pipeline(spec("llama"), "multiquery{groups=1},multiquery{groups=1}")


# ------------------------------------------------------------------ pipelines
PIPELINES = [
    ("int8,defer-norm", "int8"),                                   # defer-norm is exact after int8 too
    ("multiquery{groups=1},defer-norm", "multiquery{groups=1}"),
    ("defer-norm,multiquery{groups=1}", "multiquery{groups=1}"),   # pooling through folded weights
    ("multiquery{groups=1},defer-norm,int8", None),                 # int8 bounds vs the float MQ model
]
# palm is already multiquery: the multiquery pipelines do not apply to it (tested above as an error)
PIPELINE_CASES = [(n, p, r) for n in NAMES for p, r in PIPELINES if not ("multiquery" in p and n == "palm")]


@pytest.mark.parametrize("name,pipeline,reference", PIPELINE_CASES)
def test_pipelines(tmp_path, name, pipeline, reference):
    result = run_pipeline(spec(name), pipeline, dump_dir=tmp_path)  # every dump re-parsed and verified
    assert len(list(tmp_path.iterdir())) == len(pipeline.split(",")) + 1
    out = result.graph
    p = transform_params(out, noisy_params(spec(name)))
    if reference is not None:
        ref = piped(name, reference)
        toks = tokens()
        assert rel_err(teacher_forced(ref, p, toks), teacher_forced(out, p, toks)) < 2e-5
    else:
        cos, agree = int8_quality(name, pipeline, "multiquery{groups=1}")
        assert cos >= 0.999 and agree >= 8, (cos, agree)


# ------------------------------------------------------------------ planning the rewrites
BF16 = "cast{dtype=bf16,what=(param)}"


def planned_weights(graph, mesh, **kw):
    from einpart.passes.shard import plan
    return plan(graph, mesh, "tpu-v4", "decode", batch=128, context=2048, **kw)


def test_plan_counts_int8_weights_palm_540b():
    """PaLM 540B on 64 TPU v4 chips: the planner holds int8 weights and their scales, not the
    bf16 parameters they came from, so the least weight memory per chip halves and the
    decode step (memory-bound) gets faster and is planned differently."""
    from einpart.passes.shard.hardware import load_hardware
    from einpart.passes.shard.phases import make_phases
    from einpart.passes.shard.planner import Builder, memory_floor
    base = run_pipeline(spec("palm", **BIG["palm"]), BF16).graph
    quant = run_pipeline(base, "int8").graph
    mesh = (("x", 4), ("y", 4), ("z", 4))
    floors = {}
    for name, gr in (("bf16", base), ("int8", quant)):
        phases = make_phases(gr, "decode", batch=128, context=2048)
        built = Builder(gr, mesh, load_hardware("tpu-v4"), phases).build(None)
        floors[name] = memory_floor(built, phases)["weights"]
    assert floors["bf16"] == pytest.approx(weight_bytes(base) / 64, rel=0.01)    # 16.9 GB: all of it, sharded
    assert 0.49 < floors["int8"] / floors["bf16"] < 0.52
    p16, p8 = planned_weights(base, "x=4,y=4,z=4"), planned_weights(quant, "x=4,y=4,z=4")
    d16, d8 = p16.phases["decode"], p8.phases["decode"]
    assert d8.step_s < 0.9 * d16.step_s and d8.weights_bytes < d16.weights_bytes
    assert {s.name for s in d8.prepared} >= {"wq_i8", "wq_scale", "w_down_i8"}   # priced once, not per step
    assert not {s.name for s in d8.stmts} & {s.name for s in d8.prepared}
    split16 = {s.name: s.split for s in d16.stmts}
    assert any(split16.get(s.name.removesuffix("_raw")) != s.split for s in d8.stmts if s.name.endswith("_raw"))


def test_int8_makes_palm_540b_fit_32_chips():
    """bf16 PaLM 540B (33.8 GB of weights per chip on 32 chips) plus its cache does not fit
    32 GiB chips; with int8 the planner finds a plan that does."""
    from einpart.errors import PlanError
    base = run_pipeline(spec("palm", **BIG["palm"]), BF16).graph
    with pytest.raises(PlanError, match=r"^weights 33\.8 GB \+ KV cache"):
        planned_weights(base, "x=2,y=4,z=4")
    p = planned_weights(run_pipeline(base, "int8").graph, "x=2,y=4,z=4")
    rep = p.phases["decode"]
    assert rep.memory_bytes <= 32 * 2 ** 30
    assert rep.weights_bytes < weight_bytes(base) / 32    # (room it spends replicating some int8 weights)


def test_prepared_weights_have_one_layout_in_both_phases():
    """A two-phase plan stores each prepared weight once: prefill and decode read the same layout."""
    from einpart.passes.shard import plan, specialize
    from einpart.ir.layout import type_layout
    gr = piped("llama", "multiquery{groups=1},defer-norm,int8")
    p = plan(gr, "x=2,y=4", "tpu-v4", "both", batch=8, context=64)
    pre, dec = specialize(p.graph, "prefill").types(), specialize(p.graph, "decode").types()
    prepared = param_only(gr)
    assert {"wq_attn_norm_i8", "wk_pool_attn_norm_i8", "w_down_i8"} <= prepared
    for w in prepared:
        assert type_layout(pre[w]) == type_layout(dec[w]), w
    # what the report holds: prepared weights replace the parameters only preparation reads
    rep = p.phases["decode"]
    assert rep.weights_bytes == pytest.approx(sum(
        _held(p.graph, n) for n in _step_read_weights(p.graph)))


def _step_read_weights(graph):
    from einpart.passes.shard.report import step_reads
    prepared = param_only(graph)
    reads = step_reads(graph, prepared)
    params = {d.name for d, _ in graph.all_decls() if d.kind == "param"}
    return sorted((params | prepared) & reads)


def _held(graph, name):
    from einpart.ir.layout import type_layout
    from einpart.ir.shapes import DTYPE_BYTES
    from einpart.ir.verify import index_sizes
    typ = graph.types()[name]
    idx, mesh = index_sizes(graph), dict(graph.mesh)
    n = DTYPE_BYTES[typ.dtype]
    for i, ax in type_layout(typ).items():
        n *= idx[i] / np.prod([mesh[a] for a in ax])
    layers = [s for s, _ in graph.all_stmts() if isinstance(s.op, g.Repeat)]
    inside = any(name in {d.name for d in s.op.body.decls} | {t.name for t in s.op.body.stmts} for s in layers)
    return n * (idx["l"] if inside else 1)
