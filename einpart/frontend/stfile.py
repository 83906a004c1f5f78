"""Reading and writing safetensors files with numpy alone.

Why not the `safetensors` package: its numpy API has no bfloat16 (the dtype
of most real checkpoints) and loads whole files; the format is an 8-byte
header length, a JSON header (dtype, shape, byte range per tensor) and raw
little-endian data, so a memory-mapped reader that checks shapes before
reading a byte, and a streaming writer that never holds more than one layer
of a stacked weight, are a few lines each.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EinpartError

try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes ships with jax
    _BF16 = None

_NUMPY = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8"),
          "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"),
          "BOOL": np.dtype("?")}
if _BF16 is not None:
    _NUMPY["BF16"] = _BF16
_CODES = {"f32": "F32", "bf16": "BF16", "f16": "F16", "f64": "F64", "i32": "I32", "i8": "I8"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype code (F32, BF16, ...), shape and absolute byte offset."""
    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def load(self) -> np.ndarray:
        """The tensor, memory-mapped (read lazily)."""
        if self.dtype not in _NUMPY:
            raise EinpartError(f"{self.path}: tensor '{self.name}' has unsupported dtype {self.dtype}")
        dt = _NUMPY[self.dtype]
        if int(np.prod(self.shape, dtype=np.int64)) * dt.itemsize != self.nbytes:
            raise EinpartError(f"{self.path}: tensor '{self.name}' holds {self.nbytes} bytes, "
                               f"not {list(self.shape)} of {self.dtype}")
        if self.nbytes == 0:
            return np.zeros(self.shape, dt)
        return np.memmap(self.path, dtype=dt, mode="r", offset=self.offset, shape=self.shape)


MAX_HEADER = 100 * 2**20   # the safetensors format's own limit on the JSON header


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of one file, without reading the data.

    A header that lies is an EinpartError naming each bad tensor before any byte of
    data is read: a header length past the end of the file, JSON that is not an object,
    an unknown dtype, a shape that is not a list of non-negative integers, data offsets
    that are not [start, end] with start <= end, a byte count that does not match
    shape x dtype, data past the end of the file (a truncated file), or two tensors whose
    bytes overlap."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"file too short: {size} bytes, a safetensors file starts with an 8-byte header "
                                 f"length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"the header length {n} is larger than the file ({size} bytes)")
            if n > MAX_HEADER:
                raise ValueError(f"the header length {n} exceeds the format's limit of {MAX_HEADER} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"the header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"the header is JSON {type(header).__name__}, not an object")
    except OSError as e:
        raise EinpartError(f"{path}: cannot read weights: {e.strerror or e}") from None
    except ValueError as e:
        raise EinpartError(f"{path}: not a safetensors file ({e})") from None
    base = 8 + n
    data_size = size - base
    out, problems = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        bad = _entry_problem(info, data_size)
        if bad:
            problems.append(f"tensor '{name}': {bad}")
            continue
        start, end = info["data_offsets"]
        out[name] = TensorInfo(path, name, info["dtype"], tuple(info["shape"]), base + start, end - start)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in out.values() if t.nbytes)
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            problems.append(f"tensors '{a}' and '{b}' overlap (bytes {s0 - base}..{e0 - base} and "
                            f"{s1 - base}..{e1 - base})")
    if problems:
        head = f"{path}: the safetensors header is inconsistent ({len(problems)} problem{'s' * (len(problems) > 1)}):"
        raise EinpartError("\n  ".join([head] + problems))
    return out


def _entry_problem(info, data_size: int) -> str:
    """Why one header entry is unusable ('' if it is fine)."""
    if not isinstance(info, dict):
        return f"the entry is {type(info).__name__}, not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _NUMPY:
        return f"unsupported dtype {dtype!r} (known: {', '.join(_NUMPY)})"
    if not isinstance(shape, list) or not all(type(x) is int and x >= 0 for x in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} is not [start, end] with 0 <= start <= end"
    want = int(np.prod(shape, dtype=object)) * _NUMPY[dtype].itemsize
    if offsets[1] - offsets[0] != want:
        return (f"holds {offsets[1] - offsets[0]} bytes, but shape {shape} of {dtype} needs {want}")
    if offsets[1] > data_size:
        return (f"bytes {offsets[0]}..{offsets[1]} run past the end of the file (it has {data_size} bytes of "
                f"data: truncated?)")
    return ""


def load_file(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one file as a numpy array (memory-mapped)."""
    return {name: info.load() for name, info in read_header(path).items()}


def write_file(path: str | Path, tensors: list[tuple[str, str, tuple[int, ...], object]],
               metadata: dict[str, str] | None = None) -> int:
    """Write tensors given as (name, dtype, shape, chunks): `chunks` yields arrays whose bytes, in
    order, make up the tensor (one per layer of a stacked weight). Returns the bytes written."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _NUMPY[_CODES[dtype]].itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape, chunks in tensors:
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            wrote = 0
            for chunk in chunks:
                data = np.ascontiguousarray(chunk, dtype=_NUMPY[_CODES[dtype]]).tobytes()
                f.write(data)
                wrote += len(data)
            if wrote != want:  # pragma: no cover - a bug in the caller's transform
                raise AssertionError(f"tensor '{name}': wrote {wrote} bytes, expected {want}")
    return 8 + len(text) + offset
