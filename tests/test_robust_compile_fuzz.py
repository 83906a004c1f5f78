"""Fuzzing through the compiler, not only the parser: every mutated spec that
parses and verifies also gets through the pipeline (dce, a plan: the ILP
planner or the built-in simple plan, on a 2x2 mesh) and codegen
(generate_source, scan or unroll), or fails with an EinpartError. The
generated module must compile as Python. No other exception escapes, and each
input takes a bounded time.

The default run compiles ~100 mutated specs (~10 s); `pytest -m slow` 5,000."""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from einpart.codegen import generate_source
from einpart.errors import EinpartError, PassError, SpecError
from einpart.ir import parse
from einpart.passes import run_pipeline
from test_fuzz_spec import MESSAGE, TEXTS, mutate

SECONDS_PER_INPUT = 60.0    # the ILP has time_limit=2; everything else is far below a second
SIZES = [1, 2, 3, 4, 6, 8, 16, 64, 10**18]
PIPELINES = {"shard": "dce,shard{mesh='x=2,y=2',hardware=cpu,time_limit=2,workers=1}",
             "simple": "dce,plan{mesh='x=2,y=2',kind=simple}"}
# A PassError with these words is a compiler bug: a pass broke a graph that verified.
BUGS = ("does not verify", "does not survive printing", "returned")


def set_sizes(text: str, picks: list[int | None]) -> str:
    """Give the `size X = N` literals other values (the usual way a user changes a model):
    the i-th literal becomes SIZES[picks[i]]; None, or no pick, keeps it."""
    it = iter(picks)

    def new(m):
        if not m.string[:m.start()].rsplit("\n", 1)[-1].startswith("size"):
            return m.group(1)
        pick = next(it, None)
        return m.group(1) if pick is None else str(SIZES[pick % len(SIZES)])
    return re.sub(r"(?<== )(\d+)(?=\s*(,|\n))", new, text)


def compile_or_fail(text: str, plan: str, layers: str) -> str:
    """'compiled', 'rejected' (a spec error), or 'refused' (a clean EinpartError from a pass or
    codegen). Anything else fails the test."""
    start = time.perf_counter()
    try:
        graph = parse(text, "f.ein")
    except SpecError as e:
        assert MESSAGE.match(str(e)), str(e)
        return "rejected"
    except EinpartError:
        return "rejected"
    try:
        planned = run_pipeline(graph, PIPELINES[plan]).graph
        source = generate_source(planned, layers)
    except PassError as e:
        assert not any(b in str(e) for b in BUGS), f"{e}\n--- spec:\n{text}"
        assert str(e).startswith("pass '"), str(e)
        return "refused"
    except EinpartError as e:
        assert str(e) and "Traceback" not in str(e), str(e)
        return "refused"
    finally:
        took = time.perf_counter() - start
        assert took < SECONDS_PER_INPUT, f"{took:.1f} s for one input:\n{text}"
    compile(source, "generated.py", "exec")    # valid Python
    return "compiled"


def fuzz(n: int):
    @settings(max_examples=n, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(st.sampled_from(range(len(TEXTS))),
           st.lists(st.one_of(st.none(), st.integers(0, len(SIZES) - 1)), max_size=12),
           st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10**6), st.integers(0, 10**6),
                              st.integers(0, 5)), max_size=2),
           st.sampled_from(sorted(PIPELINES)), st.sampled_from(["scan", "unroll"]))
    def through_the_compiler(which, sizes, ops, plan, layers):
        text = set_sizes(TEXTS[which], sizes)
        if ops:
            text = mutate(text, ops)
        outcomes.append(compile_or_fail(text, plan, layers))

    outcomes: list[str] = []
    return through_the_compiler, outcomes


def test_set_sizes_changes_only_size_literals():
    text = "size B = 2, T = 8\nindex b: B\nx[b] = y[b] * 2\n"
    assert set_sizes(text, [8, 0]) == "size B = 1000000000000000000, T = 1\nindex b: B\nx[b] = y[b] * 2\n"
    assert set_sizes(text, [None, 2]) == "size B = 2, T = 3\nindex b: B\nx[b] = y[b] * 2\n"
    assert set_sizes(text, []) == text


def test_compile_fuzz_small():
    run, outcomes = fuzz(100)
    run()
    assert outcomes.count("compiled") >= 20, outcomes   # the pipeline is really exercised


@pytest.mark.slow
def test_compile_fuzz_5000():
    run, outcomes = fuzz(5000)
    run()
    assert outcomes.count("compiled") >= 1000
