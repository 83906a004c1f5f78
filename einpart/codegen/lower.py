"""Annotated IR -> a readable Python module of jax.shard_map programs.

`generate_source(graph, layers="scan"|"unroll"|"auto")` returns the text of a module with

- PARAM_SPECS / PREPARED_SPECS / STEP_PARAM_SPECS / STATE_SPECS / INPUT_SPECS /
  OUTPUT_SPECS: the PartitionSpec of every weight (as given; as prepared at
  load time; as the steps read them), state tensor (KV cache), input, output;
- `prepare(params)`: the spec's param-only statements (weight preparation:
  int8 quantisation, folded norm gains, pooled heads), run once at load time;
- `prefill(params, state, inputs, pos)` and `decode(...)`: shard_map bodies
  over local blocks, one statement of the IR after another, with exactly the
  collectives einpart.ir.layout.plan_stmt prescribes (operand moves, the
  reduction, the result move; reductions layout.collective_groups merges
  run as one psum / pmax on a tuple), positions offset by the shard's place on
  the mesh; decode is the same graph at T=1 (query splits dropped; a
  two-phase plan of the shard pass gives each program its own splits);
- `programs(mesh)`: the three wrapped in jax.shard_map.

This module assembles that text: the specs, the program graphs (prefill at the
spec's T, decode at T=1, a two-phase plan narrowed per phase) and the functions,
each from its own module:

- code.py: the text of code (dtype names, PartitionSpecs, tuples, Val, Writer);
- program.py: StepProgram, one prefill / decode function, from the mixins
  statements.py (einsums, elementwise code, take, rope), collectives.py (moves,
  reductions, merged groups, the differentiable pmax helper) and layers.py
  (the layer loop; state writes, the stacked KV cache written in place);
- prepare.py: split_prepare and `prepare(params)` (weight preparation).

Every identifier comes from a Namespace (names.py): spec names are validated
and mangled, never pasted.
"""
from __future__ import annotations

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import type_layout
from ..ir.model import step_axes
from ..ir.verify import index_sizes, resolve_sizes
from .code import spec_code, tuple_code
from .attention import ATTENTION_MODES, check_attention_mode
from .collectives import PMAX_HELPER
from .int8_matmul import check_int8_matmul_mode, kernel_import
from .names import check_identifier, docstring_text, literal, number
from ..passes.plans import specialize
from .prepare import PrepareProgram, split_prepare
from .program import StepProgram

__all__ = ["ATTENTION_MODES", "LAYER_MODES", "generate_source", "program_graphs", "split_prepare"]

LAYER_MODES = ("scan", "unroll", "auto")


# layers="auto" unrolls a model of at most this many layers. Unrolled, each layer's weights
# and KV cache are arrays of their own, which an H200 run measured fastest for Llama-8B
# (32 layers, benchmarks/README.md runs 6-7: decode b=1 5.9 ms vs 12.3 scanned, b=64 10.2 vs
# 25.5, prefill 8x2048 as fast as the scan) and quick to compile (decode 3.6 s, prefill 9.2 s).
# Compile time grows about linearly with the unrolled layers: at 64 layers of Llama-8B size
# (run 9) spec to ready took 36.7 s (XLA decode 9.5 s, prefill 13.9 s) and decode b=1 was 2x
# faster than scanned, so 128 layers would pass the 60 s compile budget of issue 7.
AUTO_UNROLL_LAYERS = 64


def resolve_layers(layers: str, graph: g.Graph) -> str:
    """The layer loop generate_source emits: "scan" or "unroll" as asked; "auto" unrolls
    when no repeat block has more than AUTO_UNROLL_LAYERS layers, and scans otherwise."""
    if layers != "auto":
        return layers
    idx = index_sizes(graph)
    depth = max((idx[s.op.index] for s, _ in graph.all_stmts() if isinstance(s.op, g.Repeat)), default=0)
    return "unroll" if depth <= AUTO_UNROLL_LAYERS else "scan"


def decl_specs(graph: g.Graph, kind: str, per_layer: bool = False) -> dict[str, str]:
    """PartitionSpec code of each declaration of a kind; a repeat block's declarations get
    a leading layer axis, or with per_layer (each layer its own array) the one spec of
    every layer's array (a pytree prefix of the tuple)."""
    out = {}
    for d, owner in graph.all_decls():
        if d.kind == kind:
            lead = 1 if owner is not None and not per_layer else 0
            out[d.name] = spec_code(type_layout(d.type), d.type.indices, lead=lead)
    return out


