"""einpart.compile: the program object, and its prefill / decode as plain JAX functions.

The gradient test is the point of the functional face: jax.grad of a loss
through a prefill sharded over 8 simulated devices, with respect to the
spec's weights, equals jax.grad of the same loss through an independent
Llama written here in plain jax.numpy (no einpart code on that side)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einpart
from conftest import spec_path
from einpart.ir.model import Reference

SIZES = {"B": 2, "T": 4, "S": 8, "D": 32, "F": 64, "H": 4, "G": 2, "K": 8, "L": 2, "V": 64}
TOKENS = (np.arange(8).reshape(2, 4) * 7 % 64).astype(np.int32)


def llama_logits(w, tokens):
    """HF-Llama prefill from position 0 in plain jax.numpy (the spec's meaning, written by hand)."""
    L, D, G, R, K = w["wq"].shape
    B, T = tokens.shape
    H = G * R

    def rms(x, g):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5) * g

    inv = 1.0 / 500000.0 ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    ang = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None, :]
    cos, sin = jnp.cos(jnp.concatenate([ang, ang], -1)), jnp.sin(jnp.concatenate([ang, ang], -1))

    def rope(x):                                   # x [B, T, heads, K]
        half = jnp.concatenate([-x[..., K // 2:], x[..., :K // 2]], axis=-1)
        return x * cos[None, :, None] + half * sin[None, :, None]

    hp = jax.lax.Precision.HIGHEST
    x = w["embed"][tokens]
    mask = jnp.tril(jnp.ones((T, T), bool))
    for l in range(L):
        h = rms(x, w["attn_norm"][l])
        q = rope(jnp.matmul(h, w["wq"][l].reshape(D, H * K), precision=hp).reshape(B, T, H, K))
        k = rope(jnp.matmul(h, w["wk"][l].reshape(D, G * K), precision=hp).reshape(B, T, G, K))
        v = jnp.matmul(h, w["wv"][l].reshape(D, G * K), precision=hp).reshape(B, T, G, K)
        k, v = jnp.repeat(k, R, axis=2), jnp.repeat(v, R, axis=2)
        s = jnp.einsum("bthk,bshk->bhts", q, k, precision=hp) / math.sqrt(K)
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        o = jnp.einsum("bhts,bshk->bthk", p, v, precision=hp).reshape(B, T, H * K)
        x = x + jnp.matmul(o, w["wo"][l].reshape(H * K, D), precision=hp)
        h = rms(x, w["mlp_norm"][l])
        x = x + jnp.matmul(jax.nn.silu(h @ w["w_gate"][l]) * (h @ w["w_up"][l]), w["w_down"][l], precision=hp)
    return jnp.matmul(rms(x, w["norm_f"]), w["unembed"], precision=hp)


def loss_of(logits):
    target = jnp.sin(jnp.arange(logits.size, dtype=jnp.float32)).reshape(logits.shape)
    return jnp.sum(jax.nn.log_softmax(logits, axis=-1) * target)


@pytest.fixture(scope="module")
def program():
    return einpart.compile(spec_path("llama"), mesh="2x4", sizes=SIZES, hardware="tpu-v4", plan="simple")


def assert_grads_match(got, want):
    assert set(got) == set(want)
    for name in want:
        g, w = np.asarray(got[name]), np.asarray(want[name])
        scale = max(float(np.abs(w).max()), 1e-3)
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("plan,pipeline", [
    ("random", None), ("shard", "defer-norm"), pytest.param("simple", None, marks=pytest.mark.slow)])
def test_grad_through_sharded_prefill_matches_plain_jax(plan, pipeline):
    """8 devices. random (seed 1): every collective kind, a cross-shard max in the softmax among
    them; shard: the ILP's plan after defer-norm (gains folded into prepared weights, so the
    gradient reaches them through prepare); simple: Megatron-style."""
    program = einpart.compile(spec_path("llama"), mesh="2x4", sizes=SIZES, hardware="tpu-v4", plan=plan,
                              pipeline=pipeline, seed=1)
    assert len(program.mesh.devices.flat) == 8
    weights = program.weights()
    plain = {n: jnp.asarray(np.asarray(a)) for n, a in weights.items()}
    want = jax.jit(jax.grad(lambda w: loss_of(llama_logits(w, TOKENS))))(plain)
    got = jax.jit(jax.grad(lambda w: loss_of(program.prefill(TOKENS, params=w)[0])))(weights)
    assert_grads_match(got, want)
    assert float(np.abs(np.asarray(got["wq"])).max()) > 0     # not a vacuous match


def test_grad_through_prefill_then_decode_via_the_cache(program):
    """The cache written by prefill carries the gradient into decode: decode's logits at position 3
    are the plain model's last logits over 4 tokens."""
    weights = program.weights()
    plain = {n: jnp.asarray(np.asarray(a)) for n, a in weights.items()}

    def through_cache(w):
        _, cache = program.prefill(TOKENS[:, :3], params=w)
        logits, _ = program.decode(TOKENS[:, 3], cache, 3, params=w)
        return loss_of(logits)
    want = jax.jit(jax.grad(lambda w: loss_of(llama_logits(w, TOKENS)[:, 3:])))(plain)
    assert_grads_match(jax.jit(jax.grad(through_cache))(weights), want)


def test_source_uses_a_differentiable_cross_shard_max():
    random = einpart.compile(spec_path("llama"), mesh="2x4", sizes=SIZES, plan="random", seed=1)
    src = random.source
    assert "jax.shard_map" in src and "def prefill(" in src
    assert "= pmax(" in src and "@pmax.defjvp" in src and "lax.pmax(x, axis_name)" in src


def test_prefill_decode_match_the_reference_interpreter(program):
    weights = program.weights()
    ref = Reference(program.executable.spec_graph, {n: np.asarray(a) for n, a in weights.items()})
    want, state = ref.step(TOKENS[:, :3], 0, ref.new_state(2))
    logits, cache = jax.jit(lambda t, w: program.prefill(t, params=w))(TOKENS[:, :3], weights)
    assert logits.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-5)
    default, _ = program.prefill(TOKENS[:, :3])            # the program's own (prepared) weights
    np.testing.assert_allclose(np.asarray(default), want, rtol=1e-4, atol=1e-5)
    want2, _ = ref.step(np.array([[5], [9]]), 3, state)
    got2, _ = jax.jit(lambda c, w: program.decode(jnp.array([5, 9]), c, 3, params=w))(cache, weights)
    np.testing.assert_allclose(np.asarray(got2), want2, rtol=1e-4, atol=1e-5)


def test_vmap_over_prompts(program):
    prompts = jnp.stack([TOKENS, (TOKENS + 1) % 64])
    batched = jax.jit(jax.vmap(lambda t: program.prefill(t)[0]))(prompts)
    for k in range(2):
        one, _ = program.prefill(np.asarray(prompts[k]))
        np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(one), rtol=1e-5, atol=1e-6)


def test_param_shardings_place_user_weights(program):
    shardings = program.param_shardings
    assert set(shardings) == {d.name for d, _ in program.graph.all_decls() if d.kind == "param"}
    rng = np.random.default_rng(3)
    shapes = {n: a.shape for n, a in program.weights().items()}
    mine = {n: jax.device_put(rng.normal(0, 0.1, shapes[n]).astype(np.float32), s) for n, s in shardings.items()}
    assert all(mine[n].sharding == shardings[n] for n in mine)
    assert any(len(s.spec) for s in shardings.values())           # the plan splits some weights
    ref = Reference(program.executable.spec_graph, {n: np.asarray(a) for n, a in mine.items()})
    want, _ = ref.step(TOKENS, 0, ref.new_state(2))
    got, _ = program.prefill(TOKENS, params=mine)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_generate_is_greedy_on_the_reference(program, capsys):
    tokens = program.generate(TOKENS[:, :3], 3)
    assert capsys.readouterr().err == ""          # not a terminal: no progress text
    ref = Reference(program.executable.spec_graph, {n: np.asarray(a) for n, a in program.weights().items()})
    np.testing.assert_array_equal(tokens, ref.generate(TOKENS[:, :3], 3)[0])


def test_spec_as_text_path_or_graph_give_one_program():
    text = spec_path("llama").read_text()
    graph = einpart.parse(text, sizes=SIZES)
    a = einpart.compile(text, mesh="2x4", sizes=SIZES, plan="simple")
    b = einpart.compile(str(spec_path("llama")), mesh={"x": 2, "y": 4}, sizes=SIZES, plan="simple")
    c = einpart.compile(graph, mesh="x=2,y=4", plan="simple")
    assert a.source == b.source == c.source
    assert [r.name for r in c.records] == ["plan{mesh=x=2,y=4}"]


def test_plan_reports_layouts_costs_and_explains():
    program = einpart.compile(spec_path("llama"), mesh="2x4", sizes=SIZES, hardware="tpu-v4", batch=4)
    assert program.executable.batch == 4
    p = program.plan
    assert set(p.costs) == {"prefill", "decode"} and p.costs["decode"].step_s > 0
    assert set(p.layouts) >= {"wq", "k_cache", "embed"}
    assert "q" in p.splits["decode"] and str(p).startswith("plan on mesh x=2, y=4, priced on tpu-v4")
    from einpart.passes.shard.explain import explain
    text = p.explain()
    assert text == explain(program.graph, "tpu-v4", "both", batch=4, memory_limit=0.0).text()
    assert "weight wq: " in text and "runner-up" in text


@pytest.mark.parametrize("call,message", [
    (lambda: einpart.compile(spec_path("llama"), mesh="2x4", plan="ilp"),
     "plan must be one of shard, simple, random, replicated, got 'ilp'"),
    (lambda: einpart.compile(3, mesh="2x4"), "spec must be spec text, a path or a Graph, got int"),
    (lambda: einpart.compile("missing.ein", mesh="2x4"), "missing.ein: error: cannot read spec: No such file or directory"),
])
def test_bad_arguments(call, message):
    with pytest.raises(einpart.EinpartError) as e:
        call()
    assert str(e.value) == message


def test_explain_needs_the_shard_planner(program):
    with pytest.raises(einpart.EinpartError) as e:
        program.plan.explain()
    assert str(e.value) == ("explain needs a plan of the shard planner (compile with plan='shard'); "
                            "the built-in plans follow a rule, not costs")
    assert program.plan.hardware == "tpu-v4" and program.plan.costs["prefill"].comm_s > 0


def test_bad_params_and_tokens(program):
    weights = program.weights()
    del weights["wq"]
    with pytest.raises(einpart.EinpartError, match="params: missing weights wq "):
        program.prefill(TOKENS, params=weights)
    with pytest.raises(einpart.EinpartError, match=r"prompt must be integer token ids, got float32"):
        program.prefill(np.zeros((2, 3), np.float32))
    with pytest.raises(einpart.EinpartError, match="token id 64 is out of range for the vocabulary of 64"):
        program.prefill(np.full((2, 3), 64, np.int32))
