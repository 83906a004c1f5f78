"""IR -> canonical spec text. Deterministic: the same graph always prints the
same bytes, attributes sorted, floats in repr form, parentheses only where
precedence needs them. `parse(format_graph(g)) == g` for every graph."""
from __future__ import annotations

from . import graph as g

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def format_size_expr(e: g.SizeExpr) -> str:
    if isinstance(e, g.SizeLit):
        return str(e.value)
    if isinstance(e, g.SizeRef):
        return e.name
    rhs = format_size_expr(e.rhs)
    if isinstance(e.rhs, g.SizeBin):  # left-associative: only the right side needs parentheses
        rhs = f"({rhs})"
    return f"{format_size_expr(e.lhs)} {e.op} {rhs}"


def _num(v: float) -> str:
    text = repr(float(v))
    if text in ("inf", "-inf", "nan"):
        raise ValueError(f"cannot print non-finite constant {text}")
    return text


def format_expr(e: g.Expr) -> str:
    return _expr(e, 0)


def _expr(e: g.Expr, ctx: int) -> str:
    if isinstance(e, g.Ref):
        return f"{e.name}[{', '.join(e.indices)}]"
    if isinstance(e, g.Const):
        text = _num(e.value)
        return f"({text})" if e.value < 0 or text.startswith("-") else text
    if isinstance(e, g.Causal):
        return f"causal({e.t}, {e.s})"
    if isinstance(e, g.SizeVal):
        return e.name
    if isinstance(e, g.Unary):
        if e.fn == "neg":
            text = "-" + _expr(e.x, 3)
            return f"({text})" if ctx > 3 else text
        return f"{e.fn}({_expr(e.x, 0)})"
    if isinstance(e, g.Binary):
        p = _PREC[e.op]
        text = f"{_expr(e.lhs, p)} {e.op} {_expr(e.rhs, p + 1)}"
        return f"({text})" if p < ctx else text
    raise TypeError(f"not an expression: {e!r}")


def format_type(t: g.TensorType) -> str:
    axes = []
    for a in t.axes:
        if not a.mesh:
            axes.append(a.index)
        elif len(a.mesh) == 1:
            axes.append(f"{a.index}@{a.mesh[0]}")
        else:
            axes.append(f"{a.index}@({', '.join(a.mesh)})")
    text = f"[{', '.join(axes)}]"
    return text if t.dtype == "f32" else f"{text} : {t.dtype}"


def format_value(v) -> str:
    if isinstance(v, bool):
        raise TypeError("booleans are not attribute values; use a symbol")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, g.Sym):
        return v.name
    if isinstance(v, g.Term):
        return f"{v.fn}({', '.join(format_value(a) for a in v.args)})"
    if isinstance(v, tuple):
        return f"[{', '.join(format_value(a) for a in v)}]"
    raise TypeError(f"not an attribute value: {v!r}")


def format_attrs(attrs: g.Attrs) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={format_value(v)}" for k, v in sorted(attrs)) + "}"


def format_op(op: g.Op, indent: str) -> str:
    if isinstance(op, g.Compute):
        if op.reduce is None:
            return format_expr(op.expr)
        factors = g.product_factors(op.expr)
        if op.reduce == "sum" and factors is not None and len(factors) > 1:
            return format_expr(op.expr)  # a contraction: the einsum form
        return f"{op.reduce}({format_expr(op.expr)})"
    if isinstance(op, g.Take):
        ids = (f"position({op.ids.index})" if isinstance(op.ids, g.Position) else format_expr(op.ids))
        return f"take({format_expr(op.table)}, {ids})"
    if isinstance(op, g.Write):
        return f"write({format_expr(op.cache)}, {format_expr(op.new)})"
    if isinstance(op, g.Rope):
        theta = "" if op.theta == 10000.0 else f", {_num(op.theta)}"
        return f"rope({format_expr(op.x)}, {op.at}, {op.pair}{theta})"
    if isinstance(op, g.Repeat):
        inner = indent + "  "
        lines = [f"repeat {op.index} ({op.carry} = {op.init}) {{"]
        lines += _block_lines(op.body, inner)
        lines.append(f"{inner}yield {op.result}")
        lines.append(f"{indent}}}")
        return "\n".join(lines)
    raise TypeError(f"not an operation: {op!r}")


def _block_lines(block: g.Block, indent: str) -> list[str]:
    lines = []
    for d in block.decls:
        lines.append(f"{indent}{d.kind} {d.name}{format_type(d.type)}{format_attrs(d.attrs)}")
    for s in block.stmts:
        lines.append(f"{indent}{s.name}{format_type(s.type)} = {format_op(s.op, indent)}{format_attrs(s.attrs)}")
    return lines


def format_graph(graph: g.Graph) -> str:
    """Canonical text: sizes, indices, declarations, statements, outputs."""
    out: list[str] = []
    if graph.sizes:
        out.append("size " + ", ".join(f"{s.name} = {format_size_expr(s.expr)}" for s in graph.sizes))
    if graph.mesh:
        out.append("mesh " + ", ".join(f"{n} = {sz}" for n, sz in graph.mesh))
    if graph.indices:
        out.append("index " + ", ".join(f"{i.name}: {i.size}" for i in graph.indices))
    out += _block_lines(graph.body, "")
    if graph.outputs:
        out.append("output " + ", ".join(graph.outputs))
    return "\n".join(out) + "\n"
