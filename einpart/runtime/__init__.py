"""The runtime: Executable (mesh, weights, KV cache, AOT-compiled prefill/decode, generate),
devices (simulated CPU devices, meshes, jax.distributed start-up) and weights
(random init, safetensors, checks)."""
from .devices import initialize_distributed, make_mesh, simulate_cpu_devices
from .executable import Executable, load_module
from .weights import check_weights, load_safetensors, load_weights, save_safetensors

__all__ = ["Executable", "check_weights", "initialize_distributed", "load_module", "load_safetensors",
           "load_weights", "make_mesh", "save_safetensors", "simulate_cpu_devices"]
