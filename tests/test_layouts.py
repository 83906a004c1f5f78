"""Forced layouts (einpart.passes.shard.forced): Pope et al.'s ws1d, ws2d, wg and dp
as constraints on the shard planner.

Each forced plan has its layout's shape, is priced by the same cost model (so the
unforced plan, optimal over a superset, is never predicted slower), says clearly
when it cannot apply, and lowers unchanged: on 8 simulated CPU devices (set in
conftest.py) it computes what the reference interpreter computes.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math

import numpy as np
import pytest

from conftest import spec_path
import einpart.codegen  # noqa: F401  (registers the plan pass)
from einpart.errors import EinpartError, PlanError
from einpart.ir import graph as g
from einpart.ir import layout as lay
from einpart.ir.analysis import param_only
from einpart.ir.model import Reference, init_params
from einpart.ir.parser import parse, parse_file
from einpart.ir.printer import format_graph
from einpart.passes import run_pipeline
from einpart.passes.shard import plan, specialize
from einpart.passes.shard.forced import KINDS, LayoutNotApplicable, describe, plan_forced

# tiny sizes every layout applies to on 8 devices (batch 8, heads and widths divisible)
TINY = {"llama": dict(D=64, F=128, H=16, G=8, K=16, L=2, V=256, B=8, S=16, T=8),
        "palm": dict(D=64, F=256, H=8, K=16, L=2, V=256, B=8, S=16, T=8)}
LLAMA_8B = dict(D=4096, F=14336, H=32, G=8, K=128, L=32, V=128256)
LLAMA_70B = dict(D=8192, F=28672, H=64, G=8, K=128, L=80, V=128256)
FFN = ("w_gate", "w_up", "w_down")


@functools.lru_cache(maxsize=None)
def tiny(name: str, pipeline: str = ""):
    graph = parse_file(spec_path(name), TINY[name])
    return run_pipeline(graph, pipeline).graph if pipeline else graph


@functools.lru_cache(maxsize=None)
def llama(sizes: tuple, pipeline: str = "cast{dtype=bf16}"):
    return run_pipeline(parse_file(spec_path("llama"), dict(sizes)), pipeline).graph


def layouts(p) -> dict:
    return {d.name: {i: a for i, a in lay.type_layout(d.type).items() if a} for d, _ in p.graph.all_decls()}


def devices(layout: dict, mesh) -> int:
    return math.prod(dict(mesh)[a] for axes in layout.values() for a in axes)


def collectives(p, phase: str, name: str) -> list[str]:
    return [d for d, _ in p.phases[phase].stmt(name).collectives]


# ------------------------------------------------------------ the shapes
def test_ws1d_splits_mlp_width_and_heads_over_all_chips():
    p = plan_forced(tiny("llama"), "ws1d", "2x4", "h200", "decode")
    lays = layouts(p)
    for w in FFN:
        assert set(lays[w]) == {"f"} and devices(lays[w], p.mesh) == 8, (w, lays[w])
    assert not lays["wq"].get("d") and devices(lays["wq"], p.mesh) == 8          # heads g, r over all 8
    assert lays["wk"] == {"g": ("x", "y")} and lays["wq"] == {"g": ("x", "y")}    # 8 kv heads over 8 chips
    for s in ("gate", "up", "mlp", "q", "attn"):
        assert not any("on w" in c for c in collectives(p, "decode", s)), s       # weights used where they lie
    assert p.stats["forced"]["kind"] == "ws1d"


def test_ws1d_partial_split_is_noted():
    """Heads a mesh cannot split are split as far as they divide, the rest replicated, and
    the note says so: 4 key-value heads split over y (4) of a 2x4 mesh; on x=8 not at all."""
    graph = parse_file(spec_path("llama"), dict(TINY["llama"], G=4, H=8))
    p = plan_forced(graph, "ws1d", "2x4", "h200", "decode")
    assert layouts(p)["wk"] == {"g": ("y",)} and layouts(p)["wq"] == {"g": ("y",), "r": ("x",)}
    assert p.stats["forced"]["notes"] == ["'wk' split 4 of 8 ways (g = 4)", "'wv' split 4 of 8 ways (g = 4)"]
    p = plan_forced(graph, "ws1d", "x=8", "h200", "decode")
    assert layouts(p)["wq"] == {} and layouts(p)["w_gate"] == {"f": ("x",)}
    assert "'wq' split 1 of 8 ways (g = 4 * r = 2)" in p.stats["forced"]["notes"]
    assert "split less than asked: 'wq' split 1 of 8 ways" in describe(p)


def test_ws2d_splits_width_and_mlp_over_disjoint_axes():
    p = plan_forced(tiny("palm"), "ws2d", "2x4", "h200", "decode")
    lays = layouts(p)
    for w in FFN:
        d, f = lays[w]["d"], lays[w]["f"]
        assert d and f and not set(d) & set(f) and set(d) | set(f) == {"x", "y"}, (w, lays[w])
    assert lays["wq"]["d"] == lays["w_gate"]["d"] and lays["wq"]["h"] == lays["w_gate"]["f"]
    variants = p.stats["forced"]["variants"]
    assert len(variants) == 2                                    # d over x, or d over y: the better kept
    assert p.objective == min(v["objective"] for v in variants)


def test_weight_gathered_stores_sharded_and_gathers_for_use():
    p = plan_forced(tiny("palm"), "wg", "2x4", "h200", "prefill")
    lays = layouts(p)
    for w, s in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "mlp"), ("wq", "q")):
        assert devices(lays[w], p.mesh) == 8, (w, lays[w])
        assert any(c.startswith("all_gather") and c.endswith(f"on {w}") for c in collectives(p, "prefill", s)), s
        assert lay.stmt_split(p.graph.stmt(s)) == {"b": ("x", "y")}


def test_data_parallel_replicates_weights_and_splits_the_batch():
    p = plan_forced(tiny("llama"), "dp", "2x4", "h200", "decode")
    lays = layouts(p)
    for w in FFN + ("wq", "wk", "wo", "embed", "unembed"):
        assert lays[w] == {}, (w, lays[w])
    for s in ("gate", "q", "logits"):
        assert lay.stmt_split(p.graph.stmt(s)) == {"b": ("x", "y")}
        assert not any("on w" in c for c in collectives(p, "decode", s))


def test_prepared_int8_weights_follow_the_layout():
    """int8's quantised matrices (computed from parameters alone) are weights too."""
    p = plan_forced(tiny("llama", "int8"), "ws1d", "2x4", "h200", "decode")
    for s in ("w_gate_i8", "w_up_i8", "w_down_i8"):
        split = {i: a for i, a in lay.stmt_split(p.graph.stmt(s)).items() if a}
        assert set(split) == {"f"} and devices(split, p.mesh) == 8, (s, split)
    assert not any("on w_gate_i8" in c for c in collectives(p, "decode", "gate_raw"))


