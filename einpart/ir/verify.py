"""The verifier: every rule a graph must satisfy, each broken rule reported as
a SpecError at the offending node (file:line:col and a caret).

verify() also normalises: an implicit contraction (`y[b,f] = x[b,d] * w[d,f]`)
gets reduce="sum", and statements are put in a stable topological order, so
every pass and the interpreter see one canonical form.
"""
from __future__ import annotations

import heapq
from dataclasses import replace

from ..errors import SpecError
from . import graph as g

# Array dimensions and element counts are 64-bit in numpy and XLA: a larger size
# (D = 10**19) would be silently wrong in generated code, so it is an error here.
MAX_EXTENT = 2**63 - 1


def resolve_sizes(graph: g.Graph, overrides: dict[str, int] | None = None) -> dict[str, int]:
    """Evaluate every size declaration; overrides replace declared values."""
    decls = {s.name: s for s in graph.sizes}
    done: dict[str, int] = dict(overrides or {})
    active: list[str] = []

    def err(msg, span):
        raise SpecError(msg, span, graph.text)

    def ev(e: g.SizeExpr, where: g.SizeDecl) -> int:
        if isinstance(e, g.SizeLit):
            return e.value
        if isinstance(e, g.SizeRef):
            if e.name not in decls:
                err(f"unknown size '{e.name}'", e.span if e.span.line else where.span)
            return size_of(e.name)
        a, b = ev(e.lhs, where), ev(e.rhs, where)
        if e.op == "*":
            return a * b
        if b == 0 or a % b:
            err(f"size {where.name} = {a} / {b} does not divide evenly", where.span)
        return a // b

    def size_of(name: str) -> int:
        if name in done:
            return done[name]
        if name in active:
            err(f"size {name} is defined in terms of itself ({' -> '.join(active + [name])})", decls[name].span)
        active.append(name)
        value = ev(decls[name].expr, decls[name])
        active.pop()
        done[name] = value
        return value

    seen: dict[str, g.SizeDecl] = {}
    for s in graph.sizes:
        if s.name in seen:
            err(f"size {s.name} is declared twice (first at line {seen[s.name].span.line})", s.span)
        seen[s.name] = s
    for s in graph.sizes:
        v = size_of(s.name)
        if v <= 0:
            err(f"size {s.name} must be positive, got {v}", s.span)
        if v > MAX_EXTENT:
            err(f"size {s.name} = {v} is too large: array dimensions are 64-bit (at most 2**63 - 1)", s.span)
    return done


