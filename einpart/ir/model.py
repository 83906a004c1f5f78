"""A spec as a model: random weights, empty state, and prefill / decode /
generate on the reference interpreter. The same conventions hold for the
JAX runtime: the first int input holds the token ids [batch, query
positions], the first output holds the logits, whose one extra axis is the
vocabulary."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import EinpartError
from . import graph as g
from .interpret import run_step
from .shapes import DeclShape, decl_shapes
from .verify import resolve_sizes


@dataclass(frozen=True)
class StepAxes:
    tokens: str        # the token input's name
    batch: str         # index of the batch axis
    query: str         # index of the query-position axis (T)
    logits: str        # the logits output's name
    vocab: str         # index of the vocabulary axis


def step_axes(graph: g.Graph) -> StepAxes:
    tok = next((d for d in graph.body.decls if d.kind == "input" and d.type.dtype in g.INT_DTYPES), None)
    if tok is None or len(tok.type.axes) != 2:
        raise EinpartError("the spec needs an integer input of token ids with two axes [batch, positions]")
    logits = graph.outputs[0]
    typ = graph.types()[logits]
    extra = [i for i in typ.indices if i not in tok.type.indices]
    if len(extra) != 1 or len(typ.indices) != 3:
        raise EinpartError(f"the first output '{logits}' must be logits over the token axes "
                           f"[{', '.join(tok.type.indices)}] plus one vocabulary axis")
    return StepAxes(tok.name, tok.type.indices[0], tok.type.indices[1], logits, extra[0])


def init_value(info: DeclShape, rng: np.random.Generator) -> np.ndarray:
    """Random init: the `init` annotation (ones, zeros, normal(std)), else normal(0.02)."""
    spec = g.attr(info.decl.attrs, "init")
    if isinstance(spec, g.Sym) and spec.name == "ones":
        return np.ones(info.shape, np.float32)
    if isinstance(spec, g.Sym) and spec.name == "zeros":
        return np.zeros(info.shape, np.float32)
    std = 0.02
    if isinstance(spec, g.Term) and spec.fn == "normal" and spec.args:
        std = float(spec.args[0])
    return (rng.standard_normal(info.shape) * std).astype(np.float32)


def init_params(graph: g.Graph, seed: int = 0, sizes: dict | None = None) -> dict[str, np.ndarray]:
    """Random float32 weights for every param, in declaration order, from one seed."""
    rng = np.random.default_rng(seed)
    shapes = decl_shapes(graph, sizes)
    return {n: init_value(i, rng) for n, i in shapes.items() if i.decl.kind == "param"}


def init_state(graph: g.Graph, sizes: dict | None = None, dtype=np.float32) -> dict[str, np.ndarray]:
    shapes = decl_shapes(graph, sizes)
    return {n: np.zeros(i.shape, dtype) for n, i in shapes.items() if i.decl.kind == "state"}


class Reference:
    """Prefill, decode and greedy generation on the reference interpreter."""

    def __init__(self, graph: g.Graph, params: dict, dtype=np.float32):
        self.graph = graph
        self.params = params
        self.dtype = dtype
        self.axes = step_axes(graph)

    def new_state(self, batch: int | None = None) -> dict:
        sizes = resolve_sizes(self.graph)
        if batch is not None:
            sizes = resolve_sizes(self.graph, {self.graph.index_size_names()[self.axes.batch]: batch})
        return init_state(self.graph, sizes, self.dtype)

    def step(self, tokens: np.ndarray, pos: int, state: dict) -> tuple[np.ndarray, dict]:
        outs, new_state = run_step(self.graph, self.params, {self.axes.tokens: np.asarray(tokens, np.int32)},
                                   state, pos, self.dtype)
        logits = outs[self.axes.logits]
        typ = self.graph.types()[self.axes.logits].indices
        order = [typ.index(self.axes.batch), typ.index(self.axes.query), typ.index(self.axes.vocab)]
        return np.transpose(logits, order), new_state

    def generate(self, prompt: np.ndarray, max_new: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Greedy: returns the new tokens [batch, max_new] and the logits of every step."""
        prompt = np.asarray(prompt, np.int32)
        state = self.new_state(prompt.shape[0])
        logits, state = self.step(prompt, 0, state)
        history = [logits]
        pos = prompt.shape[1]
        tokens = []
        nxt = logits[:, -1].argmax(-1).astype(np.int32)
        for _ in range(max_new):
            tokens.append(nxt)
            if len(tokens) == max_new:
                break
            logits, state = self.step(nxt[:, None], pos, state)
            history.append(logits)
            pos += 1
            nxt = logits[:, -1].argmax(-1).astype(np.int32)
        return np.stack(tokens, axis=1), history
