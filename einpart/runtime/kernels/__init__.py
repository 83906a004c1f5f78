"""Hand-written device kernels for products XLA lowers poorly, each with a pure-jnp
fallback so that callers stay platform-independent. Not wired into codegen yet:
a kernel earns its place there only once a benchmark shows it ahead of XLA."""
from .int8_matmul import Int8MatmulConfig, default_config, int8_matmul, int8_matmul_reference

__all__ = ["Int8MatmulConfig", "default_config", "int8_matmul", "int8_matmul_reference"]