# ------------------------------------------------------------ same cost model
@pytest.mark.parametrize("mesh", ["x=8", "2x4"])
@pytest.mark.parametrize("phase,batch,prompt", [("decode", 16, 0), ("prefill", 8, 2048)])
def test_planner_is_never_predicted_slower_than_a_forced_layout(mesh, phase, batch, prompt):
    """Llama 8B (bf16) on 8 H200s: every forced plan is optimal in its family and
    costs at least the unforced optimum; each is priced like any plan (its
    objective is the re-priced annotated program)."""
    graph = llama(tuple(LLAMA_8B.items()))
    kw = dict(batch=batch, context=2048, prompt=prompt)
    base = plan(graph, mesh, "h200", phase, **kw)
    assert base.status == "optimal"
    seen = 0
    for kind in KINDS:
        try:
            p = plan_forced(graph, kind, mesh, "h200", phase, **kw)
        except LayoutNotApplicable:
            assert kind == "ws2d" and mesh == "x=8"
            continue
        seen += 1
        assert p.status == "optimal"
        assert p.objective == pytest.approx(p.stats["objective_repriced"], rel=1e-6)
        assert base.phases[phase].step_s <= p.phases[phase].step_s * (1 + 1e-9), kind
    assert seen == (3 if mesh == "x=8" else 4)


def test_a_forced_layout_the_planner_would_pick_costs_the_same():
    """Decode of Llama 70B at batch 1 on x=8: the planner's FFN is 1D weight-stationary,
    and the forced ws1d plan is predicted within 1% of it."""
    graph = llama(tuple(LLAMA_70B.items()))
    base = plan(graph, "x=8", "h200", "decode", batch=1, context=2048)
    for w in FFN:
        assert set(layouts(base)[w]) == {"f"}
    forced = plan_forced(graph, "ws1d", "x=8", "h200", "decode", batch=1, context=2048)
    assert forced.phases["decode"].step_s == pytest.approx(base.phases["decode"].step_s, rel=0.01)


PALM_WIDE = dict(D=4096, F=16384, H=16, K=256, L=2, V=1024, S=2048)    # PaLM 8B's layer, 2 layers


