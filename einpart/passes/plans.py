"""Plans set by hand, drawn at random, or by a simple built-in rule.

A plan is written into the IR itself (the contract of einpart.ir.layout):
`graph.mesh`, a layout on every declared tensor's and statement's type, and
a `split` attribute on every statement. This module offers

- parse_mesh("2x4" | "x=2,y=4" | "8") -> {"x": 2, "y": 4}
- set_plan(graph, mesh, layouts={...}, splits={...}): set layouts by hand;
  a statement whose layout is not given gets its natural layout (the split,
  restricted to its indices: no result moves)
- random_plan(graph, mesh, seed): a random legal layout for every declared
  tensor, a random legal split for every statement, its type layout the
  natural one or a random reshard of it (sometimes a reduce-scatter);
  used by the correctness tests and the planner's tests
- simple_plan(graph, mesh): 1D tensor parallelism in the Megatron style,
  the plan `einpart compile/run/demo` use until the `shard` pass lands
- specialize(graph, sizes, drop=()): the same plan at other sizes (decode's
  T=1); splits of the indices in `drop` that no longer divide are removed
- the `plan{mesh=2x4,kind=simple|random|replicated,seed=0}` pass; kind=ws1d|ws2d|wg|dp
  gives the shard planner's forced layouts (einpart.passes.shard.forced, priced on
  `hardware`), the same as `shard{mesh=...,force=KIND}` with its other defaults
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from ..errors import EinpartError
from ..ir import graph as g
from ..ir.layout import (parts, plan_stmt, reduced_indices, split_attr, split_problem, stmt_refs,
                         stmt_split, type_layout, with_layout, ref_layout)
from ..ir.parser import override_sizes
from ..ir.verify import index_sizes, resolve_sizes, verify
from .manager import Pass, register_pass

DEFAULT_AXIS_NAMES = ("x", "y", "z", "w")


# ------------------------------------------------------------------ meshes
def parse_mesh(text: str) -> dict[str, int]:
    """'2x4' (axes x, y, ...), 'x=2,y=4', or '8' -> {'x': 2, 'y': 4}."""
    text = str(text).strip().strip("'\"").replace(" ", "")
    if not text:
        raise EinpartError("empty mesh (write e.g. 2x4 or x=2,y=4)")
    out: dict[str, int] = {}
    if "=" in text:
        for item in text.split(","):
            name, eq, num = item.partition("=")
            if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not num.isdigit():
                raise EinpartError(f"mesh '{text}': expected NAME=SIZE[,NAME=SIZE...], got '{item}'")
            if name in out:
                raise EinpartError(f"mesh '{text}': axis {name} is given twice")
            out[name] = int(num)
    else:
        nums = text.lower().split("x")
        if not all(n.isdigit() for n in nums):
            raise EinpartError(f"mesh '{text}': expected sizes like 2x4 or names like x=2,y=4")
        if len(nums) > len(DEFAULT_AXIS_NAMES):
            raise EinpartError(f"mesh '{text}': more than {len(DEFAULT_AXIS_NAMES)} axes need names (x=2,y=2,...)")
        out = {DEFAULT_AXIS_NAMES[k]: int(n) for k, n in enumerate(nums)}
    for name, n in out.items():
        if n <= 0:
            raise EinpartError(f"mesh '{text}': axis {name} must have a positive size")
    return out


def mesh_text(mesh: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def mesh_size(mesh: dict[str, int]) -> int:
    n = 1
    for v in mesh.values():
        n *= v
    return n


# ------------------------------------------------------------------ helpers
def stmt_indices(s: g.Statement) -> tuple[str, ...]:
    """Every index a (non-repeat) statement iterates over, in a fixed order."""
    seen: dict[str, None] = dict.fromkeys(s.type.indices)
    for r in stmt_refs(s):
        seen.update(dict.fromkeys(r.indices))
    if isinstance(s.op, g.Compute):
        seen.update(dict.fromkeys(g.expr_indices(s.op.expr)))
    return tuple(seen)


def _set_split(s: g.Statement, split: dict) -> g.Statement:
    attrs = dict(s.attrs)
    attrs.pop("split", None)
    value = split_attr(split)
    if value:
        attrs["split"] = value
    return replace(s, attrs=g.make_attrs(attrs))


def natural_layout(s: g.Statement, split: dict) -> dict:
    return {i: tuple(split.get(i, ())) for i in s.type.indices}


def _rebuild(graph: g.Graph, decl_layout, stmt_fn, mesh: dict[str, int]) -> g.Graph:
    """Apply decl_layout(decl) -> layout and stmt_fn(stmt, types) -> stmt over every block, in order."""
    types: dict[str, g.TensorType] = {}

    def walk(block: g.Block) -> g.Block:
        decls = []
        for d in block.decls:
            d = replace(d, type=with_layout(d.type.unsharded(), decl_layout(d)))
            types[d.name] = d.type
            decls.append(d)
        stmts = []
        for s in block.stmts:
            if isinstance(s.op, g.Repeat):
                s = stmt_fn(s, types)
                types[s.op.carry] = s.type
                s = replace(s, op=replace(s.op, body=walk(s.op.body)))
            else:
                s = stmt_fn(s, types)
            types[s.name] = s.type
            stmts.append(s)
        return replace(block, decls=tuple(decls), stmts=tuple(stmts))

    out = replace(graph, mesh=tuple(mesh.items()), body=walk(graph.body))
    return verify(out)


def _check_mesh(mesh: dict[str, int]) -> dict[str, int]:
    mesh = dict(mesh)
    for name, n in mesh.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)) or int(n) <= 0:
            raise EinpartError(f"bad mesh axis {name!r}={n!r}")
    return mesh


# ------------------------------------------------------------------ by hand
def set_plan(graph: g.Graph, mesh: dict[str, int], layouts: dict | None = None,
             splits: dict | None = None) -> g.Graph:
    """Set a plan by hand. layouts: tensor name -> {index: mesh axes} (a decl's or a
    statement's type; a repeat statement's layout is its carry's); splits: statement
    name -> {index: mesh axes}. Unnamed decls are replicated; unnamed statements get
    no split; a statement without a layout gets its natural one."""
    mesh = _check_mesh(mesh)
    layouts = {k: {i: tuple(v) if not isinstance(v, str) else (v,) for i, v in lay.items()}
               for k, lay in (layouts or {}).items()}
    splits = {k: {i: tuple(v) if not isinstance(v, str) else (v,) for i, v in sp.items()}
              for k, sp in (splits or {}).items()}
    idx = index_sizes(graph)

    def stmt_fn(s, types):
        if isinstance(s.op, g.Repeat):
            return replace(_set_split(s, {}), type=with_layout(s.type.unsharded(), layouts.get(s.name, {})))
        split = splits.get(s.name, {})
        why = split_problem(s, split, idx, mesh)
        if why:
            raise EinpartError(f"split of '{s.name}': {why}")
        lay = layouts.get(s.name, natural_layout(s, split))
        return replace(_set_split(s, split), type=with_layout(s.type.unsharded(), lay))

    return _rebuild(graph, lambda d: layouts.get(d.name, {}), stmt_fn, mesh)


def replicated_plan(graph: g.Graph, mesh: dict[str, int]) -> g.Graph:
    return set_plan(graph, mesh)


# ------------------------------------------------------------------ random
def random_layout(indices, idx: dict[str, int], mesh: dict[str, int], rng: random.Random,
                  p_none: float | None = None) -> dict[str, tuple[str, ...]]:
    """Each mesh axis (in random order) goes to a random index it still divides, or to none."""
    layout: dict[str, list[str]] = {i: [] for i in indices}
    axes = list(mesh)
    rng.shuffle(axes)
    for a in axes:
        fits = [i for i in indices if idx[i] % (parts(tuple(layout[i]) + (a,), mesh)) == 0]
        if not fits:
            continue
        if p_none is None:
            pick = rng.choice([None] + fits)
        else:
            pick = None if rng.random() < p_none else rng.choice(fits)
        if pick is not None:
            layout[pick].append(a)
    return {i: tuple(v) for i, v in layout.items() if v}


def random_plan(graph: g.Graph, mesh: dict[str, int], seed: int = 0, reshard_prob: float = 0.3) -> g.Graph:
    """A random legal plan: layouts on every decl, a split on every statement (checked
    with split_problem), statement layouts natural or a random reshard of it."""
    mesh = _check_mesh(mesh)
    rng = random.Random(seed)
    idx = index_sizes(graph)

    def decl_layout(d):
        return random_layout(d.type.indices, idx, mesh, rng)

    def stmt_fn(s, types):
        out = s.type.indices
        if isinstance(s.op, g.Repeat):
            return replace(_set_split(s, {}), type=with_layout(s.type.unsharded(), random_layout(out, idx, mesh, rng)))
        split: dict = {}
        for _ in range(30):
            cand = random_layout(stmt_indices(s), idx, mesh, rng)
            if split_problem(s, cand, idx, mesh) is None:
                split = cand
                break
        lay = natural_layout(s, split)
        red_axes = [a for i in reduced_indices(s) for a in split.get(i, ())]
        r = rng.random()
        if red_axes and r < 0.35:
            # ask for one more split over reduced axes: exercises psum_scatter
            i = rng.choice(out)
            extra = tuple(a for a in red_axes if rng.random() < 0.7) or (red_axes[0],)
            want = lay[i] + extra
            if idx[i] % parts(want, mesh) == 0:
                lay = dict(lay, **{i: want})
        elif r < 0.35 + reshard_prob:
            lay = random_layout(out, idx, mesh, rng)
        return replace(_set_split(s, split), type=with_layout(s.type.unsharded(), lay))

    return _rebuild(graph, decl_layout, stmt_fn, mesh)


# ------------------------------------------------------------------ simple (Megatron)
def _width_excluded(graph: g.Graph) -> set[str]:
    """Indices a Megatron-style plan never splits weights or caches on: the residual
    stream's (the carry's), rotary pair indices, and cache position indices."""
    out: set[str] = set()
    for s, _ in graph.all_stmts():
        op = s.op
        if isinstance(op, g.Repeat):
            out |= set(s.type.indices)
        elif isinstance(op, g.Rope):
            out.add(op.pair)
        elif isinstance(op, g.Write):
            out |= {i for i in op.cache.indices if i not in op.new.indices}
            out |= {i for i in op.new.indices if i not in op.cache.indices}
    return out


def _comm_cost(s: g.Statement, types, split, idx, mesh) -> float:
    """Elements moved (gathered operands, twice the reduced result) plus a little for the
    local work: enough to make splitting a matmul beat gathering its weight."""
    comm = plan_stmt(s, types, split)
    cost = 0.0
    for r, moves in comm.operands:
        lay = dict(ref_layout(r, types[r.name]))
        for c in moves:
            if c.kind == "slice":
                lay[c.index] = tuple(lay.get(c.index, ())) + c.axes
                continue
            if c.kind == "all_gather":
                lay[c.index] = tuple(lay[c.index])[:len(lay[c.index]) - len(c.axes)]
            else:  # all_to_all
                lay[c.other] = tuple(lay[c.other])[:-1]
                lay[c.index] = tuple(lay.get(c.index, ())) + c.axes
            n = 1
            for i in r.indices:
                n *= idx[i] // parts(lay.get(i, ()), mesh)
            cost += n
    n_out = 1
    for i in s.type.indices:
        n_out *= idx[i] // parts(tuple(split.get(i, ())), mesh)
    cost += 2 * n_out * len(comm.reduce)
    flops = 1
    for i in stmt_indices(s):
        flops *= idx[i] // parts(tuple(split.get(i, ())), mesh)
    return cost + 1e-3 * flops


def simple_plan(graph: g.Graph, mesh: dict[str, int]) -> g.Graph:
    """1D tensor parallelism, Megatron style, on any spec: every weight and cache is
    split on its first 'width' index (heads, MLP width, vocabulary: not the residual
    stream's indices, not rotary pairs, not cache positions) over as many mesh axes
    as divide it; each statement then takes the cheapest of a few candidate splits
    (its operands' layouts, their union, none) and its natural layout."""
    mesh = _check_mesh(mesh)
    idx = index_sizes(graph)
    excluded = _width_excluded(graph)

    def decl_layout(d):
        if d.kind == "input":
            return {}
        layout: dict[str, tuple] = {}
        axes = [a for a in mesh if mesh[a] > 1]
        for i in d.type.indices:
            if i in excluded or not axes:
                continue
            take = []
            for a in list(axes):
                if idx[i] % parts(tuple(take) + (a,), mesh) == 0:
                    take.append(a)
            if take:
                layout[i] = tuple(take)
                axes = [a for a in axes if a not in take]
        return layout

    def stmt_fn(s, types):
        if isinstance(s.op, g.Repeat):
            init_lay = type_layout(types[s.op.init])
            return replace(_set_split(s, {}), type=with_layout(s.type.unsharded(), init_lay))
        names = stmt_indices(s)
        cands: list[dict] = [{}]
        union: dict[str, tuple] = {}
        used: set[str] = set()
        ok = True
        for r in stmt_refs(s):
            lay = {i: a for i, a in ref_layout(r, types[r.name]).items() if a}
            cands.append(lay)
            for i, a in lay.items():
                if i in union and union[i] == a:
                    continue
                if i in union or used & set(a):
                    ok = False
                    continue
                union[i] = a
                used |= set(a)
        if ok:
            cands.append(union)
        best, best_cost = {}, None
        for c in cands:
            c = {i: a for i, a in c.items() if i in names}
            if split_problem(s, c, idx, mesh) is not None:
                continue
            trial = replace(s, type=with_layout(s.type.unsharded(), natural_layout(s, c)))
            cost = _comm_cost(trial, types, c, idx, mesh)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = c, cost
        return replace(_set_split(s, best), type=with_layout(s.type.unsharded(), natural_layout(s, best)))

    return _rebuild(graph, decl_layout, stmt_fn, mesh)


# ------------------------------------------------------------------ other sizes
def specialize(graph: g.Graph, sizes: dict[str, int], drop: tuple[str, ...] = ()) -> g.Graph:
    """The same plan at other sizes. A split or layout of an index in `drop` that no
    longer divides it is removed (decode: T=1 cannot be split); any other index that
    no longer divides is an error that names it."""
    if not sizes:
        return graph
    new = override_sizes(graph, sizes)
    idx = index_sizes(new, resolve_sizes(new))
    mesh = dict(graph.mesh)

    def fix(layout: dict, what: str) -> dict:
        out = {}
        for i, axes in layout.items():
            if axes and idx[i] % parts(tuple(axes), mesh):
                if i in drop:
                    continue
                raise EinpartError(f"{what}: index {i} of size {idx[i]} cannot be split "
                                   f"{parts(tuple(axes), mesh)} ways over mesh axes {', '.join(axes)}")
            out[i] = axes
        return out

    def fix_type(t: g.TensorType, what: str) -> g.TensorType:
        return with_layout(t, fix(type_layout(t), what))

    def fn(block: g.Block, owner) -> g.Block:
        decls = tuple(replace(d, type=fix_type(d.type, f"'{d.name}'")) for d in block.decls)
        stmts = []
        for s in block.stmts:
            s = replace(s, type=fix_type(s.type, f"'{s.name}'"))
            if not isinstance(s.op, g.Repeat):
                s = _set_split(s, fix(stmt_split(s), f"split of '{s.name}'"))
            stmts.append(s)
        return replace(block, decls=decls, stmts=tuple(stmts))

    return verify(g.map_blocks(new, fn))


# ------------------------------------------------------------------ the pass
PLAN_KINDS = ("simple", "random", "replicated")
FORCED_KINDS = ("ws1d", "ws2d", "wg", "dp")


@register_pass("plan")
@dataclass(frozen=True)
class PlanPass(Pass):
    """A built-in plan: simple (Megatron-style tensor parallel), random (seeded, legal),
    or replicated; or a forced layout of the `shard` planner (ws1d, ws2d, wg, dp), solved
    and priced on `hardware` like an unforced plan."""
    mesh: str = "1"
    kind: str = "simple"
    seed: int = 0
    hardware: str = "cpu"

    def apply(self, graph: g.Graph) -> g.Graph:
        mesh = parse_mesh(self.mesh)
        if self.kind in FORCED_KINDS:
            from .shard.forced import plan_forced
            return plan_forced(graph, self.kind, tuple(mesh.items()), self.hardware, seed=self.seed).graph
        if self.kind == "simple":
            return simple_plan(graph, mesh)
        if self.kind == "random":
            return random_plan(graph, mesh, self.seed)
        if self.kind == "replicated":
            return replicated_plan(graph, mesh)
        raise EinpartError(f"plan: kind must be one of {', '.join(PLAN_KINDS + FORCED_KINDS)}, got '{self.kind}'")
