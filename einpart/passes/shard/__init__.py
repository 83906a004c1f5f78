"""Sharding: meshes and hardware as data, the cost model, the strategy-graph
ILP (ilp.py, reduce.py) and the `shard` pass. Importing this package
registers the pass."""
from .shard import Plan, Shard, plan, specialize  # noqa: F401  (registers "shard")

__all__ = ["Plan", "Shard", "plan", "specialize"]
