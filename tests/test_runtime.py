"""The runtime: bad input, weights files, sampling, bf16, the CLI, and a
multi-process run (2 processes x 4 CPU devices) giving one process's tokens.

8 simulated CPU devices, set in tests/conftest.py before JAX starts."""
from __future__ import annotations

import os

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import spec_path  # noqa: E402
from einpart.cli_run import main as cli_main  # noqa: E402
from einpart.cli_run import plan_graph  # noqa: E402
from einpart.codegen import set_plan, simple_plan  # noqa: E402
from einpart.errors import EinpartError  # noqa: E402
from einpart.ir import parse, parse_file  # noqa: E402
from einpart.ir.model import Reference, init_params  # noqa: E402
from einpart.runtime import Executable, save_safetensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = """
size B = 2, T = 4, S = 8, V = 16, D = 8, E = 4
index b: B, t: T, s: S, v: V, d: D, e: E
input tokens[b, t] : i32
param emb[v, d]
param w1[d, e]
param out[e, v]
state cache[b, s, e]
h[b, t, d] = take(emb[v, d], tokens[b, t])
k[b, t, e] = h[b, t, d] * w1[d, e]
kc[b, s, e] = write(cache[b, s, e], k[b, t, e])
sc[b, t, s] = k[b, t, e] * kc[b, s, e]
a[b, t, s] = sc[b, t, s] + causal(t, s)
m[b, t] = max(a[b, t, s])
p[b, t, s] = exp(a[b, t, s] - m[b, t])
o[b, t, e] = p[b, t, s] * kc[b, s, e]
logits[b, t, v] = o[b, t, e] * out[e, v]
output logits
"""


def tiny():
    return parse(TINY, "tiny.ein")


# ------------------------------------------------------------------ bad input
def test_weights_file_names_every_offender(tmp_path):
    graph = tiny()
    good = init_params(graph, 0)
    bad = {"emb": good["emb"][:, :4].copy(), "out": good["out"].astype(np.float16),
           "bias": np.zeros(3, np.float32)}
    path = tmp_path / "w.safetensors"
    save_safetensors(bad, path)
    with pytest.raises(EinpartError) as e:
        Executable(simple_plan(graph, {"x": 2}), weights=str(path), compile=False)
    assert str(e.value) == (
        f"weights file {path} do not match the spec (4 problems):\n"
        "  missing tensor 'w1': expected shape (8, 4) f32\n"
        "  unexpected tensor 'bias' (shape (3,) f32): the spec has no such parameter\n"
        "  tensor 'emb' has shape (16, 4), expected shape (16, 8)\n"
        "  tensor 'out' has dtype f16, expected f32 (shape (4, 16))")


def test_weights_from_safetensors_equal_random_init(tmp_path):
    graph = tiny()
    path = tmp_path / "w.safetensors"
    save_safetensors(init_params(graph, 5), path)
    prompt = np.arange(6, dtype=np.int32).reshape(2, 3)
    a = Executable(simple_plan(graph, {"x": 2}), weights=str(path)).prefill(prompt)
    b = Executable(simple_plan(graph, {"x": 2}), seed=5).prefill(prompt)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(EinpartError, match="no such weights file"):
        Executable(simple_plan(graph, {"x": 2}), weights=str(tmp_path / "nope.safetensors"), compile=False)


def test_weights_file_in_stored_axes_after_multiquery(tmp_path):
    """multiquery re-declares the key/value weights (`stored_as`): a weights file written for
    the original spec loads, and is reshaped into the declared axes."""
    from einpart.passes import run_pipeline
    graph = parse_file(spec_path("gpt2"))
    rewritten = run_pipeline(graph, "multiquery{groups=2}").graph
    path = tmp_path / "gpt2.safetensors"
    params = init_params(graph, 4)
    save_safetensors(params, path)
    planned = simple_plan(rewritten, {"x": 2})
    prompt = np.arange(10, dtype=np.int32).reshape(2, 5)
    got = Executable(planned, weights=str(path)).prefill(prompt)
    from einpart.passes.multiquery import transform_params
    ref = Reference(rewritten, transform_params(rewritten, params))
    want, _ = ref.step(prompt, 0, ref.new_state(2))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prompt_longer_than_context_fails_before_compiling():
    ex = Executable(simple_plan(tiny(), {"x": 2}), compile=False)
    with pytest.raises(EinpartError, match=r"the prompt has 9 tokens, longer than the context of 8 positions "
                                           r"\(the KV cache length; raise it with --set S=...\)"):
        ex.generate(np.zeros((2, 9), np.int32), 1)
    with pytest.raises(EinpartError, match="the prompt \\(6 tokens\\) plus 4 new tokens needs 9 cached positions, "
                                           "more than the context of 8"):
        ex.generate(np.zeros((2, 6), np.int32), 4)
    with pytest.raises(EinpartError, match="longer than the context"):
        Executable(simple_plan(tiny(), {"x": 2}), prefill_len=9, compile=False)
    assert ex._compiled == {}


