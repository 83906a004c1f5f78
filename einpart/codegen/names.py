"""The one namespace that hands out every identifier of a generated module.

Spec names (tensors, mesh axes) never reach generated source unchecked:
each is validated against `[A-Za-z_][A-Za-z0-9_]*` and mangled (tensors get
a `t_` prefix), and every identifier handed out is checked against Python's
keywords, its builtins, the module's own imports and helpers, and every name
handed out before (a clash gets a numeric suffix). So a spec whose tensors
are called `__import__`, `print` or `jax` produces code in which none of
them is a bare identifier. Mesh axis names only ever appear as string
literals, written with repr() of a validated name.
"""
from __future__ import annotations

import builtins
import keyword
import re

from ..errors import EinpartError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# Names the generated module defines or imports itself.
MODULE_NAMES = frozenset({
    "jax", "jnp", "lax", "np", "P", "F32", "BF16", "F16", "HIGHEST", "NEG_INF", "MESH",
    "PARAM_SPECS", "STATE_SPECS", "INPUT_SPECS", "OUTPUT_SPECS", "PROGRAMS", "PREPARED_SPECS",
    "STEP_PARAM_SPECS", "INPUT_SHAPES", "prefill", "decode", "prepare", "programs", "params", "state",
    "inputs", "pos", "carry", "functools", "pmax", "pmax_jvp",
})


def check_identifier(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _IDENT.match(name):
        raise EinpartError(f"{what} {name!r} is not a valid identifier ([A-Za-z_][A-Za-z0-9_]*); "
                           f"it cannot appear in generated code")
    return name


def literal(name: str, what: str = "name") -> str:
    """A validated name as a Python string literal."""
    return repr(check_identifier(name, what))


def number(v) -> str:
    """A float constant as source text: repr(float(v)), finite only."""
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")):
        raise EinpartError(f"cannot emit non-finite constant {f!r}")
    return repr(f)


def docstring_text(text: str) -> str:
    """Free text (a spec's file name) made safe inside a triple-quoted docstring or a comment:
    printable ASCII on one line, with no quote or backslash that could end the string.
    (A file named `x\"\"\"+__import__('os').system(...)+\"\"\".ein` must stay text.)"""
    out = "".join(c if " " <= c <= "~" and c not in "\"\\" else "?" for c in " ".join(str(text).split()))
    return out


class Namespace:
    """Hands out identifiers; never the same twice, never a reserved one."""

    def __init__(self, extra_reserved=()):
        self.reserved = (set(keyword.kwlist) | set(getattr(keyword, "softkwlist", ())) | set(dir(builtins))
                         | set(MODULE_NAMES) | set(extra_reserved))
        self.used: set[str] = set()
        self.tensors: dict[tuple[str, str], str] = {}

    def _take(self, base: str) -> str:
        check_identifier(base, "identifier")
        name, n = base, 1
        while name in self.reserved or name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name

    def tensor(self, name: str, role: str = "") -> str:
        """The variable of a spec tensor (role distinguishes e.g. a stacked weight from its slice)."""
        key = (name, role)
        if key not in self.tensors:
            check_identifier(name, "tensor name")
            base = f"t_{name}" + (f"_{role}" if role else "")
            self.tensors[key] = self._take(base)
        return self.tensors[key]

    def fresh(self, hint: str) -> str:
        """A new internal identifier starting with `hint`."""
        check_identifier(hint, "identifier")
        name, n = hint, 0
        while hint.endswith("_") and n == 0 or name in self.reserved or name in self.used:
            n += 1
            name = f"{hint}{n}"
        self.used.add(name)
        return name