def stacked_decls(graph: g.Graph) -> dict[str, int]:
    """Weights and states of repeat blocks: name -> number of layers."""
    idx = index_sizes(graph)
    return {d.name: idx[owner.index] for d, owner in graph.all_decls()
            if owner is not None and d.kind in ("param", "state")}


def phase_graph(graph: g.Graph, phase: str) -> g.Graph:
    """A two-phase plan of the shard pass (split_prefill / split_decode attributes)
    narrowed to one phase; any other graph as it is."""
    if any(g.attr(s.attrs, "split_decode") is not None for s, _ in graph.all_stmts()):
        from ..passes.shard import specialize as shard_specialize
        return shard_specialize(graph, phase)
    return graph


def program_graphs(graph: g.Graph, prefill_len: int | None = None, batch: int | None = None) -> dict[str, g.Graph]:
    """The graphs of the two programs: prefill at T=prefill_len (default: the spec's T),
    decode at T=1 (splits of the query index dropped); both at batch `batch`.
    A two-phase plan (the shard pass's) gives each program its own splits."""
    ax = step_axes(graph)
    names = graph.index_size_names()
    base: dict[str, int] = {}
    if batch is not None:
        base[names[ax.batch]] = int(batch)
    pre = dict(base)
    if prefill_len is not None:
        pre[names[ax.query]] = int(prefill_len)
    return {"prefill": specialize(phase_graph(graph, "prefill"), pre),
            "decode": specialize(phase_graph(graph, "decode"), dict(base, **{names[ax.query]: 1}),
                                 drop=(ax.query,))}


