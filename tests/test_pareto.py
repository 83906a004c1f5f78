"""einpart pareto: the mesh rule, the sweep's numbers against plan(), the
frontier (no frontier point dominated, every other point dominated), the
CSV table, the SVG and PNG charts, and bad input."""
import csv
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from einpart.cli import main
from einpart.errors import EinpartError
from einpart.ir.parser import parse_file
from einpart.passes.shard import plan
from einpart.reports import pareto
from einpart.reports.pareto import CSV_COLUMNS, Point, mark_frontier, mesh_for, sweep

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("hw,chips,want", [
    ("tpu-v4", 1, (("x", 1),)),
    ("tpu-v4", 2, (("x", 2),)),
    ("tpu-v4", 8, (("x", 2), ("y", 2), ("z", 2))),
    ("tpu-v4", 16, (("x", 2), ("y", 2), ("z", 4))),
    ("tpu-v4", 32, (("x", 2), ("y", 4), ("z", 4))),
    ("tpu-v4", 64, (("x", 4), ("y", 4), ("z", 4))),
    ("tpu-v4", 12, (("x", 2), ("y", 2), ("z", 3))),
    ("h100", 4, (("x", 2), ("y", 2))),
    ("h100", 8, (("x", 2), ("y", 4))),
    ("h100", 7, (("x", 7),)),
    ("h200", 16, (("x", 2), ("y", 2), ("z", 4))),
    ("h100", 64, (("x", 8), ("y", 2), ("z", 4))),
])
def test_mesh_rule(hw, chips, want):
    assert mesh_for(chips, hw) == want


def test_mesh_rule_bad_counts():
    with pytest.raises(EinpartError, match=r"^--chips 12: h100 has 8 devices per node; a count above one node "
                                           r"must be a whole number of nodes$"):
        mesh_for(12, "h100")
    with pytest.raises(EinpartError, match=r"^--chips: a chip count must be at least 1, got 0$"):
        mesh_for(0, "tpu-v4")


def _pt(phase, chips, batch, latency):
    return Point(phase, chips, (("x", chips),), batch, batch, latency, "optimal")


def test_frontier_by_hand():
    # cost = chips * latency / batch
    pts = [_pt("decode", 1, 1, 1.0),    # cost 1.0: dominated by the next (faster, same cost)
           _pt("decode", 2, 1, 0.5),    # cost 1.0, faster, same cost: dominates the first
           _pt("decode", 4, 1, 0.4),    # cost 1.6: fastest
           _pt("decode", 4, 8, 2.0),    # cost 1.0 but slow: dominated by the second
           _pt("decode", 1, 8, 4.0),    # cost 0.5: cheapest
           _pt("decode", 8, 8, 4.0),    # cost 4.0: dominated
           _pt("prefill", 2, 1, 0.5),   # its own phase: frontier alone
           Point("decode", 1, (("x", 1),), 64, 64)]   # infeasible: never on the frontier
    front = mark_frontier(pts)
    assert [p.frontier for p in pts] == [False, True, True, False, True, False, True, False]
    assert [(p.phase, p.latency_s) for p in front if p.phase == "decode"] == [
        ("decode", 0.4), ("decode", 0.5), ("decode", 4.0)]
    # ties (same latency and cost) are both on the frontier
    tie = [_pt("decode", 1, 1, 1.0), _pt("decode", 2, 2, 1.0)]
    mark_frontier(tie)
    assert [p.frontier for p in tie] == [True, True]


def _dominates(q, p):
    return q.latency_s <= p.latency_s and q.cost <= p.cost and (q.latency_s < p.latency_s or q.cost < p.cost)


@pytest.fixture(scope="module")
def palm_sweep():
    graph = parse_file(EXAMPLES / "palm.ein")
    return graph, sweep(graph, "cpu", [1, 2, 4], [1, 2, 4], context=16, prompt=4, time_limit=5, spec="palm")


def test_sweep_points_match_plan(palm_sweep):
    graph, result = palm_sweep
    assert len(result.points) == 2 * 3 * 3
    assert {(p.phase, p.chips, p.batch) for p in result.points} == {
        (ph, c, b) for ph in ("prefill", "decode") for c in (1, 2, 4) for b in (1, 2, 4)}
    for p in result.points:
        assert p.feasible
        assert p.tokens == (p.batch * 4 if p.phase == "prefill" else p.batch)
        assert p.cost == pytest.approx(p.chips * p.latency_s / p.tokens, rel=1e-12)
    one = next(p for p in result.points if (p.phase, p.chips, p.batch) == ("decode", 4, 2))
    again = plan(graph, (("x", 2), ("y", 2)), "cpu", "decode", batch=2, context=16, prompt=4, time_limit=5)
    assert one.mesh == (("x", 2), ("y", 2))
    assert one.latency_s == pytest.approx(again.phases["decode"].step_s, rel=1e-9)


def test_sweep_frontier_is_exact(palm_sweep):
    _, result = palm_sweep
    for phase in ("prefill", "decode"):
        pts = [p for p in result.points if p.phase == phase]
        front = [p for p in pts if p.frontier]
        assert front
        for p in pts:
            dominated = any(_dominates(q, p) for q in pts)
            assert p.frontier == (not dominated), (p.chips, p.batch)


