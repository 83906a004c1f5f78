"""Subcommands that plan, lower and run a spec: compile, run, demo.

    einpart compile SPEC --mesh 2x4 --out DIR     dumps, NN-lower.py, plan.json
    einpart run SPEC --mesh 2x4 --devices 8 --prompt-len 6 --max-new 8 [--check]
    einpart demo                                  Llama on 8 simulated CPU devices

The plan comes from `--plan`: the built-in `plan` pass (simple: Megatron-style
tensor parallel; random; replicated) or the ILP planner (`shard`). DEFAULT_PLAN
below is what compile/run/demo use when none is given: switching them all to
the ILP planner is that one line. JAX is imported only after the device count
is set.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from .cli_ir import add_spec_args, example_path, load_spec, parse_sets
from .codegen.lower import LAYER_MODES
from .errors import EinpartError

# The plan compile/run/demo use by default: the ILP planner (the shard pass).
DEFAULT_PLAN = "shard"
PLANS = ("simple", "random", "replicated", "shard")
# The planning pass per plan kind; {mesh} is the mesh as NAME=SIZE,... (quoted).
PLAN_PIPELINES = {
    "shard": "shard{{mesh={mesh},hardware={hardware}}}",
    "builtin": "plan{{mesh={mesh},kind={kind},seed={seed}}}",
}

F32_RTOL, F32_ATOL = 1e-4, 1e-5      # |err| <= atol * max(1, scale) + rtol * |ref|
BF16_RTOL, BF16_ATOL = 5e-2, 2e-2


def _mesh(args) -> dict[str, int]:
    from .passes.plans import parse_mesh
    return parse_mesh(args.mesh)


def plan_pipeline(mesh: dict[str, int], kind: str | None = None, seed: int = 0, before: str | None = None,
                  hardware: str = "cpu") -> str:
    from .passes.plans import mesh_text
    kind = kind or DEFAULT_PLAN
    if kind not in PLANS:
        raise EinpartError(f"plan must be one of {', '.join(PLANS)}, got '{kind}'")
    if before:       # a pipeline that ends with its own planning pass runs as given
        from .passes.rewrite_util import planning_pass_last
        if planning_pass_last(before):
            return before
    template = PLAN_PIPELINES["shard" if kind == "shard" else "builtin"]
    text = template.format(mesh=f"'{mesh_text(mesh)}'", kind=kind, seed=seed, hardware=hardware)
    return f"{before},{text}" if before else text


def plan_graph(graph, mesh, kind=None, seed=0, before=None, dump_dir=None, hardware="cpu"):
    """Run the planning pipeline (dumps after each pass when dump_dir is set)."""
    from . import codegen  # noqa: F401,F811  (registers the plan pass)
    if (kind or DEFAULT_PLAN) == "shard":
        try:
            from .passes import shard  # noqa: F401  (registers the shard pass)
        except ImportError as e:
            raise EinpartError(f"the shard planner is not available: {e}") from None
    from . import progress
    from .passes import run_pipeline
    with progress.current().step("planning"):
        result = run_pipeline(graph, plan_pipeline(mesh, kind, seed, before, hardware), dump_dir=dump_dir)
    progress.current().timings(result.records)
    return result


def plan_json(graph, layers: str) -> dict:
    """Everything the plan decided: the stored layout of every declared tensor, and per
    program (prefill, decode) every statement's split, layout and collectives."""
    from .codegen.lower import program_graphs
    from .ir import graph as g
    from .ir.layout import plan_stmt, stmt_split, type_layout
    from .ir.printer import format_value
    from .ir.verify import resolve_sizes
    progs = program_graphs(graph)
    decls = {}
    for d, owner in progs["prefill"].all_decls():
        decls[d.name] = {"kind": d.kind, "indices": list(d.type.indices), "dtype": d.type.dtype,
                         "layout": {i: list(a) for i, a in type_layout(d.type).items() if a},
                         "stacked": owner.index if owner is not None else None}
    programs = {}
    for name, pg in progs.items():
        types = pg.types()
        stmts = {}
        for s, _ in pg.all_stmts():
            entry = {"indices": list(s.type.indices), "dtype": s.type.dtype,
                     "layout": {i: list(a) for i, a in type_layout(s.type).items() if a}}
            if not isinstance(s.op, g.Repeat):
                split = stmt_split(s)
                entry["split"] = {i: list(a) for i, a in split.items() if a}
                entry["collectives"] = [c.describe() for c in plan_stmt(s, types, split).all()]
            extra = {k: format_value(v) for k, v in s.attrs if k != "split"}
            if extra:
                entry["attrs"] = extra
            stmts[s.name] = entry
        programs[name] = {"sizes": resolve_sizes(pg), "statements": stmts}
    return {"mesh": dict(graph.mesh), "layers": layers, "declarations": decls, "programs": programs}


