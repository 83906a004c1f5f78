"""The einsum-cascade IR: graph dataclasses, the spec language (parser and
printer), the verifier and the numpy reference interpreter."""
from .graph import Graph
from .parser import parse, parse_file
from .printer import format_graph
from .verify import verify

__all__ = ["Graph", "parse", "parse_file", "format_graph", "verify"]
