"""Hostile specs: text that looks like Python, names of builtins and of JAX
modules, unicode look-alikes, huge / zero / negative sizes, deep nesting and
thousands of statements. Each gets a clear error or correct generated code;
the generated module (read back with `ast`) never uses spec text as code."""
from __future__ import annotations

import ast
import re
import time

import numpy as np
import pytest

from einpart.cli import main as cli_main
from einpart.codegen import generate_source
from einpart.errors import SpecError
from einpart.ir import format_graph, parse
from einpart.ir.model import Reference, init_params
from einpart.passes import run_pipeline

SIMPLE = "plan{mesh='x=2',kind=simple}"

BASE = """size B = 2, T = 4, S = 8, V = 16, D = 8
index b: B, t: T, s: S, v: V, d: D
input tokens[b, t] : i32
param emb[v, d]
param out[d, v]
state cache[b, s, d]
h[b, t, d] = take(emb[v, d], tokens[b, t])
kc[b, s, d] = write(cache[b, s, d], h[b, t, d])
x[b, t, d] = h[b, t, d] * 0.5
logits[b, t, v] = x[b, t, d] * out[d, v]
output logits
"""
PAYLOAD = "__import__('os').system('echo pwned')"

# Tensors, indices, sizes and mesh axes named like what generated code (or Python) uses.
HOSTILE = """size jnp = 2, lax = 4, sys = 8, np = 16, os = 8
index os: os, jax: lax, print: sys, len: np, eval: jnp
mesh sys = 2
input __import__[eval, jax] : i32
param jnp[len, os] {note="%s"}
param np[os, len]
state lax[eval, print, os]
jax[eval, jax, os] = take(jnp[len, os], __import__[eval, jax])
sys[eval, print, os] = write(lax[eval, print, os], jax[eval, jax, os])
exec[eval, jax, os] = %s
print[eval, jax, len] = exec[eval, jax, os] * np[os, len] {why="eval('1')\\n\\"quoted\\""}
output print
"""
HOSTILE_NAMES = {"__import__", "print", "jax", "eval", "len", "jnp", "lax", "np", "os", "sys", "exec"}


def compiled(text: str, pipeline: str = SIMPLE, layers: str = "scan"):
    graph = parse(text, "h.ein")
    planned = run_pipeline(graph, pipeline).graph
    return graph, planned, generate_source(planned, layers)


def identifiers(source: str) -> tuple[set[str], set[str], set[str]]:
    """(names bound in the module, names read, attribute names) of generated source."""
    tree = ast.parse(source)
    bound, read, attrs = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.Lambda)) and hasattr(node, "name"):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.Attribute):
            attrs.add(node.attr)
    return bound, read, attrs


def string_constants(source: str) -> list[str]:
    """Every string literal but docstrings (codegen's own text; the module's is checked apart)."""
    tree = ast.parse(source)
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
    return names


# ------------------------------------------------------------------ text that looks like Python
@pytest.mark.parametrize("layers", ["scan", "unroll"])
def test_hostile_names_and_strings_never_reach_the_code(layers):
    text = HOSTILE % (PAYLOAD, "jax[eval, jax, os] * 0.5")
    graph, planned, source = compiled(text, layers=layers)
    assert parse(format_graph(graph), "h.ein") == graph       # quotes and newlines round-trip escaped
    assert dict(graph.body.decls[1].attrs)["note"] == PAYLOAD
    bound, read, attrs = identifiers(source)
    own = imports(source)                                       # jax, jnp, lax, np, P
    assert own == {"annotations", "jax", "jnp", "lax", "P"} or own >= {"jax", "jnp", "lax"}
    for name in HOSTILE_NAMES:
        # a module name the program imports itself is only read, never rebound by spec text
        assert name not in bound - own, name
        if name not in own:
            assert name not in read and name not in attrs, name
    # spec strings do not appear at all; spec names only as the validated dict keys
    assert "__import__(" not in source and "echo pwned" not in source and "eval('1')" not in source
    for s in string_constants(source):
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*|[A-Za-z,]*->[A-Za-z]*", s), s   # names, einsum subscripts


