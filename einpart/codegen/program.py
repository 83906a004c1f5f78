"""A step program (prefill or decode): one jax.shard_map body over local blocks.

StepProgram holds what one generated function's emitters share (the graph, its sizes,
the namespace, the values bound so far, the next state) and writes the function:
reads of weights, state and inputs, then the IR's statements one after another
(StatementEmitter, CollectiveEmitter, LayerEmitter), then the outputs and next state.
"""
from __future__ import annotations

from ..ir import graph as g
from ..ir.layout import reshard, type_layout
from ..ir.model import step_axes
from ..ir.printer import format_type
from ..ir.verify import index_sizes, resolve_sizes
from .code import Val, Writer, one_line, spec_code
from .attention import AttentionEmitter, check_attention_mode
from .collectives import CollectiveEmitter
from .int8_matmul import Int8MatmulEmitter, check_int8_matmul_mode, sibling_groups
from .layers import LayerState, LayerEmitter
from .names import Namespace, literal
from .statements import StatementEmitter


class StepProgram(StatementEmitter, CollectiveEmitter, LayerEmitter, AttentionEmitter, Int8MatmulEmitter):
    """One generated function: `name(params, state, inputs, pos)` for a single-phase planned graph."""

    def __init__(self, graph: g.Graph, name: str, layers: str, given: dict | None = None,
                 attention: str = "einsum", platform: str | None = None, int8_matmul: str = "xla"):
        self.graph = graph
        # unrolled, a stacked weight or state is a tuple of the layers' arrays (lower.py's
        # PER_LAYER); a scan needs the stacked array
        self.per_layer = layers == "unroll"
        # weights passed in another layout than this program declares (a two-phase plan
        # whose phases lay a prepared weight out differently): moved when loaded
        self.given = {n: lay for n, lay in (given or {}).items()
                      if graph.decl(n) is not None and lay != type_layout(graph.decl(n).type)}
        self.name = name
        self.layers = layers
        self.mesh = dict(graph.mesh)
        self.sizes = resolve_sizes(graph)
        self.idx = index_sizes(graph, self.sizes)
        self.types = graph.types()
        self.ns = Namespace()
        self.w = Writer()
        self.vals: dict[str, Val] = {}
        self.next_state: dict[str, str] = {}
        self.merge = True                   # step programs merge reductions (layout.collective_groups)
        self.grouped: set = set()           # members of the block's merged groups
        self.partial: dict = {}             # member -> (local partial variable, what finishes it)
        self.uses_pmax = False              # emits pmax(): the module then defines it (PMAX_HELPER)
        # the low float dtype the spec stores its weights in (None: float32 products stay float32)
        self.float_storage = next((d.type.dtype for d, _ in graph.all_decls()
                                   if d.kind == "param" and d.type.dtype in ("bf16", "f16")), None)
        # inside a repeat body: state name -> LayerState (the stacked cache, updated in place)
        self.layer_state: dict[str, LayerState] = {}
        for d, _ in graph.all_decls():  # tensor variables first: stable names
            self.ns.tensor(d.name)
            if _ is not None:
                self.ns.tensor(d.name, "all")
        for s, _ in graph.all_stmts():
            self.ns.tensor(s.name)
            if isinstance(s.op, g.Repeat):
                self.ns.tensor(s.op.carry)
        # softmax-attention chains computed by one fused call (attention.py): member -> (chain, implementation)
        self.attention_mode = check_attention_mode(attention)
        self.platform = platform
        self.fused = self.select_attention()
        # int8 weight products through the Pallas GEMV kernel (int8_matmul.py); set once one is emitted
        self.int8_matmul_mode = check_int8_matmul_mode(int8_matmul)
        self.uses_int8_gemv = False
        # products sharing their activation, one int8_gemv_siblings call per group (int8_matmul.py)
        self.int8_siblings = sibling_groups(graph, self.int8_matmul_mode, platform)
        self.int8_siblings_done: set = set()
        self.uses_int8_gemv_siblings = False

    def load(self, d: g.Decl, var: str) -> Val:
        """A declared tensor as this program reads it (moved if it is given in another layout)."""
        declared = type_layout(d.type)
        if d.name not in self.given:
            return Val(var, d.type.indices, declared, d.type.dtype)
        have = {i: tuple(self.given[d.name].get(i, ())) for i in d.type.indices}
        self.w(f"# {one_line(d.name)} is given as {spec_code(have, d.type.indices)}; this program reads it as "
               f"{spec_code(declared, d.type.indices)}")
        moved = self.moves(Val(var, d.type.indices, have, d.type.dtype), reshard(have, declared, d.type.indices))
        return Val(moved.var, d.type.indices, declared, d.type.dtype)

    def emit(self) -> list[str]:
        w = self.w
        graph = self.graph
        ax = step_axes(graph)
        q_size = self.idx[ax.query]
        w(f"def {self.name}(params, state, inputs, pos):")
        w.depth += 1
        w(f'"""The {self.name} step (T={q_size}): one shard_map body over local blocks. pos is the position '
          f'of the first token."""')
        w("# global sizes: " + ", ".join(f"{i.name}={self.idx[i.name]}" for i in graph.indices))
        for d, owner in graph.all_decls():
            src = {"param": "params", "state": "state", "input": "inputs"}[d.kind]
            var = self.ns.tensor(d.name, "all") if owner is not None else self.ns.tensor(d.name)
            local = self.local(d.type.indices, self.given.get(d.name, type_layout(d.type)))
            if owner is not None and self.per_layer and d.kind != "input":
                local = f"{self.idx[owner.index]} arrays {local}"
            elif owner is not None:
                local = (self.idx[owner.index],) + local
            note = f"{d.kind} {d.name}{format_type(d.type)}" + (f" x {owner.index}" if owner is not None else "")
            w(f"{var} = {src}[{literal(d.name, 'tensor name')}]  # {one_line(note)}: local {local}")
            if owner is None:
                self.vals[d.name] = self.load(d, var)
        self.block(graph.body.stmts)
        outs = ", ".join(f"{literal(n, 'tensor name')}: {self.vals[n].var}" for n in graph.outputs)
        states = [d for d, _ in graph.all_decls() if d.kind == "state"]
        nxt = ", ".join(f"{literal(d.name, 'tensor name')}: {self.next_state[d.name]}" for d in states)
        w(f"return {{{outs}}}, {{{nxt}}}")
        w.depth -= 1
        return w.lines
