"""Mesh-axis symmetry of a strategy graph, and breaking it for the exact solver.

Why: on hardware whose mesh axes are alike (tpu-v4 4x4x4: same size, bandwidth
and latency on x, y and z) renaming the axes maps every plan to a plan of the
same cost and memory. The exact solver then proves the same thing up to six
times over. Keeping, for one node, only one strategy of each orbit under the
renamings loses nothing: any optimal plan renamed so that this node takes its
orbit's representative is optimal too, and allowed.

A renaming counts as a symmetry only after it is checked on the numbers: it
must map every node's strategies onto strategies of equal cost and usage and
every edge's matrix onto itself (to a relative 1e-9). Anything that breaks
it (axes of other sizes or links, a pinned layout, a strategy with no
renamed counterpart) simply leaves that renaming out, so the result stays
exact on any hardware.
"""
from __future__ import annotations

from itertools import permutations

import numpy as np

from .cost import FORBIDDEN

_REL = 1e-9


def _rename(key, perm: dict):
    return tuple(tuple(perm.get(a, a) for a in axes) for axes in key)


def _keys(n) -> list:
    """What each choice of node n means, as renameable data."""
    if n.kind != "stmt":
        return [("layout", n.layouts[c]) for c in range(len(n.cost))]
    out = []
    for c in range(len(n.cost)):
        st, var = n.choice(c)
        split = tuple(sorted(st.split.items()))
        out.append(("split", split, var.out if var is not None else None))
    return out


def _renamed(key, perm: dict):
    if key[0] == "layout":
        return ("layout", _rename(key[1], perm))
    split = tuple(sorted((i, tuple(perm.get(a, a) for a in axes)) for i, axes in key[1]))
    return ("split", split, None if key[2] is None else _rename(key[2], perm))


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    big_a, big_b = a >= FORBIDDEN, b >= FORBIDDEN
    if not np.array_equal(big_a, big_b):
        return False
    a, b = a[~big_a], b[~big_b]
    return bool(np.all(np.abs(a - b) <= _REL * np.maximum(np.abs(a), np.abs(b)) + 1e-300))


def symmetries(built, mesh) -> list[list[np.ndarray]]:
    """The axis renamings that are symmetries of built.sg: for each, one array per
    node mapping a strategy to its renamed strategy (identity left out)."""
    names = [a for a, _ in mesh]
    size = dict(mesh)
    keys = [_keys(n) for n in built.nodes]
    index = [{k: c for c, k in enumerate(ks)} for ks in keys]
    if any(len(ix) != len(ks) for ix, ks in zip(index, keys)):
        return []      # two choices of one node mean the same thing: nothing to rename by
    sg = built.sg
    found = []
    for order in permutations(names):
        perm = dict(zip(names, order))
        if all(a == b for a, b in perm.items()) or any(size[a] != size[b] for a, b in perm.items()):
            continue
        maps = []
        for i, ks in enumerate(keys):
            m = [index[i].get(_renamed(k, perm), -1) for k in ks]
            if -1 in m:
                break
            m = np.array(m)
            if not (_close(sg.node_costs[i][m], sg.node_costs[i]) and
                    _close(np.asarray(sg.node_usages[i], float)[m], np.asarray(sg.node_usages[i], float))):
                break
            maps.append(m)
        else:
            if all(_close(mat[np.ix_(maps[u], maps[v])], mat) for (u, v), mat in zip(sg.edges, sg.edge_costs)):
                found.append(maps)
    return found


def is_group(found: list) -> bool:
    """Whether the renamings found, with the identity, are closed under composition
    (they are when the checks are exact: symmetries compose), so that the least
    index over them is the least of a full orbit."""
    keys = {tuple(m.tobytes() for m in f) for f in found}
    keys.add(tuple(np.arange(len(m)).tobytes() for m in found[0]))
    return all(tuple(a[i][b[i]].tobytes() for i in range(len(a))) in keys for a in found for b in found)


def break_symmetry(built, mesh) -> dict:
    """Forbid, on one node, every strategy but the first of its orbit under the
    axis renamings that are symmetries (exact; see the module docstring).
    The node is the one whose orbits remove the most strategies. Returns stats."""
    found = symmetries(built, mesh)
    if not found:
        return {"symmetries": 0, "forbidden": 0}
    if not is_group(found):
        return {"symmetries": len(found), "forbidden": 0}
    group = found
    sg = built.sg
    best, best_drop = None, 0
    for i in range(len(sg.node_costs)):
        ok = sg.node_costs[i] < FORBIDDEN
        canon = np.arange(len(ok))
        for gmaps in group:
            canon = np.minimum(canon, gmaps[i])
        drop = int((ok & (canon != np.arange(len(ok)))).sum())
        if drop > best_drop:
            best, best_drop = (i, canon), drop
    if best is None:
        return {"symmetries": len(group), "forbidden": 0}
    i, canon = best
    c = np.array(sg.node_costs[i], dtype=float)
    c[canon != np.arange(len(c))] = FORBIDDEN
    sg.node_costs[i] = c
    built.nodes[i].cost = c
    return {"symmetries": len(group), "forbidden": best_drop, "node": sg.node_name(i)}