def write_compile_outputs(graph, out: Path, records, layers: str, attention: str = "einsum",
                          int8_matmul: str = "xla") -> Path:
    from .codegen import generate_source
    source = generate_source(graph, layers, attention=attention, int8_matmul=int8_matmul)
    path = out / f"{len(records):02d}-lower.py"
    path.write_text(source)
    (out / "plan.json").write_text(json.dumps(plan_json(graph, layers), indent=1, sort_keys=True) + "\n")
    return path


def _setup_devices(args, mesh) -> None:
    from .runtime.devices import simulate_cpu_devices
    if getattr(args, "devices", None):
        n = 1
        for v in mesh.values():
            n *= v
        if args.devices < n:
            raise EinpartError(f"--devices {args.devices} is fewer than the mesh's {n} devices")
        simulate_cpu_devices(args.devices)


def _before(args) -> str:
    """--pipeline with --kv-groups / --int8 put in place (rewrite_util.with_rewrites)."""
    from .passes.rewrite_util import with_rewrites
    return with_rewrites(args.pipeline, args.int8, args.kv_groups)


# ----------------------------------------------------------------- compile
def cmd_compile(args) -> int:
    mesh = _mesh(args)
    graph = load_spec(args)
    out = Path(args.out)
    result = plan_graph(graph, mesh, args.plan, args.seed, _before(args), dump_dir=out, hardware=args.hardware)
    path = write_compile_outputs(result.graph, out, result.records, args.layers, args.attention, args.int8_matmul)
    for rec in result.records:
        print(f"{rec.name:<40} {rec.seconds * 1000:8.1f} ms  {rec.dump}")
    print(f"{'lower':<40} {'':>11}  {path}")
    print(f"plan: {out / 'plan.json'}")
    if args.html:
        from .reports.html import write_report
        print(f"report: {write_report(args.html, args.spec, result.records, result.graph, args.hardware, path.read_text())}")
    return 0


# ----------------------------------------------------------------- run
def _tolerance(dtype: str):
    return (BF16_RTOL, BF16_ATOL) if dtype == "bf16" else (F32_RTOL, F32_ATOL)


def check_against_reference(ex, weights: dict, prompt, new_tokens, logits_history) -> tuple[float, float, bool]:
    """Teacher-forced: the reference interpreter runs the same tokens; returns
    (largest |error|, largest |logit|, within tolerance)."""
    import numpy as np
    from .ir.model import Reference
    ref = Reference(ex.graph, weights)
    state = ref.new_state(prompt.shape[0])
    rtol, atol = _tolerance(ex.dtype)
    worst, scale, ok = 0.0, 0.0, True
    pos = 0
    feed = [prompt] + [new_tokens[:, i:i + 1] for i in range(new_tokens.shape[1] - 1)]
    for tokens, got in zip(feed, logits_history):
        want, state = ref.step(tokens, pos, state)
        pos += tokens.shape[1]
        err = np.abs(np.asarray(got, np.float64) - want)
        s = float(np.abs(want).max())
        worst, scale = max(worst, float(err.max())), max(scale, s)
        ok &= bool((err <= atol * max(1.0, s) + rtol * np.abs(want)).all())
    return worst, scale, ok


