"""Facts about a graph that several passes need."""
from __future__ import annotations

from . import graph as g
from .verify import stmt_inputs


def param_only(graph: g.Graph) -> set[str]:
    """Statements computed from parameters alone (directly or through each other).

    They are weight preparation (a folded norm gain, an int8 quantisation):
    the same for every step, so the runtime computes them once at load time
    and the planner counts them as weights, not as per-step work. The
    interpreter simply evaluates them every step, which defines their meaning.
    """
    params = {d.name for d, _ in graph.all_decls() if d.kind == "param"}
    known = set(params)
    changed = True
    while changed:
        changed = False
        for s, _ in graph.all_stmts():
            if s.name in known or isinstance(s.op, (g.Repeat, g.Write)):
                continue
            if isinstance(s.op, g.Take) or isinstance(s.op, g.Rope):
                continue  # these depend on positions / token ids
            if isinstance(s.op, g.Compute) and g.has_causal(s.op.expr):
                continue
            if stmt_inputs(s) <= known:
                known.add(s.name)
                changed = True
    return known - params
