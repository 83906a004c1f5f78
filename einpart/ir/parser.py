"""Spec text -> IR. A lark LALR parser with positions and a Transformer that
builds the frozen dataclasses of graph.py. Syntax errors are rewritten as
"FILE:LINE:COL: error: unexpected X, expected Y" with the line and a caret;
the verifier then checks names, sizes and types the same way."""
from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ..errors import EinpartError, SpecError
from . import graph as g

_TERMINAL_WORDS = {
    "NAME": "a name", "INT": "an integer", "NUMBER": "a number", "ESCAPED_STRING": "a string",
    "LSQB": "'['", "RSQB": "']'", "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'", "RBRACE": "'}'",
    "COMMA": "','", "EQUAL": "'='", "COLON": "':'", "AT": "'@'", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "$END": "end of file", "TENSOR_KIND": "param/input/state",
    "REDUCE": "sum/max/mean",
}


# The deepest syntax tree accepted. The examples nest 12 levels; every later stage
# (transformer, verifier, printer, passes, codegen) walks expressions recursively, so
# a spec of a 3,000-term sum or 3,000 unary minuses would end in a RecursionError
# somewhere deep in the compiler. It is refused here, at the place it starts.
MAX_NESTING = 200


def _check_nesting(tree: Tree, file: str, text: str) -> None:
    """An iterative walk: a SpecError at the first node nested deeper than MAX_NESTING."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if depth > MAX_NESTING:
            meta = node.meta
            line, col = (meta.line, meta.column) if not getattr(meta, "empty", True) else (0, 0)
            raise SpecError(f"expression nested too deeply (more than {MAX_NESTING} levels of operators or "
                            f"parentheses); split it into several statements",
                            g.Span(file, line, col, line, col + 1), text)
        stack.extend((c, depth + 1) for c in node.children)


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = (Path(__file__).with_name("grammar.lark")).read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _describe(tok) -> str:
    if isinstance(tok, Token):
        if tok.type == "$END":
            return "end of file"
        return repr(str(tok))
    return str(tok)


def _expected(names) -> str:
    words = sorted({_TERMINAL_WORDS.get(n, repr(n.lower()) if n.isupper() and not n.startswith("__") else n)
                    for n in names})
    words = [w for w in words if not w.startswith("'__")]
    if len(words) > 10:
        words = words[:10] + ["..."]
    return ", ".join(words)


class _Builder(Transformer):
    """Builds IR nodes bottom-up; `meta` gives each node its span."""

    def __init__(self, file: str):
        super().__init__(visit_tokens=True)
        self.file = file

    def _span(self, meta) -> g.Span:
        if getattr(meta, "empty", True):
            return g.NO_SPAN
        return g.Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> g.Span:
        return g.Span(self.file, tok.line, tok.column, tok.end_line or tok.line,
                      tok.end_column or tok.column + len(tok))

    # --- terminals
    def NUMBER(self, tok):
        text = str(tok)
        if any(c in text for c in ".eE"):
            return float(text)
        return int(text)

    def ESCAPED_STRING(self, tok):
        body = str(tok)[1:-1]
        return body.encode("utf-8").decode("unicode_escape") if "\\" in body else body

    # --- top level
    def start(self, items):
        return list(items)

    @v_args(meta=True)
    def size_decl(self, meta, defs):
        return list(defs)

    @v_args(meta=True)
    def size_def(self, meta, children):
        name, expr = children
        return g.SizeDecl(str(name), expr, self._tok_span(name))

    def size_lit(self, children):
        return g.SizeLit(int(children[0]))

    def size_ref(self, children):
        return g.SizeRef(str(children[0]), self._tok_span(children[0]))

    def size_mul(self, c):
        return g.SizeBin("*", c[0], c[1])

    def size_div(self, c):
        return g.SizeBin("/", c[0], c[1])

    def mesh_decl(self, defs):
        return ("mesh", list(defs))

    def mesh_def(self, c):
        return (str(c[0]), int(c[1]), self._tok_span(c[0]))

    def index_decl(self, defs):
        return list(defs)

    def index_def(self, c):
        return g.IndexDecl(str(c[0]), str(c[1]), self._tok_span(c[0]))

    @v_args(meta=True)
    def tensor_decl(self, meta, c):
        kind, name, typ, attrs = c
        return g.Decl(str(kind), str(name), typ, attrs or (), self._tok_span(name))

    def type(self, c):
        *axes, dtype = c
        axes = tuple(a for a in axes if a is not None)
        return g.TensorType(axes, dtype or "f32")

    def dtype(self, c):
        tok = c[0]
        if str(tok) not in g.DTYPES:
            raise SpecError(f"unknown dtype '{tok}' (known: {', '.join(g.DTYPES)})", self._tok_span(tok))
        return str(tok)

    def axis(self, c):
        return g.Axis(str(c[0]), c[1] or ())

    def mesh_one(self, c):
        return (str(c[0]),)

    def mesh_many(self, c):
        return tuple(str(x) for x in c)

    def output_decl(self, c):
        return ("output", [(str(t), self._tok_span(t)) for t in c])

    # --- statements
    @v_args(meta=True)
    def statement(self, meta, c):
        name, typ, op, attrs = c
        return g.Statement(str(name), typ, op, attrs or (), self._tok_span(name))

    def compute(self, c):
        return g.Compute(c[0], None)

    def reduce(self, c):
        return g.Compute(c[1], str(c[0]))

    def take(self, c):
        return g.Take(c[0], c[1])

    def position(self, c):
        return g.Position(str(c[0]), self._tok_span(c[0]))

    def write(self, c):
        return g.Write(c[0], c[1])

    def rope(self, c):
        x, at, pair, theta = c
        return g.Rope(x, str(at), str(pair), theta.value if theta is not None else 10000.0)

    @v_args(meta=True)
    def repeat(self, meta, c):
        index, carry, init, *items, result = c
        block = _collect_block(items, nested=True)
        return g.Repeat(str(index), str(carry), str(init), block, str(result), self._tok_span(index))

    # --- expressions
    def add(self, c):
        return g.Binary("+", c[0], c[1])

    def sub(self, c):
        return g.Binary("-", c[0], c[1])

    def mul(self, c):
        return g.Binary("*", c[0], c[1])

    def div(self, c):
        return g.Binary("/", c[0], c[1])

    def neg(self, c):
        x = c[0]
        if isinstance(x, g.Const):
            return g.Const(-x.value)
        return g.Unary("neg", x)

    def call(self, c):
        fn, x = c
        if str(fn) in g.REDUCERS:
            raise SpecError(f"{fn}() is a reduction: it must be the whole right-hand side "
                            f"of a statement", self._tok_span(fn))
        if str(fn) not in g.UNARY_FUNCS:
            raise SpecError(f"unknown function '{fn}' (known: {', '.join(g.UNARY_FUNCS)})",
                            self._tok_span(fn))
        return g.Unary(str(fn), x)

    def size_value(self, c):
        return g.SizeVal(str(c[0]), self._tok_span(c[0]))

    def causal(self, c):
        return g.Causal(str(c[0]), str(c[1]), self._tok_span(c[0]))

    @v_args(meta=True)
    def ref(self, meta, c):
        name, *idx = c
        idx = tuple(str(i) for i in idx if i is not None)
        return g.Ref(str(name), idx, self._span(meta))

    def number(self, c):
        return g.Const(float(c[0]))

    # --- annotations
    @v_args(meta=True)
    def attrs(self, meta, c):
        items = [a for a in c if a is not None]
        keys = [k for k, _ in items]
        for k in keys:
            if keys.count(k) > 1:
                raise SpecError(f"annotation '{k}' given twice", self._span(meta))
        return tuple(sorted(items))

    def attr(self, c):
        return (str(c[0]), c[1])

    def v_number(self, c):
        return c[0]

    def v_symbol(self, c):
        return g.Sym(str(c[0]))

    def v_string(self, c):
        return c[0]

    def v_list(self, c):
        return tuple(x for x in c if x is not None)

    def v_term(self, c):
        fn, *args = c
        return g.Term(str(fn), tuple(a for a in args if a is not None))


def _collect_block(items, nested: bool):
    decls, stmts, sizes, indices, outputs, mesh = [], [], [], [], [], []
    for it in items:
        if isinstance(it, g.Decl):
            decls.append(it)
        elif isinstance(it, g.Statement):
            stmts.append(it)
        elif isinstance(it, list) and it and isinstance(it[0], g.SizeDecl):
            sizes.extend(it)
        elif isinstance(it, list) and it and isinstance(it[0], g.IndexDecl):
            indices.extend(it)
        elif isinstance(it, tuple) and it[0] == "output":
            outputs.extend(it[1])
        elif isinstance(it, tuple) and it[0] == "mesh":
            mesh.extend(it[1])
    if nested:
        for what, found in (("size", sizes), ("index", indices), ("output", outputs), ("mesh", mesh)):
            if found:
                span = found[0][-1] if what in ("output", "mesh") else found[0].span
                raise SpecError(f"'{what}' declarations belong at the top level, not inside a repeat block",
                                span)
        return g.Block(tuple(decls), tuple(stmts))
    return g.Block(tuple(decls), tuple(stmts)), sizes, indices, outputs, mesh


def parse_syntax(text: str, file: str = "<spec>") -> tuple[g.Graph, dict]:
    """Parse text into a Graph without checking names or sizes (see verify).

    Also returns the spans of the output names, which the Graph does not keep."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, file) from None
    _check_nesting(tree, file, text)
    try:
        items = _Builder(file).transform(tree)
    except VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise SpecError(e.orig_exc.message, e.orig_exc.span, text) from None
        raise
    block, sizes, indices, outputs, mesh = _collect_block(items, nested=False)
    seen_axes: dict[str, g.Span] = {}
    for name, size, span in mesh:
        if name in seen_axes:
            raise SpecError(f"mesh axis {name} is declared twice", span, text)
        if size <= 0:
            raise SpecError(f"mesh axis {name} must have a positive size, got {size}", span, text)
        seen_axes[name] = span
    graph = g.Graph(tuple(sizes), tuple(indices), block, tuple(n for n, _ in outputs),
                    tuple((n, sz) for n, sz, _ in mesh), file, text)
    return graph, {"outputs": dict(outputs), "mesh": seen_axes}


