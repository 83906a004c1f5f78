"""`einpart.compile`: a spec in, a sharded program out, for use inside research code.

    program = einpart.compile("examples/llama.ein", mesh="2x4", devices=8)
    print(program.plan.explain())                  # why each layout won
    print(program.source)                          # the generated jax.shard_map module
    weights = program.weights()                    # the spec's weights, placed by param_shardings
    logits, cache = program.prefill(tokens, params=weights)     # plain JAX: jit / grad / vmap
    logits, cache = program.decode(next_tokens, cache, pos=3, params=weights)
    new_tokens = program.generate(prompt, max_new_tokens=8)     # greedy, on the compiled programs

It is the CLI's path, not a second one: the user's pipeline and the planning
pass (the `shard` pass by default) run through `run_pipeline` (verified,
timed, dumped), and the runtime's `Executable` builds the mesh, the module,
the weights and the ahead-of-time programs `generate` runs. What this module
adds is the functional face of the same generated programs: `prefill` and
`decode` take the weights and the KV cache as arguments and return new ones,
without donating buffers or holding state, so they compose with `jax.jit`,
`jax.grad` and `jax.vmap`. Passing `params=` gives the weights as the spec
declares them (the names and layouts of `param_shardings`); weight
preparation (folded gains, int8 scales) then runs inside the function, so a
gradient is with respect to the spec's weights. Without `params`, the
program's own prepared weights are used.

What does not differentiate: token ids (integers), and the sampling in
`generate` (argmax / categorical draws); int8 rounding has zero derivative.
"""
from __future__ import annotations

from pathlib import Path

from . import progress
from .errors import EinpartError
from .ir import graph as g

PLANS = ("shard", "simple", "random", "replicated")


def load_graph(spec, sizes: dict | None = None) -> g.Graph:
    """spec: a Graph, a path to a spec file, a built-in example name, or spec text."""
    from .ir.parser import override_sizes, parse, parse_file
    from .ir.verify import verify
    if isinstance(spec, g.Graph):
        return verify(override_sizes(spec, sizes)) if sizes else spec
    if isinstance(spec, Path):
        return parse_file(spec, sizes)
    if not isinstance(spec, str):
        raise EinpartError(f"spec must be spec text, a path or a Graph, got {type(spec).__name__}")
    if "\n" not in spec and (spec.endswith(".ein") or Path(spec).is_file()):
        return parse_file(spec, sizes)
    from .cli_ir import BUILTIN_EXAMPLES, example_path
    if spec in BUILTIN_EXAMPLES:
        return parse_file(example_path(spec), sizes)
    return parse(spec, "<spec>", sizes)


def _plan_pass(kind: str, mesh: dict, hardware: str, phase: str, batch: int, context: int, prompt: int,
               steps: int, memory_limit, time_limit: float, seed: int):
    from .passes.plans import mesh_text
    from .passes.manager import make_pass
    if kind == "shard":
        return make_pass("shard", {"mesh": mesh_text(mesh), "hardware": str(hardware), "phase": phase,
                                   "batch": int(batch), "context": int(context), "prompt": int(prompt),
                                   "steps": int(steps),
                                   "memory_limit": float("inf") if memory_limit is None else float(memory_limit),
                                   "time_limit": float(time_limit)})
    return make_pass("plan", {"mesh": mesh_text(mesh), "kind": kind, "seed": int(seed)})


