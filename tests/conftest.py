"""Shared test helpers: where the example specs live.

Test modules import these directly (`from conftest import EXAMPLES, spec_path`)
or use the `examples_dir` fixture."""
from __future__ import annotations

from pathlib import Path

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
