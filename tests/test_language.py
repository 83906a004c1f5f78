"""The spec language: round-trips, canonical printing, and the exact message
for each kind of mistake (FILE:LINE:COL, the source line, a caret)."""
from pathlib import Path

import pytest

from einpart.errors import EinpartError, SpecError
from einpart.ir import format_graph, parse, parse_file
from einpart.ir import graph as g

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SPECS = sorted(EXAMPLES.glob("*.ein"))

BASE = """\
size B = 2, T = 4, D = 8, F = 16
index b: B, t: T, d: D, f: F
input x[b, t, d]
param w[d, f]
y[b, t, f] = x[b, t, d] * w[d, f]
output y
"""


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_examples_round_trip(path):
    graph = parse_file(path)
    text = format_graph(graph)
    again = parse(text)
    assert again == graph
    assert format_graph(again) == text  # printing is canonical: twice gives the same text


def test_three_examples_exist():
    assert {p.stem for p in SPECS} == {"gpt2", "llama", "palm"}


def test_equality_ignores_spans_but_not_meaning():
    a = parse(BASE)
    b = parse("\n\n" + BASE.replace("x[b, t, d] * w[d, f]", "x[b,t,d]*w[d,f]"))
    assert a == b
    c = parse(BASE.replace("* w[d, f]", "* w[d, f] * 2.0"))
    assert a != c


def test_annotations_round_trip():
    text = BASE.replace("size B", "mesh x = 2, y = 4\nsize B").replace(
        "param w[d, f]", 'param w[d@x, f@y] : bf16 {init=normal(0.02), note="a \\"q\\"", tags=[a, 1, 2.5]}')
    text = text.replace("* w[d, f]\n", "* w[d, f] {split=[d(x), f(y)], comm=[psum(x)]}\n")
    graph = parse(text)
    w = graph.decl("w")
    assert w.type.axes == (g.Axis("d", ("x",)), g.Axis("f", ("y",)))
    assert w.type.dtype == "bf16"
    assert g.attr(w.attrs, "init") == g.Term("normal", (0.02,))
    assert g.attr(w.attrs, "note") == 'a "q"'
    assert g.attr(w.attrs, "tags") == (g.Sym("a"), 1, 2.5)
    assert graph.mesh == (("x", 2), ("y", 4))
    assert parse(format_graph(graph)) == graph
    assert "param w[d@x, f@y] : bf16 {init=normal(0.02), note=\"a \\\"q\\\"\", tags=[a, 1, 2.5]}" in format_graph(graph)


def test_multi_axis_layout_and_precedence_round_trip():
    text = BASE.replace("mesh", "").replace("size B", "mesh x = 2, y = 2\nsize B").replace(
        "param w[d, f]", "param w[d, f@(x, y)]")
    text = text.replace("y[b, t, f] = x[b, t, d] * w[d, f]",
                        "y0[b, t, f] = x[b, t, d] * w[d, f]\n"
                        "y[b, t, f] = (y0[b, t, f] - (y0[b, t, f] - 1.0)) / (2.0 * -y0[b, t, f]) + (-3.5)")
    graph = parse(text)
    printed = format_graph(graph)
    assert "w[d, f@(x, y)]" in printed
    assert "y0[b, t, f] - (y0[b, t, f] - 1.0)" in printed
    assert parse(printed) == graph


def test_statements_in_any_order_are_sorted_topologically():
    text = BASE.replace("y[b, t, f] = x[b, t, d] * w[d, f]",
                        "y[b, t, f] = exp(z[b, t, f])\nz[b, t, f] = x[b, t, d] * w[d, f]")
    graph = parse(text)
    assert [s.name for s in graph.body.stmts] == ["z", "y"]


def test_implicit_contraction_is_a_sum():
    graph = parse(BASE)
    op = graph.stmt("y").op
    assert isinstance(op, g.Compute) and op.reduce == "sum"
    assert parse(BASE.replace("= x[b, t, d] * w[d, f]", "= sum(x[b, t, d] * w[d, f])")) == graph


def test_sizes_override_and_derived_sizes():
    text = BASE.replace("F = 16", "F = 16, H = 4, R = F / H * 2")
    graph = parse(text, sizes={"F": 32})
    from einpart.ir.verify import resolve_sizes
    assert resolve_sizes(graph)["R"] == 16
    with pytest.raises(EinpartError) as e:
        parse(text, sizes={"Q": 3})
    assert str(e.value) == "unknown size 'Q' in --set (this spec has: B, D, F, H, R, T)"


