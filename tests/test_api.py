"""The top-level library API: the names a user imports from `einpart`."""
import subprocess
import sys

import numpy as np

import einpart
from conftest import spec_path


def test_parse_format_interpret_round_trip():
    graph = einpart.parse(spec_path("palm").read_text(), sizes={"D": 32})
    assert einpart.parse(einpart.format(graph)) == graph
    params = einpart.init_params(graph, 0)
    ref = einpart.Reference(graph, params)
    tokens = np.arange(6, dtype=np.int32).reshape(2, 3)
    outs, _ = einpart.interpret(graph, params, {"tokens": tokens}, ref.new_state(), pos=0)
    logits, _ = ref.step(tokens, 0, ref.new_state())
    np.testing.assert_array_equal(outs["logits"], logits)  # palm's logits are [b, t, v] already


def test_lazy_names_resolve_and_import_einpart_does_not_load_jax():
    code = ("import sys, einpart; assert 'jax' not in sys.modules, 'jax imported'; "
            "from einpart.api import compile, Program; assert einpart.compile is compile; "
            "assert einpart.Program is Program and 'jax' not in sys.modules, 'compile imported jax'; "
            "assert callable(einpart.trace) and 'jax' in sys.modules; "
            "from einpart.runtime.executable import Executable; assert einpart.Executable is Executable")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_library_example_runs(monkeypatch, capsys):
    """The Python block under 'As a library' in README.md, run as written."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = text.split("## As a library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)
    exec(compile(block, "README.md", "exec"), {})  # the README's own example, nothing else
    out = capsys.readouterr().out
    assert "def decode(" in out and "jax.shard_map" in out
    assert out.startswith("plan on mesh x=2, y=4, priced on tpu-v4") and "why each layout won" in out
