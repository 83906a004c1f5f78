"""einpart: transformer inference written as einsum cascades, compiled to
sharded JAX programs.

    import einpart
    graph = einpart.parse(open("examples/llama.ein").read(), sizes={"D": 128})
    print(einpart.format(graph))
    outs, state = einpart.interpret(graph, params, {"tokens": tokens}, state, pos=0)
    ex = einpart.Executable(graph, {"x": 2, "y": 4})       # imports JAX on first use

    program = einpart.compile("examples/llama.ein", mesh="2x4", devices=8)   # plan, lower, load

The IR, the passes and the planner need no JAX; compile, Executable and trace import
it when first used, so `import einpart` stays light.
"""
from .errors import EinpartError, PassError, PlanError, SpecError
from .ir.interpret import run_step as interpret
from .ir.model import Reference, init_params
from .ir.parser import parse, parse_file
from .ir.printer import format_graph as format
from .passes import PASSES, Pass, parse_pipeline, register_pass, run_pipeline

__all__ = ["EinpartError", "Executable", "PASSES", "Pass", "PassError", "PlanError", "Program", "Reference",
           "SpecError", "compile", "format", "init_params", "interpret", "parse", "parse_file", "parse_pipeline", "register_pass",
           "run_pipeline", "trace"]

_LAZY = {"Executable": ("einpart.runtime.executable", "Executable"),
         "compile": ("einpart.api", "compile"), "Program": ("einpart.api", "Program"),
         "trace": ("einpart.frontend.trace", "trace")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'einpart' has no attribute {name!r}")
