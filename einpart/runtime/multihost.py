"""One process of a multi-process run: the same Executable over one global mesh.

    python -m einpart.runtime.multihost --coordinator 127.0.0.1:PORT \\
        --num-processes 2 --process-id I [--local-devices 4] \\
        SPEC --mesh 2x4 --prompt-len 5 --max-new 4 [--plan simple|random] [--seed S]

Every process joins jax.distributed (CPU collectives through gloo), sees the
devices of all processes, builds the same plan, weights (from the seed) and
programs, and generates; each prints one JSON line with the tokens, which
are the same in every process and the same as one process with all the
devices.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import EinpartError


def run(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="einpart-multihost")
    p.add_argument("spec")
    p.add_argument("--set", action="append")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--local-devices", type=int, default=None)
    p.add_argument("--mesh", required=True)
    p.add_argument("--plan", default=None, choices=("simple", "random", "replicated", "shard"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", default="scan", choices=("scan", "unroll"))
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--max-new", type=int, required=True)
    args = p.parse_args(argv)

    from .devices import initialize_distributed
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, args.local_devices)
    import jax
    import numpy as np
    from ..cli_ir import load_spec
    from ..cli_run import plan_graph
    from ..codegen.plans import parse_mesh
    from .executable import Executable
    graph = load_spec(args)
    planned = plan_graph(graph, parse_mesh(args.mesh), args.plan, args.seed).graph
    ex = Executable(planned, layers=args.layers, seed=args.seed)
    prompt = np.random.default_rng(args.seed).integers(0, ex.vocab, (ex.batch, args.prompt_len), dtype=np.int32)
    tokens, history = ex.generate(prompt, args.max_new, return_logits=True)
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "tokens": tokens.tolist(), "logits_sum": [float(np.asarray(h, np.float64).sum()) for h in history]}


def main(argv=None) -> int:
    try:
        out = run(argv)
    except EinpartError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