def _err(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse(text, "m.ein")
    return str(e.value)


REPEAT = BASE.replace("index b: B", "index l: T, b: B").replace("output y", """\
r[b, t, f] = repeat l (c = y) {
  q[b, t, d] = c[b, t, f] * w[d, f]
  yield q
}
output y""")

# (name, spec text, the exact message)
MISTAKES = [
    ("syntax", BASE.replace("= x[b", "= * x[b"),
     "m.ein:5:14: error: unexpected '*', expected '(', '-', 'causal', 'repeat', 'rope', 'take', 'write', "
     "a name, a number, sum/max/mean\n  y[b, t, f] = * x[b, t, d] * w[d, f]\n               ^"),
    ("bad character", BASE.replace("param w[d, f]", "param w[d, f] $"),
     "m.ein:4:15: error: unexpected character '$', expected ':', '=', '{', a name, param/input/state\n"
     "  param w[d, f] $\n                ^"),
    ("end of file", BASE.replace("output y", "output"),
     "m.ein:6:7: error: unexpected end of file, expected a name\n  output\n        ^"),
    ("unknown tensor", BASE.replace("* w[d, f]", "* v[d, f]"),
     "m.ein:5:27: error: unknown tensor 'v'\n  y[b, t, f] = x[b, t, d] * v[d, f]\n                            ^~~~~~~"),
    ("unknown index", BASE.replace("* w[d, f]", "* w[d, e]"),
     "m.ein:5:27: error: unknown index 'e'\n  y[b, t, f] = x[b, t, d] * w[d, e]\n                            ^~~~~~~"),
    ("duplicate", BASE.replace("param w[d, f]", "param w[d, f]\nparam w[d, f]"),
     "m.ein:5:7: error: duplicate definition of 'w' (first defined at line 4)\n  param w[d, f]\n        ^"),
    ("size mismatch", BASE.replace("* w[d, f]", "* w[f, d]"),
     "m.ein:5:27: error: index f has size 16 but axis 1 of 'w' is d with size 8\n"
     "  y[b, t, f] = x[b, t, d] * w[f, d]\n                            ^~~~~~~"),
    ("output index from nowhere", BASE.replace("index b: B", "index b: B, e: B").replace("y[b, t, f] =", "y[b, t, f, e] ="),
     "m.ein:5:1: error: index e of the output appears in no input\n"
     "  y[b, t, f, e] = x[b, t, d] * w[d, f]\n  ^"),
    ("rank", BASE.replace("* w[d, f]", "* w[d]"),
     "m.ein:5:27: error: 'w' has 2 axes [d, f] but is used with 1\n"
     "  y[b, t, f] = x[b, t, d] * w[d]\n                            ^~~~"),
    ("dtype", BASE.replace("input x[b, t, d]", "input x[b, t, d] : i32"),
     "m.ein:5:14: error: dtype mismatch: 'x' is i32 and cannot be used in arithmetic\n"
     "  y[b, t, f] = x[b, t, d] * w[d, f]\n               ^~~~~~~~~~"),
    ("cycle", BASE.replace("y[b, t, f] = x[b, t, d] * w[d, f]",
                           "y[b, t, f] = z[b, t, f] + 1.0\nz[b, t, f] = exp(y[b, t, f])"),
     "m.ein:5:1: error: cycle: y -> z -> y\n  y[b, t, f] = z[b, t, f] + 1.0\n  ^"),
    ("map that reduces", BASE.replace("x[b, t, d] * w[d, f]", "exp(x[b, t, d]) + w[d, f]"),
     "m.ein:5:1: error: index d is not in the output; a map keeps every index - write sum(...), max(...) "
     "or mean(...) to reduce it\n  y[b, t, f] = exp(x[b, t, d]) + w[d, f]\n  ^"),
    ("unknown size", BASE.replace("index b: B", "index b: Q"),
     "m.ein:2:7: error: index b ranges over unknown size 'Q'\n  index b: Q, t: T, d: D, f: F\n        ^"),
    ("uneven division", BASE.replace("F = 16", "F = 16, G = F / 3"),
     "m.ein:1:35: error: size G = 16 / 3 does not divide evenly\n"
     "  size B = 2, T = 4, D = 8, F = 16, G = F / 3\n                                    ^"),
    ("unknown function", BASE.replace("x[b, t, d] * w[d, f]", "foo(x[b, t, d] * w[d, f])"),
     "m.ein:5:14: error: unknown function 'foo' (known: exp, log, sqrt, rsqrt, tanh, sigmoid, silu, gelu, "
     "relu, abs)\n  y[b, t, f] = foo(x[b, t, d] * w[d, f])\n               ^~~"),
    ("carry changes shape", REPEAT,
     "m.ein:6:21: error: repeat block changes the shape of its carried value: 'c' is [b=2, t=4, f=16] but "
     "yield 'q' is [b=2, t=4, d=8]\n  r[b, t, f] = repeat l (c = y) {\n                      ^"),
    ("unknown dtype", BASE.replace("param w[d, f]", "param w[d, f] : f8"),
     "m.ein:4:17: error: unknown dtype 'f8' (known: f32, f64, bf16, f16, i8, i32)\n"
     "  param w[d, f] : f8\n                  ^~"),
    ("zero size", BASE.replace("D = 8", "D = 0"),
     "m.ein:1:20: error: size D must be positive, got 0\n  size B = 2, T = 4, D = 0, F = 16\n                     ^"),
    ("unknown output", BASE.replace("output y", "output yy"),
     "m.ein:6:8: error: unknown tensor 'yy' in output\n  output yy\n         ^~"),
    ("no output", BASE.replace("output y", ""),
     "m.ein:1:1: error: the spec declares no output (add: output NAME)\n"
     "  size B = 2, T = 4, D = 8, F = 16\n  ^"),
    ("undeclared mesh axis", BASE.replace("param w[d, f]", "param w[d@z, f]"),
     "m.ein:4:7: error: 'w' is laid out over mesh axis z, which the mesh does not declare\n"
     "  param w[d@z, f]\n        ^"),
    ("state never written", BASE.replace("param w[d, f]", "param w[d, f]\nstate kv[b, d]"),
     "m.ein:5:7: error: state 'kv' is never written (add a write(...) statement)\n  state kv[b, d]\n        ^~"),
]


@pytest.mark.parametrize("name,text,message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_error_messages(name, text, message):
    assert _err(text) == message


def test_at_least_ten_distinct_mistakes_are_pinned():
    assert len({m for _, _, m in MISTAKES}) >= 10


def test_names_that_start_with_keywords():
    text = ("size A = 2\nindex a: A\ninput params[a]\nstates[a] = exp(params[a])\n"
            "summary[a] = states[a] * 2.0\nmaximum[a] = summary[a] + inputs_[a]\ninput inputs_[a]\noutput maximum\n")
    graph = parse(text)
    assert [s.name for s in graph.body.stmts] == ["states", "summary", "maximum"]
    assert parse(format_graph(graph)) == graph
