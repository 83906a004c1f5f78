"""`einpart plan --explain` / program.plan.explain(): each choice against its runner-up.

The runner-up is checked independently: pinning a weight (or a statement) to
its runner-up and solving again must cost at least the plan (the plan is
optimal) and at most the plan plus the reported difference (the re-solve may
also move everything else)."""
import math
import subprocess
import sys

import pytest

import einpart
from conftest import spec_path
from einpart.passes.shard import plan
from einpart.passes.shard.explain import explain

SIZES = dict(D=1024, F=4096, H=16, G=4, K=64, L=4, V=8192, S=512, T=128, B=8)


@pytest.fixture(scope="module")
def planned():
    graph = einpart.parse_file(spec_path("llama"), sizes=SIZES)
    p = plan(graph, "x=2,y=4", "tpu-v4", "prefill")
    assert p.status == "optimal", p.note
    return graph, p, explain(p.graph, "tpu-v4", "prefill")


def _layout(text: str, indices) -> dict:
    """'g@y d@(x,y)' -> {'g': ('y',), 'd': ('x', 'y')} (the explanation's notation)."""
    out = {i: () for i in indices}
    if text == "replicated":
        return out
    for part in text.split():
        i, axes = part.split("@")
        out[i] = tuple(axes.strip("()").split(","))
    return out


def test_objective_is_the_plans_and_no_runner_up_is_cheaper(planned):
    _, p, e = planned
    assert math.isclose(e.objective_s, p.objective, rel_tol=1e-9)
    priced = [it for it in e.items if it.runner_up is not None]
    assert len(priced) > 40
    for it in priced:
        assert it.runner_up.objective_s >= -1e-12 * p.objective, (it.name, it.runner_up)
        assert it.runner_up.time_s >= -1e-12 * p.objective, (it.name, it.runner_up)
        assert it.runner_up.text != it.chosen, it.name
    # something real is traded: some runner-up loses on communication yet saves on memory traffic
    assert any(d.comm_s > 0 and d.memory_s < 0 for it in priced for d in it.runner_up.phases.values())


def test_runner_up_cost_matches_a_re_solve_pinned_to_it(planned):
    graph, p, e = planned
    weights = [it for it in e.items if it.kind == "weight" and it.runner_up and it.runner_up.time_s > 0]
    assert weights
    it = max(weights, key=lambda i: i.runner_up.time_s)
    indices = next(d.type.indices for d, _ in graph.all_decls() if d.name == it.name)
    pinned = plan(graph, "x=2,y=4", "tpu-v4", "prefill", fix={it.name: _layout(it.runner_up.text, indices)})
    assert pinned.objective >= p.objective * (1 - 1e-9)
    assert pinned.objective <= p.objective + it.runner_up.objective_s + 1e-12 * p.objective


def test_text_names_every_choice_and_its_runner_up(planned):
    _, _, e = planned
    text = e.text()
    assert text.startswith("why each layout won (mesh x=2, y=4, tpu-v4)")
    for it in e.items:
        head = f"{it.kind} {it.name}: {it.chosen}"
        line = next(l for l in text.splitlines() if l.startswith(head + "  "))
        if it.runner_up is not None:
            assert f"runner-up {it.runner_up.text}" in line
    wq = next(it for it in e.items if it.name == "wq")
    assert f"weight wq: {wq.chosen}" in text
    assert "compute" in text and "memory" in text and "communication" in text


def test_two_phase_plan_ties_caches_to_their_writes():
    graph = einpart.parse_file(spec_path("llama"))
    p = plan(graph, "x=2,y=4", "tpu-v4", "both")
    e = explain(p.graph, "tpu-v4", "both")
    assert math.isclose(e.objective_s, p.objective, rel_tol=1e-9)
    cache = next(it for it in e.items if it.name == "k_cache")
    assert cache.kind == "cache" and "decode:kc" in cache.tied_to and cache.runner_up is not None
    kc = next(it for it in e.items if it.name == "prefill:kc")
    assert kc.runner_up is None and f"statement prefill:kc: {kc.chosen}  (fixed by decl:k_cache)" in e.text()
    assert "per prefill + 64 decode steps" in e.text()


def test_cli_plan_explain():
    proc = subprocess.run([sys.executable, "-m", "einpart.cli", "plan", str(spec_path("llama")), "--mesh", "2x4",
                           "--hardware", "tpu-v4", "--phase", "decode", "--explain"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "== decode ==" in out and "why each layout won (mesh x=2, y=4, tpu-v4)" in out
    assert "weight wq: " in out and "runner-up" in out and "statement decode:q: split" in out
    assert proc.stderr == ""            # piped: no progress text


def test_cli_plan_explain_json(capsys):
    import json
    from einpart import cli
    assert cli.main(["plan", str(spec_path("llama")), "--mesh", "2x4", "--hardware", "tpu-v4", "--phase", "decode",
                     "--explain", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    wq = next(x for x in data["explain"] if x["name"] == "wq")
    assert wq["kind"] == "weight" and wq["runner_up"]["time_s"] >= 0 and wq["runner_up"]["layout"] != wq["chosen"]


def test_a_plan_the_planner_cannot_express_is_a_clear_error():
    from einpart.passes.plans import set_plan
    graph = einpart.parse_file(spec_path("llama"))
    hand = set_plan(graph, {"x": 2, "y": 4}, layouts={"wq": {"k": ("x",)}})   # rope pairs are never split
    with pytest.raises(einpart.EinpartError) as e:
        explain(hand, "tpu-v4", "prefill")
    assert str(e.value) == ("explain: the layout k@x of 'wq' is not one the planner chooses from on this mesh "
                            "(explain a plan of the shard pass)")


@pytest.mark.slow
def test_runner_ups_of_a_proved_two_phase_plan_are_not_cheaper():
    """PaLM 540B, both phases: the plan is proved optimal (the stored-layout relaxation; it was
    feasible with a ~0.15% gap, and explain then found a weight whose runner-up was cheaper), so
    no runner-up is cheaper and none LOSES; pinning the closest one and solving again costs at
    least the plan and at most the plan plus the reported difference."""
    graph = einpart.run_pipeline(einpart.parse_file(spec_path("palm"), sizes=dict(
        D=18432, F=73728, H=48, K=256, L=118, V=256000)), "cast{dtype=bf16}").graph
    opts = dict(batch=64, context=2048, prompt=2048)
    p = plan(graph, "x=4,y=4,z=4", "tpu-v4", "both", **opts)
    assert p.status == "optimal" and p.gap == 0.0
    e = explain(p.graph, "tpu-v4", "both", **opts)
    ups = [it for it in e.items if it.runner_up and it.kind == "weight"]
    assert ups and all(it.runner_up.time_s >= -1e-9 * p.objective for it in ups)
    assert "LOSES" not in e.text()
    it = min(ups, key=lambda it: it.runner_up.time_s)
    indices = next(d.type.indices for d, _ in graph.all_decls() if d.name == it.name)
    pinned = plan(graph, "x=4,y=4,z=4", "tpu-v4", "both", fix={it.name: _layout(it.runner_up.text, indices)},
                  **opts)
    assert p.objective * (1 - 1e-9) <= pinned.objective <= p.objective + it.runner_up.objective_s + 1e-9 * p.objective
