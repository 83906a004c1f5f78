"""The executable: a planned spec on a device mesh, ready to prefill, decode and generate.

    ex = Executable(graph, mesh={"x": 2, "y": 4}, layers="scan", seed=0)
    tokens = ex.generate(prompt, max_new_tokens=8)           # greedy
    logits = ex.prefill(prompt); logits = ex.decode(next_tokens, pos)

Built from a graph (planned, i.e. with graph.mesh and layouts; an unplanned
graph gets the built-in simple plan for `mesh`), it generates the program
module (einpart.codegen), writes it to a file and imports it, makes the mesh,
creates or loads the weights (checked by name, shape and dtype), places them
with NamedSharding, allocates the KV cache in its planned layout, and compiles
prefill and decode ahead of time (jax.jit(...).lower(...).compile()) with the
cache donated. Bad input (a prompt longer than the context, a batch the mesh
cannot split, token ids out of range) is an EinpartError raised before
anything is compiled. Works unchanged across processes (jax.distributed):
every process builds the same Executable over one global mesh.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import parts, stmt_split
from ..ir.model import step_axes
from ..ir.shapes import decl_shapes
from ..ir.verify import index_sizes, resolve_sizes, verify
from ..codegen.attention import check_attention_mode
from ..codegen.int8_matmul import check_int8_matmul_mode
from ..codegen.lower import LAYER_MODES, generate_source, program_graphs, split_prepare
from ..passes.plans import parse_mesh, simple_plan
from .. import progress
from .devices import make_mesh, simulate_cpu_devices
from .weights import NUMPY_DTYPE, load_weights

STORAGE_DTYPES = ("f32", "bf16")
_MODULES: dict[str, object] = {}


def load_module(source: str, directory: str | Path | None = None, name: str | None = None):
    """Write generated source to a file and import it (cached by content)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if digest in _MODULES:
        return _MODULES[digest]
    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / "einpart-generated"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"einpart_{digest}.py")
    # Several processes (a multi-host run) may write the same file: write a private
    # copy and rename it into place, so no process imports a half-written module.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(source)
    os.replace(tmp, path)
    mod_name = f"einpart_generated_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[mod_name] = module
    _MODULES[digest] = module
    return module


def context_length(graph: g.Graph) -> int | None:
    """The number of cached positions (the smallest KV-cache position axis), None without a cache."""
    idx = index_sizes(graph)
    sizes = [idx[next(i for i in s.op.cache.indices if i not in s.op.new.indices)]
             for s, _ in graph.all_stmts() if isinstance(s.op, g.Write)]
    return min(sizes) if sizes else None


def query_parts(graph: g.Graph, query: str) -> int:
    """How many ways the query index is split anywhere in the plan (lcm)."""
    mesh = dict(graph.mesh)
    n = 1
    layouts = [a.mesh for d, _ in graph.all_decls() for a in d.type.axes if a.index == query]
    for s, _ in graph.all_stmts():
        layouts += [a.mesh for a in s.type.axes if a.index == query]
        if not isinstance(s.op, g.Repeat):
            layouts.append(stmt_split(s).get(query, ()))
    for axes in layouts:
        n = math.lcm(n, parts(tuple(axes), mesh))
    return n


@dataclass
class Timing:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    new_tokens: int = 0
    compile_s: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