@pytest.mark.parametrize("pipeline", ["", "int8"])
def test_palm_decode_sees_the_merged_attention_and_mlp_psum(pipeline):
    """PaLM's parallel block on x=8 H200s, decode at batch 1: under ws1d codegen
    runs the attention and MLP partial sums as one psum (layout.collective_groups).
    The planner credits that merge (layout.branch_partners), so its plan is
    predicted no slower than forced ws1d, both priced by report.price_graph; before,
    it priced each psum alone and replicated wq (272.9 us against ws1d's 244.9 us).
    Its objective is the merged program's price."""
    graph = parse_file(spec_path("palm"), PALM_WIDE)
    graph = run_pipeline(graph, pipeline).graph if pipeline else graph
    base = plan(graph, "x=8", "h200", "decode", batch=1, context=2048)
    forced = plan_forced(graph, "ws1d", "x=8", "h200", "decode", batch=1, context=2048)
    assert base.status == "optimal"
    assert base.phases["decode"].step_s <= forced.phases["decode"].step_s * (1 + 1e-9)
    assert base.objective == pytest.approx(base.stats["objective_merged"], rel=1e-6)
    assert base.objective == pytest.approx(base.stats["objective_repriced"], rel=1e-6)
    members = ("mlp_raw", "attn_raw") if pipeline else ("attn", "mlp")      # in block order
    for name in members:
        assert f"psum(x) on ({', '.join(members)})" in collectives(base, "decode", name)


def test_branch_partners_are_the_parallel_blocks_attention_and_mlp():
    """Only reductions over different indices that meet through elementwise
    statements: PaLM's attention and MLP outputs (after int8, their raw products),
    nothing in Llama's sequential block."""
    def pairs(name, pipeline=""):
        graph = tiny(name, pipeline)
        body = next(s for s in graph.body.stmts if isinstance(s.op, g.Repeat)).op.body
        return lay.branch_partners(body.stmts, param_only(graph))
    assert pairs("palm") == [("attn", "mlp")]
    assert pairs("palm", "int8") == [("mlp_raw", "attn_raw")]
    assert pairs("llama") == pairs("llama", "int8") == []


# ------------------------------------------------------------ where a layout does not apply
def test_not_applicable_says_why():
    with pytest.raises(LayoutNotApplicable) as e:
        plan_forced(tiny("llama"), "ws2d", "x=8", "h200", "decode")
    assert str(e.value) == ("ws2d (2D weight-stationary) splits d over some mesh axes and the other weight "
                            "indices over the rest: mesh x=8 has 1 axis of size > 1 (use e.g. 2x4 for 8 devices)")
    for kind in ("wg", "dp"):
        with pytest.raises(LayoutNotApplicable) as e:
            plan_forced(tiny("llama"), kind, "2x4", "h200", "decode", batch=1)
        assert str(e.value) == (f"{kind} ({KINDS[kind]}) splits the batch over all 8 devices of mesh x=2,y=4: "
                                f"batch b = 1 (decode) does not divide")
    with pytest.raises(LayoutNotApplicable) as e:
        plan_forced(tiny("llama"), "ws1d", "x=3", "h200", "decode")
    assert str(e.value).startswith("ws1d (1D weight-stationary) on mesh x=3: 100% of the weight bytes cannot "
                                   "split as it asks: 'embed' split 1 of 3 ways (v = 256)")
    with pytest.raises(EinpartError, match="force: layout must be one of ws1d, ws2d, wg, dp, got 'tp'"):
        plan_forced(tiny("llama"), "tp", "2x4")


def test_data_parallel_70b_does_not_fit():
    with pytest.raises(PlanError) as e:
        plan_forced(llama(tuple(LLAMA_70B.items())), "dp", "2x4", "h200", "decode", batch=16, context=2048)
    msg = str(e.value)
    assert msg.startswith("dp (data-parallel) has no plan on mesh x=2,y=4: data-parallel: weights 141 GB")
    assert "> 141 GB HBM on h200 with 8 chips" in msg and "\n" not in msg


# ------------------------------------------------------------ passes and CLI
def test_shard_force_and_plan_kind_in_a_pipeline():
    out = run_pipeline(tiny("palm"), "shard{mesh=2x4,force=ws2d,phase=decode}").graph   # dumps re-parse
    assert parse(format_graph(out)) == out
    d, f = (lay.type_layout(out.decl("w_up").type)[i] for i in ("d", "f"))
    assert d and f and not set(d) & set(f)
    out = run_pipeline(tiny("palm"), "plan{mesh=x=8,kind=ws1d}").graph
    assert lay.type_layout(out.decl("w_up").type) == {"d": (), "f": ("x",)}
    with pytest.raises(EinpartError, match="kind must be one of simple, random, replicated, ws1d, ws2d, wg, dp"):
        run_pipeline(tiny("palm"), "plan{mesh=x=8,kind=tp}")


