"""Weights: random init, safetensors files, and the check that names every offender."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.model import init_params
from ..ir.shapes import decl_shapes
from ..ir.verify import index_sizes, resolve_sizes

try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

NUMPY_DTYPE = {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64), "f16": np.dtype(np.float16),
               "i8": np.dtype(np.int8), "i32": np.dtype(np.int32)}
if _BF16 is not None:
    NUMPY_DTYPE["bf16"] = _BF16


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    for k, v in NUMPY_DTYPE.items():
        if v == dt:
            return k
    return str(dt)


FLOAT_NAMES = ("bf16", "f16", "f32", "f64")
STORED_AS = "stored_as"   # multiquery: the axes a parameter has in the weights file


def expected_params(graph: g.Graph, sizes: dict | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every parameter as a weights file holds it, stacked over
    the layer index (a `stored_as` parameter in its stored axes)."""
    idx = index_sizes(graph, sizes if sizes is not None else resolve_sizes(graph))
    out = {}
    for n, i in decl_shapes(graph, sizes).items():
        if i.decl.kind != "param":
            continue
        shape = i.shape
        stored = g.attr(i.decl.attrs, STORED_AS)
        if stored:
            shape = ((i.shape[0],) if i.stacked is not None else ()) + tuple(idx[a.name] for a in stored)
        out[n] = (shape, i.decl.type.dtype)
    return out


def declared_shapes(graph: g.Graph, sizes: dict | None = None) -> dict[str, tuple[int, ...]]:
    return {n: i.shape for n, i in decl_shapes(graph, sizes).items() if i.decl.kind == "param"}


def check_weights(graph: g.Graph, arrays: dict, source: str = "weights", sizes: dict | None = None) -> None:
    """One EinpartError naming every missing, unexpected, mis-shaped or mis-typed tensor."""
    want = expected_params(graph, sizes)
    declared = declared_shapes(graph, sizes)
    problems = []
    for name, (shape, dtype) in want.items():
        if name not in arrays:
            problems.append(f"missing tensor '{name}': expected shape {shape} {dtype}")
    for name in arrays:
        if name not in want:
            a = arrays[name]
            problems.append(f"unexpected tensor '{name}' (shape {tuple(np.shape(a))} "
                            f"{dtype_name(np.asarray(a).dtype)}): the spec has no such parameter")
    for name, (shape, dtype) in want.items():
        if name not in arrays:
            continue
        a = arrays[name]
        got_shape, got_dtype = tuple(np.shape(a)), dtype_name(np.asarray(a).dtype)
        if got_shape != shape and got_shape != declared[name]:
            problems.append(f"tensor '{name}' has shape {got_shape}, expected shape {shape}")
        if got_dtype != dtype:
            problems.append(f"tensor '{name}' has dtype {got_dtype}, expected {dtype} (shape {shape})")
    if problems:
        head = f"{source} do not match the spec ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
        raise EinpartError("\n  ".join([head] + problems))


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, memory-mapped. The whole header is checked first
    (frontend/stfile.py: sizes, offsets, overlaps, truncation), so a file that lies fails
    with the names of its bad tensors before any data is read."""
    from ..frontend import stfile
    path = Path(path)
    if not path.is_file():
        raise EinpartError(f"{path}: no such weights file")
    return {name: info.load() for name, info in stfile.read_header(path).items()}


def save_safetensors(arrays: dict, path: str | Path) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


def check_finite(arrays: dict, source: str = "weights") -> None:
    """One EinpartError naming every floating-point tensor that holds NaN or Inf (where the
    first one is and how many), read a slice of the first axis at a time."""
    problems = []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        if dtype_name(a.dtype) not in FLOAT_NAMES:
            continue
        nan = inf = 0
        first = None
        rows = a.reshape((1,) + a.shape) if a.ndim == 0 else a     # one slice of the first axis at a time
        for i in range(rows.shape[0]):
            x = np.asarray(rows[i], dtype=np.float64)
            bad = ~np.isfinite(x)
            if bad.any():
                nan += int(np.isnan(x).sum())
                inf += int(np.isinf(x).sum())
                if first is None:
                    first = ((i,) if a.ndim else ()) + tuple(int(j) for j in np.argwhere(bad)[0])
        if nan or inf:
            problems.append(f"tensor '{name}' has {nan + inf} non-finite value{'s' * (nan + inf > 1)} ({nan} NaN, {inf} Inf), "
                            f"the first at index {list(first)}")
    if problems:
        head = f"{source} hold non-finite values ({len(problems)} tensor{'s' * (len(problems) > 1)}):"
        raise EinpartError("\n  ".join([head] + problems))


def load_weights(graph: g.Graph, weights=None, seed: int = 0, sizes: dict | None = None,
                 check_finite_values: bool = False) -> dict[str, np.ndarray]:
    """None: random init from `seed`; a path: a safetensors file; a dict: arrays by name.
    Checked against the spec (every tensor: names, shapes, dtypes; with check_finite_values
    also NaN / Inf) before anything is returned, so a caller places nothing on a device
    from a file that fails; returned in the spec's declared dtypes."""
    if weights is None:
        want = expected_params(graph, sizes)
        try:
            arrays = init_params(graph, seed, sizes)
            return {n: a.astype(NUMPY_DTYPE[want[n][1]]) for n, a in arrays.items()}
        except (MemoryError, ValueError) as e:
            total = sum(int(np.prod(shape, dtype=object)) * NUMPY_DTYPE[dt].itemsize for shape, dt in want.values())
            raise EinpartError(f"cannot create random weights for this spec ({total} bytes of parameters): "
                               f"{type(e).__name__}: {e}") from None
    if isinstance(weights, (str, Path)):
        source = f"weights file {weights}"
        arrays = load_safetensors(weights)
    elif isinstance(weights, dict):
        source, arrays = "weights", {k: np.asarray(v) for k, v in weights.items()}
    else:
        raise EinpartError(f"weights must be None, a safetensors path or a dict, got {type(weights).__name__}")
    check_weights(graph, arrays, source, sizes)
    if check_finite_values:
        check_finite(arrays, source)
    if any(g.attr(d.attrs, STORED_AS) for d, _ in graph.all_decls()):
        from ..passes.multiquery import transform_params
        arrays = transform_params(graph, arrays, sizes)
    return arrays
