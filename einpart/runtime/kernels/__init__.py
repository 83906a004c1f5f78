"""Hand-written device kernels for products XLA lowers poorly, each with a pure-jnp
fallback so that callers stay platform-independent. A kernel earns its place in
codegen only once a benchmark shows it ahead of XLA: int8_gemv has (codegen/int8_matmul.py
emits it for decode rows); int8_matmul, the tl.dot version, has not."""
from .int8_matmul import Int8MatmulConfig, default_config, int8_matmul, int8_matmul_reference

__all__ = ["Int8MatmulConfig", "default_config", "int8_matmul", "int8_matmul_reference"]
