"""Devices and meshes: real devices, N simulated CPU devices, several processes.

JAX fixes its device count when its backend starts; `simulate_cpu_devices(n)`
must run before that (the CLI calls it first thing). Multi-host runs call
`initialize_distributed(...)` in every process before anything else: each
process then sees the devices of all processes in jax.devices(), and one
global mesh spans them.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import EinpartError


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # pragma: no cover - private API moved
        return False


def simulate_cpu_devices(n: int) -> bool:
    """Ask for n CPU devices. Returns False when JAX has already started (too late)."""
    import jax
    if _backend_started():
        return False
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:
        return False
    return True


def initialize_distributed(coordinator: str, num_processes: int, process_id: int,
                           local_devices: int | None = None, heartbeat_s: int | None = None,
                           init_timeout_s: int | None = None, recoverable: bool = False) -> None:
    """Join a multi-process run (jax.distributed) with CPU collectives (gloo) enabled;
    `local_devices` simulated CPU devices in this process. heartbeat_s / init_timeout_s
    bound how long a dead or missing peer can go unnoticed (JAX's defaults otherwise);
    recoverable: a dead peer does not abort this process from inside JAX, so the caller
    can notice it and say so (runtime.multihost's watchdog)."""
    import jax
    if local_devices:
        simulate_cpu_devices(local_devices)
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # pragma: no cover - older/newer flag names
        pass
    if recoverable:
        jax.config.update("jax_enable_recoverability", True)
    timeouts = {}
    if init_timeout_s is not None:
        timeouts["initialization_timeout"] = int(init_timeout_s)
    if heartbeat_s is not None:
        timeouts.update(heartbeat_timeout_seconds=int(heartbeat_s), shutdown_timeout_seconds=int(heartbeat_s))
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **timeouts)


def make_mesh(mesh: dict[str, int], devices=None, platform: str | None = None):
    """A jax Mesh with Auto axis types over the first prod(mesh) devices (of `platform`:
    "cpu", "gpu", ...; default: JAX's default backend)."""
    import jax
    from jax.sharding import AxisType, Mesh
    if devices is not None:
        devs = list(devices)
    else:
        try:
            devs = jax.devices(platform) if platform else jax.devices()
        except RuntimeError as e:
            raise EinpartError(f"no {platform} devices: {e}") from None
    need = 1
    for n in mesh.values():
        need *= n
    if need > len(devs):
        platform = devs[0].platform if devs else "none"
        have = len(devs)
        hint = (f"To simulate more CPU devices, start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={need} (or pass --devices {need} to "
                f"einpart, or call jax.config.update('jax_num_cpu_devices', {need}) before JAX starts).")
        exist = f"{have} {platform} device exists" if have == 1 else f"{have} {platform} devices exist"
        raise EinpartError(f"the mesh {', '.join(f'{k}={v}' for k, v in mesh.items())} needs {need} devices, "
                           f"but only {exist}. {hint}")
    arr = np.array(devs[:need], dtype=object).reshape(tuple(mesh.values()))
    return Mesh(arr, tuple(mesh), axis_types=(AxisType.Auto,) * len(mesh))


def xla_flags_for(n: int) -> dict[str, str]:
    """Environment for a child process with n simulated CPU devices."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    return env