def compile(spec, mesh, *, hardware: str = "cpu", batch: int = 0, context: int = 0, prompt: int = 0,
            pipeline=None, sizes: dict | None = None, plan: str = "shard", phase: str = "both", steps: int = 64,
            memory_limit: float | None = 0.0, time_limit: float = 10.0, layers: str = "auto",
            attention: str = "auto", int8_matmul: str = "auto", dtype: str = "f32", weights=None, seed: int = 0, devices: int | None = None,
            platform: str | None = None, dump_dir: str | Path | None = None) -> "Program":
    """Parse (or take) a spec, run `pipeline` and the planner, lower it and load it on a mesh.

    mesh: "2x4", "x=2,y=4" or {"x": 2, "y": 4}. plan: "shard" (the ILP planner, priced on
    `hardware` for `batch`, `context`, `prompt`, weighting decode by `steps`; memory_limit in
    bytes per device, 0 = the hardware's HBM, None = none) or simple / random / replicated.
    pipeline: passes to run first (text like 'defer-norm,int8' or Pass objects). devices: N
    simulated CPU devices (before JAX starts). weights: None (random from `seed`), a
    safetensors path, or a dict of arrays. dump_dir: write every pass's IR there. layers: scan, unroll
    or auto (codegen.lower.resolve_layers: unrolled up to 64 layers). attention: einsum,
    xla, cudnn or auto (softmax attention as one jax.nn.dot_product_attention; codegen/attention.py).
    int8_matmul: xla, pallas or auto (int8 weight products at decode through the Pallas GEMV
    kernel; codegen/int8_matmul.py).
    """
    from .passes.plans import parse_mesh
    from .passes import parse_pipeline, run_pipeline
    from .passes.shard.phases import overrides
    from .ir.parser import override_sizes
    from .ir.verify import verify
    from . import codegen  # noqa: F401  (registers the plan pass)
    if plan not in PLANS:
        raise EinpartError(f"plan must be one of {', '.join(PLANS)}, got '{plan}'")
    from .codegen.attention import check_attention_mode
    check_attention_mode(attention)
    from .codegen.int8_matmul import check_int8_matmul_mode
    check_int8_matmul_mode(int8_matmul)
    mesh = parse_mesh(mesh) if not isinstance(mesh, dict) else {str(k): int(v) for k, v in mesh.items()}
    graph = load_graph(spec, sizes)
    if plan != "shard" and (batch or context or prompt):
        # the shard pass sizes its plan itself; the built-in plans take the sizes first
        graph = verify(override_sizes(graph, overrides(graph, "prefill", batch, context, prompt)))
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline or [])
    passes.append(_plan_pass(plan, mesh, hardware, phase, batch, context, prompt, steps, memory_limit,
                             time_limit, seed))
    with progress.current().step("planning" + (" (solving the ILP)" if plan == "shard" else "")):
        result = run_pipeline(graph, passes, dump_dir)
    progress.current().timings(result.records)
    if devices:
        from .runtime.devices import simulate_cpu_devices
        simulate_cpu_devices(devices)
    from .runtime.executable import Executable
    ex = Executable(result.graph, layers=layers, dtype=dtype, seed=seed, weights=weights, platform=platform,
                    compile=False, attention=attention, int8_matmul=int8_matmul)
    options = {"hardware": hardware, "phase": phase, "batch": batch, "context": context, "prompt": prompt,
               "steps": steps, "memory_limit": memory_limit} if plan == "shard" else None
    return Program(ex, result.graph, result.records, options, hardware, weights, seed)


class ProgramPlan:
    """What the planner decided, read from the planned graph: the stored layout of every
    declared tensor, every statement's split per program, the predicted cost of each
    program (passes.shard.report, the prices the planner used), and explain()."""

    def __init__(self, graph: g.Graph, shard_options: dict | None, hardware: str = "cpu"):
        from .codegen.lower import program_graphs
        from .ir.layout import stmt_split, type_layout
        self.graph = graph
        self.mesh = dict(graph.mesh)
        self._options = shard_options
        self.hardware = hardware
        self.programs = program_graphs(graph)
        self.layouts = {d.name: {i: a for i, a in type_layout(d.type).items() if a}
                        for d, _ in graph.all_decls()}
        self.splits = {name: {s.name: {i: a for i, a in stmt_split(s).items() if a}
                              for s, _ in pg.all_stmts() if not isinstance(s.op, g.Repeat)}
                       for name, pg in self.programs.items()}
        self._costs = None

    @property
    def costs(self) -> dict:
        """Per program (prefill, decode): its PhaseReport (step_s, compute_s, memory_s,
        comm_s, mfu, memory per device, and every statement's StmtCost)."""
        if self._costs is None:
            from .passes.shard.report import price_graph
            self._costs = {name: price_graph(pg, self.hardware, name) for name, pg in self.programs.items()}
        return self._costs

    def explain(self) -> str:
        """Why each layout won: each choice against its runner-up (passes.shard.explain)."""
        return self.explanation().text()

    def explanation(self):
        if self._options is None:
            raise EinpartError("explain needs a plan of the shard planner (compile with plan='shard'); "
                               "the built-in plans follow a rule, not costs")
        from .passes.shard.explain import explain
        return explain(self.graph, **self._options)

    def __str__(self) -> str:
        from .passes.shard.cli import _t
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"plan on mesh {mesh}, priced on {self.hardware}"]
        for name, rep in self.costs.items():
            lines.append(f"{name}: {_t(rep.step_s)} per step (compute {_t(rep.compute_s)}, memory "
                         f"{_t(rep.memory_s)}, communication {_t(rep.comm_s)})")
        for name, layout in self.layouts.items():
            text = " ".join(f"{i}@{a[0]}" if len(a) == 1 else f"{i}@({','.join(a)})" for i, a in layout.items())
            lines.append(f"  {name}: {text or 'replicated'}")
        return "\n".join(lines)