def test_batch_the_mesh_cannot_split_fails_before_compiling():
    planned = set_plan(tiny(), {"x": 2}, layouts={"tokens": {"b": "x"}, "cache": {"b": "x"}})
    ex = Executable(planned, compile=False)
    with pytest.raises(EinpartError, match=r"cannot run batch 3 x 4 positions on mesh x=2: 'tokens': index b of "
                                           r"size 3 cannot be split 2 ways over mesh axes x"):
        ex.generate(np.zeros((3, 2), np.int32), 2)
    assert ex._compiled == {}


def test_mesh_larger_than_the_devices():
    with pytest.raises(EinpartError) as e:
        Executable(simple_plan(tiny(), {"x": 4, "y": 4}), compile=False)
    msg = str(e.value)
    assert "the mesh x=4, y=4 needs 16 devices, but only 8 cpu devices exist" in msg
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in msg


def test_bad_tokens_and_decode_order():
    ex = Executable(simple_plan(tiny(), {"x": 2}), compile=False)
    with pytest.raises(EinpartError, match="token id 16 is out of range for the vocabulary of 16"):
        ex.prefill(np.full((2, 3), 16, np.int32))
    with pytest.raises(EinpartError, match="must have two axes"):
        ex.prefill(np.zeros(3, np.int32))
    with pytest.raises(EinpartError, match="decode before prefill"):
        ex.decode(np.zeros(2, np.int32), 3)


# ------------------------------------------------------------------ generation
def test_generate_greedy_sampling_and_reference():
    graph = tiny()
    ex = Executable(simple_plan(graph, {"x": 2}), seed=1)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    ref_tokens, _ = Reference(graph, init_params(graph, 1)).generate(prompt, 4)
    np.testing.assert_array_equal(ex.generate(prompt, 4), ref_tokens)
    a = ex.generate(prompt, 4, temperature=1.0, top_k=5, seed=3)
    b = ex.generate(prompt, 4, temperature=1.0, top_k=5, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ex.generate(prompt, 4, temperature=0.7, top_k=1, seed=9), ref_tokens)
    assert ex.timing.new_tokens == 16 and ex.timing.tokens_per_s > 0


def test_longer_prompt_compiles_a_longer_prefill():
    graph = tiny()
    ex = Executable(simple_plan(graph, {"x": 2}), seed=2)
    prompt = np.arange(12, dtype=np.int32).reshape(2, 6) % 16        # longer than T=4, within S=8
    ref = Reference(graph, init_params(graph, 2))
    want, _ = ref.step(prompt, 0, ref.new_state(2))
    np.testing.assert_allclose(ex.prefill(prompt), want, rtol=1e-4, atol=1e-5)
    assert ("prefill", 2, 6) in ex._compiled
    # another batch: its own programs and cache
    prompt3 = np.arange(12, dtype=np.int32).reshape(4, 3)
    ref_tokens, _ = ref.generate(prompt3, 3)
    np.testing.assert_array_equal(ex.generate(prompt3, 3), ref_tokens)
    assert ("decode-loop", 4, 32, 0.0, None) in ex._compiled      # runtime/decode_loop.py
    np.testing.assert_array_equal(ex.generate(prompt3, 3, steps_per_call=1), ref_tokens)
    assert ("decode", 4, 1) in ex._compiled


