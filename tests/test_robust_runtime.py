"""Runtime limits: generating past the KV cache, a batch other than the compiled
one, and a process of a multi-process run dying (the others exit with a clear
error within a bounded time instead of hanging in a collective)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from einpart.codegen import simple_plan
from einpart.errors import EinpartError
from einpart.ir import parse
from einpart.ir.model import Reference, init_params
from einpart.runtime import Executable

ROOT = Path(__file__).resolve().parents[1]
TINY = """size B = 2, T = 4, S = 8, V = 16, D = 8
index b: B, t: T, s: S, v: V, d: D
input tokens[b, t] : i32
param emb[v, d]
param out[d, v]
state cache[b, s, d]
h[b, t, d] = take(emb[v, d], tokens[b, t])
kc[b, s, d] = write(cache[b, s, d], h[b, t, d])
sc[b, t, s] = h[b, t, d] * kc[b, s, d]
a[b, t, s] = sc[b, t, s] + causal(t, s)
m[b, t] = max(a[b, t, s])
p[b, t, s] = exp(a[b, t, s] - m[b, t])
o[b, t, d] = p[b, t, s] * kc[b, s, d]
logits[b, t, v] = o[b, t, d] * out[d, v]
output logits
"""


def tiny():
    return parse(TINY, "tiny.ein")


# ------------------------------------------------------------------ the KV cache
def test_decoding_past_the_kv_cache_is_an_error_not_a_wrap():
    ex = Executable(simple_plan(tiny(), {"x": 2}), seed=0)
    ex.prefill(np.ones((2, 6), np.int32))
    ex.decode(np.ones(2, np.int32))                 # position 6
    ex.decode(np.ones(2, np.int32))                 # position 7: the last slot
    with pytest.raises(EinpartError) as e:
        ex.decode(np.ones(2, np.int32))             # position 8 does not exist
    assert str(e.value) == "position 8 is outside the context of 8 positions"
    with pytest.raises(EinpartError) as e:
        ex.decode(np.ones(2, np.int32), pos=-1)
    assert str(e.value) == "position -1 is outside the context of 8 positions"
    with pytest.raises(EinpartError) as e:
        ex.generate(np.ones((2, 5), np.int32), 5)
    assert str(e.value) == ("the prompt (5 tokens) plus 5 new tokens needs 9 cached positions, more than the "
                            "context of 8")
    assert ex.generate(np.ones((2, 5), np.int32), 4).shape == (2, 4)     # exactly fills the cache


# ------------------------------------------------------------------ batches
def test_a_batch_larger_than_compiled_gets_its_own_programs_and_the_right_tokens():
    graph = tiny()
    ex = Executable(simple_plan(graph, {"x": 2}), seed=3)
    assert set(ex._compiled) == {("prefill", 2, 4), ("decode", 2, 1)}
    prompt = np.arange(18, dtype=np.int32).reshape(6, 3) % 16
    want, _ = Reference(graph, init_params(graph, 3)).generate(prompt, 3)
    np.testing.assert_array_equal(ex.generate(prompt, 3), want)
    assert ("decode-loop", 6, 32, 0.0, None) in ex._compiled     # generate's decode loop for batch 6
    with pytest.raises(EinpartError) as e:          # the cache holds 6 sequences now
        ex.decode(np.ones(2, np.int32))
    assert str(e.value) == "decode batch 2 differs from the prefill's (6)"


def test_a_batch_the_plan_cannot_split_fails_before_compiling():
    from einpart.codegen import set_plan
    planned = set_plan(tiny(), {"x": 2}, layouts={"tokens": {"b": "x"}, "cache": {"b": "x"}})
    ex = Executable(planned, compile=False)
    with pytest.raises(EinpartError) as e:
        ex.generate(np.zeros((5, 2), np.int32), 2)
    assert str(e.value) == ("cannot run batch 5 x 4 positions on mesh x=2: 'tokens': index b of size 5 cannot "
                            "be split 2 ways over mesh axes x")
    assert ex._compiled == {}


# ------------------------------------------------------------------ a process dies
def test_the_watchdog_ends_a_stuck_stage_with_one_line():
    """The bound that holds whatever JAX does: a stage with no progress for --stage-timeout
    seconds ends the process with status 3 and a line naming the stage."""
    code = ("import time; from einpart.runtime.multihost import Watchdog\n"
            "dog = Watchdog(1, 0.5); dog.enter('generate'); time.sleep(30)")
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    took = time.monotonic() - start
    assert p.returncode == 3, p.stderr
    assert p.stderr.splitlines() == [
        "einpart-multihost: process 1: stage generate",
        "einpart-multihost: process 1: stage 'generate' made no progress for 0.5 s (limit --stage-timeout); "
        "another process of the run has probably died. Exiting with status 3."]
    assert took < 20, took


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_and_kill(victim: int, heartbeat: int = 4):
    """Two processes x 4 CPU devices; `victim` is killed once it has joined the run. Returns
    (survivor's return code, its stderr, seconds from the kill to its exit)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "xla_force_host_platform_device_count" not in f)
    port = _free_port()
    args = ["llama", "--mesh", "2x4", "--plan", "simple", "--prompt-len", "5", "--max-new", "4",
            "--stage-timeout", "120", "--heartbeat-timeout", str(heartbeat)]
    procs = [subprocess.Popen([sys.executable, "-m", "einpart.runtime.multihost", *args,
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--local-devices", "4"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        for line in procs[victim].stderr:                 # joined: the run now depends on it
            if "stage build" in line:
                break
        procs[victim].kill()
        killed = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=90)         # a hang fails here
        return survivor.returncode, err, time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_killed_process_ends_the_others_with_a_clear_error():
    """Process 1 dies: process 0 (the coordinator) learns it from the coordination
    service's heartbeat (4 s here) and exits 3 with one line, within seconds."""
    code, err, took = _run_and_kill(victim=1)
    assert code == 3, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("einpart-multihost: process 0: stage '")]
    assert line and line[-1].endswith("process 1 of the run stopped sending heartbeats (died or lost). "
                                      "Exiting with status 3."), err[-3000:]
    assert took < 45, took


def test_a_killed_coordinator_ends_the_others_at_once():
    """Process 0 (the coordinator) dies: JAX's own error polling ends process 1 at once,
    with its message (a fatal log: status -6, SIGABRT), before einpart's watchdog can."""
    code, err, took = _run_and_kill(victim=0)
    assert code != 0, err[-3000:]
    assert ("another task died" in err or "cannot reach the coordinator" in err), err[-3000:]
    assert took < 45, took
