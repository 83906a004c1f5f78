"""Products with an int8 weight through the Pallas GEMV kernel (the `int8_matmul` lowering option).

The einsum code casts an int8 weight to the product's dtype inside jnp.einsum. XLA fuses
that cast into its GEMM, but at decode batch 1 the GEMM reads int8 at about 1.7 TB/s on an
H200, slower than the bf16 weight it replaces (benchmarks/int8_matvec.py). The kernel
einpart.runtime.kernels.int8_gemv streams the int8 bytes with no dot. This module emits
one call of it in place of such a product's einsum:

- "xla": the einsum code everywhere (no kernel call);
- "pallas": the kernel for every product of an int8 weight with one activation whose
  local rows (the activation's axes that are not summed) number at most KERNEL_MAX_ROWS
  (decode); larger products (prefill) keep the einsum;
- "auto": the kernel on a CUDA platform for products of at most AUTO_MAX_ROWS local
  rows; the einsum everywhere else (CPU, TPU, prefill, larger decode batches).

The call sees 2-D local blocks. The activation is transposed to (rows, summed axes in the
weight's order) and reshaped to [M, K]. The weight is reshaped to [K, N]: this needs its
summed axes to come first, as every matmul weight of the examples has them. The [M, N]
result is reshaped and transposed back to the statement's axes. A product that does not
fit this form keeps the einsum. The kernel accumulates in float32 and returns the dtype the
einsum would (bf16 for a weight product of a bf16 spec, else float32), so the code after
the call is unchanged. Its one import, `int8_gemv`, is added to the generated module only
when a call is emitted. A mixin of StepProgram (program.py).
"""
from __future__ import annotations

from ..errors import EinpartError
from ..ir import graph as g
from .code import DTYPE_CODE, one_line, tuple_code

INT8_MATMUL_MODES = ("xla", "pallas", "auto")
KERNEL_MAX_ROWS = 8          # einpart.runtime.kernels.int8_gemv.MAX_ROWS (a test checks that they agree)
# auto: the rows up to which the kernel beats bf16 and XLA's int8 GEMM on an H200
# (benchmarks/results/int8-matvec-h200-int8kernel2.json, 8 layers of Llama-8B MLP products:
# batch 1 0.364 ms against 0.481 bf16 and 0.564 i8-dot; batch 2 0.694 against 0.495 and 0.386)
AUTO_MAX_ROWS = 1
KERNEL_IMPORT = "from einpart.runtime.kernels.int8_gemv import int8_gemv"


def kernel_import(plain: bool, siblings: bool) -> str:
    """The generated module's import of the kernel entry points it calls."""
    return KERNEL_IMPORT + (", int8_gemv_siblings" if siblings else "") if plain else (
        "from einpart.runtime.kernels.int8_gemv import int8_gemv_siblings")


def check_int8_matmul_mode(mode: str) -> str:
    if mode not in INT8_MATMUL_MODES:
        raise EinpartError(f"int8_matmul must be one of {', '.join(INT8_MATMUL_MODES)}, got '{mode}'")
    return mode


def kernel_rows_limit(mode: str, platform: str | None) -> int:
    """The most local rows a product may have to run through the kernel under `mode` (0: none)."""
    if mode == "pallas":
        return KERNEL_MAX_ROWS
    if mode == "auto" and platform == "cuda":
        return AUTO_MAX_ROWS
    return 0


def gemv_form(factors, dtypes: list[str], out: tuple, local: dict):
    """(activation position, weight position, rows, summed, columns, M, K, N) when the
    two-factor product `factors` is an activation times an int8 weight whose summed axes
    lead, else None. `dtypes`: the factors' stored dtypes; `local`: index -> local size."""
    if len(factors) != 2 or dtypes.count("i8") != 1 or not all(d in ("i8", "bf16", "f32") for d in dtypes):
        return None
    wi = dtypes.index("i8")
    xi = 1 - wi
    x, w = factors[xi].indices, factors[wi].indices
    if len(set(x)) != len(x) or len(set(w)) != len(w):
        return None                       # a repeated index (a diagonal) is no matmul
    summed = tuple(i for i in w if i not in out)
    columns = w[len(summed):]
    rows = tuple(i for i in x if i not in summed)
    if (w[:len(summed)] != summed or not summed or any(i in x for i in columns) or any(i not in x for i in summed)
            or any(i not in out for i in rows) or set(out) != set(rows) | set(columns)):
        return None
    M = K = N = 1
    for i in rows:
        M *= local[i]
    for i in summed:
        K *= local[i]
    for i in columns:
        N *= local[i]
    return xi, wi, rows, summed, columns, M, K, N