def _syntax_error(e: UnexpectedInput, text: str, file: str) -> SpecError:
    line, col = getattr(e, "line", 0) or 0, getattr(e, "column", 0) or 0
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "end of file"
        msg = f"unexpected character {ch!r}"
        if e.allowed:
            msg += f", expected {_expected(e.allowed)}"
    elif isinstance(e, UnexpectedEOF):
        lines = text.splitlines() or [""]
        line, col = len(lines), len(lines[-1]) + 1
        msg = f"unexpected end of file, expected {_expected(e.expected)}"
    elif isinstance(e, UnexpectedToken):
        if e.token.type == "$END":
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
        msg = f"unexpected {_describe(e.token)}, expected {_expected(e.accepts or e.expected)}"
    else:  # pragma: no cover - lark has no other kinds
        msg = str(e)
    width = len(str(e.token)) if isinstance(e, UnexpectedToken) and e.token.type != "$END" else 1
    return SpecError(msg, g.Span(file, line, col, line, col + width), text)


def parse(text: str, file: str = "<spec>", sizes: dict[str, int] | None = None,
          verify: bool = True) -> g.Graph:
    """Parse and verify a spec. `sizes` overrides size declarations (--set)."""
    graph, spans = parse_syntax(text, file)
    if sizes:
        graph = override_sizes(graph, sizes)
    if verify:
        from .verify import verify as _verify
        graph = _verify(graph, spans)
    return graph


def override_sizes(graph: g.Graph, sizes: dict[str, int]) -> g.Graph:
    known = {s.name for s in graph.sizes}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise EinpartError(f"unknown size '{unknown[0]}' in --set (this spec has: {', '.join(sorted(known))})")
    new = tuple(replace(s, expr=g.SizeLit(int(sizes[s.name]))) if s.name in sizes else s for s in graph.sizes)
    return replace(graph, sizes=new)


def parse_file(path: str | Path, sizes: dict[str, int] | None = None) -> g.Graph:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise EinpartError(f"{path}: error: cannot read spec: {reason}") from None
    return parse(text, str(path), sizes)
