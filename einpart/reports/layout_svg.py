"""Drawings of how a tensor is laid out over the device mesh: which device
holds which block.

Left, the tensor: its first index down, the others across (a 1-D tensor is
one row), cut into the blocks its layout makes (`f@(y, z)` cuts f into
|y| x |z| parts), each block a colour and a number. Right, the mesh: its
first axis down, the others across, every device coloured and numbered by
the block it holds, so a replicated axis shows as repeated colours. Block
positions follow layout.py: an index split over several mesh axes is cut
major to minor, as a PartitionSpec entry is.
"""
from __future__ import annotations

import math

from ..ir import graph as g
from ..ir.layout import type_layout
from . import svg as S

MAX_LABELLED = 256   # more blocks or devices than this: colours only


def _mixed_radix(coords: dict, axes: tuple, mesh: dict) -> int:
    n = 0
    for a in axes:
        n = n * mesh[a] + coords[a]
    return n


def device_coords(mesh: dict) -> list[dict]:
    """Every device's coordinate on each mesh axis, in device order (last axis fastest)."""
    out = [{}]
    for a, size in mesh.items():
        out = [dict(c, **{a: k}) for c in out for k in range(size)]
    return out


def block_of(coords: dict, layout: dict, rows: tuple, cols: tuple, mesh: dict) -> tuple[int, int]:
    """(row, column) of the block of a tensor a device at coords holds."""
    def pos(indices):
        n = 0
        for i in indices:
            ax = layout.get(i, ())
            n = n * math.prod(mesh[a] for a in ax) + _mixed_radix(coords, ax, mesh)
        return n
    return pos(rows), pos(cols)


def layout_text(typ: g.TensorType) -> str:
    parts = []
    for a in typ.axes:
        m = a.mesh
        parts.append(a.index + ("" if not m else f"@{m[0]}" if len(m) == 1 else f"@({', '.join(m)})"))
    return "[" + ", ".join(parts) + "]"


def tensor_svg(decl: g.Decl, mesh: dict, stacked: str | None = None) -> str:
    """The drawing of one declared tensor (inline SVG, no XML header)."""
    layout = {i: tuple(a) for i, a in type_layout(decl.type).items()}
    idx = decl.type.indices
    rows, cols = (idx[:1], idx[1:]) if len(idx) > 1 else ((), idx)
    nparts = {i: math.prod(mesh[a] for a in layout.get(i, ())) for i in idx}
    nr, nc = math.prod(nparts[i] for i in rows), math.prod(nparts[i] for i in cols)
    devs = device_coords(mesh)
    axes = list(mesh)
    drow = mesh[axes[0]] if len(axes) > 1 else 1
    dcol = len(devs) // drow
    tw, th = 200.0, (120.0 if rows else 40.0)
    bw, bh = tw / nc, th / nr
    cell = max(14.0, min(30.0, 420.0 / max(dcol, 1)))
    gx, top = tw + 60, 34
    name = decl.name + layout_text(decl.type) + f" : {decl.type.dtype}"
    if stacked:
        name += f"  (per layer: stacked over {stacked}, not split)"
    across = " x ".join(f"{a}={mesh[a]}" for a in axes[1:]) if len(axes) > 1 else f"{axes[0]}={mesh[axes[0]]}"
    down = f", {axes[0]}={mesh[axes[0]]} down" if len(axes) > 1 else ""
    where = f"devices: {across} across{down}"
    copies = len(devs) // (nr * nc)
    if nr * nc == 1:
        share = f"replicated: each of the {len(devs)} devices holds all of it"
    else:
        share = f"{nr * nc} blocks; each device holds 1/{nr * nc}" + (f", {copies} copies of each" if copies > 1 else "")
    # text widths estimated at 0.6 em per character (Helvetica averages ~0.55)
    width = max(gx + dcol * cell, len(name) * 13 * 0.6, gx + max(len(where), len(share)) * 11 * 0.6) + 12
    height = top + max(th, drow * cell) + 40
    svg = S.Svg(width, height)
    svg.text(0, 16, name, size=13, weight="bold")
    holders: dict[tuple, list[int]] = {}
    for d, c in enumerate(devs):
        holders.setdefault(block_of(c, layout, rows, cols, mesh), []).append(d)
    label = nr * nc <= MAX_LABELLED
    for r in range(nr):
        for c in range(nc):
            b = r * nc + c
            owners = holders.get((r, c), [])
            svg.rect(bw * c, top + bh * r, bw, bh, fill=S.colour(b), stroke="#fff", width=1,
                     tip=f"block {b}: held by {len(owners)} device(s): {', '.join(map(str, owners))}")
            if label and bw >= 14 and bh >= 12:
                svg.text(bw * c + bw / 2, top + bh * r + bh / 2 + 4, b, size=min(11, bh * 0.6), anchor="middle",
                         fill="#fff")
    svg.rect(0, top, tw, th, stroke="#333")
    svg.text(tw / 2, top + th + 16, " x ".join(cols) + " across" + (f", {rows[0]} down" if rows else ""),
             size=11, anchor="middle", fill="#555")
    svg.text(gx - 14, top + th / 2 + 5, "->", size=14, anchor="end", fill="#555")
    label = len(devs) <= MAX_LABELLED
    for d, c in enumerate(devs):
        r, k = divmod(d, dcol)
        b = (lambda rc: rc[0] * nc + rc[1])(block_of(c, layout, rows, cols, mesh))
        coord = ", ".join(f"{a}={c[a]}" for a in axes)
        svg.rect(gx + k * cell, top + r * cell, cell, cell, fill=S.colour(b), stroke="#fff", width=1,
                 tip=f"device {d} ({coord}) holds block {b}")
        if label:
            svg.text(gx + k * cell + cell / 2, top + r * cell + cell / 2 + 4, b, size=min(11, cell * 0.45),
                     anchor="middle", fill="#fff")
    svg.text(gx, top + max(th, drow * cell) + 16, where, size=11, fill="#555")
    svg.text(gx, top + max(th, drow * cell) + 30, share, size=11, fill="#555")
    return svg.text_doc(standalone=False)
