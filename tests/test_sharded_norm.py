"""Merged reductions (layout.collective_groups) and the sequence-sharded KV cache.

- the grouping rule on small specs: independent partial sums over the same
  mesh axes share one collective; a dependent one does not; the schedule
  never deadlocks (two groups each waiting for the other are refused);
- a plan that shards the normalised index d (every statement with d splits
  it over x=8): defer-norm cuts the collectives per layer of llama from 4 to
  2 and of palm from 3 to 1 (a norm's statistic joins the matmuls it
  scales); the generated source has exactly the collectives the report
  prices, and the llama program matches the reference interpreter;
- PaLM 540B, batch 1, context 32,768, 8 TPU v4 chips: the planner shards the
  KV cache over s; that plan, and a split-K (flash-decoding) plan whose
  softmax runs on s-shards (pmax of the local max, then one psum of the
  exp-sum and e . v together), run at small sizes on 8 simulated devices and
  match the reference over a prefill and several decode steps.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from conftest import spec_path
from einpart.codegen import census, generate_source, set_plan
from einpart.codegen.lower import program_graphs
from einpart.ir import graph as g
from einpart.ir import layout as lay
from einpart.ir import parse, parse_file
from einpart.ir.analysis import param_only
from einpart.ir.model import Reference
from einpart.ir.verify import index_sizes
from einpart.passes import run_pipeline
from einpart.passes.shard import plan
from einpart.passes.shard.report import price_graph
from test_codegen import assert_close, make_params

MESH8 = {"x": 8}


def groups_of(text: str, splits: dict, mesh=(("x", 8),)) -> list:
    graph = parse(text)
    planned = set_plan(graph, dict(mesh), splits=splits)
    types = planned.types()
    stmts = planned.body.stmts
    comms = {s.name: lay.plan_stmt(s, types, lay.stmt_split(s)) for s in stmts}
    return [gr.members for gr in lay.collective_groups(stmts, comms)], lay.merged_schedule(
        stmts, lay.collective_groups(stmts, comms))


RULE_SPEC = """
size B = 2, D = 16, F = 16
index b: B, d: D, f: F, e: F
input x[b, d]
param w[d, f]
param u[d, f]
param v[f, e]
ms[b] = mean(x[b, d] * x[b, d])
y[b, f] = x[b, d] * w[d, f]
r[b] = rsqrt(ms[b])
yr[b, f] = y[b, f] * r[b]
c[b, f] = x[b, d] * u[d, f] * r[b]
o[b, e] = yr[b, f] * v[f, e]
output o, c
"""


def test_independent_partial_sums_share_one_collective():
    d = {"d": "x"}
    got, order = groups_of(RULE_SPEC, {"ms": d, "y": d, "c": d, "o": {"f": "x"}})
    # c needs r = rsqrt(ms), so it cannot join ms and y; o (over f) needs yr, which
    # also waits for that group, and nothing of c: c and o share the next collective
    assert got == [("ms", "y"), ("c", "o")]
    names = [it.members if kind == "group" else it.name for kind, it in order]
    assert names.index(("ms", "y")) < names.index("r") and names.index("y") < names.index(("ms", "y"))
    # over other axes, or a pmax with a psum, nothing merges
    got, _ = groups_of(RULE_SPEC, {"ms": d, "y": {"d": "y"}}, (("x", 2), ("y", 2)))
    assert got == []


def test_groups_that_would_wait_for_each_other_are_refused():
    """a and c over x, b and dd over y: b needs a, c needs dd. Merging both pairs
    would deadlock (each collective waits for the other); the rule merges one."""
    text = """