def kernel_form(factors, dtypes: list[str], weights: list[bool], out: tuple, local: dict, product: str,
                mode: str, platform: str | None):
    """gemv_form's tuple when int8_matmul `mode` routes this product through the kernel, else
    None: an int8 weight (`weights`: which factors are params) times an activation, computed
    in bf16 or float32 (`product`), with at most kernel_rows_limit local rows."""
    limit = kernel_rows_limit(mode, platform)
    if not limit or product not in ("bf16", "f32") or "i8" not in dtypes or not weights[dtypes.index("i8")]:
        return None
    form = gemv_form(factors, dtypes, out, local)
    return form if form is not None and form[5] <= limit else None


def kernel_statements(graph: g.Graph, mode: str, platform: str | None) -> set:
    """The statements of a single-program graph (a split_prepare'd prefill or decode)
    whose product the generated code computes with the kernel under `mode`: the emitter's
    decision (Int8MatmulEmitter) from the graph alone, for the cost model
    (passes/shard/fusion.py) to price."""
    return {name for name, _, _ in _kernel_products(graph, mode, platform)}


def sibling_groups(graph: g.Graph, mode: str, platform: str | None) -> dict:
    """Kernel statements whose products share their activation, computed by ONE
    int8_gemv_siblings call (Llama's q / kn / vn from h1, gate / up from h2): statement
    name -> (its group's members in statement order, their gemv forms), for groups of two
    or more. Members agree on the activation (the same ref, moved the same way, so the
    first member's operand code serves all), the summed axes and rows, the product and
    result dtypes; their weights are loaded as declared (no moves), so each exists where
    the group's first member is emitted. Within one block (the layer body or the top)."""
    by_key: dict = {}
    for name, key, form in _kernel_products(graph, mode, platform):
        if key is not None:
            by_key.setdefault(key, []).append((name, form))
    out = {}
    for members in by_key.values():
        if len(members) > 1:
            group = (tuple(n for n, _ in members), tuple(f for _, f in members))
            out.update((n, group) for n, _ in members)
    return out


def kernel_calls(graph: g.Graph, mode: str, platform: str | None) -> int:
    """How many kernel calls the generated code makes (a sibling group is one call)."""
    groups = {members for members, _ in sibling_groups(graph, mode, platform).values()}
    return len(kernel_statements(graph, mode, platform)) - sum(len(m) - 1 for m in groups)