def test_hostile_program_computes_what_the_benign_one_does():
    """Correct code, not just harmless code: the hostile spec is the tiny model with every name
    changed, so with the same weights it gives the same logits as the reference."""
    from einpart.runtime import Executable
    text = HOSTILE % (PAYLOAD, "(" * 2000 + "jax[eval, jax, os]" + ")" * 2000 + " * 0.5")
    graph = parse(text, "h.ein")
    params = init_params(graph, 1)
    prompt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    ex = Executable(run_pipeline(graph, "plan{mesh='sys=2',kind=simple}").graph, seed=1)
    ref = Reference(graph, params)
    want, _ = ref.step(prompt, 0, ref.new_state(2))
    np.testing.assert_allclose(ex.prefill(prompt), want, rtol=1e-5, atol=1e-6)
    benign = parse(BASE, "b.ein")
    bref = Reference(benign, {"emb": params["jnp"], "out": params["np"]})
    bwant, _ = bref.step(prompt, 0, bref.new_state(2))
    np.testing.assert_allclose(want, bwant, rtol=1e-6)


def test_a_spec_file_name_cannot_break_out_of_the_docstring():
    """The module docstring names the spec's file; a name with quotes once ended the
    docstring and ran `__import__(...)` when the module was imported."""
    from einpart.codegen import simple_plan
    name = 'x"""+__import__("os").system("echo pwned")+"""\n\u043e.ein'
    source = generate_source(simple_plan(parse(BASE, name), {"x": 2}))
    tree = ast.parse(source)
    doc = tree.body[0]
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    assert doc.value.value.startswith('einpart: x???+__import__(?os?).system(?echo pwned?)+??? ?.ein lowered')
    bound, read, attrs = identifiers(source)
    assert "__import__" not in read and "system" not in attrs


@pytest.mark.parametrize("name, where", [
    ("оut", "\u043e (Cyrillic o)"),          # Cyrillic о
    ("ｏut", "\uff4f (fullwidth o)"),         # fullwidth ｏ
    ("pаram", "a Cyrillic a in a keyword"),
])
def test_unicode_look_alikes_are_syntax_errors(name, where):
    text = BASE.replace("param out", f"param {name}" if name != "pаram" else "pаram out")
    with pytest.raises(SpecError) as e:
        parse(text, "u.ein")
    bad = next(c for c in (name if name != "pаram" else "pаram") if ord(c) > 127)
    line = 5
    col = text.splitlines()[line - 1].index(bad) + 1
    assert str(e.value).startswith(f"u.ein:{line}:{col}: error: unexpected character {bad!r}"), str(e.value)


def test_non_identifier_names_are_refused_by_codegen_even_if_a_pass_makes_them():
    from einpart.codegen.names import Namespace, check_identifier
    for bad in ["os.system", "a b", "x\ny", "оut", "1x", ""]:
        with pytest.raises(Exception) as e:
            check_identifier(bad, "tensor name")
        assert str(e.value) == (f"tensor name {bad!r} is not a valid identifier ([A-Za-z_][A-Za-z0-9_]*); "
                                f"it cannot appear in generated code")
    ns = Namespace()
    assert [ns.tensor(n) for n in ("print", "jax", "t_print")] == ["t_print", "t_jax", "t_t_print"]
    assert ns.fresh("jnp") == "jnp1" and ns.fresh("len") == "len1"


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize("sizes, message", [
    ({"D": 0}, "h.ein:1:35: error: size D must be positive, got 0"),
    ({"D": -3}, "h.ein:1:35: error: size D must be positive, got -3"),
    ({"D": 10**19}, "h.ein:1:35: error: size D = 10000000000000000000 is too large: array dimensions are "
                    "64-bit (at most 2**63 - 1)"),
    ({"D": 10**18}, "h.ein:4:7: error: 'emb' [v=16, d=1000000000000000000] has 16000000000000000000 elements, "
                    "more than a 64-bit count (2**63 - 1) allows"),
])
def test_bad_sizes_are_errors(sizes, message):
    with pytest.raises(SpecError) as e:
        parse(BASE, "h.ein", sizes=sizes)
    assert str(e.value).splitlines()[0] == message


