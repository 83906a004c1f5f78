"""The einpart command: summaries, canonical text, dumps, and one-line
errors with exit status 1 (never a traceback)."""
import subprocess
import sys
from pathlib import Path

import pytest

from einpart.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_llama_8b(capsys):
    code, out, err = run(capsys, "check", str(EXAMPLES / "llama.ein"),
                         "--set", "D=4096,F=14336,H=32,G=8,K=128,L=32,V=128256")
    assert code == 0 and err == ""
    assert "parameters: 8.03e+09 (8,030,261,248) in 12 tensors, 32.1 GB f32" in out
    assert "repeat l (32 times, 'xl'): 25 statements, 11 declarations" in out


def test_check_palm_540b(capsys):
    code, out, _ = run(capsys, "check", str(EXAMPLES / "palm.ein"),
                       "--set", "D=18432,F=73728,H=48,K=256,L=118", "--set", "V=256000")
    assert code == 0
    assert "parameters: 5.40e+11 (540,356,474,880)" in out


def test_builtin_example_by_name(capsys):
    code, out, _ = run(capsys, "check", "gpt2")
    assert code == 0 and out.startswith("gpt2: ok\nsizes: B=2 T=8 S=32 P=64 D=64 F=256 H=4 K=16 L=2 V=256\n")


def test_fmt_prints_canonical_text(capsys, tmp_path):
    messy = tmp_path / "m.ein"
    messy.write_text("size A=2\nindex a:A\ninput x[a]\ny[a]=exp(x[a])   # comment\noutput y\n")
    code, out, _ = run(capsys, "fmt", str(messy))
    assert code == 0
    assert out == "size A = 2\nindex a: A\ninput x[a]\ny[a] = exp(x[a])\noutput y\n"


def test_dump_writes_each_pass(capsys, tmp_path):
    code, out, _ = run(capsys, "dump", "palm", "--pipeline", "dce,cast{dtype=f16}", "--dump-dir", str(tmp_path))
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00-input.ein", "01-dce.ein", "02-cast.ein"]
    assert "cast{dtype=f16}" in out


@pytest.mark.parametrize("argv,message", [
    (["check", "no/such.ein"], "no/such.ein: error: cannot read spec: No such file or directory\n"),
    (["check", "llama", "--set", "Q=3"],
     "unknown size 'Q' in --set (this spec has: B, D, F, G, H, K, L, R, S, T, V)\n"),
    (["check", "llama", "--set", "D=big"], "--set D=big: expected NAME=INTEGER\n"),
    (["dump", "llama", "--pipeline", "bogus", "--dump-dir", "x"], None),
])
def test_one_line_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    if message is not None:
        assert err == message


def test_bad_spec_from_the_shell_exit_1_with_caret_no_traceback(tmp_path):
    bad = tmp_path / "bad.ein"
    bad.write_text("size A = 2\nindex a: A\ninput x[a]\ny[a] = x[a] * w[a]\noutput y\n")
    proc = subprocess.run([sys.executable, "-m", "einpart.cli", "check", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"{bad}:4:15: error: unknown tensor 'w'\n"
                           "  y[a] = x[a] * w[a]\n"
                           "                ^~~~\n")
