"""The pass manager: pipelines from text, verification and dumps after every
pass, failures reported with the pass and what ran before it."""
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from einpart.errors import EinpartError, PassError
from einpart.ir import format_graph, graph as g, parse, parse_file
from einpart.ir.interpret import run_step
from einpart.ir.model import Reference, init_params
from einpart.passes import PASSES, Pass, parse_pipeline, register_pass, run_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_pipeline_text_builds_passes_with_options():
    passes = parse_pipeline("dce, cast{dtype=f16,what=(param)}")
    assert [p.name for p in passes] == ["dce", "cast"]
    assert passes[1].dtype == "f16" and passes[1].what == ("param",)
    assert passes[1].describe() == "cast{dtype=f16,what=(param)}"


@pytest.mark.parametrize("text,message", [
    ("nope", "unknown pass 'nope' (known: "),
    ("cast{size=3}", "pass 'cast' has no option 'size' (options: dtype, what)"),
    ("cast{dtype}", "pipeline item 'cast{dtype}': option 'dtype' needs a value (k=v)"),
    ("cast{dtype=bf16", "pipeline 'cast{dtype=bf16': unbalanced brackets or quotes"),
])
def test_bad_pipelines(text, message):
    with pytest.raises(EinpartError) as e:
        parse_pipeline(text)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("name", ["gpt2", "llama", "palm"])
def test_dumps_are_valid_spec_text_and_round_trip(tmp_path, name):
    graph = parse_file(EXAMPLES / f"{name}.ein")
    result = run_pipeline(graph, "dce,cast{dtype=f16}", dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-input.ein", "01-dce.ein", "02-cast.ein"]
    for f in files:
        text = (tmp_path / f).read_text()
        again = parse(text)
        assert format_graph(again) == text
    assert parse((tmp_path / "02-cast.ein").read_text()) == result.graph
    assert [r.name for r in result.records] == ["input", "dce", "cast{dtype=f16}"]
    assert all(r.seconds >= 0 for r in result.records)


def test_dce_removes_dead_statements_only():
    text = (EXAMPLES / "llama.ein").read_text().replace(
        "msf[b, t] =", "dead[b, t, d] = exp(xl[b, t, d])\nmsf[b, t] =")
    graph = parse(text)
    out = run_pipeline(graph, "dce").graph
    assert graph.stmt("dead") is not None and out.stmt("dead") is None
    assert out == parse_file(EXAMPLES / "llama.ein")


def test_cast_rounds_weights_like_a_device_would():
    graph = parse_file(EXAMPLES / "llama.ein")
    cast = run_pipeline(graph, "cast{dtype=bf16}").graph
    assert all(d.type.dtype == "bf16" for d, _ in cast.all_decls() if d.kind in ("param", "state"))
    params = init_params(graph, 0)
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    full = Reference(graph, params).step(tokens, 0, Reference(graph, params).new_state())[0]
    half = Reference(cast, params).step(tokens, 0, Reference(cast, params).new_state())[0]
    err = np.abs(full - half).max()
    assert 0 < err < 1e-2 * np.abs(full).max()


@register_pass("test-scale-output")
@dataclass(frozen=True)
class ScaleOutput(Pass):
    """A user's pass defined outside the package: multiply the logits by a factor."""
    factor: float = 2.0

    def apply(self, graph):
        out = graph.outputs[0]
        s = graph.stmt(out)
        scaled = replace(s, op=g.Compute(g.Binary("*", s.op.expr, g.Const(self.factor)), s.op.reduce))
        stmts = tuple(scaled if x.name == out else x for x in graph.body.stmts)
        return graph.with_body(replace(graph.body, stmts=stmts))


def test_user_pass_runs_by_name_and_is_verified_and_dumped(tmp_path):
    assert "test-scale-output" in PASSES
    graph = parse_file(EXAMPLES / "palm.ein")
    result = run_pipeline(graph, "dce,test-scale-output{factor=3}", dump_dir=tmp_path)
    assert (tmp_path / "02-test-scale-output.ein").exists()
    params = init_params(graph, 1)
    tokens = np.arange(6, dtype=np.int32).reshape(2, 3)
    state = Reference(graph, params).new_state()
    base = run_step(graph, params, {"tokens": tokens}, state)[0]["logits"]
    scaled = run_step(result.graph, params, {"tokens": tokens}, state)[0]["logits"]
    np.testing.assert_allclose(scaled, 3 * base, rtol=1e-5, atol=1e-7)


@register_pass("test-fails")
@dataclass(frozen=True)
class Fails(Pass):
    def apply(self, graph):
        raise EinpartError("nothing to do here")


@register_pass("test-breaks-ir")
@dataclass(frozen=True)
class BreaksIR(Pass):
    """Renames an output's operand to a tensor that does not exist."""

    def apply(self, graph):
        s = graph.body.stmts[-1]
        bad = replace(s, op=g.Compute(g.Ref("missing", ("b", "t", "d")), None))
        return graph.with_body(replace(graph.body, stmts=graph.body.stmts[:-1] + (bad,)))


def test_failing_pass_names_itself_and_what_ran_before():
    graph = parse_file(EXAMPLES / "palm.ein")
    with pytest.raises(PassError) as e:
        run_pipeline(graph, "dce,cast,test-fails")
    assert str(e.value) == "pass 'test-fails' failed (passes run before it: dce, cast): nothing to do here"


def test_pass_output_is_verified_and_errors_point_into_the_dump():
    graph = parse_file(EXAMPLES / "palm.ein")
    with pytest.raises(PassError) as e:
        run_pipeline(graph, "dce,test-breaks-ir")
    msg = str(e.value)
    assert msg.startswith("pass 'test-breaks-ir' produced IR that does not verify (passes run before it: dce):\n"
                          "02-test-breaks-ir.ein:")
    assert "error: unknown tensor 'missing'" in msg