def test_cli_plan_force(capsys):
    import einpart.cli as cli
    argv = ["plan", str(spec_path("palm")), "--mesh", "2x4", "--hardware", "h200", "--phase", "decode",
            "--batch", "8", "--force", "ws2d"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "forced layout: ws2d (2D weight-stationary), d over (" in out and "best of 2 axis partitions" in out
    assert "per decode step" in out
    assert cli.main(argv[:-2] + ["--force", "wg", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["forced"]["kind"] == "wg"
    argv[argv.index("--batch") + 1] = "1"
    assert cli.main(argv[:-2] + ["--force", "dp"]) == 1
    err = capsys.readouterr().err
    assert err.strip().endswith("dp (data-parallel) splits the batch over all 8 devices of mesh x=2,y=4: "
                                "batch b = 1 (decode) does not divide") and err.count("\n") == 1


# ------------------------------------------------------------ lowering: equal to the interpreter
def run_against_reference(name: str, kind: str, mesh: str, pipeline: str = ""):
    from einpart.runtime import Executable
    graph = tiny(name, pipeline)
    p = plan(graph, mesh, "cpu", "both") if kind == "planner" else plan_forced(graph, kind, mesh, "cpu", "both")
    params = {k: v * 4 for k, v in init_params(graph, 3).items()}    # peaked attention
    ref = Reference(graph, params)
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 256, (8, 6)).astype(np.int32)
    nxt = rng.integers(0, 256, (8, 2)).astype(np.int32)
    ex = Executable(p.graph, weights=params)
    want, state = ref.step(prompt, 0, ref.new_state(8))
    got = [ex.prefill(prompt)]
    wants = [want]
    for i in range(nxt.shape[1]):
        want, state = ref.step(nxt[:, i:i + 1], 6 + i, state)
        wants.append(want)
        got.append(ex.decode(nxt[:, i], 6 + i))
    # int8: XLA's and numpy's quantisation of a weight can round one element differently (x / scale
    # near .5): on palm that moves logits ~5e-4 of their scale on one device with no plan at all
    tol = 1e-3 if "int8" in pipeline else 1e-5
    for k, (a, b) in enumerate(zip(got, wants)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=10 * tol, atol=tol * scale, err_msg=f"{name} {kind} step {k}")
    return p


@pytest.mark.parametrize("name,kind", [("llama", "ws2d"), ("palm", "wg")])
def test_forced_plans_equal_the_interpreter(name, kind):
    """Both phases planned together (one weight and cache layout) and lowered unchanged."""
    p = run_against_reference(name, kind, "2x4")
    assert p.stats["forced"]["kind"] == kind
    assert specialize(p.graph, "decode") != specialize(p.graph, "prefill")


SLOW = [(n, k, m, pipe) for n in TINY for k in ("planner",) + tuple(KINDS)
        for m, pipe in (("x=8", ""), ("2x4", ""), ("2x2x2", ""), ("2x4", "int8")) if not (k == "ws2d" and m == "x=8")]


@pytest.mark.slow
@pytest.mark.parametrize("name,kind,mesh,pipeline", SLOW, ids=[f"{n}-{k}-{m}-{p or 'f32'}" for n, k, m, p in SLOW])
def test_every_forced_plan_equals_the_interpreter(name, kind, mesh, pipeline):
    run_against_reference(name, kind, mesh, pipeline)


# ------------------------------------------------------------ the benchmark's statistics
def _bench():
    spec = importlib.util.spec_from_file_location("bench_layouts", spec_path("llama").parents[1] / "benchmarks" / "layouts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_spearman_and_summary():
    b = _bench()
    assert b.ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert b.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert b.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert b.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert b.spearman([1, 2], [1, 2]) is None
    rows = [dict(group="p", model="llama", size="8b", dtype="bf16", point="decode b=1", mesh="2x4", layout=k,
                 applies=True, predicted_s=t, measured_s=m)
            for k, t, m in (("planner", 1.0, 1.01), ("ws1d", 1.1, 1.0), ("ws2d", 2.0, 1.5), ("wg", 9.0, 9.0))]
    rows.append(dict(rows[0], layout="dp", applies=False, why="no", predicted_s=None, measured_s=None))
    s, = b.summarise(rows, 0.03)
    assert (s["measured_winner"], s["planner_won"], s["predicted_winner"]) == ("ws1d", True, "planner")
    assert s["spearman"] == pytest.approx(0.8) and s["layouts_measured"] == 4
    md = b.markdown(rows, [s], True, "t")
    assert "| llama 8B | bf16 | decode b=1 | 2x4 | 1.01e+03 (1e+03) |" in md and "| n/a | ws1d | yes | 0.80 |" in md
    json.dumps(s)