size N = 8
index i: N, j: N, k: N
input x[i, j]
a[i] = sum(x[i, j])
b[k] = sum(a[i] * x[i, k])
dd[k] = sum(x[j, k])
c[i] = sum(dd[j] * x[i, j])
output b, c
"""
    got, order = groups_of(text, {"a": {"j": "x"}, "b": {"i": "y"}, "dd": {"j": "y"}, "c": {"j": "x"}},
                           (("x", 2), ("y", 2)))
    assert got == [("b", "dd")]
    assert [it.members if kind == "group" else it.name for kind, it in order] == \
        ["a", "b", "dd", ("b", "dd"), "c"]


def d_sharded(graph: g.Graph) -> g.Graph:
    """Every statement over d splits d over x; every weight over d stores it split."""
    layouts = {d.name: {"d": "x"} for d, _ in graph.all_decls() if "d" in d.type.indices and d.kind == "param"}
    splits = {}
    for s, _ in graph.all_stmts():
        if isinstance(s.op, g.Repeat):
            continue
        idx = set(s.type.indices) | {i for r in lay.stmt_refs(s) for i in r.indices}
        if "d" in idx:
            splits[s.name] = {"d": "x"}
    carry = {s.name: {"d": "x"} for s, _ in graph.all_stmts() if isinstance(s.op, g.Repeat)}
    return set_plan(graph, MESH8, layouts={**layouts, **carry}, splits=splits)


def census_of(planned: g.Graph, hardware="h100") -> dict:
    src = generate_source(planned)
    out = {}
    for phase, pg in program_graphs(planned).items():
        prep = param_only(pg)
        out[phase] = (census.emitted(src, phase), census.priced(price_graph(pg, hardware), prep),
                      census.priced(price_graph(pg, hardware, merge=False), prep))
    return out


def run_against_reference(planned: g.Graph, graph: g.Graph, batch: int, prompt_len: int, steps: int, seed=0):
    """Prefill a random prompt, then greedy-free decode of random tokens: every step's
    logits against the reference interpreter on the same (unplanned) graph."""
    from einpart.runtime import Executable
    params = make_params(graph, seed)
    ref = Reference(graph, params)
    rng = np.random.default_rng(seed)
    V = index_sizes(graph)[ref.axes.vocab]
    prompt = rng.integers(0, V, (batch, prompt_len)).astype(np.int32)
    ex = Executable(planned, weights=params)
    state = ref.new_state(batch)
    want, state = ref.step(prompt, 0, state)
    assert_close(ex.prefill(prompt), want, "prefill")
    for k in range(steps):
        tok = rng.integers(0, V, (batch, 1)).astype(np.int32)
        want, state = ref.step(tok, prompt_len + k, state)
        assert_close(ex.decode(tok[:, 0], prompt_len + k), want, f"decode step {k}")
    return ex


@pytest.mark.parametrize("name,plain,deferred", [("llama", 4, 2), ("palm", 3, 2)])
def test_defer_norm_merges_the_statistic_with_the_matmuls(name, plain, deferred):
    """Collectives per layer of the d-sharded plan. llama: ms1 | {q, kn, vn} | ms2 |
    {gate, up} without defer-norm (each psum over x; the three projections already
    share one), {ms1, q_raw, kn_raw, vn_raw} | {ms2, gate_raw, up_raw} with it.
    palm: mu | var | {q, kn, vn, gate, up}, then {mu, q_raw, kn_raw, vn_raw,
    gate_raw, up_raw} | var (var reads x - mu: it waits for mu)."""
    graph = parse_file(spec_path(name))
    counts = []
    for pipeline in ("", "defer-norm"):
        g2 = run_pipeline(graph, pipeline).graph if pipeline else graph
        c = census_of(d_sharded(g2))
        for phase, (emitted, merged, alone) in c.items():
            assert emitted["layer"] == merged["layer"] and emitted["outside"] == merged["outside"], (phase, c)
            assert emitted["kinds"] == {"psum": emitted["layer"]}
            assert merged["layer_comm_s"] < alone["layer_comm_s"]
        counts.append(c["decode"][0]["layer"])
    assert counts == [plain, deferred]


def test_merged_d_sharded_llama_matches_the_reference():
    graph = run_pipeline(parse_file(spec_path("llama")), "defer-norm").graph
    planned = d_sharded(graph)
    src = generate_source(planned)
    assert "= lax.psum((" in src
    run_against_reference(planned, graph, batch=2, prompt_len=5, steps=3)


# ------------------------------------------------------------ the sequence-sharded cache
PALM_540B = dict(D=18432, F=73728, H=48, K=256, L=118, V=256000)
SMALL = dict(B=1, T=8, S=128, D=64, F=128, H=8, K=16, L=2, V=256)


@functools.lru_cache(maxsize=None)
def palm_long_context_plan(merge_pairs: bool = True):
    """PaLM 540B decode, batch 1, context 32,768, on 8 TPU v4 chips. The bf16 weights
    alone are 135.1 GB per chip (8 x 32 GiB cannot hold them), so the memory limit is
    a chip that holds them and 1.9 GB more: the replicated cache (3.96 GB) does not fit,
    an eighth of it (0.49 GB) does. Batch 1 and the single K/V head leave s or the
    head size k to split; the planner must pick s. merge_pairs: the planner prices
    merged reductions (opt-in)."""
    graph = run_pipeline(parse_file(spec_path("palm"), PALM_540B), "cast{dtype=bf16},defer-norm").graph
    return plan(graph, "x=8", "tpu-v4", "decode", batch=1, context=32768, memory_limit=137e9, time_limit=30,
                merge_pairs=merge_pairs)


def test_planner_shards_the_long_context_cache_over_s():
    p = palm_long_context_plan()
    assert p.status == "optimal"
    rep = p.phases["decode"]
    assert rep.memory_bytes <= 137e9
    for name in ("k_cache", "v_cache"):
        assert lay.type_layout(p.graph.decl(name).type) == {"b": (), "s": ("x",), "k": ()}
    for name in ("kc", "vc"):        # the cache writes run on s-shards: no move of the cache
        assert lay.stmt_split(p.graph.stmt(name)) == {"s": ("x",)}
    # replicated, the same plan would need 3.5 GB more per chip than the limit leaves
    assert rep.kv_bytes == pytest.approx(2 * 118 * 32768 * 256 * 2 / 8)


def transfer(planned: g.Graph, small: g.Graph) -> g.Graph:
    """The plan of a large graph (split of every statement, layout of every tensor) set on
    the same graph at other sizes."""
    layouts = {d.name: lay.type_layout(d.type) for d, _ in planned.all_decls()}
    splits = {}
    for s, _ in planned.all_stmts():
        layouts[s.name] = lay.type_layout(s.type)
        if not isinstance(s.op, g.Repeat):
            splits[s.name] = lay.stmt_split(s)
    return set_plan(small, dict(planned.mesh), layouts=layouts, splits=splits)


def small_palm():
    return run_pipeline(parse_file(spec_path("palm"), SMALL), "defer-norm").graph


def test_the_planners_long_context_plan_matches_the_reference():
    """The planner's plan, set on PaLM at small sizes (context 128: 16 positions per
    shard; the prompt and the decode steps write across shard boundaries)."""
    small = small_palm()
    planned = transfer(palm_long_context_plan().graph, small)
    assert lay.type_layout(planned.decl("k_cache").type)["s"] == ("x",)
    assert lay.stmt_split(planned.stmt("z")) == lay.stmt_split(planned.stmt("o_raw")) == {"s": ("x",)}
    run_against_reference(planned, small, batch=1, prompt_len=14, steps=4)


def test_split_k_attention_is_one_pmax_and_one_psum():
    """Flash-decoding on the s-sharded cache: scores, max, exp, exp-sum and e . v on
    s-shards; then pmax of the local max, and the exp-sum and e . v in one psum.
    Generated code, the priced collectives and the reference agree."""
    small = small_palm()
    on_s = {"s": "x"}
    planned = set_plan(small, MESH8, layouts={"k_cache": on_s, "v_cache": on_s},
                       splits={n: on_s for n in ("kc", "vc", "sc", "sm", "mx", "e", "z", "o_raw")})
    src = generate_source(planned)
    assert "t_z, t_o_raw = lax.psum((t_z, t_o_raw), 'x')" in src
    c = census_of(planned, "tpu-v4")
    for phase, (emitted, merged, alone) in c.items():
        assert emitted["kinds"] == {"pmax": 1, "psum": 1}, phase
        assert emitted["layer"] == merged["layer"] == 2 and alone["layer"] == 3
        assert emitted["outside"] == merged["outside"] == 0
    run_against_reference(planned, small, batch=1, prompt_len=14, steps=4)


def test_the_planner_counts_merged_reductions():
    """With merge-pair edges the planner sees that split-K's exp-sum and e . v share one
    psum, and that after defer-norm the d-sharded norm statistic shares one with the
    projections it scales: on the long-context PaLM it picks the split-K combine (one
    pmax, one psum for attention) and its plan holds both merged groups. The objective
    is the repricing (each reduction alone, less one latency per credited pair); the
    program codegen emits costs no more, and its collectives are the priced ones.
    Without the pair edges the same planner picks a dearer plan without the combine."""
    p = palm_long_context_plan()
    assert p.status == "optimal" and p.stats["merge_pairs"] > 0
    assert p.objective == pytest.approx(p.stats["objective_repriced"], rel=1e-6)
    assert p.stats["objective_merged"] <= p.stats["objective_repriced"] * (1 + 1e-9)
    for n in ("sc", "mx", "e", "z", "o_raw"):
        assert lay.stmt_split(p.graph.stmt(n)) == {"s": ("x",)}, n
    ops = {d for s in p.phases["decode"].stmts if s.in_repeat for d, _ in s.collectives}
    assert "psum(x) on (z, o_raw)" in ops and "pmax(x)" in ops
    norm = [d for d in ops if " on (" in d and "var" in d.split(" on ")[1]]
    assert len(norm) == 1 and "q_raw" in norm[0], ops
    for phase, (emitted, merged, alone) in census_of(p.graph, "tpu-v4").items():
        assert emitted["layer"] == merged["layer"] < alone["layer"], phase
        assert emitted["outside"] == merged["outside"], phase
    old = palm_long_context_plan(merge_pairs=False)
    assert old.stats["merge_pairs"] == 0 and old.objective > p.objective * (1 + 1e-3)
    assert lay.stmt_split(old.graph.stmt("z")) != {"s": ("x",)}
