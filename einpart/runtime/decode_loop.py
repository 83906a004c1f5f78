"""Several decode steps in one compiled call.

Executable.generate's host loop runs one decode program per token and waits
for each token on the host before it can launch the next step: a device
round trip per token, and the device idles while the host dispatches. The
loop here is one jitted `lax.fori_loop` over up to `steps` decode steps: it
feeds each sampled token back on the device and returns the tokens of the
whole chunk at once (the KV cache donated, so it is updated in place). The
trip count is an argument, so one compilation per batch serves every chunk.

Sampling is the host loop's (Executable._pick: greedy, or temperature / top-k
with the key folded with the step's index), so both loops give the same tokens.
"""
from __future__ import annotations


def compiled_loop(ex, batch: int, steps: int, temperature: float, top_k: int | None):
    """The jitted loop `(params, state, token[batch], pos, count, base_key, first_step)
    -> (tokens[batch, steps], state)` for one batch size and sampler, cached on `ex`."""
    key = ("decode-loop", batch, steps, float(temperature), top_k)
    if key in ex._compiled:
        return ex._compiled[key]
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    module = ex.module(batch, ex.prefill_len)
    decode = module.programs(ex.mesh)["decode"]
    pick = ex._pick(temperature, top_k)
    tokens_name, logits_name = ex.axes.tokens, ex.axes.logits

    def loop(params, state, token, pos, count, base, first):
        def body(i, carry):
            state, token, out = carry
            outs, state = decode(params, state, {tokens_name: token[:, None]}, pos + i)
            rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(base), first + i))
            token = pick(outs[logits_name], 0, rng)
            return state, token, lax.dynamic_update_slice(out, token[:, None], (0, i))

        out = jnp.zeros((batch, steps), jnp.int32)
        state, _, out = lax.fori_loop(0, count, body, (state, token, out))
        return out, state

    replicated = ex._sharding(P())
    fn = jax.jit(loop, donate_argnums=(1,), out_shardings=(replicated, None))
    ex._compiled[key] = fn
    return fn


def generate_on_device(ex, first_token, max_new: int, steps: int, temperature: float, top_k: int | None,
                       base_key, on_step) -> list:
    """Tokens 2 .. max_new of a generation whose first token (sampled from the prefill's
    logits) is `first_token` [batch]: max_new - 1 decode steps in chunks of `steps`,
    from the executable's cache and position. `on_step(n)` reports progress."""
    import time

    import numpy as np
    from jax.sharding import PartitionSpec as P

    batch = first_token.shape[0]
    fn = compiled_loop(ex, batch, steps, temperature, top_k)
    base_key = ex._put(np.asarray(base_key), P())     # on the mesh, as every other argument
    token, done, out = first_token, 1, []
    while done < max_new:
        count = min(steps, max_new - done)
        start = time.perf_counter()
        args = [ex._put(np.asarray(v, np.int32), P()) for v in (token, ex.pos, count, done)]
        chunk, ex.state = fn(ex.params, ex.state, args[0], args[1], args[2], base_key, args[3])
        chunk = ex.host(chunk)[:, :count]
        ex.timing.decode_s += time.perf_counter() - start
        ex.timing.decode_steps += count
        ex.pos += count
        out.extend(chunk.T)
        token, done = chunk[:, -1], done + count
        on_step(done)
    return out
