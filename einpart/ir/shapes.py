"""Concrete shapes of declared tensors: what weights, inputs and state look
like in memory (stacked over the layer index inside a repeat block)."""
from __future__ import annotations

from dataclasses import dataclass

from . import graph as g
from .verify import index_sizes, resolve_sizes

DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "i8": 1, "i32": 4}


@dataclass(frozen=True)
class DeclShape:
    decl: g.Decl
    shape: tuple[int, ...]
    axes: tuple[str, ...]          # index per axis; the layer index first when stacked
    stacked: str | None            # the repeat index, or None at top level

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.decl.type.dtype]
        for s in self.shape:
            n *= s
        return n

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def decl_shapes(graph: g.Graph, sizes: dict[str, int] | None = None) -> dict[str, DeclShape]:
    """Every param / input / state with its full (stacked) shape."""
    idx = index_sizes(graph, sizes if sizes is not None else resolve_sizes(graph))
    out = {}
    for d, owner in graph.all_decls():
        axes = d.type.indices
        if owner is not None:
            axes = (owner.index,) + axes
        out[d.name] = DeclShape(d, tuple(idx[i] for i in axes), axes, owner.index if owner else None)
    return out
