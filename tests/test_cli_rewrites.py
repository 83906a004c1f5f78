"""The rewrites from the command line: `--int8` and `--kv-groups G` on plan,
compile and run put their passes in place (multiquery first, int8 last before
planning); `--pipeline` takes the rewrites in any sensible order; a rewrite
that cannot apply is one message on stderr and exit status 1."""
from __future__ import annotations

import json

import pytest

from conftest import spec_path
from einpart.cli import main
from einpart.errors import EinpartError
from einpart.passes.rewrite_util import planning_pass_last, with_rewrites

TINY = """size B = 2, T = 4, S = 8, V = 16, D = 8
index b: B, t: T, s: S, v: V, d: D
input tokens[b, t] : i32
param embed[v, d]
x[b, t, d] = take(embed[v, d], tokens[b, t])
logits[b, t, v] = x[b, t, d] * embed[v, d]
output logits
"""
NO_MATMUL = ("pass 'int8' failed (passes run before it: nothing): int8: the spec has no matmul weights to quantise "
             "(a matmul weight is a float parameter contracted with activations; embeddings read by take() and "
             "1-D gains are left alone)\n")
BAD_GROUPS = ("pass 'multiquery' failed (passes run before it: nothing): multiquery{groups=3}: 3 does not divide "
              "8 heads\n")


@pytest.mark.parametrize("pipeline,int8,groups,want", [
    (None, True, None, "int8"),
    (None, False, 1, "multiquery{groups=1}"),
    ("defer-norm", True, 1, "multiquery{groups=1},defer-norm,int8"),
    ("defer-norm,cast{dtype=bf16,what=(param)}", True, None, "defer-norm,cast{dtype=bf16,what=(param)},int8"),
    ("defer-norm,shard{mesh=(x=2,y=4)}", True, 2, "multiquery{groups=2},defer-norm,int8,shard{mesh=(x=2,y=4)}"),
    ("dce", False, None, "dce"),
])
def test_flags_go_in_their_place(pipeline, int8, groups, want):
    assert with_rewrites(pipeline, int8, groups) == want


def test_flags_and_pipeline_disagree():
    with pytest.raises(EinpartError) as e:
        with_rewrites("int8,defer-norm", True)
    assert str(e.value) == "--int8: the pipeline already has an int8 pass"
    with pytest.raises(EinpartError) as e:
        with_rewrites("multiquery{groups=2}", False, 1)
    assert str(e.value) == "--kv-groups: the pipeline already has a multiquery pass"
    with pytest.raises(EinpartError) as e:
        planning_pass_last("shard{mesh=2},int8")
    assert str(e.value) == "pipeline 'shard{mesh=2},int8': the planning pass (shard) must come last"


@pytest.mark.parametrize("pipeline,dumps", [
    ("int8,defer-norm", ["int8", "defer-norm", "plan"]),                 # (--plan simple: fast)
    ("defer-norm,int8", ["defer-norm", "int8", "plan"]),
    ("multiquery{groups=1},defer-norm", ["multiquery", "defer-norm", "plan"]),
    ("defer-norm,multiquery{groups=1},int8,shard{mesh=(x=2,y=4),time_limit=5}", ["defer-norm", "multiquery", "int8",
                                                                                  "shard"]),
])
def test_compile_takes_rewrites_in_any_order(tmp_path, capsys, pipeline, dumps):
    out = tmp_path / "out"
    plan = ["--plan", "simple"] if dumps[-1] == "plan" else []
    assert main(["compile", "llama", "--mesh", "2x4", "--pipeline", pipeline, "--out", str(out), *plan]) == 0, \
        capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    want = ["00-input"] + [f"{k + 1:02d}-{d}" for k, d in enumerate(dumps)]
    assert [n.split(".")[0].split("{")[0] for n in names[:-2]] == want
    assert names[-2:] == [f"{len(dumps) + 1:02d}-lower.py", "plan.json"]
    plan = json.loads((out / "plan.json").read_text())
    if "int8" in dumps:      # the steps read int8 weights in one layout for both programs
        pre, dec = (plan["programs"][p]["statements"]["w_down_i8"] for p in ("prefill", "decode"))
        assert pre["dtype"] == dec["dtype"] == "i8" and pre["layout"] == dec["layout"]


def test_compile_flags(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", "llama", "--mesh", "2x4", "--int8", "--kv-groups", "1", "--pipeline", "defer-norm",
                 "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names[:5] == ["00-input.ein", "01-multiquery.ein", "02-defer-norm.ein", "03-int8.ein", "04-shard.ein"]
    pooled = (out / "01-multiquery.ein").read_text()       # llama has G already: the groups are G2 = 1
    assert "G2 = 1" in pooled and "state k_cache[b, g2, s, k]" in pooled


def test_run_flags_check_against_the_reference(capsys):
    code = main(["run", "llama", "--mesh", "x=2,y=2", "--prompt-len", "4", "--max-new", "2", "--int8",
                 "--kv-groups", "1", "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().endswith("ok")


def test_plan_flags_pool_the_cache_and_prepare_int8(capsys):
    base = ["plan", "llama", "--mesh", "2x4", "--phase", "decode", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["phases"]["decode"]
    assert main(base + ["--int8", "--kv-groups", "1", "--memory-limit", "inf"]) == 0
    rew = json.loads(capsys.readouterr().out)["phases"]["decode"]
    assert rew["memory_per_device"]["kv_cache"] < plain["memory_per_device"]["kv_cache"]
    assert plain["prepared"] == [] and {"w_down_i8", "wk_pool_i8"} <= set(rew["prepared"])
    steps = {s["name"] for s in rew["statements"]}
    assert not steps & set(rew["prepared"])     # preparation is not priced per step


@pytest.mark.parametrize("command", [["plan"], ["compile", "--out", "OUT"],
                                     ["run", "--prompt-len", "2", "--max-new", "1"]])
def test_bad_rewrite_requests_are_one_message(tmp_path, capsys, command):
    spec = tmp_path / "tiny.ein"
    spec.write_text(TINY)
    rest = [str(tmp_path / "o") if a == "OUT" else a for a in command[1:]]
    assert main([command[0], str(spec), "--mesh", "2", "--int8", *rest]) == 1
    assert capsys.readouterr().err == NO_MATMUL
    assert main([command[0], str(spec_path("gpt2")), "--set", "H=8", "--mesh", "2", "--kv-groups", "3", *rest]) == 1
    assert capsys.readouterr().err == BAD_GROUPS
