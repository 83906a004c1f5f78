"""einpart.progress: progress lines on a terminal, nothing when piped, timings with -v."""
import io
import re
import sys

import pytest

from conftest import spec_path
from einpart import cli, progress
from einpart.passes.manager import PassRecord


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture(autouse=True)
def restore_progress():
    yield
    progress.configure()


def test_terminal_gets_steps_and_counters():
    out = FakeTTY()
    p = progress.Progress(out)
    with p.step("compiling prefill (XLA)"):
        pass
    for i in range(1, 4):
        p.count("generating tokens", i, 3)
    p.note("done")
    text = out.getvalue()
    assert text.startswith("einpart: compiling prefill (XLA) ...\n")
    assert re.search(r"^einpart: compiling prefill \(XLA\): \d+\.\d ms$", text, re.M)
    assert "\reinpart: generating tokens 1/3\reinpart: generating tokens 2/3\reinpart: generating tokens 3/3\n" in text
    assert text.endswith("einpart: done\n")


def test_piped_stream_gets_nothing():
    out = io.StringIO()
    p = progress.Progress(out)
    with p.step("solving the ILP"):
        pass
    p.count("generating tokens", 1, 2)
    p.note("x")
    p.timings([PassRecord("dce", 0.01)])
    assert out.getvalue() == ""


def test_verbose_prints_each_pass_and_its_time_even_when_piped():
    out = io.StringIO()
    p = progress.Progress(out, verbose=True)
    p.timings([PassRecord("input", 0.0), PassRecord("dce", 0.0123), PassRecord("shard{mesh=2x4}", 1.5)])
    assert out.getvalue() == "einpart: pass dce: 12.3 ms\neinpart: pass shard{mesh=2x4}: 1.50 s\n"


def test_cli_compile_piped_is_quiet_and_verbose_times_passes(tmp_path, capsys):
    cmd = ["compile", str(spec_path("llama")), "--mesh", "2x4", "--plan", "simple", "--pipeline", "dce",
           "--out", str(tmp_path)]
    assert cli.main(cmd) == 0                 # pytest's captured stderr is not a terminal
    quiet = capsys.readouterr()
    assert quiet.err == "" and "plan.json" in quiet.out
    assert cli.main(cmd + ["-v"]) == 0
    loud = capsys.readouterr()
    time = r"\d+\.\d+ m?s"
    assert re.fullmatch(rf"einpart: planning: {time}\neinpart: pass dce: {time}\n"
                        rf"einpart: pass plan\{{mesh=x=2,y=4\}}: {time}\n", loud.err), loud.err


def test_cli_run_on_a_terminal_shows_compiling_and_generating(monkeypatch, capsys):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    rc = cli.main(["run", str(spec_path("llama")), "--mesh", "x=1", "--plan", "simple", "--prompt-len", "3",
                   "--max-new", "3", "--set", "D=32,F=64,L=1,V=64"])
    assert rc == 0
    text = tty.getvalue()
    for step in ("planning", "drawing random weights", "compiling prefill for batch 2 x 3 (XLA)",
                 "compiling decode for batch 2 x 1 (XLA)"):
        assert f"einpart: {step} ...\n" in text, text
    assert "\reinpart: generating tokens 3/3\n" in text
    assert "sequence 0: prompt" in capsys.readouterr().out     # results still go to stdout