def cmd_run(args) -> int:
    import numpy as np
    mesh = _mesh(args)
    _setup_devices(args, mesh)
    graph = load_spec(args)
    planned = plan_graph(graph, mesh, args.plan, args.seed, _before(args), hardware=args.hardware).graph
    from .runtime import Executable
    from .runtime.weights import load_weights
    start = time.perf_counter()
    ex = Executable(planned, layers=args.layers, dtype=args.dtype, seed=args.seed, weights=args.weights,
                    prefill_len=args.prompt_len, platform=args.platform, check_finite=args.check_weights,
                    attention=args.attention, int8_matmul=args.int8_matmul)
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, ex.vocab, (ex.batch, args.prompt_len), dtype=np.int32)
    tokens, history = ex.generate(prompt, args.max_new, temperature=args.temperature, top_k=args.top_k,
                                  seed=args.seed, return_logits=True)
    t = ex.timing
    print(f"mesh {', '.join(f'{k}={v}' for k, v in mesh.items())}; {len(ex.mesh.devices.flat)} devices "
          f"({ex.mesh.devices.flat[0].platform}); built and compiled in {build_s:.2f} s")
    for b in range(tokens.shape[0]):
        print(f"sequence {b}: prompt {prompt[b].tolist()} -> {tokens[b].tolist()}")
    print(f"prefill {t.prefill_s * 1000:.1f} ms; {t.decode_steps} decode steps "
          f"{t.decode_s * 1000 / max(t.decode_steps, 1):.2f} ms each; "
          f"{tokens.size / max(t.prefill_s + t.decode_s, 1e-9):.1f} tokens/s")
    if args.check:
        weights = load_weights(ex.spec_graph, args.weights, args.seed)
        worst, scale, ok = check_against_reference(ex, weights, prompt, tokens, history)
        n = sum(h.size for h in history)
        print(f"check: {n} logits against the reference interpreter; largest error {worst:.3g} "
              f"(logits up to {scale:.3g}): {'ok' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    return 0


# ----------------------------------------------------------------- demo
DEMO_MESH = {"x": 2, "y": 4}
DEMO_DEVICES = 8


def cmd_demo(args) -> int:
    import numpy as np
    from .runtime.devices import simulate_cpu_devices
    simulate_cpu_devices(DEMO_DEVICES)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="einpart-demo-"))
    t0 = time.perf_counter()
    from .ir.parser import parse_file
    graph = parse_file(example_path("llama"), parse_sets(args.set))
    result = plan_graph(graph, DEMO_MESH, dump_dir=out)
    lower = write_compile_outputs(result.graph, out, result.records, args.layers)
    print(f"einpart demo: the Llama example on mesh x=2, y=4 ({DEMO_DEVICES} simulated CPU devices), "
          f"plan: {DEFAULT_PLAN}")
    print(f"dumps written to {out}/ (the IR after each pass, the generated module {lower.name}, plan.json)")
    from .runtime import Executable
    from .runtime.weights import load_weights
    ex = Executable(result.graph, layers=args.layers, seed=0, platform="cpu")
    print(f"compiled prefill and decode in {sum(ex.timing.compile_s.values()):.1f} s")
    prompt = np.random.default_rng(0).integers(0, ex.vocab, (ex.batch, 6), dtype=np.int32)
    tokens, history = ex.generate(prompt, args.max_new, return_logits=True)
    for b in range(tokens.shape[0]):
        print(f"sequence {b}: prompt {prompt[b].tolist()} -> {tokens[b].tolist()}")
    t = ex.timing
    print(f"{tokens.size / max(t.prefill_s + t.decode_s, 1e-9):.1f} tokens/s")
    worst, scale, ok = check_against_reference(ex, load_weights(ex.spec_graph, None, 0), prompt, tokens, history)
    print(f"checked against the reference interpreter: largest logit error {worst:.3g} "
          f"(logits up to {scale:.3g}): {'ok' if ok else 'MISMATCH'}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


# ----------------------------------------------------------------- registration
def _plan_args(p) -> None:
    p.add_argument("--mesh", required=True, metavar="M", help="mesh: 2x4 (axes x, y) or x=2,y=4")
    p.add_argument("--plan", default=None, choices=PLANS,
                   help=f"simple (Megatron-style tensor parallel), random, replicated, or shard (the ILP "
                        f"planner); default {DEFAULT_PLAN}")
    p.add_argument("--hardware", default="cpu", metavar="H", help="hardware preset for --plan shard")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, prompt and random plans")
    p.add_argument("--layers", default="auto", choices=LAYER_MODES,
                   help="lower layers to lax.scan, unroll them (each layer's weights and cache their own "
                        "arrays), or auto: unroll up to 64 layers, scan above (default)")
    p.add_argument("--pipeline", metavar="P", help="passes to run before planning, e.g. 'defer-norm,cast{dtype=bf16}'")
    p.add_argument("--int8", action="store_true", help="int8 weights (adds the int8 pass last before planning)")
    p.add_argument("--kv-groups", type=int, metavar="G", help="pool K/V heads into G groups (adds multiquery{groups=G} first)")
    p.add_argument("--attention", default="auto", choices=("einsum", "xla", "cudnn", "auto"),
                   help="softmax attention as einsums or one jax.nn.dot_product_attention (auto: cudnn for bf16 "
                        "prefill on an NVIDIA GPU, else einsum; compile has no GPU, so auto is einsum there)")
    p.add_argument("--int8-matmul", default="auto", choices=("xla", "pallas", "auto"),
                   help="int8 weight products as XLA dots or the Pallas GEMV kernel (auto: the kernel at decode "
                        "on an NVIDIA GPU, else xla; compile has no GPU, so auto is xla there)")


def register(sub) -> None:
    p = sub.add_parser("compile", help="plan and lower a spec; write the dumps, the module and plan.json")
    add_spec_args(p)
    _plan_args(p)
    p.add_argument("--devices", type=int, metavar="N", help="simulated CPU devices (not needed to compile)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained HTML report (einpart report)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="compile and generate; print tokens and tokens/s")
    add_spec_args(p)
    _plan_args(p)
    p.add_argument("--devices", type=int, metavar="N", help="simulate N CPU devices")
    p.add_argument("--platform", default=None, metavar="P", help="cpu or gpu (default: JAX's default backend)")
    p.add_argument("--prompt-len", type=int, required=True, metavar="P")
    p.add_argument("--max-new", type=int, required=True, metavar="N")
    p.add_argument("--weights", metavar="FILE", help="safetensors weights (default: random from --seed)")
    p.add_argument("--check-weights", action="store_true", help="refuse weights holding NaN or Inf (reads them all)")
    p.add_argument("--dtype", default="f32", choices=("f32", "bf16"), help="storage of weights and cache")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--check", action="store_true", help="compare every logit with the reference interpreter")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the Llama example on 8 simulated CPU devices, checked against the reference")
    p.add_argument("--out", metavar="DIR", help="where to write the dumps (default: a new temporary folder)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE[,...]", help="override sizes")
    p.add_argument("--layers", default="scan", choices=LAYER_MODES)
    p.add_argument("--max-new", type=int, default=8)
    p.set_defaults(func=cmd_demo)


def main(argv=None) -> int:
    """`python -m einpart.cli_run ...` (until einpart.cli lists this module)."""
    from . import cli
    if "einpart.cli_run" not in cli.COMMAND_MODULES:
        cli.COMMAND_MODULES = tuple(cli.COMMAND_MODULES) + ("einpart.cli_run",)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
