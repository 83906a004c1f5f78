"""Fuzzing the spec language: every input either parses and verifies or fails
with einpart's own error and a FILE:LINE:COL message; nothing else escapes.

The default run tries a few hundred inputs; `pytest -m slow` runs 5,000+."""
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from einpart.errors import EinpartError, SpecError
from einpart.ir import format_graph, parse

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.ein"))
TEXTS = [p.read_text() for p in EXAMPLES]
TOKEN = re.compile(r"\s+|[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|.")
TERMINALS = ["size", "index", "mesh", "param", "input", "state", "output", "repeat", "yield", "take",
             "write", "rope", "position", "causal", "sum", "max", "mean", "exp", "rsqrt", "x", "w", "b",
             "d", "D", "=", ",", ":", "[", "]", "(", ")", "{", "}", "@", "+", "-", "*", "/", "1", "2.5",
             "1e-05", "\n", " ", '"s"', "# c\n", "i32", "bf16"]
MESSAGE = re.compile(r"^f\.ein(:\d+:\d+)?: error: \S")


def check(text: str) -> None:
    try:
        graph = parse(text, "f.ein")
    except SpecError as e:
        assert MESSAGE.match(str(e)), str(e)
        return
    except EinpartError as e:  # e.g. a size override; still one line, never a traceback
        assert str(e) and "\n" not in str(e)
        return
    assert parse(format_graph(graph)) == graph  # whatever parses also round-trips


def mutate(text: str, ops: list[tuple[int, int, int, int]]) -> str:
    toks = TOKEN.findall(text)
    for kind, i, j, n in ops:
        if not toks:
            break
        i, j = i % len(toks), j % len(toks)
        if kind == 0:
            del toks[i]
        elif kind == 1:
            toks.insert(i, toks[j])
        elif kind == 2:
            toks[i], toks[j] = toks[j], toks[i]
        elif kind == 3 and toks[i].isdigit():
            toks[i] = str([0, 1, 3, 7, 10**18, 2**31][n % 6])
        elif kind == 4:
            lines = "".join(toks).splitlines(keepends=True)
            a, b = i % len(lines), j % len(lines)
            lines[a], lines[b] = lines[b], lines[a]
            toks = TOKEN.findall("".join(lines))
    return "".join(toks)


def fuzz(n: int):
    common = settings(max_examples=n, deadline=2000, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])

    @common
    @given(st.binary(max_size=200))
    def random_bytes(data):
        check(data.decode("latin-1"))

    @common
    @given(st.lists(st.sampled_from(TERMINALS), max_size=60))
    def token_soup(toks):
        check(" ".join(toks))

    @common
    @given(st.sampled_from(range(len(TEXTS))),
           st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10**6), st.integers(0, 10**6),
                              st.integers(0, 5)), min_size=1, max_size=4))
    def mutations(which, ops):
        check(mutate(TEXTS[which], ops))

    return random_bytes, token_soup, mutations


@pytest.mark.parametrize("case", range(3), ids=["bytes", "tokens", "mutations"])
def test_fuzz_spec_small(case):
    fuzz(150)[case]()


@pytest.mark.slow
@pytest.mark.parametrize("case", range(3), ids=["bytes", "tokens", "mutations"])
def test_fuzz_spec_5000(case):
    fuzz(2000)[case]()
