"""Passes and the pipeline that runs them.

A pass is a frozen dataclass with a registered name, options as fields and
`apply(graph) -> graph`. It never prints, times or verifies itself: the
pipeline verifies the IR after every pass, times each one and writes a
dump after each when asked ("NN-<name>.ein", valid spec text). A failing
pass is reported with its name and the passes that ran before it.
"""
from __future__ import annotations

import abc
import dataclasses
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import EinpartError, PassError, SpecError
from ..ir import graph as g
from ..ir.parser import parse
from ..ir.printer import format_graph
from ..ir.verify import verify

PASSES: dict[str, type] = {}


class Pass(abc.ABC):
    """Base of every pass. Subclasses are frozen dataclasses; options are fields."""
    name: ClassVar[str] = ""

    @abc.abstractmethod
    def apply(self, graph: g.Graph) -> g.Graph:
        """Return the rewritten or annotated graph; never print, never mutate."""

    def describe(self) -> str:
        opts = [f"{f.name}={_show(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def _show(v) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_show(x) for x in v) + ")"
    return str(v)


def register_pass(name: str):
    """Class decorator: make a pass available by name in pipelines (also for user code)."""
    def wrap(cls):
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(frozen=True)(cls)
        cls.name = name
        PASSES[name] = cls
        return cls
    return wrap


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on sep outside (), {} and quotes."""
    out, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise EinpartError(f"pipeline '{text}': unbalanced brackets or quotes")
    out.append("".join(cur))
    return [p.strip() for p in out]


def _convert(cls, fname: str, ftype, raw: str):
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    elif raw.startswith("(") and raw.endswith(")"):
        raw = raw[1:-1]
    origin = typing.get_origin(ftype)
    args = typing.get_args(ftype)
    if origin is typing.Union and type(None) in args:
        if raw in ("", "none"):
            return None
        ftype = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(ftype), typing.get_args(ftype)
    try:
        if ftype is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if ftype in (int, float, str):
            return ftype(raw)
        if origin is tuple:
            item = args[0] if args else str
            return tuple(item(x.strip()) for x in _split_top(raw) if x.strip())
    except ValueError:
        raise EinpartError(f"pass '{cls.name}': option {fname}={raw!r} is not a valid {getattr(ftype, '__name__', ftype)}") from None
    return raw


def make_pass(name: str, options: dict[str, str] | None = None) -> Pass:
    if name not in PASSES:
        raise EinpartError(f"unknown pass '{name}' (known: {', '.join(sorted(PASSES))})")
    cls = PASSES[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in (options or {}).items():
        fname = key.replace("-", "_")
        if fname not in fields:
            known = ", ".join(f.replace("_", "-") for f in fields) or "none"
            raise EinpartError(f"pass '{name}' has no option '{key}' (options: {known})")
        kwargs[fname] = _convert(cls, key, hints[fname], raw) if isinstance(raw, str) else raw
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise EinpartError(f"pass '{name}': {e}") from None


def parse_pipeline(text: str) -> list[Pass]:
    """'defer-norm,int8,shard{mesh=2x4}' -> pass objects."""
    passes = []
    for item in _split_top(text):
        if not item:
            continue
        name, opts = item, {}
        if "{" in item:
            if not item.endswith("}"):
                raise EinpartError(f"pipeline item '{item}': options go in braces at the end: name{{k=v,...}}")
            name, body = item[:-1].split("{", 1)
            for kv in _split_top(body):
                if not kv:
                    continue
                if "=" not in kv:
                    raise EinpartError(f"pipeline item '{item}': option '{kv}' needs a value (k=v)")
                k, v = kv.split("=", 1)
                opts[k.strip()] = v
        passes.append(make_pass(name.strip(), opts))
    return passes


@dataclass
class PassRecord:
    name: str
    seconds: float
    dump: Path | None = None


@dataclass
class PipelineResult:
    graph: g.Graph
    records: list[PassRecord] = field(default_factory=list)


def run_pipeline(graph: g.Graph, passes: list[Pass] | str, dump_dir: str | Path | None = None) -> PipelineResult:
    """Run passes in order; verify after each; dump each when dump_dir is set."""
    if isinstance(passes, str):
        passes = parse_pipeline(passes)
    dump = Path(dump_dir) if dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
    result = PipelineResult(graph)
    if dump is not None:
        path = dump / "00-input.ein"
        path.write_text(format_graph(graph))
        result.records.append(PassRecord("input", 0.0, path))
    ran: list[str] = []
    for n, p in enumerate(passes, start=1):
        before = ", ".join(ran) or "nothing"
        start = time.perf_counter()
        try:
            out = p.apply(result.graph)
            if not isinstance(out, g.Graph):
                raise PassError(f"pass '{p.name}' returned {type(out).__name__}, not a Graph "
                                f"(passes run before it: {before})")
            text = format_graph(out)
            # Re-read the dump: every pass's output must be valid spec text, and an
            # error then points into the dump, where the user can see it.
            reread = parse(text, file=f"{n:02d}-{p.name}.ein")
            if reread != verify(out):
                raise PassError(f"pass '{p.name}': its output does not survive printing and parsing "
                                f"(a printer bug; passes run before it: {before})")
            out = reread
        except PassError:
            raise
        except SpecError as e:
            raise PassError(f"pass '{p.name}' produced IR that does not verify (passes run before it: {before}):\n"
                            f"{e.render()}") from None
        except EinpartError as e:
            raise PassError(f"pass '{p.name}' failed (passes run before it: {before}): {e}") from None
        seconds = time.perf_counter() - start
        path = None
        if dump is not None:
            path = dump / f"{n:02d}-{p.name}.ein"
            path.write_text(text)
        result.records.append(PassRecord(p.describe(), seconds, path))
        result.graph = out
        ran.append(p.name)
    return result