class Executable:
    def __init__(self, graph: g.Graph, mesh=None, *, layers: str = "scan", dtype: str = "f32", seed: int = 0,
                 weights=None, devices: int | None = None, prefill_len: int | None = None,
                 source_dir: str | Path | None = None, plan=simple_plan, compile: bool = True,
                 platform: str | None = None, check_finite: bool = False, attention: str = "auto",
                 int8_matmul: str = "auto"):
        if layers not in LAYER_MODES:
            raise EinpartError(f"layers must be one of {', '.join(LAYER_MODES)}, got '{layers}'")
        if dtype not in STORAGE_DTYPES:
            raise EinpartError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got '{dtype}'")
        if isinstance(mesh, str):
            mesh = parse_mesh(mesh)
        if not graph.mesh:
            graph = plan(graph, dict(mesh) if mesh is not None else {"x": 1})
        elif mesh is not None and dict(graph.mesh) != dict(mesh):
            raise EinpartError(f"the graph is planned for mesh {dict(graph.mesh)}, not {dict(mesh)}")
        self.spec_graph = graph              # the spec's dtypes: weights are checked against it
        if dtype != "f32":
            from ..passes.basic import Cast
            graph = verify(Cast(dtype=dtype).apply(graph))
        self.graph = graph
        self.layers = layers
        self.attention = check_attention_mode(attention)   # codegen/attention.py: einsum | xla | cudnn | auto
        self.int8_matmul = check_int8_matmul_mode(int8_matmul)   # codegen/int8_matmul.py: xla | pallas | auto
        self.dtype = dtype
        self.source_dir = source_dir
        self.axes = step_axes(graph)
        self.sizes = resolve_sizes(graph)
        self.idx = index_sizes(graph, self.sizes)
        names = graph.index_size_names()
        self.batch = self.idx[self.axes.batch]
        self.context = context_length(graph)
        self._t_parts = query_parts(graph, self.axes.query)
        if prefill_len is not None:
            n = int(prefill_len)
            if n < 1:
                raise EinpartError(f"the prompt length must be at least 1, got {n}")
            if self.context is not None and n > self.context:
                raise EinpartError(self._too_long(n))
            self.prefill_len = -(-n // self._t_parts) * self._t_parts   # the query split must divide it
            if self.context is not None and self.prefill_len > self.context:
                self.prefill_len = n
        else:
            self.prefill_len = self.idx[self.axes.query]
        self.vocab = self.idx[self.axes.vocab]
        self._size_name = {"batch": names[self.axes.batch], "query": names[self.axes.query]}
        extra = [d.name for d in graph.body.decls if d.kind == "input" and d.name != self.axes.tokens]
        if extra:
            raise EinpartError(f"the runtime feeds only the token input '{self.axes.tokens}'; "
                               f"this spec also declares inputs {', '.join(extra)}")
        if self.context is not None and self.prefill_len > self.context:
            raise EinpartError(f"the prefill length {self.prefill_len} is longer than the context "
                               f"{self.context}")
        self._pgraphs: dict = {}
        self._programs_for(self.batch, self.prefill_len)   # plan errors before anything else
        if devices:
            simulate_cpu_devices(devices)
        self.mesh_shape = dict(graph.mesh)
        self.mesh = make_mesh(self.mesh_shape, platform=platform)
        if self.attention == "cudnn" and self.platform_name() != "cuda":
            raise EinpartError(f"attention='cudnn' runs on NVIDIA GPUs only; this mesh is on "
                               f"{self.platform_name()} (use attention='auto', 'xla' or 'einsum')")
        # every tensor is checked (and with check_finite, scanned for NaN / Inf) before any is placed
        with progress.current().step("drawing random weights" if weights is None else "loading weights"):
            arrays = load_weights(self.spec_graph, weights, seed, check_finite_values=check_finite)
        self._modules: dict = {}
        self._compiled: dict = {}
        self.timing = Timing()
        module = self.module(self.batch, self.prefill_len)
        self.param_specs = dict(module.STEP_PARAM_SPECS)
        self.params = self._prepare(module, self._place_params(module, arrays))
        self.state = None
        self._state_batch = None
        self.pos = 0
        self._samplers: dict = {}
        if compile:
            self.compiled("prefill", self.batch, self.prefill_len)
            self.compiled("decode", self.batch)

    # -- programs -----------------------------------------------------------
    def _programs_for(self, batch: int, T: int) -> dict:
        key = (batch, T)
        if key not in self._pgraphs:
            try:
                self._pgraphs[key] = program_graphs(self.graph, T, batch)
            except EinpartError as e:
                raise EinpartError(f"cannot run batch {batch} x {T} positions on mesh "
                                   f"{', '.join(f'{k}={v}' for k, v in self.graph.mesh)}: {e}") from None
        return self._pgraphs[key]

    def source(self, batch: int | None = None, T: int | None = None) -> str:
        return generate_source(self.graph, self.layers, prefill_len=T or self.prefill_len,
                               batch=batch or self.batch, attention=self.attention, platform=self.platform_name(),
                               int8_matmul=self.int8_matmul)

    def platform_name(self) -> str:
        """The mesh's platform as codegen's attention='auto' and int8_matmul='auto' read it: 'cuda' for NVIDIA GPUs."""
        dev = self.mesh.devices.flat[0]
        version = str(getattr(dev.client, "platform_version", "")).lower()
        return "cuda" if dev.platform == "gpu" and "cuda" in version else dev.platform

    def module(self, batch: int, T: int):
        key = (batch, T)
        if key not in self._modules:
            self._programs_for(batch, T)
            self._modules[key] = load_module(self.source(batch, T), self.source_dir)
        return self._modules[key]

    def _sharding(self, spec):
        from jax.sharding import NamedSharding
        return NamedSharding(self.mesh, spec)

    def _structs(self, module, kind: str, batch: int, T: int):
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P
        pg = split_prepare(self._programs_for(batch, T)[kind])[0]
        shapes = decl_shapes(pg)
        dt = {k: jnp.dtype(v) for k, v in NUMPY_DTYPE.items()}

        def struct(name, spec):
            info = shapes[name]
            return jax.ShapeDtypeStruct(info.shape, dt[info.decl.type.dtype], sharding=self._sharding(spec))
        layered = module.PER_LAYER

        def entry(name, spec):     # a tuple of per-layer arrays (PER_LAYER), or one array
            if name not in layered:
                return struct(name, spec)
            one = shapes[name].shape[1:]
            dtype = dt[shapes[name].decl.type.dtype]
            return tuple(jax.ShapeDtypeStruct(one, dtype, sharding=self._sharding(spec))
                         for _ in range(layered[name]))
        params = {n: entry(n, s) for n, s in module.STEP_PARAM_SPECS.items()}
        state = {n: entry(n, s) for n, s in module.STATE_SPECS.items()}
        inputs = {n: struct(n, s) for n, s in module.INPUT_SPECS[kind].items()}
        pos = jax.ShapeDtypeStruct((), jnp.int32, sharding=self._sharding(P()))
        return params, state, inputs, pos

    def compiled(self, kind: str, batch: int, T: int | None = None):
        """The compiled program (ahead of time, state donated)."""
        import jax
        T = T if kind == "prefill" else self.prefill_len
        key = (kind, batch, T if kind == "prefill" else 1)
        if key not in self._compiled:
            module = self.module(batch, T)
            fn = module.programs(self.mesh)[kind]
            start = time.perf_counter()
            with progress.current().step(f"compiling {kind} for batch {batch} x {key[2]} (XLA)"):
                lowered = jax.jit(fn, donate_argnums=(1,)).lower(*self._structs(module, kind, batch, T))
                self._compiled[key] = lowered.compile()
            self.timing.compile_s[f"{kind}-{batch}x{key[2]}"] = time.perf_counter() - start
        return self._compiled[key]

    # -- data ---------------------------------------------------------------
    def _put(self, arr: np.ndarray, spec):
        import jax
        arr = np.asarray(arr)
        return jax.make_array_from_callback(arr.shape, self._sharding(spec), lambda i: arr[i])

    def _place_params(self, module, arrays: dict) -> dict:
        """The weights as given, each in its planned layout."""
        shapes = decl_shapes(self.graph)
        out = {}
        for name, spec in module.PARAM_SPECS.items():
            want = NUMPY_DTYPE[shapes[name].decl.type.dtype]
            out[name] = self._put(np.asarray(arrays[name]).astype(want), spec)
        return out

    def _prepare(self, module, raw: dict) -> dict:
        """Weight preparation (the spec's param-only statements: int8 quantisation, folded
        gains, pooled heads) once, at load time; the step programs read its results.
        Weights only preparation reads are released."""
        import jax
        prepared = {}
        if module.PREPARED_SPECS:
            start = time.perf_counter()
            fn = jax.jit(module.programs(self.mesh)["prepare"])
            prepared = fn(raw)
            self.timing.compile_s["prepare"] = time.perf_counter() - start
        return self.unstack(module, {n: prepared[n] if n in prepared else raw[n] for n in module.STEP_PARAM_SPECS})

    def unstack(self, module, tensors: dict) -> dict:
        """Stacked weights [layers, ...] split into the tuples of per-layer arrays the
        module stores them as (module.PER_LAYER; layers="unroll"), each placed in its
        layout; the rest as they are. Works on concrete arrays and under jit / grad."""
        import jax
        out = dict(tensors)
        for name, n in module.PER_LAYER.items():
            if name in out and not isinstance(out[name], (tuple, list)):
                sharding = self._sharding(module.STEP_PARAM_SPECS.get(name, module.STATE_SPECS.get(name)))
                split = jax.jit(lambda a, n=n: tuple(a[i] for i in range(n)), out_shardings=(sharding,) * n)
                out[name] = split(out[name])
        return out

    def new_state(self, batch: int | None = None) -> dict:
        """A zero KV cache in its planned layout."""
        import jax
        batch = batch or self.batch
        module = self.module(batch, self.prefill_len)
        shapes = decl_shapes(self._programs_for(batch, self.prefill_len)["decode"])
        out = {}
        for name, spec in module.STATE_SPECS.items():
            info = shapes[name]
            sharding = self._sharding(spec)
            dt = NUMPY_DTYPE[info.decl.type.dtype]
            layers = module.PER_LAYER.get(name)
            shape = info.shape[1:] if layers else info.shape
            local = sharding.shard_shape(shape)

            def zeros(n=local, d=dt, shape=shape, sharding=sharding):
                return jax.make_array_from_callback(shape, sharding, lambda i: np.zeros(n, d))
            out[name] = tuple(zeros() for _ in range(layers)) if layers else zeros()
        return out

    def host(self, x) -> np.ndarray:
        """A global array on this host, in every process."""
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def _logits_order(self) -> tuple[int, ...]:
        typ = self.graph.types()[self.axes.logits].indices
        return (typ.index(self.axes.batch), typ.index(self.axes.query), typ.index(self.axes.vocab))

    def _gather_logits(self, logits) -> np.ndarray:
        """Logits [batch, positions, vocab] as float32 on this host (in every process)."""
        import jax
        import jax.numpy as jnp
        from jax.sharding import PartitionSpec as P
        order = self._logits_order()
        if logits.is_fully_addressable:
            return np.transpose(np.asarray(logits), order).astype(np.float32)
        if "gather" not in self._samplers:
            self._samplers["gather"] = jax.jit(lambda x: jnp.transpose(x, order).astype(jnp.float32),
                                               out_shardings=self._sharding(P()))
        return self.host(self._samplers["gather"](logits))

    # -- checks -------------------------------------------------------------
    def check_tokens(self, tokens, what: str = "tokens") -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim != 2:
            raise EinpartError(f"{what} must have two axes [batch, positions], got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise EinpartError(f"{what} must be integer token ids, got {arr.dtype}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise EinpartError(f"{what} is empty (shape {arr.shape})")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab):
            bad = int(arr.max() if arr.max() >= self.vocab else arr.min())
            raise EinpartError(f"{what}: token id {bad} is out of range for the vocabulary of {self.vocab}")
        return arr.astype(np.int32)

    def _prefill_T(self, P_len: int, batch: int) -> int:
        if self.context is not None and P_len > self.context:
            raise EinpartError(self._too_long(P_len))
        if P_len <= self.prefill_len:
            T = self.prefill_len
        else:
            T = -(-P_len // self._t_parts) * self._t_parts
            if self.context is not None and T > self.context:
                T = P_len
        self._programs_for(batch, T)    # a batch the mesh cannot split fails here, before compiling
        return T

    def _too_long(self, n: int) -> str:
        return (f"the prompt has {n} tokens, longer than the context of {self.context} positions "
                f"(the KV cache length; raise it with --set {self._cache_size_name()}=...)")

    def _cache_size_name(self) -> str:
        names = self.graph.index_size_names()
        for s, _ in self.graph.all_stmts():
            if isinstance(s.op, g.Write):
                return names[next(i for i in s.op.cache.indices if i not in s.op.new.indices)]
        return "S"

    # -- running ------------------------------------------------------------
    def _run(self, kind: str, tokens: np.ndarray, pos: int, T: int | None = None):
        from jax.sharding import PartitionSpec as P
        batch = tokens.shape[0]
        prog = self.compiled(kind, batch, T)
        module = self.module(batch, T if kind == "prefill" else self.prefill_len)
        inputs = {self.axes.tokens: self._put(tokens, module.INPUT_SPECS[kind][self.axes.tokens])}
        pos_arr = self._put(np.asarray(pos, np.int32), P())
        outs, self.state = prog(self.params, self.state, inputs, pos_arr)
        return outs[self.axes.logits]

    def prefill(self, tokens) -> np.ndarray:
        """Run the prompt from position 0 on a fresh cache; logits [batch, positions, vocab]."""
        logits, n = self._prefill(tokens)
        return self._gather_logits(logits)[:, :n]

    def _prefill(self, tokens):
        tokens = self.check_tokens(tokens, "prompt")
        batch, n = tokens.shape
        T = self._prefill_T(n, batch)
        padded = np.zeros((batch, T), np.int32)
        padded[:, :n] = tokens
        self.compiled("prefill", batch, T)
        self.state = self.new_state(batch)
        self._state_batch = batch
        start = time.perf_counter()
        logits = self._run("prefill", padded, 0, T)
        logits.block_until_ready()
        self.timing.prefill_s += time.perf_counter() - start
        self.pos = n
        return logits, n

    def decode(self, tokens, pos: int | None = None) -> np.ndarray:
        """One token per sequence at position `pos` (default: after the last); logits [batch, 1, vocab]."""
        return self._gather_logits(self._decode(tokens, pos))

    def _decode(self, tokens, pos=None):
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[:, None]
        tokens = self.check_tokens(tokens)
        if tokens.shape[1] != 1:
            raise EinpartError(f"decode takes one token per sequence, got shape {tokens.shape}")
        pos = self.pos if pos is None else int(pos)
        if self.state is None:
            raise EinpartError("decode before prefill: there is no KV cache yet")
        batch = tokens.shape[0]
        if batch != self._state_batch:
            raise EinpartError(f"decode batch {batch} differs from the prefill's ({self._state_batch})")
        if self.context is not None and not 0 <= pos < self.context:
            raise EinpartError(f"position {pos} is outside the context of {self.context} positions")
        start = time.perf_counter()
        logits = self._run("decode", tokens, pos)
        logits.block_until_ready()
        self.timing.decode_s += time.perf_counter() - start
        self.timing.decode_steps += 1
        self.pos = pos + 1
        return logits

    def _pick(self, temperature: float, top_k: int | None):
        """The sampling function (logits, position index, key data) -> tokens [batch]:
        greedy at temperature 0, else temperature / top-k sampling."""
        import jax
        import jax.numpy as jnp
        from jax import lax
        order = self._logits_order()

        def pick(logits, index, rng):
            x = jnp.transpose(logits, order).astype(jnp.float32)
            x = lax.dynamic_index_in_dim(x, index, axis=1, keepdims=False)   # [batch, vocab]
            if temperature == 0:
                return jnp.argmax(x, axis=-1).astype(jnp.int32)
            x = x / temperature
            if top_k:
                kth = lax.top_k(x, top_k)[0][:, -1:]
                x = jnp.where(x < kth, -jnp.inf, x)
            return jax.random.categorical(jax.random.wrap_key_data(rng), x, axis=-1).astype(jnp.int32)
        return pick

    def _sampler(self, temperature: float, top_k: int | None):
        import jax
        from jax.sharding import PartitionSpec as P
        key = (float(temperature), top_k)
        if key not in self._samplers:
            self._samplers[key] = jax.jit(self._pick(temperature, top_k), out_shardings=self._sharding(P()))
        return self._samplers[key]

    def generate(self, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0, return_logits: bool = False, steps_per_call: int = 32):
        """Greedy (temperature 0) or sampled (temperature, top_k, seed) generation.
        Returns the new tokens [batch, max_new_tokens] (and the logits of every step,
        [batch, positions, vocab] each, with return_logits=True). steps_per_call: decode
        steps per compiled call (runtime/decode_loop.py: tokens fed back on the device);
        1, or return_logits, runs one call per token from the host."""
        import jax
        from jax.sharding import PartitionSpec as P
        prompt = self.check_tokens(prompt_tokens, "prompt")
        max_new = int(max_new_tokens)
        if max_new < 1:
            raise EinpartError(f"max_new_tokens must be at least 1, got {max_new}")
        if temperature < 0:
            raise EinpartError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= int(top_k) <= self.vocab:
            raise EinpartError(f"top_k must be between 1 and the vocabulary size {self.vocab}, got {top_k}")
        if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)) or steps_per_call < 1:
            raise EinpartError(f"steps_per_call must be a positive integer, got {steps_per_call!r}")
        n = prompt.shape[1]
        if self.context is not None and n > self.context:
            raise EinpartError(self._too_long(n))
        if self.context is not None and n + max_new - 1 > self.context:
            raise EinpartError(f"the prompt ({n} tokens) plus {max_new} new tokens needs {n + max_new - 1} "
                               f"cached positions, more than the context of {self.context}")
        self._prefill_T(n, prompt.shape[0])
        on_host = steps_per_call == 1 or return_logits
        if on_host:       # compile before the prefill runs (the device loop compiles its own)
            self.compiled("decode", prompt.shape[0])
        sample = self._sampler(temperature, top_k)
        base = jax.random.key_data(jax.random.key(seed))
        history = []
        logits, _ = self._prefill(prompt)
        if return_logits:
            history.append(self._gather_logits(logits)[:, :n])
        out = []
        for step in range(max_new):
            rng = self._put(np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base), step))),
                            P())
            index = self._put(np.asarray(n - 1 if step == 0 else 0, np.int32), P())
            nxt = self.host(sample(logits, index, rng))
            out.append(nxt)
            progress.current().count("generating tokens", step + 1, max_new)
            if step + 1 == max_new:
                break
            if not on_host:
                from .decode_loop import generate_on_device
                out += generate_on_device(self, nxt, max_new, int(steps_per_call), temperature, top_k, base,
                                          lambda k: progress.current().count("generating tokens", k, max_new))
                break
            logits = self._decode(nxt[:, None])
            if return_logits:
                history.append(self._gather_logits(logits))
        self.timing.new_tokens += max_new
        tokens = np.stack(out, axis=1).astype(np.int32)
        return (tokens, history) if return_logits else tokens
