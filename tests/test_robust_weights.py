"""Weights files that are broken or lie: truncated, wrong dtype or shape, extra
and missing tensors, NaN / Inf (checked on request), and safetensors headers
whose sizes and offsets do not add up. Each is one EinpartError naming the
tensors, raised before any array is placed on a device."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from einpart.errors import EinpartError
from einpart.ir import parse
from einpart.ir.model import init_params
from einpart.runtime.weights import check_finite, load_safetensors, load_weights, save_safetensors

SPEC = """size B = 2, T = 4, S = 8, V = 16, D = 8
index b: B, t: T, s: S, v: V, d: D
input tokens[b, t] : i32
param emb[v, d]
param out[d, v]
state cache[b, s, d]
h[b, t, d] = take(emb[v, d], tokens[b, t])
kc[b, s, d] = write(cache[b, s, d], h[b, t, d])
logits[b, t, v] = h[b, t, d] * out[d, v]
output logits
"""


def graph():
    return parse(SPEC, "w.ein")


def raw_file(path, header, data: bytes = b"", length: int | None = None):
    """A safetensors file written by hand: `header` a dict (JSON) or raw bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text) if length is None else length))
        f.write(text)
        f.write(data)
    return path


def entry(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def good_file(tmp_path):
    path = tmp_path / "good.safetensors"
    save_safetensors(init_params(graph(), 0), path)
    return path


def error(fn, *args, **kw) -> str:
    with pytest.raises(EinpartError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_a_good_file_loads_equal_to_what_was_saved(tmp_path):
    path = good_file(tmp_path)
    got = load_weights(graph(), str(path), check_finite_values=True)
    want = init_params(graph(), 0)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_truncated_file_names_the_tensors_cut_off(tmp_path):
    path = good_file(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])       # out [8, 16] f32 = 512 bytes, the last tensor
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    start, end = header[last]["data_offsets"]
    have = len(data) - 100 - 8 - n
    assert error(load_weights, graph(), str(cut)) == (
        f"{cut}: the safetensors header is inconsistent (1 problem):\n"
        f"  tensor '{last}': bytes {start}..{end} run past the end of the file (it has {have} bytes of data: "
        f"truncated?)")


@pytest.mark.parametrize("content, reason", [
    (b"", "file too short: 0 bytes, a safetensors file starts with an 8-byte header length"),
    (b"\x01\x02", "file too short: 2 bytes, a safetensors file starts with an 8-byte header length"),
    (struct.pack("<Q", 1000) + b"{}", "the header length 1000 is larger than the file (10 bytes)"),
    (struct.pack("<Q", 2**64 - 1) + b"{}", "the header length 18446744073709551615 is larger than the file (10 bytes)"),
    (struct.pack("<Q", 5) + b"{nope", "the header is not JSON: Expecting property name enclosed in double quotes: "
                                      "line 1 column 2 (char 1)"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "the header is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: "
                                         "invalid start byte"),
    (struct.pack("<Q", 2) + b"[]", "the header is JSON list, not an object"),
])
def test_not_a_safetensors_file(tmp_path, content, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    assert error(load_safetensors, path) == f"{path}: not a safetensors file ({reason})"


def test_a_header_that_lies_names_every_bad_tensor(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "a": entry("F32", [2, 2], 0, 16),              # fine
        "b": entry("F32", [2, 2], 8, 24),              # overlaps a
        "c": entry("F32", [4], 24, 40),                # fine
        "far": entry("F32", [4], 1000, 1016),          # past the end
        "short": entry("F32", [3, 3], 40, 44),         # 4 bytes for 36
        "dt": entry("Q7", [1], 40, 44),                # unknown dtype
        "neg": entry("F32", [-1, 4], 40, 44),          # negative dimension
        "back": entry("F32", [1], 44, 40),             # end before start
        "odd": [1, 2],                                 # not an object
    }
    path = raw_file(tmp_path / "lies.safetensors", header, bytes(48))
    assert error(load_safetensors, path) == (
        f"{path}: the safetensors header is inconsistent (7 problems):\n"
        "  tensor 'far': bytes 1000..1016 run past the end of the file (it has 48 bytes of data: truncated?)\n"
        "  tensor 'short': holds 4 bytes, but shape [3, 3] of F32 needs 36\n"
        "  tensor 'dt': unsupported dtype 'Q7' (known: F64, F32, F16, I64, I32, I16, I8, U8, BOOL, BF16)\n"
        "  tensor 'neg': shape [-1, 4] is not a list of non-negative integers\n"
        "  tensor 'back': data_offsets [44, 40] is not [start, end] with 0 <= start <= end\n"
        "  tensor 'odd': the entry is list, not an object\n"
        "  tensors 'a' and 'b' overlap (bytes 0..16 and 8..24)")


def test_wrong_dtype_shape_extra_and_missing_in_one_message(tmp_path):
    good = init_params(graph(), 0)
    path = tmp_path / "w.safetensors"
    save_safetensors({"emb": good["emb"].astype(np.float64), "out": good["out"][:4], "extra": np.zeros(2, np.int32)},
                     path)
    g2 = parse(SPEC.replace("param out[d, v]", "param out[d, v]\nparam gain[d]")
                   .replace("h[b, t, d] * out[d, v]", "h[b, t, d] * gain[d] * out[d, v]"), "w.ein")
    assert error(load_weights, g2, str(path)) == (
        f"weights file {path} do not match the spec (4 problems):\n"
        "  missing tensor 'gain': expected shape (8,) f32\n"
        "  unexpected tensor 'extra' (shape (2,) i32): the spec has no such parameter\n"
        "  tensor 'emb' has dtype f64, expected f32 (shape (16, 8))\n"
        "  tensor 'out' has shape (4, 16), expected shape (8, 16)")


def test_nan_and_inf_are_refused_when_asked(tmp_path):
    params = init_params(graph(), 0)
    params["emb"][3, 5] = np.nan
    params["emb"][7, 0] = np.inf
    params["out"][0, 1] = -np.inf
    path = tmp_path / "nan.safetensors"
    save_safetensors(params, path)
    assert sorted(load_weights(graph(), str(path))) == ["emb", "out"]     # off by default: loads
    assert error(load_weights, graph(), str(path), check_finite_values=True) == (
        f"weights file {path} hold non-finite values (2 tensors):\n"
        "  tensor 'emb' has 2 non-finite values (1 NaN, 1 Inf), the first at index [3, 5]\n"
        "  tensor 'out' has 1 non-finite value (0 NaN, 1 Inf), the first at index [0, 1]")
    # bf16 and scalars too; integer tensors are never checked
    import ml_dtypes
    assert error(check_finite, {"s": np.float32(np.nan), "h": np.array([1, np.inf], ml_dtypes.bfloat16),
                                "i": np.array([1, 2], np.int32)}) == (
        "weights hold non-finite values (2 tensors):\n"
        "  tensor 'h' has 1 non-finite value (0 NaN, 1 Inf), the first at index [1]\n"
        "  tensor 's' has 1 non-finite value (1 NaN, 0 Inf), the first at index []")


def test_nothing_is_placed_on_devices_when_the_file_fails(tmp_path, monkeypatch):
    """Executable validates every tensor (and with check_finite scans them) before placing any."""
    from einpart.codegen import simple_plan
    from einpart.runtime import Executable
    placed = []
    monkeypatch.setattr(Executable, "_place_params", lambda self, module, arrays: placed.append(1))
    params = init_params(graph(), 0)
    params["out"][0, 0] = np.nan
    path = tmp_path / "nan.safetensors"
    save_safetensors(params, path)
    msg = error(Executable, simple_plan(graph(), {"x": 2}), weights=str(path), compile=False, check_finite=True)
    assert msg.startswith(f"weights file {path} hold non-finite values (1 tensor):")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good_file(tmp_path).read_bytes()[:-1])
    assert "run past the end of the file" in error(Executable, simple_plan(graph(), {"x": 2}), weights=str(cut),
                                                   compile=False)
    assert placed == []


def test_cli_run_check_weights(tmp_path, capsys):
    from einpart.cli_run import main as cli_main
    params = init_params(graph(), 0)
    params["emb"][0, 0] = np.nan
    path = tmp_path / "nan.safetensors"
    save_safetensors(params, path)
    spec = tmp_path / "w.ein"
    spec.write_text(SPEC)
    args = ["run", str(spec), "--mesh", "2", "--plan", "simple", "--prompt-len", "2", "--max-new", "1",
            "--weights", str(path), "--check-weights"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert f"weights file {path} hold non-finite values (1 tensor):" in err and "Traceback" not in err