def index_sizes(graph: g.Graph, sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Index name -> its extent."""
    sizes = sizes if sizes is not None else resolve_sizes(graph)
    return {i.name: sizes[i.size] for i in graph.indices}


class _Verifier:
    def __init__(self, graph: g.Graph):
        self.graph = graph
        self.sizes = resolve_sizes(graph)
        self.index_size: dict[str, int] = {}
        self.types: dict[str, g.TensorType] = {}
        self.kinds: dict[str, str] = {}
        self.defined_at: dict[str, g.Span] = {}
        self.writes: dict[str, g.Span] = {}

    def err(self, msg: str, span: g.Span | None):
        raise SpecError(msg, span, self.graph.text)

    # -- declarations -------------------------------------------------------
    def check_indices(self):
        for i in self.graph.indices:
            if i.name in self.index_size:
                self.err(f"index {i.name} is declared twice", i.span)
            if i.size not in self.sizes:
                self.err(f"index {i.name} ranges over unknown size '{i.size}'", i.span)
            self.index_size[i.name] = self.sizes[i.size]

    def define(self, name: str, span: g.Span, typ: g.TensorType, kind: str):
        if name in self.defined_at:
            first = self.defined_at[name]
            self.err(f"duplicate definition of '{name}' (first defined at line {first.line})", span)
        if name in g.RESERVED:
            self.err(f"'{name}' is a reserved word and cannot name a tensor", span)
        self.defined_at[name] = span
        self.types[name] = typ
        self.kinds[name] = kind

    def check_type(self, typ: g.TensorType, span: g.Span, what: str):
        seen = set()
        for a in typ.axes:
            if a.index not in self.index_size:
                self.err(f"unknown index '{a.index}' in {what}", span)
            if a.index in seen:
                self.err(f"index {a.index} appears twice in {what}", span)
            seen.add(a.index)
        if typ.dtype not in g.DTYPES:
            self.err(f"unknown dtype '{typ.dtype}'", span)

    def collect(self, block: g.Block, owner: g.Repeat | None):
        """Define every name first, so statements may be written in any order."""
        for d in block.decls:
            if d.kind == "input" and owner is not None:
                self.err(f"input '{d.name}' must be declared at the top level, not inside a repeat block", d.span)
            self.check_type(d.type, d.span, f"the type of '{d.name}'")
            self.define(d.name, d.span, d.type, d.kind)
        for s in block.stmts:
            self.check_type(s.type, s.span, f"the output of '{s.name}'")
            self.define(s.name, s.span, s.type, "stmt")
            if isinstance(s.op, g.Repeat):
                self.define(s.op.carry, s.op.span, s.type, "carry")
                if s.op.index not in self.index_size:
                    self.err(f"unknown index '{s.op.index}' in repeat", s.op.span)
                self.collect(s.op.body, s.op)

    # -- references ---------------------------------------------------------
    def check_ref(self, ref: g.Ref, scope: set[str], stmt: g.Statement) -> g.TensorType:
        span = ref.span if ref.span.line else stmt.span
        if ref.name not in self.types:
            self.err(f"unknown tensor '{ref.name}'", span)
        if ref.name not in scope:
            self.err(f"'{ref.name}' is defined inside a repeat block and cannot be used outside it", span)
        typ = self.types[ref.name]
        if len(ref.indices) != len(typ.axes):
            self.err(f"'{ref.name}' has {len(typ.axes)} axes [{', '.join(typ.indices)}] "
                     f"but is used with {len(ref.indices)}", span)
        for pos, (idx, axis) in enumerate(zip(ref.indices, typ.axes)):
            if idx not in self.index_size:
                self.err(f"unknown index '{idx}'", span)
            if ref.indices.count(idx) > 1:
                self.err(f"index {idx} appears twice in {ref.name}[{', '.join(ref.indices)}]", span)
            want, got = self.index_size[axis.index], self.index_size[idx]
            if want != got:
                self.err(f"index {idx} has size {got} but axis {pos + 1} of '{ref.name}' is "
                         f"{axis.index} with size {want}", span)
        return typ

    # -- statements ---------------------------------------------------------
    def check_block(self, block: g.Block, scope: set[str], owner: g.Repeat | None) -> g.Block:
        scope = scope | {d.name for d in block.decls} | {s.name for s in block.stmts}
        if owner is not None:
            scope.add(owner.carry)
        stmts = tuple(self.check_stmt(s, scope) for s in block.stmts)
        return replace(block, stmts=_topo_sort(stmts, self))

    def check_stmt(self, s: g.Statement, scope: set[str]) -> g.Statement:
        out = set(s.type.indices)
        op = s.op
        if isinstance(op, g.Compute):
            return replace(s, op=self.check_compute(s, op, scope, out))
        if isinstance(op, g.Take):
            self.check_take(s, op, scope, out)
        elif isinstance(op, g.Write):
            self.check_write(s, op, scope, out)
        elif isinstance(op, g.Rope):
            typ = self.check_ref(op.x, scope, s)
            self.require_float(op.x, typ, s)
            for idx, role in ((op.at, "position"), (op.pair, "pair")):
                if idx not in op.x.indices:
                    self.err(f"rope {role} index {idx} is not an index of {op.x.name}", s.span)
            if self.index_size[op.pair] % 2:
                self.err(f"rope pairs index {op.pair}, whose size {self.index_size[op.pair]} is odd", s.span)
            self.same_indices(s, out, set(op.x.indices), "rope keeps the indices of its input")
        elif isinstance(op, g.Repeat):
            return replace(s, op=self.check_repeat(s, op, scope))
        return s

    def require_float(self, ref: g.Ref, typ: g.TensorType, s: g.Statement):
        if typ.dtype not in g.FLOAT_DTYPES and typ.dtype != "i8":
            self.err(f"dtype mismatch: '{ref.name}' is {typ.dtype} and cannot be used in arithmetic",
                     ref.span if ref.span.line else s.span)

    def same_indices(self, s, out: set, want: set, why: str):
        if out != want:
            self.err(f"output indices [{', '.join(s.type.indices)}] do not match: {why} "
                     f"[{', '.join(sorted(want))}]", s.span)

    def check_compute(self, s, op: g.Compute, scope, out: set) -> g.Compute:
        for ref in g.expr_refs(op.expr):
            self.require_float(ref, self.check_ref(ref, scope, s), s)
        for leaf in g.expr_leaves(op.expr):
            if isinstance(leaf, g.Causal):
                for idx in (leaf.t, leaf.s):
                    if idx not in self.index_size:
                        self.err(f"unknown index '{idx}'", leaf.span if leaf.span.line else s.span)
            elif isinstance(leaf, g.SizeVal) and leaf.name not in self.sizes:
                self.err(f"unknown size '{leaf.name}' (a tensor is read with indices: {leaf.name}[...])",
                         leaf.span if leaf.span.line else s.span)
        have = g.expr_indices(op.expr)
        missing = [i for i in s.type.indices if i not in have]
        if missing:
            self.err(f"index {missing[0]} of the output appears in no input", s.span)
        reduced = [i for i in have if i not in out]
        if op.reduce is None and reduced:
            if g.product_factors(op.expr) is None:
                self.err(f"index {reduced[0]} is not in the output; a map keeps every index - "
                         f"write sum(...), max(...) or mean(...) to reduce it", s.span)
            return replace(op, reduce="sum")
        if op.reduce is not None and not reduced:
            self.err(f"{op.reduce}(...) reduces nothing: every index is in the output", s.span)
        return op

    def check_take(self, s, op: g.Take, scope, out: set):
        self.check_ref(op.table, scope, s)
        looked_up = [i for i in op.table.indices if i not in out]
        if len(looked_up) != 1:
            self.err(f"take() looks up exactly one axis of {op.table.name}: the one missing from the output "
                     f"(found {len(looked_up)})", s.span)
        if isinstance(op.ids, g.Position):
            if op.ids.index not in self.index_size:
                self.err(f"unknown index '{op.ids.index}'", op.ids.span)
            ids_idx = {op.ids.index}
        else:
            typ = self.check_ref(op.ids, scope, s)
            if typ.dtype not in g.INT_DTYPES:
                self.err(f"dtype mismatch: take() ids '{op.ids.name}' must be an integer tensor, "
                         f"got {typ.dtype}", op.ids.span)
            ids_idx = set(op.ids.indices)
        self.same_indices(s, out, ids_idx | (set(op.table.indices) - set(looked_up)),
                          "take() yields the ids' indices plus the table's other indices")

    def check_write(self, s, op: g.Write, scope, out: set):
        ctyp = self.check_ref(op.cache, scope, s)
        ntyp = self.check_ref(op.new, scope, s)
        if self.kinds.get(op.cache.name) != "state":
            self.err(f"write() updates a state tensor; '{op.cache.name}' is not declared as state", s.span)
        if op.cache.name in self.writes:
            self.err(f"state '{op.cache.name}' is written twice (first at line {self.writes[op.cache.name].line})",
                     s.span)
        self.writes[op.cache.name] = s.span
        only_c = [i for i in op.cache.indices if i not in op.new.indices]
        only_n = [i for i in op.new.indices if i not in op.cache.indices]
        if len(only_c) != 1 or len(only_n) != 1:
            self.err("write(cache, new): exactly one index of the cache (positions) must be absent from new, "
                     "and one of new (the written positions) absent from the cache", s.span)
        if ctyp.dtype != ntyp.dtype:
            self.err(f"dtype mismatch: cache '{op.cache.name}' is {ctyp.dtype} but the written value "
                     f"'{op.new.name}' is {ntyp.dtype}", s.span)
        if s.type.dtype != ctyp.dtype:
            self.err(f"dtype mismatch: '{s.name}' is {s.type.dtype} but cache '{op.cache.name}' is "
                     f"{ctyp.dtype}", s.span)
        self.same_indices(s, out, set(op.cache.indices), "write() yields the cache's indices")

    def check_repeat(self, s, op: g.Repeat, scope) -> g.Repeat:
        if op.init not in self.types:
            self.err(f"unknown tensor '{op.init}'", op.span)
        if op.init not in scope:
            self.err(f"'{op.init}' is defined inside a repeat block and cannot be used outside it", op.span)
        init_t = self.types[op.init]
        if self._shape(init_t) != self._shape(s.type):
            self.err(f"'{s.name}' {self._fmt(s.type)} must have the type of the value it carries, "
                     f"'{op.init}' {self._fmt(init_t)}", s.span)
        body = self.check_block(op.body, scope, op)
        body_names = {st.name for st in op.body.stmts}
        if op.result not in body_names:
            self.err(f"yield '{op.result}': not a statement of this repeat block", op.span)
        res_t = self.types[op.result]
        if self._shape(res_t) != self._shape(s.type):
            self.err(f"repeat block changes the shape of its carried value: '{op.carry}' is "
                     f"{self._fmt(s.type)} but yield '{op.result}' is {self._fmt(res_t)}", op.span)
        return replace(op, body=body)

    def _shape(self, t: g.TensorType):
        return tuple(self.index_size[i] for i in t.indices)

    def _fmt(self, t: g.TensorType) -> str:
        return "[" + ", ".join(f"{i}={self.index_size[i]}" for i in t.indices) + "]"

    # -- the whole graph ----------------------------------------------------
    def check_layouts(self, spans: dict):
        """Mesh axes on tensor axes must be declared, used once per tensor, and divide the index."""
        mesh = dict(self.graph.mesh)
        types = [(d.name, d.type, d.span, o) for d, o in self.graph.all_decls()]
        types += [(s.name, s.type, s.span, o) for s, o in self.graph.all_stmts()]
        for name, typ, span, owner in types:
            count = self.index_size[owner.index] if owner is not None else 1
            for i in typ.indices:
                count *= self.index_size[i]
            if count > MAX_EXTENT:
                self.err(f"'{name}' {self._fmt(typ)} has {count} elements, more than a 64-bit count "
                         f"(2**63 - 1) allows", span)
            used: list[str] = []
            for a in typ.axes:
                parts = 1
                for m in a.mesh:
                    if m not in mesh:
                        self.err(f"'{name}' is laid out over mesh axis {m}, which the mesh does not declare", span)
                    if m in used:
                        self.err(f"'{name}' uses mesh axis {m} twice", span)
                    used.append(m)
                    parts *= mesh[m]
                if self.index_size[a.index] % parts:
                    self.err(f"'{name}': index {a.index} of size {self.index_size[a.index]} cannot be split "
                             f"{parts} ways over mesh axes {', '.join(a.mesh)}", span)

    def run(self, spans: dict) -> g.Graph:
        output_spans = spans.get("outputs", {})
        self.check_indices()
        self.collect(self.graph.body, None)
        self.check_layouts(spans)
        top = self.check_block(self.graph.body, set(), None)
        states = [d.name for d, _ in self.graph.all_decls() if d.kind == "state"]
        for name in states:
            if name not in self.writes:
                self.err(f"state '{name}' is never written (add a write(...) statement)", self.defined_at[name])
        top_names = {d.name for d in top.decls} | {st.name for st in top.stmts}
        if not self.graph.outputs:
            self.err("the spec declares no output (add: output NAME)", g.Span(self.graph.source, 1, 1))
        for name in self.graph.outputs:
            span = output_spans.get(name)
            if name not in self.types:
                self.err(f"unknown tensor '{name}' in output", span)
            if name not in top_names:
                self.err(f"output '{name}' must be defined at the top level", span)
        return self.graph.with_body(top)


def stmt_inputs(s: g.Statement) -> set[str]:
    """Names a statement reads (for a repeat: the free names of its body, and its init)."""
    op = s.op
    if isinstance(op, g.Compute):
        return {r.name for r in g.expr_refs(op.expr)}
    if isinstance(op, g.Take):
        return {op.table.name} | ({op.ids.name} if isinstance(op.ids, g.Ref) else set())
    if isinstance(op, g.Write):
        return {op.cache.name, op.new.name}
    if isinstance(op, g.Rope):
        return {op.x.name}
    if isinstance(op, g.Repeat):
        inner = {d.name for d in op.body.decls} | {st.name for st in op.body.stmts} | {op.carry}
        used = set().union(*(stmt_inputs(st) for st in op.body.stmts)) if op.body.stmts else set()
        return (used - inner) | {op.init}
    raise TypeError(op)


def _topo_sort(stmts: tuple[g.Statement, ...], v: _Verifier) -> tuple[g.Statement, ...]:
    """Stable topological order; a cycle is an error naming its members."""
    names = {s.name: i for i, s in enumerate(stmts)}
    deps = {i: {names[n] for n in stmt_inputs(s) if n in names} for i, s in enumerate(stmts)}
    users: dict[int, set[int]] = {i: set() for i in deps}
    for i, ds in deps.items():
        for d in ds:
            users[d].add(i)
    pending = {i: len(ds) for i, ds in deps.items()}
    ready = [i for i, n in pending.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(stmts):
        left = {i for i in deps if i not in set(order)}
        start = min(left)
        path, cur = [start], start
        while True:  # walk dependencies inside the unresolved set until one repeats
            cur = min(d for d in deps[cur] if d in left)
            if cur in path:
                path = path[path.index(cur):] + [cur]
                break
            path.append(cur)
        cycle = " -> ".join(stmts[i].name for i in path)
        v.err(f"cycle: {cycle}", stmts[path[0]].span)
    return tuple(stmts[i] for i in order)


def verify(graph: g.Graph, spans: dict | None = None) -> g.Graph:
    """Check every rule; return the normalised graph. Raises SpecError.

    `spans` (from the parser) locates names the IR keeps no span for (outputs)."""
    return _Verifier(graph).run(spans or {})