def _kernel_products(graph: g.Graph, mode: str, platform: str | None):
    """(statement name, sibling key or None, gemv form) of each kernel statement."""
    from ..ir.layout import parts, plan_stmt, stmt_split
    from ..ir.verify import index_sizes
    check_int8_matmul_mode(mode)
    if not kernel_rows_limit(mode, platform):
        return []
    types, mesh, idx = graph.types(), dict(graph.mesh), index_sizes(graph)
    params = {d.name for d, _ in graph.all_decls() if d.kind == "param"}
    storage = next((d.type.dtype for d, _ in graph.all_decls()
                    if d.kind == "param" and d.type.dtype in ("bf16", "f16")), None)
    chosen = []
    for s, owner in graph.all_stmts():
        if not isinstance(s.op, g.Compute) or s.op.reduce != "sum":
            continue
        factors = g.product_factors(s.op.expr)
        if factors is None or len(factors) < 2 or not all(isinstance(f, g.Ref) for f in factors):
            continue
        dtypes = [types[f.name].dtype for f in factors]
        low = next((d for d in dtypes if d in ("bf16", "f16")), None)
        if low is None and "i8" in dtypes:
            low = storage
        split = stmt_split(s)
        local = {i: idx[i] // parts(tuple(split.get(i, ())), mesh) for f in factors for i in f.indices}
        form = kernel_form(factors, dtypes, [f.name in params for f in factors], s.type.indices, local,
                           low or "f32", mode, platform)
        if form is None:
            continue
        comm = plan_stmt(s, types, split)
        moves = dict(((r.name, r.indices), tuple(m)) for r, m in comm.operands)
        x, w = factors[form[0]], factors[form[1]]
        in_low = low is not None and not comm.reduce and s.name not in graph.outputs
        key = None
        if not moves.get((w.name, w.indices)):
            key = ((owner.index, owner.carry) if owner is not None else None, x.name, x.indices, moves.get((x.name, x.indices), ()),
                   form[2], form[3], form[5], form[6], low or "f32", in_low)
        chosen.append((s.name, key, form))
    return chosen


class Int8MatmulEmitter:
    """Emits the kernel call for a product that int8_matmul routes through it (int8_product),
    and one int8_gemv_siblings call for a group of products that share their activation
    (sibling_groups): at the group's first member in emission order, for all members; the
    others then find their result bound."""

    def int8_product(self, s: g.Statement, factors, vals, args: list[str], out: tuple, product: str,
                     out_dtype: str) -> bool:
        """Write `s` as one int8_gemv call and return True, or return False (the einsum code).
        args: the factors' code, cast to the `product` dtype where the einsum casts them;
        out_dtype: the dtype the einsum would return."""
        if not kernel_rows_limit(self.int8_matmul_mode, self.platform):
            return False
        weights = [(d := self.graph.decl(f.name)) is not None and d.kind == "param" for f in factors]
        local = {}
        for f, v in zip(factors, vals):
            local.update(zip(f.indices, self.local(f.indices, v.layout)))
        form = kernel_form(factors, [v.dtype for v in vals], weights, out, local, product,
                           self.int8_matmul_mode, self.platform)
        if form is None:
            return False
        xi, wi, rows, summed, columns, M, K, N = form
        x_code = self.transpose(args[xi], factors[xi].indices, rows + summed)
        group = self.int8_siblings.get(s.name)
        if group is not None and s.name in self.int8_siblings_done:
            self.w(f"# (computed by the int8_gemv_siblings call of {one_line(', '.join(group[0]))} above)")
            return True
        if group is not None and group[1][group[0].index(s.name)] == form:
            self.sibling_call(group, x_code, [local[i] for i in rows], product, out_dtype)
            return True
        y = (f"int8_gemv({x_code}.reshape({M}, {K}), {vals[wi].var}.reshape({K}, {N}), "
             f"out_dtype={DTYPE_CODE[out_dtype]})")
        shape = tuple_code(local[i] for i in rows + columns)
        var = self.ns.tensor(s.name)
        self.w(f"# int8 weight product through the Pallas kernel (int8_matmul={self.int8_matmul_mode}): "
               f"[{M}, {K}] {product} x [{K}, {N}] i8")
        self.w(f"{var} = {self.transpose(f'{y}.reshape({shape})', rows + columns, out)}")
        self.uses_int8_gemv = True
        return True

    def sibling_call(self, group, x_code: str, row_sizes: list, product: str, out_dtype: str) -> None:
        """All of a sibling group's products as one int8_gemv_siblings call on the shared
        activation `x_code` (already in rows + summed order), each result bound to its
        statement's variable in the statement's axis order. The members share their rows
        (sibling_groups' key), so `row_sizes` (the calling member's) serve all."""
        names, forms = group
        M, K = forms[0][5], forms[0][6]
        ws, shapes, ns = [], [], []
        for name, (xi, wi, rows, summed, columns, _, _, N) in zip(names, forms):
            st = self.graph.stmt(name)
            weight = g.product_factors(st.op.expr)[wi]
            ws.append(f"{self.vals[weight.name].var}.reshape({K}, {N})")
            sizes = dict(zip(weight.indices, self.local(weight.indices, self.vals[weight.name].layout)))
            ns.append(str(N))
            shapes.append((rows, columns, sizes))
        outs = [self.ns.tensor(n) for n in names]
        self.w(f"# int8 weight products of {one_line(', '.join(names))}: one Pallas kernel call on their shared "
               f"input (int8_matmul={self.int8_matmul_mode}): [{M}, {K}] {product} x [{K}, {' | '.join(ns)}] i8")
        self.w(f"{', '.join(outs)} = int8_gemv_siblings({x_code}.reshape({M}, {K}), ({', '.join(ws)}), "
               f"out_dtype={DTYPE_CODE[out_dtype]})")
        for name, var, (rows, columns, sizes) in zip(names, outs, shapes):
            shape = tuple_code(tuple(row_sizes) + tuple(sizes[i] for i in columns))
            st = self.graph.stmt(name)
            self.w(f"{var} = {self.transpose(f'{var}.reshape({shape})', rows + columns, st.type.indices)}")
        self.int8_siblings_done.update(names)
        self.uses_int8_gemv_siblings = True
