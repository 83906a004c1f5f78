"""One process of a multi-process run: the same Executable over one global mesh.

    python -m einpart.runtime.multihost --coordinator 127.0.0.1:PORT \\
        --num-processes 2 --process-id I [--local-devices 4] \\
        SPEC --mesh 2x4 --prompt-len 5 --max-new 4 [--plan simple|random] [--seed S] \\
        [--stage-timeout 120] [--heartbeat-timeout 10]

Every process joins jax.distributed (CPU collectives through gloo), sees the
devices of all processes, builds the same plan, weights (from the seed) and
programs, and generates; each prints one JSON line with the tokens, which
are the same in every process and the same as one process with all the
devices.

A process of the run can die (killed, out of memory, a lost host). The
others must not hang in a collective that can never complete, so two
bounds apply: jax.distributed's heartbeat (`--heartbeat-timeout`, passed as
`heartbeat_timeout_seconds`; JAX's default is 100 s) lets the coordination
service notice a missing process, and a watchdog gives each stage (join,
build, generate, finish) at most `--stage-timeout` seconds (default an hour:
it is the backstop; the heartbeat is what notices a dead process). When the watchdog fires, or a
collective fails, the process prints one line, `einpart-multihost: process I:
...` naming the stage, and exits with status 3 (the watchdog exits the
process at once: a thread stuck in a collective cannot be interrupted).
Progress lines (`... process I: stage STAGE`) go to stderr, so a caller can
see how far each process got.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from ..codegen.lower import LAYER_MODES
from ..errors import EinpartError

LOST_PROCESS = 3   # exit status: a process of the run died or stopped responding


class Watchdog:
    """Exits the process (status LOST_PROCESS) when a stage runs longer than `limit_s`."""

    def __init__(self, process: int, limit_s: float):
        self.process, self.limit_s = process, float(limit_s)
        self.peers: int = 0          # set after joining: poll the coordination service for live processes
        self.stage, self.started = "start", time.monotonic()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="einpart-watchdog", daemon=True)
        self._thread.start()

    def enter(self, stage: str) -> None:
        with self._lock:
            self.stage, self.started = stage, time.monotonic()
        report(self.process, f"stage {stage}")

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(0.2):
            with self._lock:
                stage, elapsed = self.stage, time.monotonic() - self.started
            if self.peers:
                self._check_peers()
            if elapsed > self.limit_s:
                report(self.process, f"stage '{stage}' made no progress for {self.limit_s:g} s (limit "
                                     f"--stage-timeout); another process of the run has probably died. "
                                     f"Exiting with status {LOST_PROCESS}.")
                os._exit(LOST_PROCESS)


    def _check_peers(self) -> None:
        from jax._src import distributed
        client = distributed.global_state.client
        if client is None:
            return
        try:
            live = client.get_live_nodes(list(range(self.peers)))
        except Exception as e:   # the coordinator itself is gone
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            self._lost(f"cannot reach the coordinator of the run (process 0): {first}")
        gone = sorted(set(range(self.peers)) - set(live))
        if gone:
            self._lost(f"process{'es' if len(gone) > 1 else ''} {', '.join(map(str, gone))} of the run "
                       f"stopped sending heartbeats (died or lost)")

    def _lost(self, why: str) -> None:
        report(self.process, f"stage '{self.stage}': {why}. Exiting with status {LOST_PROCESS}.")
        os._exit(LOST_PROCESS)


def report(process: int, message: str) -> None:
    print(f"einpart-multihost: process {process}: {message}", file=sys.stderr, flush=True)


def join(coordinator: str, num_processes: int, process_id: int, local_devices: int | None,
         heartbeat_s: int, init_timeout_s: int) -> None:
    """jax.distributed with bounded timeouts, recoverable: a dead process must not abort the
    others from inside JAX (a fatal log and a native stack); the Watchdog notices it and
    exits with one line."""
    from .devices import initialize_distributed
    initialize_distributed(coordinator, num_processes, process_id, local_devices, heartbeat_s=heartbeat_s,
                           init_timeout_s=init_timeout_s, recoverable=True)


def leave(client, process_id: int, num_processes: int, limit_s: float) -> None:
    """Disconnect in order. With recoverable tasks JAX's shutdown barrier no longer keeps the
    coordinator (process 0, which hosts the coordination service) alive until the others
    have disconnected, and a process whose coordinator is gone aborts. So the others
    shut down first, and process 0 waits until none of them is live before it does."""
    import jax
    if process_id != 0:
        jax.distributed.shutdown()
        return
    everyone = list(range(num_processes))      # the request must include the caller
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and set(client.get_live_nodes(everyone)) - {0}:
        time.sleep(0.05)
    jax.distributed.shutdown()


def parse_args(argv=None):
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
    p.add_argument("--layers", default="auto", choices=LAYER_MODES)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--max-new", type=int, required=True)
    p.add_argument("--stage-timeout", type=float, default=3600.0,
                   help="seconds each stage (join, build, generate) may take before this process gives up")
    p.add_argument("--heartbeat-timeout", type=int, default=30,
                   help="jax.distributed heartbeat timeout in seconds (JAX's default: 100)")
    return p.parse_args(argv)


def run(argv=None, watchdog: Watchdog | None = None) -> dict:
    args = parse_args(argv)
    dog = watchdog or Watchdog(args.process_id, args.stage_timeout)
    dog.enter("join")
    join(args.coordinator, args.num_processes, args.process_id, args.local_devices, args.heartbeat_timeout,
         max(1, int(args.stage_timeout)))
    dog.peers = args.num_processes
    import jax
    import numpy as np
    from ..cli_ir import load_spec
    from ..cli_run import plan_graph
    from ..passes.plans import parse_mesh
    from .executable import Executable
    dog.enter("build")
    graph = load_spec(args)
    planned = plan_graph(graph, parse_mesh(args.mesh), args.plan, args.seed).graph
    ex = Executable(planned, layers=args.layers, seed=args.seed)
    prompt = np.random.default_rng(args.seed).integers(0, ex.vocab, (ex.batch, args.prompt_len), dtype=np.int32)
    dog.enter("generate")
    tokens, history = ex.generate(prompt, args.max_new, return_logits=True)
    # No process may leave before all are done: one that exits would look dead to the
    # others' liveness check. So the check stops here and everyone meets at a barrier
    # (bounded by --stage-timeout; a peer that dies now makes it fail).
    dog.enter("finish")
    dog.peers = 0
    from jax._src import distributed
    client = distributed.global_state.client
    client.wait_at_barrier("einpart-multihost-finish", int(args.stage_timeout * 1000))
    leave(client, args.process_id, args.num_processes, args.stage_timeout)
    dog.enter("done")
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "tokens": tokens.tolist(), "logits_sum": [float(np.asarray(h, np.float64).sum()) for h in history]}


def _run_errors() -> tuple:
    try:
        from jax.errors import JaxRuntimeError
    except ImportError:  # pragma: no cover - older JAX
        from jaxlib.xla_extension import XlaRuntimeError as JaxRuntimeError
    return (JaxRuntimeError, ConnectionError)


_RUN_ERRORS: tuple = ()


def main(argv=None) -> int:
    global _RUN_ERRORS
    _RUN_ERRORS = _run_errors()
    args = parse_args(argv)
    dog = Watchdog(args.process_id, args.stage_timeout)
    try:
        out = run(argv, dog)
    except EinpartError as e:
        print(str(e), file=sys.stderr)
        return 1
    except _RUN_ERRORS as e:   # a failed collective or coordination call: the run is broken
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:500]
        report(args.process_id, f"stage '{dog.stage}' failed ({type(e).__name__}: {first}); another process "
                                f"of the run has probably died. Exiting with status {LOST_PROCESS}.")
        return LOST_PROCESS
    finally:
        dog.stop()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
