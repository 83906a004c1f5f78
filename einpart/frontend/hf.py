"""Hugging Face-style checkpoints on disk -> an einpart spec and einpart-named weights.

`import_hf(DIR, OUT)` reads DIR/config.json and DIR/*.safetensors (sharded or
not) of the Llama (grouped-query included), Mistral, Qwen2 and GPT-2 families
and writes:

- OUT/model.ein: a spec in the style and naming of examples/llama.ein or
  examples/gpt2.ein, sizes, rope theta and norm epsilon taken from the config;
  B, T, S are run sizes (defaults 1, 8, 64) that `--set` overrides at use;
- OUT/weights.safetensors: one tensor per einpart param, layers stacked
  [L, ...], HF Linear weights ([out, in]) transposed and reshaped to the
  spec's axes (wq[d, g, r, k]); GPT-2's Conv1D weights are already [in, out]
  and its fused c_attn is split into q, k, v;
- OUT/mapping.json: for each einpart tensor, the HF tensors and the transform
  that made it, and the HF tensors left unused.

The families (spec text and weight plan) live in hf_families.py; this module
reads the checkpoint, checks every tensor against the plan before a byte is
written, and writes the three files. Nothing here imports torch or
transformers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EinpartError
from ..ir.parser import parse
from ..ir.shapes import decl_shapes
from . import stfile
from .hf_families import PLANS, DTYPES, RUN_SIZES, SUPPORTED, Plan, Source, Target, Config

__all__ = ["import_hf", "load_weights", "plan", "check", "checkpoint_tensors", "SUPPORTED", "RUN_SIZES"]


@dataclass
class ImportResult:
    family: str
    sizes: dict[str, int]
    spec_path: Path
    weights_path: Path
    mapping_path: Path
    tensors: int
    nbytes: int
    notes: list[str]


def plan(src: str | Path, dtype: str = "f32") -> Plan:
    """Read DIR/config.json: the spec and the weight plan for its family."""
    cfg = Config(Path(src) / "config.json")
    family = cfg.get("model_type")
    if family not in PLANS:
        raise cfg.fail(f"unsupported model_type {family!r} (supported: {', '.join(SUPPORTED)})")
    if dtype not in DTYPES:
        raise EinpartError(f"unsupported --dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return PLANS[family](cfg, "" if dtype == "f32" else f" : {dtype}")


def checkpoint_tensors(src: str | Path) -> dict[str, stfile.TensorInfo]:
    """Every tensor of the checkpoint: the files named by model.safetensors.index.json, else *.safetensors."""
    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EinpartError(f"{index}: cannot read the shard index ({e})") from None
        files = sorted({src / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise EinpartError(f"{index}: shard '{f.name}' does not exist")
    else:
        files = sorted(src.glob("*.safetensors"))
    if not files:
        raise EinpartError(f"{src}: no *.safetensors files (only safetensors checkpoints can be imported)")
    found: dict[str, stfile.TensorInfo] = {}
    for f in files:
        for name, info in stfile.read_header(f).items():
            if name in found:
                raise EinpartError(f"{f}: tensor '{name}' is also in {found[name].path.name}")
            found[name] = info
    return found


def _resolve(name: str, found: dict) -> str | None:
    """The checkpoint's name for a source: as written, or without the `model.` / `transformer.` prefix
    (checkpoints of the bare LlamaModel / GPT2Model, and the original GPT-2 files, omit it)."""
    if name in found:
        return name
    for prefix in ("model.", "transformer."):
        if name.startswith(prefix) and name[len(prefix):] in found:
            return name[len(prefix):]
    return None


def check(p: Plan, found: dict, src: Path) -> dict[str, str]:
    """Every source exists with the shape the config implies. Returns source -> checkpoint name."""
    names: dict[str, str] = {}
    L = p.sizes["L"]
    for t in p.targets:
        for s in t.sources:
            for layer in (range(L) if t.stacked else [None]):
                want = s.name if layer is None else s.name.format(l=layer)
                if want in names:
                    continue
                got = _resolve(want, found)
                if got is None:
                    raise EinpartError(f"{src}: tensor '{want}' is missing (expected shape {list(s.shape)}: "
                                       f"{s.why} from config.json)")
                info = found[got]
                if info.shape != s.shape:
                    raise EinpartError(f"{info.path}: tensor '{got}' has shape {list(info.shape)}, expected "
                                       f"{list(s.shape)} ({s.why} from config.json)")
                if not info.dtype.startswith(("F", "BF")):
                    raise EinpartError(f"{info.path}: tensor '{got}' has dtype {info.dtype}, expected a float")
                names[want] = got
    return names


def _chunks(t: Target, names: dict, found: dict, L: int):
    """The target's data, one layer at a time (float32 transforms, cast by the writer)."""
    for layer in (range(L) if t.stacked else [None]):
        arrays = [np.asarray(found[names[s.name if layer is None else s.name.format(l=layer)]].load(), np.float32)
                  for s in t.sources]
        out = t.fn(*arrays)
        if out.shape != t.shape:  # pragma: no cover - a wrong transform in the plan
            raise AssertionError(f"{t.name}: transform gave {out.shape}, expected {t.shape}")
        yield out


