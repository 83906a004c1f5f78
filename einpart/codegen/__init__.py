"""Lowering: a planned graph -> the source of a Python module of jax.shard_map programs.

generate_source(graph, layers="scan"|"unroll") is the entry point (lower.py, which
assembles the module from program.py, prepare.py and their emitters);
the plans it lowers without the ILP (set_plan, random_plan, simple_plan) live in
einpart.passes.plans and are re-exported here for tests and baselines.
Nothing here imports jax: the generated text does."""
from .lower import LAYER_MODES, generate_source, program_graphs, split_prepare
from .names import Namespace
from ..passes.plans import parse_mesh, random_plan, replicated_plan, set_plan, simple_plan, specialize

__all__ = ["LAYER_MODES", "Namespace", "generate_source", "parse_mesh", "program_graphs", "random_plan",
           "replicated_plan", "set_plan", "simple_plan", "specialize", "split_prepare"]
