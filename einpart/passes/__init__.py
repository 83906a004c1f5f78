"""Passes over the IR and the pipeline that runs them. Importing this package
registers the built-in passes."""
from .manager import PASSES, Pass, parse_pipeline, register_pass, run_pipeline
from . import basic  # noqa: F401  (registers dce, cast)
from . import defer_norm, int8, multiquery  # noqa: F401  (registers the rewrites)
from . import shard  # noqa: F401  (registers the planner's shard pass)
from . import plans  # noqa: F401  (registers the plan pass: plans without the ILP)

__all__ = ["PASSES", "Pass", "parse_pipeline", "register_pass", "run_pipeline"]