class Program:
    """A compiled spec: the plan, the generated module, and the programs on the mesh.

    prefill / decode are pure functions of (tokens, params, state); generate runs the
    ahead-of-time compiled programs of the Executable (`program.executable`)."""

    def __init__(self, executable, graph: g.Graph, records, plan_options: dict | None, hardware: str, weights,
                 seed: int):
        self.executable = executable
        self.graph = graph                     # the planned graph (layouts and splits in the IR)
        self.hardware = hardware
        self.records = records                 # the pipeline's passes, times and dumps
        self._plan_options = plan_options
        self._weights, self._seed = weights, seed
        self._plan = None
        self._jitted: dict = {}

    # -- what was decided -------------------------------------------------------
    @property
    def plan(self):
        """Layouts, predicted costs per phase, and explain() (a ProgramPlan)."""
        if self._plan is None:
            self._plan = ProgramPlan(self.graph, self._plan_options, self.hardware)
        return self._plan

    @property
    def source(self) -> str:
        """The generated module (the text `prefill` and `decode` run)."""
        return self.executable.source()

    @property
    def mesh(self):
        return self.executable.mesh

    @property
    def param_shardings(self) -> dict:
        """NamedSharding of every weight as the spec declares it: `jax.device_put(w, s)`."""
        return self._shardings(self._module().PARAM_SPECS)

    @property
    def state_shardings(self) -> dict:
        return self._shardings(self._module().STATE_SPECS)

    def _shardings(self, specs: dict) -> dict:
        from jax.sharding import NamedSharding
        return {n: NamedSharding(self.executable.mesh, s) for n, s in specs.items()}

    def _module(self, batch: int | None = None, T: int | None = None):
        ex = self.executable
        return ex.module(batch or ex.batch, T or ex.prefill_len)

    @property
    def params(self) -> dict:
        """The program's weights as the steps read them (prepared at load time)."""
        return self.executable.params

    def weights(self, weights=None, seed: int | None = None) -> dict:
        """The spec's weights (random from the seed, a safetensors path or a dict), each a
        jax.Array placed by param_shardings: what prefill(params=...) differentiates."""
        import jax
        from .runtime.weights import NUMPY_DTYPE, load_weights
        from .ir.shapes import decl_shapes
        ex = self.executable
        given = self._weights if weights is None else weights
        arrays = load_weights(ex.spec_graph, given, self._seed if seed is None else seed)
        shapes = decl_shapes(ex.graph)
        out = {}
        for name, sharding in self.param_shardings.items():
            out[name] = jax.device_put(arrays[name].astype(NUMPY_DTYPE[shapes[name].decl.type.dtype]), sharding)
        return out

    def new_state(self, batch: int | None = None) -> dict:
        """A zero KV cache in its planned layout."""
        return self.executable.new_state(batch)

    # -- the functional programs ---------------------------------------------
    def _tokens(self, tokens, what: str):
        import jax
        import jax.numpy as jnp
        shape = jnp.shape(tokens)
        if len(shape) != 2:
            raise EinpartError(f"{what} must have two axes [batch, positions], got shape {tuple(shape)}")
        if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise EinpartError(f"{what} must be integer token ids, got {jnp.result_type(tokens)}")
        if not isinstance(tokens, jax.core.Tracer):
            self.executable.check_tokens(tokens, what)     # ids in range, when the values are known
        return jnp.asarray(tokens, jnp.int32)

    def _step_params(self, params, module):
        if params is None:
            return self.executable.params
        missing = sorted(set(module.PARAM_SPECS) - set(params))
        if missing:
            raise EinpartError(f"params: missing weights {', '.join(missing)} (give the spec's weights, "
                               f"as program.weights() returns them)")
        raw = {n: params[n] for n in module.PARAM_SPECS}
        prepared = module.programs(self.executable.mesh)["prepare"](raw) if module.PREPARED_SPECS else {}
        return self.executable.unstack(module, {n: prepared[n] if n in prepared else raw[n]
                                                for n in module.STEP_PARAM_SPECS})

    def _logits(self, outs, n: int | None = None):
        import jax.numpy as jnp
        ex = self.executable
        logits = jnp.transpose(outs[ex.axes.logits], ex._logits_order())
        return logits if n is None else logits[:, :n]

    def prefill(self, tokens, params=None, state=None):
        """Run a prompt from position 0: (logits [batch, positions, vocab], the KV cache).
        Pure: composes with jax.jit, jax.grad (w.r.t. params) and jax.vmap."""
        import jax.numpy as jnp
        ex = self.executable
        tokens = self._tokens(tokens, "prompt")
        batch, n = tokens.shape
        if ex.context is not None and n > ex.context:
            raise EinpartError(ex._too_long(n))
        T = ex._prefill_T(n, batch)
        module = ex.module(batch, T)
        if n < T:      # later positions never affect earlier ones (causal): pad, then drop them
            tokens = jnp.pad(tokens, ((0, 0), (0, T - n)))
        state = ex.new_state(batch) if state is None else state
        fn = self._program(module, "prefill", params is not None)
        outs, state = fn(params if params is not None else ex.params, state, {ex.axes.tokens: tokens},
                         jnp.int32(0))
        return self._logits(outs, n), state

    def decode(self, tokens, state, pos, params=None):
        """One token per sequence at position `pos`: (logits [batch, 1, vocab], the next KV cache)."""
        import jax.numpy as jnp
        ex = self.executable
        if jnp.ndim(tokens) == 1:
            tokens = jnp.reshape(tokens, (-1, 1))
        tokens = self._tokens(tokens, "tokens")
        if tokens.shape[1] != 1:
            raise EinpartError(f"decode takes one token per sequence, got shape {tuple(tokens.shape)}")
        batch = tokens.shape[0]
        module = ex.module(batch, ex.prefill_len)
        fn = self._program(module, "decode", params is not None)
        outs, state = fn(params if params is not None else ex.params, state, {ex.axes.tokens: tokens},
                         jnp.asarray(pos, jnp.int32))
        return self._logits(outs), state

    def _program(self, module, kind: str, raw: bool):
        """The step program as one jax.jit (so a call outside jit compiles once instead of
        dispatching op by op; inside jit, grad or vmap it is traced through like any function).
        raw: it takes the spec's weights and runs weight preparation first. No donation."""
        key = (id(module), kind, raw)
        if key not in self._jitted:
            import jax
            step = module.programs(self.executable.mesh)[kind]
            if raw:
                def fn(params, state, inputs, pos):
                    return step(self._step_params(params, module), state, inputs, pos)
            else:
                fn = step
            self._jitted[key] = (module, jax.jit(fn))
        return self._jitted[key][1]

    def generate(self, prompt_tokens, max_new_tokens: int, **options):
        """New tokens [batch, max_new_tokens] (Executable.generate: greedy, or temperature / top_k
        / seed; return_logits=True adds every step's logits). Not differentiable: it samples."""
        return self.executable.generate(prompt_tokens, max_new_tokens, **options)


__all__ = ["Program", "ProgramPlan", "compile", "load_graph"]
