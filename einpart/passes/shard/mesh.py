"""Device meshes as data: named axes with sizes, in order (major to minor).

A mesh is written `x=4,y=4,z=4` (named axes) or `2x4` (sizes only; the
axes are then named x, y, z, w, then a4, a5, ...). The order matters: it is
the order of `jax.make_mesh`'s axes, and the last axis varies fastest over
device ids, so on a GPU cluster the minor axes are the ones inside a node
(hardware.py relies on that). A malformed mesh is one EinpartError line
naming the problem, never a traceback.
"""
from __future__ import annotations

import re

from ...errors import EinpartError

Mesh = tuple  # tuple[tuple[str, int], ...]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_DEFAULT_NAMES = ("x", "y", "z", "w")


def _default_name(i: int) -> str:
    return _DEFAULT_NAMES[i] if i < len(_DEFAULT_NAMES) else f"a{i}"


def parse_mesh(text) -> Mesh:
    """'x=4,y=4,z=4' | '2x4' | '8' | an already parsed mesh -> ((name, size), ...)."""
    if isinstance(text, (tuple, list)):
        items = tuple((str(n), int(s)) for n, s in text)
        return _check(items, str(text))
    raw = str(text).strip()
    body = raw[1:-1].strip() if raw.startswith("(") and raw.endswith(")") else raw
    if not body:
        raise EinpartError("mesh: empty (expected e.g. x=4,y=4,z=4 or 2x4)")
    if "=" in body:
        items = []
        for part in body.split(","):
            part = part.strip()
            name, eq, size = part.partition("=")
            name, size = name.strip(), size.strip()
            if not eq or not name or not size:
                raise EinpartError(f"mesh '{raw}': '{part}' is not NAME=SIZE")
            if not _NAME.match(name):
                raise EinpartError(f"mesh '{raw}': axis name '{name}' is not an identifier")
            if not size.isdigit():
                raise EinpartError(f"mesh '{raw}': size of axis {name} must be a positive integer, got '{size}'")
            items.append((name, int(size)))
    else:
        parts = [p.strip() for p in body.lower().split("x")]
        if any(not p.isdigit() for p in parts):
            raise EinpartError(f"mesh '{raw}': expected sizes like 2x4 or named axes like x=2,y=4")
        items = [(_default_name(i), int(p)) for i, p in enumerate(parts)]
    return _check(tuple(items), raw)


def _check(items: Mesh, raw: str) -> Mesh:
    seen = set()
    for name, size in items:
        if name in seen:
            raise EinpartError(f"mesh '{raw}': axis {name} is named twice")
        if size < 1:
            raise EinpartError(f"mesh '{raw}': axis {name} has size {size}; sizes must be at least 1")
        seen.add(name)
    return items


def mesh_devices(mesh: Mesh) -> int:
    n = 1
    for _, s in mesh:
        n *= s
    return n


def format_mesh(mesh: Mesh) -> str:
    return ",".join(f"{n}={s}" for n, s in mesh)