def generate_source(graph: g.Graph, layers: str = "scan", prefill_len: int | None = None,
                    batch: int | None = None, attention: str = "einsum", platform: str | None = None,
                    int8_matmul: str = "xla") -> str:
    """The generated module's text for a planned graph (graph.mesh set, layouts and splits in the IR).
    attention: einsum | xla | cudnn | auto (codegen/attention.py); int8_matmul: xla | pallas | auto
    (codegen/int8_matmul.py); `platform` ('cuda' for an NVIDIA GPU) is what both autos decide by."""
    check_attention_mode(attention)
    check_int8_matmul_mode(int8_matmul)
    if layers not in LAYER_MODES:
        raise EinpartError(f"layers must be one of {', '.join(LAYER_MODES)}, got '{layers}'")
    if not graph.mesh:
        raise EinpartError("the graph has no mesh: plan it first (e.g. the plan or shard pass)")
    for name, n in graph.mesh:
        check_identifier(name, "mesh axis")
        if not isinstance(n, int) or n <= 0:
            raise EinpartError(f"mesh axis {name} has a bad size {n!r}")
    asked, layers = layers, resolve_layers(layers, graph)
    full = program_graphs(graph, prefill_len, batch)
    progs, prepared = {}, ()
    for p, pg in full.items():
        progs[p], prepared = split_prepare(pg)
    # layers="unroll": every stacked weight and state is stored as a tuple of per-layer
    # arrays (PER_LAYER), so that no step slices a stacked buffer: XLA copies a slice
    # that feeds a matmul (the cache per layer), and sinks an int8 -> bf16 convert above
    # the slices of a stacked weight (a bf16 copy of every weight), both measured on an H200
    per_layer = layers == "unroll"
    raw_specs = decl_specs(full["prefill"], "param")
    pspecs = decl_specs(progs["prefill"], "param", per_layer)
    prep_specs = decl_specs(progs["prefill"], "param")
    sspecs = decl_specs(progs["prefill"], "state", per_layer)
    other = decl_specs(progs["decode"], "state", per_layer)
    layered = stacked_decls(progs["prefill"]) if per_layer else {}
    for n in sorted(set(sspecs) | set(other)):
        if sspecs.get(n) != other.get(n):
            raise EinpartError(f"prefill and decode must share one cache layout: '{n}' is "
                               f"{sspecs.get(n, 'absent')} in prefill and {other.get(n, 'absent')} in decode")
    if set(pspecs) != set(decl_specs(progs["decode"], "param")):
        raise EinpartError("prefill and decode read different weights")
    given = {d.name: type_layout(d.type) for d, _ in progs["prefill"].all_decls() if d.kind == "param"}
    lines = [
        f'"""einpart: {docstring_text(graph.source.replace(chr(92), "/").split("/")[-1])} lowered to jax.shard_map.',
        "",
        f"mesh {', '.join(f'{n}={v}' for n, v in graph.mesh)}; layers={layers}{'' if asked == layers else f' ({asked})'}; "
        + ("" if attention == "einsum" else f"attention={attention}; ")
        + ("" if int8_matmul == "xla" else f"int8_matmul={int8_matmul}; ") + "sizes "
        + ", ".join(f"{k}={v}" for k, v in resolve_sizes(progs["prefill"]).items())
        + "; decode: one query position.",
        "Generated code: do not edit. Every collective is one that",
        "einpart.ir.layout.plan_stmt prescribes for the statement above it.",
        '"""',
        "import jax",
        "import jax.numpy as jnp",
        "from jax import lax",
        "from jax.sharding import PartitionSpec as P",
        "",
        "F32 = jnp.float32",
        "HIGHEST = lax.Precision.HIGHEST",
        f"NEG_INF = {number(g.NEG_INF)}",
        "MESH = " + tuple_code(f"({literal(n, 'mesh axis')}, {int(v)})" for n, v in graph.mesh),
        "",
        "# the weights as given (a file, or random init); prepare() turns them into STEP_PARAM_SPECS",
        "PARAM_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {sp}," for n, sp in raw_specs.items()],
        "}",
        "PREPARED_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {prep_specs[n]}," for n in prepared],
        "}",
        "# weights and states stored as a tuple of per-layer arrays (name: layers); the",
        "# runtime splits the stacked weights as given (and as prepared) into them",
        "PER_LAYER = {" + ", ".join(f"{literal(n, 'tensor name')}: {int(L)}" for n, L in layered.items()) + "}",
        "# what prefill and decode read: weights as given, or prepared at load time",
        "STEP_PARAM_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {sp}," for n, sp in pspecs.items()],
        "}",
        "STATE_SPECS = {",
        *[f"    {literal(n, 'tensor name')}: {sp}," for n, sp in sspecs.items()],
        "}",
    ]
    for key, kind in (("INPUT_SPECS", "input"), ("INPUT_SHAPES", None), ("OUTPUT_SPECS", "output")):
        lines.append(f"{key} = {{")
        for p, pg in progs.items():
            idx = index_sizes(pg)
            if kind == "input":
                items = decl_specs(pg, "input")
            elif kind is None:
                items = {d.name: tuple_code(idx[i] for i in d.type.indices)
                         for d in pg.body.decls if d.kind == "input"}
            else:
                types = pg.types()
                items = {n: spec_code(type_layout(types[n]), types[n].indices) for n in pg.outputs}
            lines.append(f"    {literal(p)}: {{" + ", ".join(f"{literal(n, 'tensor name')}: {v}"
                                                         for n, v in items.items()) + "},")
        lines.append("}")
    emitters = [PrepareProgram(full["prefill"], prepared, layers)] + [
        StepProgram(pg, p, layers, given, attention, platform, int8_matmul) for p, pg in progs.items()]
    bodies = [e.emit() for e in emitters]
    plain, siblings = (any(getattr(e, u, False) for e in emitters) for u in ("uses_int8_gemv", "uses_int8_gemv_siblings"))
    if plain or siblings:
        at = lines.index("from jax.sharding import PartitionSpec as P")
        lines[at + 1:at + 1] = ["", kernel_import(plain, siblings)]
    if any(e.uses_pmax for e in emitters):
        lines[lines.index("import jax")] = "import functools\n\nimport jax"
        lines += ["", ""] + PMAX_HELPER
    for body in bodies:
        lines += ["", ""] + body
    lines += [
        "", "",
        "def programs(mesh):",
        '    """shard_map functions over `mesh`: prepare (params -> prepared), prefill and decode '
        '((step params, state, inputs, pos) -> (outputs, next state))."""',
        "    return {",
        "        'prepare': jax.shard_map(prepare, mesh=mesh, in_specs=(PARAM_SPECS,), out_specs=PREPARED_SPECS, "
        "check_vma=False),",
        "        'prefill': jax.shard_map(prefill, mesh=mesh, in_specs=(STEP_PARAM_SPECS, STATE_SPECS, "
        "INPUT_SPECS['prefill'], P()), out_specs=(OUTPUT_SPECS['prefill'], STATE_SPECS), check_vma=False),",
        "        'decode': jax.shard_map(decode, mesh=mesh, in_specs=(STEP_PARAM_SPECS, STATE_SPECS, "
        "INPUT_SPECS['decode'], P()), out_specs=(OUTPUT_SPECS['decode'], STATE_SPECS), check_vma=False),",
        "    }",
    ]
    return "\n".join(lines) + "\n"