def import_hf(src: str | Path, out: str | Path, dtype: str = "f32") -> ImportResult:
    """Convert the checkpoint in `src`; write model.ein, weights.safetensors and mapping.json to `out`."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EinpartError(f"{src}: not a directory")
    if out.resolve() == src.resolve():  # weights.safetensors would then be read as part of the checkpoint
        raise EinpartError(f"{out}: --out must differ from the checkpoint folder")
    p = plan(src, dtype)
    graph = parse(p.spec, "model.ein")  # the spec verifies before anything is written
    L = p.sizes["L"]
    shapes = decl_shapes(graph)
    for t in p.targets:
        want = ((L,) if t.stacked else ()) + t.shape
        if t.name not in shapes or shapes[t.name].shape != want:  # pragma: no cover - plan and spec disagree
            raise AssertionError(f"plan for {t.name} {want} does not match the spec")
    found = checkpoint_tensors(src)
    names = check(p, found, src)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights.safetensors"
    rows = [(t.name, dtype, ((L,) if t.stacked else ()) + t.shape, _chunks(t, names, found, L)) for t in p.targets]
    nbytes = stfile.write_file(weights, rows, {"format": "np", "source": "einpart import-hf", "family": p.family})
    (out / "model.ein").write_text(p.spec, encoding="utf-8")

    def hf_name(s: Source) -> str:  # the checkpoint's own spelling, '{l}' for the layer
        got = names[s.name.format(l=0)] if "{l}" in s.name else names[s.name]
        return got.replace(".0.", ".{l}.", 1) if "{l}" in s.name else got

    used = set(names.values())
    tensors = {}
    for t in p.targets:
        row = {"shape": list(((L,) if t.stacked else ()) + t.shape), "dtype": dtype,
               "from": [hf_name(s) for s in t.sources], "transform": t.transform}
        if t.stacked:
            row["stacked"] = f"over l = 0..{L - 1} ({{l}} in from)"
        tensors[t.name] = row
    mapping = {"family": p.family, "source": str(src.resolve()), "sizes": p.sizes, "notes": p.notes,
               "tensors": tensors, "unused": sorted(set(found) - used)}
    mapping_path = out / "mapping.json"
    mapping_path.write_text(_dump(mapping), encoding="utf-8")
    return ImportResult(p.family, p.sizes, out / "model.ein", weights, mapping_path, len(rows), nbytes, p.notes)


def _dump(mapping: dict) -> str:
    """JSON a person can read: one line per tensor."""
    lines = ["{"]
    for i, (key, value) in enumerate(mapping.items()):
        end = "," if i < len(mapping) - 1 else ""
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            lines.append(f"  {json.dumps(key)}: {{")
            rows = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
            lines.append(",\n".join(rows))
            lines.append("  }" + end)
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{end}")
    return "\n".join(lines) + "\n}\n"


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    """weights.safetensors -> {param name: array}, as Reference(graph, params) and the runtime take them."""
    return stfile.load_file(path)
