"""Subcommands that bring models in from elsewhere: `import-hf`.

`einpart import-hf DIR --out OUT` converts a Hugging Face-style checkpoint
folder (config.json + *.safetensors) into OUT/model.ein, OUT/weights.safetensors
and OUT/mapping.json (see einpart/frontend/hf.py). Kept apart from cli_ir.py so
that each area registers its own commands (cli.py's COMMAND_MODULES).
"""
from __future__ import annotations


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def cmd_import_hf(args) -> int:
    from .frontend.hf import import_hf
    r = import_hf(args.dir, args.out, dtype=args.dtype)
    sizes = " ".join(f"{k}={v}" for k, v in r.sizes.items() if k not in ("B", "T", "S"))
    print(f"{r.spec_path}: {r.family} ({sizes}); run sizes B, T, S set with --set")
    print(f"{r.weights_path}: {r.tensors} tensors, {_human(r.nbytes)} ({args.dtype})")
    print(f"{r.mapping_path}: where each tensor came from")
    for note in r.notes:
        print(f"note: {note}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="convert a Hugging Face checkpoint folder (config.json + *.safetensors) "
                                         "into a spec and einpart-named weights")
    p.add_argument("dir", metavar="DIR", help="folder with config.json and *.safetensors "
                                              "(llama, mistral, qwen2 or gpt2)")
    p.add_argument("--out", metavar="OUT", required=True, help="folder to write model.ein, weights.safetensors and mapping.json")
    p.add_argument("--dtype", default="f32", choices=("f32", "bf16", "f16"),
                   help="storage dtype of the written weights (default f32)")
    p.set_defaults(func=cmd_import_hf)