def test_infeasible_points_are_kept_with_the_planner_message():
    graph = parse_file(EXAMPLES / "palm.ein")
    # the tiny PaLM's weights are ~0.5 MB in f32: one chip cannot hold them under 300 kB, four can
    result = sweep(graph, "cpu", [1, 4], [1], phases=("decode",), memory_limit=300e3, time_limit=5)
    one, four = result.points
    assert not one.feasible and one.status == "infeasible" and not one.frontier
    assert one.note == ("weights 0.000541 GB > 0.0003 GB HBM on cpu with 1 chips "
                        "(each at its smallest layout; 0.000553 GB in all)")
    assert math.isnan(one.cost)
    assert four.feasible and four.frontier
    row = one.row()
    assert row["latency_s"] == "" and row["cost_chip_s_per_token"] == "" and row["frontier"] == 0


def test_cli_writes_csv_and_svg(tmp_path, capsys):
    code = main(["pareto", str(EXAMPLES / "palm.ein"), "--hardware", "cpu", "--chips", "1,2", "--batch", "1,4",
                 "--context", "16", "--prompt", "4", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""          # not a terminal: no progress
    assert "prefill frontier (" in out and "decode frontier (" in out
    assert f"wrote {tmp_path / 'pareto.csv'}" in out and f"wrote {tmp_path / 'pareto.svg'}" in out
    assert not (tmp_path / "pareto.png").exists()
    with open(tmp_path / "pareto.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert len(rows) == 8
    for r in rows:
        cost = float(r["cost_chip_s_per_token"])
        assert cost == pytest.approx(int(r["chips"]) * float(r["latency_s"]) / int(r["tokens_per_step"]), rel=1e-5)
        assert r["frontier"] in ("0", "1") and r["status"] == "optimal"
    for phase in ("prefill", "decode"):
        mine = [r for r in rows if r["phase"] == phase]
        for r in mine:
            lat, cost = float(r["latency_s"]), float(r["cost_chip_s_per_token"])
            dominated = any(float(q["latency_s"]) <= lat and float(q["cost_chip_s_per_token"]) <= cost and
                            (float(q["latency_s"]) < lat or float(q["cost_chip_s_per_token"]) < cost) for q in mine)
            assert r["frontier"] == ("0" if dominated else "1")
    root = ET.parse(tmp_path / "pareto.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    circles = root.findall(f"{ns}circle")
    # a dot per point (8), a ring per distinct frontier point, and the legend's dots (2 chip counts x 2 panels)
    rings = [c for c in circles if c.get("fill") == "none"]
    dots = [c for c in circles if c.get("fill") != "none" and c.find(f"{ns}title") is not None]
    assert len(dots) == 8 and 1 <= len(rings) <= sum(r["frontier"] == "1" for r in rows)
    assert len(root.findall(f"{ns}polyline")) == 2
    titles = [t.text for t in root.iter(f"{ns}title")]
    assert any(t.startswith("decode: 2 chips (x=2), batch 4: latency ") for t in titles)


def test_png_through_matplotlib(tmp_path, capsys):
    code = main(["pareto", "palm", "--hardware", "cpu", "--chips", "1,2", "--batch", "1,2", "--phase", "decode",
                 "--format", "png", "--out", str(tmp_path)])
    assert code == 0
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "pareto.csv").exists()


def test_png_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    code = main(["pareto", "palm", "--hardware", "cpu", "--chips", "1", "--batch", "1", "--format", "csv,png",
                 "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 1
    assert err == ("PNG output needs matplotlib: pip install 'einpart[plot]' "
                   "(or ask for --format csv,svg, which need nothing)\n")
    assert not (tmp_path / "pareto.csv").exists()        # refused before planning anything


@pytest.mark.parametrize("argv,message", [
    (["--chips", "8,x", "--batch", "1"], "--chips 8,x: expected integers separated by commas, like 8,16,32"),
    (["--chips", "8", "--batch", "0"], "--batch: batch sizes must be at least 1, got 0"),
    (["--chips", "8", "--batch", "1", "--format", "gif"], "--format gif: expected some of csv, svg, png"),
    (["--chips", "12", "--batch", "1", "--hardware", "h100"],
     "--chips 12: h100 has 8 devices per node; a count above one node must be a whole number of nodes"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    if "--hardware" not in argv:
        argv = argv + ["--hardware", "cpu"]
    code = main(["pareto", "palm", *argv, "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 1 and err == message + "\n"


def test_progress_only_on_a_terminal():
    class Tty:
        def __init__(self, tty):
            self.tty, self.text = tty, ""

        def isatty(self):
            return self.tty

        def write(self, s):
            self.text += s

        def flush(self):
            pass
    from einpart.reports.cli import _progress
    assert _progress(Tty(False)) is None
    t = Tty(True)
    show = _progress(t)
    show(1, 2, _pt("decode", 2, 4, 0.5))
    show(2, 2, Point("decode", 4, (("x", 4),), 4, 4))
    assert t.text == ("\r\x1b[K[1/2] decode 2 chips batch 4: 0.5 s (0.0 s)"
                      "\r\x1b[K[2/2] decode 4 chips batch 4: infeasible (0.0 s)\n")


def test_frontier_marks_join_ties():
    pts = [_pt("decode", 1, 1, 1.0), _pt("decode", 2, 2, 1.0), _pt("decode", 1, 4, 2.0)]
    mark_frontier(pts)
    assert [(p.batch, m) for p, m in pareto.frontier_marks(pts)] == [(1, "1c B=1, 2c B=2"), (4, "1c B=4")]
