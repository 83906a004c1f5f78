"""Shared test set-up and helpers.

JAX runs on 8 simulated CPU devices, set here before any test imports JAX
(each flag only if the environment does not set it). XLA's compile time
dominates the lowering tests: LLVM at -O0 and the classic (not MLIR) CPU
fusion emitters cut it about 5x, with the same results.

Test modules import the helpers directly (`from conftest import EXAMPLES,
spec_path`) or use the `examples_dir` fixture."""
from __future__ import annotations

import os
from pathlib import Path

TEST_XLA_FLAGS = {"xla_force_host_platform_device_count": "8", "xla_backend_optimization_level": "0",
                  "xla_cpu_use_fusion_emitters": "false"}
_flags = os.environ.get("XLA_FLAGS", "")
for _k, _v in TEST_XLA_FLAGS.items():
    if _k not in _flags:
        _flags += f" --{_k}={_v}"
os.environ["XLA_FLAGS"] = _flags.strip()

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def spec_path(name: str) -> Path:
    """The path of an example spec by name: "llama" or "llama.ein"."""
    path = EXAMPLES / (name if name.endswith(".ein") else f"{name}.ein")
    if not path.is_file():
        raise FileNotFoundError(f"no example spec {path}")
    return path


@pytest.fixture
def examples_dir() -> Path:
    return EXAMPLES
