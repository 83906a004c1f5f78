"""einpart report / compile --html: the page parses, has its sections, every
pass has its dump (the exact text) and its diff (difflib's), the plan table
has every statement with the cost model's totals, the layout drawings put
every device on the block it holds, and hostile text stays text.

CI has no browser; tools/report_screenshot.py renders the page in Chromium."""
import difflib
import json
import html
from html.parser import HTMLParser
from pathlib import Path

import pytest

from einpart.cli import main
from einpart.codegen.lower import program_graphs
from einpart.ir.layout import type_layout
from einpart.ir.parser import parse
from einpart.ir.printer import format_graph
from einpart.passes import register_pass
from einpart.passes.manager import PASSES, Pass
from einpart.passes.shard.cli import _t
from einpart.passes.shard.report import price_graph
from einpart.reports.layout_svg import block_of, device_coords

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VOID = {"meta", "br", "rect", "line", "circle", "polyline"}   # no end tag (SVG ones self-close)


class Page(HTMLParser):
    """Checks nesting and collects ids, the text of pre blocks per pipeline stage, tables and SVGs."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.ids = [], [], []
        self.stage = None
        self.pres = {}          # stage number -> {class: text}
        self.cur_pre = None
        self.tables = {}        # id of the enclosing plan div -> rows of cell texts
        self.plan_div = None
        self.row, self.cell = None, None
        self.svgs = []          # [{id of the weight div, rect fills with titles}]
        self.weight = None
        self.tags = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)
        if "id" in a:
            self.ids.append(a["id"])
            if a["id"].startswith("stage-"):
                self.stage = int(a["id"][6:])
                self.pres[self.stage] = {}
            if a["id"].startswith("plan-"):
                self.plan_div = a["id"][5:]
                self.tables[self.plan_div] = []
            if a["id"].startswith("layout-"):
                self.weight = {"name": a["id"][7:], "rects": []}
                self.svgs.append(self.weight)
        if tag == "pre" and self.stage is not None:
            self.cur_pre = a.get("class", "")
            self.pres[self.stage][self.cur_pre] = ""
        if tag == "tr" and self.plan_div:
            self.row = []
            self.tables[self.plan_div].append(self.row)
        if tag in ("td", "th") and self.row is not None:
            self.cell = ""
        if tag == "rect" and self.weight is not None:
            self.weight["rects"].append({"fill": a.get("fill"), "title": None})

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "pre":
            self.cur_pre = None
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        if tag == "table":
            self.plan_div, self.row = None, None
        if tag == "section":
            self.stage, self.weight = None, None

    def handle_data(self, data):
        if self.cur_pre is not None and self.stage is not None:
            self.pres[self.stage][self.cur_pre] += data
        if self.cell is not None:
            self.cell += data
        if self.weight is not None and self.stack and self.stack[-1] == "title" and self.weight["rects"]:
            self.weight["rects"][-1]["title"] = data


def read_page(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert p.errors == [] and p.stack == []
    return p


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    code = main(["compile", str(EXAMPLES / "llama.ein"), "--mesh", "2x4", "--plan", "simple",
                 "--pipeline", "defer-norm", "--out", str(out), "--html", str(out / "report.html")])
    assert code == 0
    return out, read_page(out / "report.html")


def test_sections_and_self_contained(compiled):
    out, page = compiled
    text = (out / "report.html").read_text()
    for section in ("pipeline", "plan", "layouts", "source"):
        assert section in page.ids
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<link" not in text and "src=" not in text
    assert page.tags.count("svg") == len(page.svgs) > 0


def test_every_pass_has_its_dump_and_diff(compiled):
    out, page = compiled
    dumps = sorted(out.glob("[0-9][0-9]-*.ein"))
    assert [d.name for d in dumps] == ["00-input.ein", "01-defer-norm.ein", "02-plan.ein"]
    assert sorted(page.pres) == [0, 1, 2]
    prev = ""
    for n, path in enumerate(dumps):
        text = path.read_text()
        assert page.pres[n]["dump"] == text                 # the exact dump, unescaped back
        if n == 0:
            assert "diff" not in page.pres[n]
        else:
            want = list(difflib.unified_diff(prev.splitlines(), text.splitlines(), "before",
                                             page_stage_name(n, compiled), lineterm="", n=2))
            assert want and page.pres[n]["diff"] == "".join(want)
        prev = text


def page_stage_name(n, compiled):
    out, _ = compiled
    heading = (out / "report.html").read_text().split(f'id="stage-{n}"><h3>')[1].split("</h3>")[0]
    return html.unescape(heading.split(" ", 1)[1])


def test_plan_table_has_every_statement_and_the_totals(compiled):
    out, page = compiled
    planned = parse((out / "02-plan.ein").read_text())
    for phase, pg in program_graphs(planned).items():
        rep = price_graph(pg, "cpu", phase)
        rows = page.tables[phase]
        assert rows[0][:3] == ["statement", "x", "split"]
        body, total = rows[1:-1], rows[-1]
        assert [r[0] for r in body] == [s.name for s in rep.stmts]
        assert [int(r[1]) for r in body] == [s.count for s in rep.stmts]
        assert total[0] == "total" and total[-1] == _t(rep.step_s) and total[-2] == _t(rep.comm_s)
        for r, s in zip(body, rep.stmts):
            assert r[-1] == _t(s.time_s * s.count)
            assert r[4] == "-" if not s.collectives else all(d in r[4] for d, _ in s.collectives)


def test_layout_drawing_puts_every_device_on_its_block(compiled):
    out, page = compiled
    planned = parse((out / "02-plan.ein").read_text())
    mesh = dict(planned.mesh)
    decls = {d.name: d for d, _ in planned.all_decls() if d.kind in ("param", "state")}
    assert [w["name"] for w in page.svgs] == list(decls)
    devs = device_coords(mesh)
    split_any = False
    for w in page.svgs:
        d = decls[w["name"]]
        layout = type_layout(d.type)
        idx = d.type.indices
        rows, cols = (idx[:1], idx[1:]) if len(idx) > 1 else ((), idx)
        cells = [r for r in w["rects"] if r["title"] and r["title"].startswith("device ")]
        assert len(cells) == len(devs) == 8
        nc = 1
        for i in cols:
            for a in layout.get(i, ()):
                nc *= mesh[a]
        for k, (cell, c) in enumerate(zip(cells, devs)):
            r, col = block_of(c, layout, rows, cols, mesh)
            coord = ", ".join(f"{a}={c[a]}" for a in mesh)
            assert cell["title"] == f"device {k} ({coord}) holds block {r * nc + col}"
        split_any |= len({cell["title"].rsplit(" ", 1)[1] for cell in cells}) > 1
    assert split_any                                          # the simple plan splits some weight


def test_block_of_follows_the_partition_spec_order():
    mesh = {"x": 2, "y": 4}
    # f split over (x, y): x major; device (x=1, y=2) holds block 1 * 4 + 2 of f
    assert block_of({"x": 1, "y": 2}, {"f": ("x", "y")}, ("d",), ("f",), mesh) == (0, 6)
    assert block_of({"x": 1, "y": 2}, {"f": ("y", "x")}, ("d",), ("f",), mesh) == (0, 5)
    assert block_of({"x": 1, "y": 3}, {"d": ("x",), "f": ("y",)}, ("d",), ("f",), mesh) == (1, 3)
    assert [c for c in device_coords(mesh)][:3] == [{"x": 0, "y": 0}, {"x": 0, "y": 1}, {"x": 0, "y": 2}]


HOSTILE = '<script>alert(1)</script> & "q" <img src=x onerror=alert(2)>'


def test_hostile_text_stays_text(tmp_path, capsys):
    spec = (EXAMPLES / "llama.ein").read_text().replace(
        "param norm_f[d] {init=ones}", "param norm_f[d] {init=ones, note=" + json.dumps(HOSTILE) + "}")
    assert spec.count("note=") == 1
    path = tmp_path / "<b>evil&.ein"
    path.write_text(spec)
    name = "<img src=y onerror=alert(3)>"

    @register_pass(name)
    class Evil(Pass):
        def apply(self, graph):
            return graph
    try:
        out = tmp_path / "r.html"
        code = main(["report", str(path), "--mesh", "2x4", "--plan", "simple", "--pipeline", name, "--out", str(out)])
    finally:
        del PASSES[name]
    assert code == 0
    text = out.read_text()
    assert "<script" not in text and "<img" not in text and "<b>evil" not in text
    assert "&lt;b&gt;evil&amp;.ein" in text                    # the path in the title and heading
    assert "<h3>01 &lt;img src=y onerror=alert(3)&gt;</h3>" in text   # the pass name
    page = read_page(out)
    # the dump shows the hostile string exactly as the printer wrote it, as text
    dump = format_graph(parse(spec))
    assert HOSTILE.replace('"', '\\"') in dump
    assert page.pres[0]["dump"] == dump
    assert sorted(page.pres) == [0, 1, 2]
    assert page.pres[1]["diff"] == "no change"                 # the identity pass changed nothing
    assert '<pre class="diff"><span class="muted">no change</span></pre>' in text


def test_bad_mesh_is_one_line_and_writes_nothing(tmp_path, capsys):
    code = main(["report", str(EXAMPLES / "llama.ein"), "--mesh", "2x0", "--out", str(tmp_path / "r.html")])
    _, err = capsys.readouterr()
    assert code == 1 and err == "mesh '2x0': axis y must have a positive size\n"
    assert not (tmp_path / "r.html").exists()


def test_report_of_an_ilp_plan(tmp_path, capsys):
    """The default plan (the shard pass, both phases): its dump, and the per-phase tables priced on the hardware."""
    out = tmp_path / "gpt2.html"
    assert main(["report", "gpt2", "--mesh", "2x2", "--hardware", "h100", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    page = read_page(out)
    text = out.read_text()
    assert "predicted on h100 by the cost model" in text
    assert sorted(page.pres) == [0, 1] and "split_prefill=" in page.pres[1]["dump"]
    assert "+mesh x = 2, y = 2" in page.pres[1]["diff"].replace("\n", "")
    assert set(page.tables) == {"prefill", "decode"}