@pytest.mark.parametrize("edit, message", [
    ("D = -8", "h.ein:1:39: error: unexpected '-', expected '(', a name, an integer"),
    ("D = 0", "h.ein:1:35: error: size D must be positive, got 0"),
    ("D = 8 / 0", "h.ein:1:35: error: size D = 8 / 0 does not divide evenly"),
    ("D = 99999999999999999999", "h.ein:1:35: error: size D = 99999999999999999999 is too large: array "
                                 "dimensions are 64-bit (at most 2**63 - 1)"),
])
def test_bad_sizes_in_the_text(edit, message):
    with pytest.raises(SpecError) as e:
        parse(BASE.replace("D = 8", edit), "h.ein")
    assert str(e.value).splitlines()[0] == message


def test_huge_sizes_that_fit_compile_to_code_with_the_exact_numbers():
    """B = 10**17: every tensor still has fewer than 2**63 elements; nothing is allocated to
    plan or generate code, and the numbers reach the source as exact integers."""
    graph, planned, source = compiled(BASE.replace("B = 2", "B = 100000000000000000"))
    ast.parse(source)
    assert "100000000000000000" in source or "50000000000000000" in source


# ------------------------------------------------------------------ nesting and size of a spec
def test_2000_nested_parentheses_compile():
    deep = "(" * 2000 + "h[b, t, d]" + ")" * 2000
    graph, _, source = compiled(BASE.replace("x[b, t, d] = h[b, t, d] * 0.5", f"x[b, t, d] = {deep} * 0.5"))
    assert graph == parse(BASE, "h.ein")
    ast.parse(source)


@pytest.mark.parametrize("expr", [" + ".join(["h[b, t, d]"] * 3000), "-" * 3000 + "h[b, t, d]",
                                  "exp(" * 1000 + "h[b, t, d]" + ")" * 1000])
def test_deeply_nested_expressions_are_one_error_not_a_recursion_error(expr, capsys, tmp_path):
    text = BASE.replace("x[b, t, d] = h[b, t, d] * 0.5", f"x[b, t, d] = {expr}")
    with pytest.raises(SpecError) as e:
        parse(text, "h.ein")
    head = str(e.value).splitlines()[0]
    assert head.startswith("h.ein:9:") and head.endswith(
        "error: expression nested too deeply (more than 200 levels of operators or parentheses); "
        "split it into several statements"), head
    path = tmp_path / "deep.ein"
    path.write_text(text)
    assert cli_main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "Traceback" not in err and "RecursionError" not in err


def test_a_long_sum_under_the_limit_compiles_and_computes():
    terms = " + ".join(["h[b, t, d]"] * 150)
    text = BASE.replace("x[b, t, d] = h[b, t, d] * 0.5", f"x[b, t, d] = {terms}")
    graph, _, source = compiled(text)
    ast.parse(source)
    params = init_params(graph, 0)
    prompt = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.int32)
    ref = Reference(graph, params)
    got, _ = ref.step(prompt, 0, ref.new_state(2))
    want = 150 * params["emb"][prompt] @ params["out"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_thousands_of_statements_compile_in_bounded_time():
    chain = "\n".join(f"x{i}[b, t, d] = x{i - 1}[b, t, d] * 0.5" for i in range(1, 2000))
    text = BASE.replace("x[b, t, d] = h[b, t, d] * 0.5", "x0[b, t, d] = h[b, t, d] * 1.0\n" + chain) \
               .replace("x[b, t, d] * out", "x1999[b, t, d] * out")
    start = time.process_time()
    graph, planned, source = compiled(text)
    took = time.process_time() - start
    assert len(graph.body.stmts) == 2003
    assert source.count("* 0.5") >= 1999
    ast.parse(source)
    assert took < 60, took
