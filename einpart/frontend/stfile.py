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


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of one file, without reading the data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise EinpartError(f"{path}: not a safetensors file ({e})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > size:
            raise EinpartError(f"{path}: tensor '{name}' runs past the end of the file")
        out[name] = TensorInfo(path, name, info["dtype"], tuple(int(x) for x in info["shape"]), base + start,
                               end - start)
    return out


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