@pytest.mark.parametrize("layers", ["scan", "unroll"])
def test_decode_loop_on_device_gives_the_host_loop_tokens(layers):
    """generate with several decode steps per compiled call (chunks of 32, of 2, and a
    last chunk shorter than the rest) gives the host loop's tokens, greedy and sampled,
    and leaves the cache and position where the host loop leaves them."""
    graph = tiny()
    ex = Executable(simple_plan(graph, {"x": 2}), seed=1, layers=layers)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    for options in ({}, {"temperature": 1.0, "top_k": 5, "seed": 3}, {"temperature": 0.8, "seed": 4}):
        want = ex.generate(prompt, 5, steps_per_call=1, **options)
        want_next = ex.decode(want[:, -1])
        for steps in (32, 2):
            np.testing.assert_array_equal(ex.generate(prompt, 5, steps_per_call=steps, **options), want)
            assert ex.pos == 3 + 4
            np.testing.assert_allclose(ex.decode(want[:, -1]), want_next, rtol=1e-5, atol=1e-6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(EinpartError, match=f"steps_per_call must be a positive integer, got {bad!r}"):
            ex.generate(prompt, 2, steps_per_call=bad)


def test_bf16_storage_matches_the_reference_at_bf16():
    from einpart.passes.basic import Cast
    from einpart.ir.verify import verify
    graph = parse_file(spec_path("llama"))
    ex = Executable(simple_plan(graph, {"x": 2, "y": 2}), dtype="bf16", seed=0)
    params = init_params(graph, 0)
    ref = Reference(verify(Cast(dtype="bf16").apply(graph)), params)
    prompt = np.random.default_rng(0).integers(0, 256, (2, 5)).astype(np.int32)
    want, _ = ref.step(prompt, 0, ref.new_state(2))
    got = ex.prefill(prompt)
    scale = float(np.abs(want).max())
    # bf16 products (activations rounded too), float32 accumulation: about bf16's epsilon of the scale
    assert float(np.abs(got - want).max()) <= 1e-2 * max(1.0, scale)
    src = ex.source()
    assert "jnp.bfloat16" in src and "preferred_element_type=F32" in src


# ------------------------------------------------------------------ CLI
def test_cli_compile_writes_dumps_module_and_plan(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["compile", str(spec_path("llama")), "--mesh", "2x4", "--plan", "simple",
                     "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-input.ein", "01-plan.ein", "02-lower.py", "plan.json"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["mesh"] == {"x": 2, "y": 4}
    assert plan["programs"]["decode"]["statements"]["mlp"]["collectives"] == ["psum(x,y)"]
    assert plan["programs"]["decode"]["sizes"]["T"] == 1 and plan["programs"]["prefill"]["sizes"]["T"] == 8
    assert plan["declarations"]["w_down"]["layout"] == {"f": ["x", "y"]}
    compile((out / "02-lower.py").read_text(), "02-lower.py", "exec")


def test_cli_compile_plans_with_the_ilp_by_default(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["compile", str(spec_path("palm")), "--mesh", "2x4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00-input.ein", "01-shard.ein", "02-lower.py", "plan.json"]
    dump = (out / "01-shard.ein").read_text()
    assert "mesh x = 2, y = 4" in dump and "split_decode=" in dump
    assert json.loads((out / "plan.json").read_text())["mesh"] == {"x": 2, "y": 4}


def test_cli_run_check(capsys):
    code = cli_main(["run", str(spec_path("palm")), "--mesh", "x=2,y=2", "--prompt-len", "5", "--max-new", "3",
                     "--check"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "sequence 0: prompt" in text and "tokens/s" in text
    assert "check: " in text and text.rstrip().endswith("ok")


def test_cli_errors_are_one_message(capsys):
    assert cli_main(["run", "llama", "--mesh", "4x4", "--prompt-len", "4", "--max-new", "2"]) == 1
    err = capsys.readouterr().err
    assert "needs 16 devices, but only 8 cpu devices exist" in err and "Traceback" not in err
    assert cli_main(["run", "llama", "--mesh", "2", "--prompt-len", "40", "--max-new", "2"]) == 1
    assert "the prompt has 40 tokens, longer than the context of 32 positions" in capsys.readouterr().err
    assert cli_main(["compile", "llama", "--mesh", "2xq", "--out", "/nonexistent"]) == 1


def test_demo(tmp_path, capsys):
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--max-new", "4"]) == 0
    text = capsys.readouterr().out
    assert f"dumps written to {tmp_path / 'demo'}" in text
    assert "checked against the reference interpreter" in text and "ok" in text
    assert (tmp_path / "demo" / "02-lower.py").is_file()


# ------------------------------------------------------------------ several processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_tokens_of_one():
    args = ["llama", "--mesh", "2x4", "--plan", "random", "--seed", "3", "--prompt-len", "5", "--max-new", "4"]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "einpart.runtime.multihost", *args,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--local-devices", "4"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["local_devices"] == 4 and r["devices"] == 8 for r in results)
    # one process, 8 devices, the same plan, weights and prompt
    graph = parse_file(spec_path("llama"))
    planned = plan_graph(graph, {"x": 2, "y": 4}, "random", 3).graph
    ex = Executable(planned, seed=3)
    prompt = np.random.default_rng(3).integers(0, ex.vocab, (ex.batch, 5), dtype=np.int32)
    tokens, history = ex.generate(prompt, 4, return_logits=True)
    for r in results:
        assert r["tokens"] == tokens.tolist()
        np.testing.assert_allclose(r["logits_sum"], [float(np.asarray(h, np.float64).sum()) for h in history],
                                   rtol=1e-5, atol=1e-4)
