"""Counting collectives: in a generated module, and in a priced plan.

The two must agree (tests/test_sharded_norm.py, benchmarks/collectives.py):
codegen emits one line per collective (a merged group is one `lax.psum` on
a tuple), and report.price_graph lists one entry per collective per
statement, a merged group's entries sharing one description.
"""
from __future__ import annotations

import re

# `pmax(` alone is the module's differentiable helper (collectives.PMAX_HELPER) around lax.pmax
COLLECTIVE_CALL = re.compile(r"(?<![\w.])(?:lax\.)?(psum_scatter|psum|pmax|all_gather|all_to_all)\(")


def _function(source: str, name: str, indent: str = "") -> str:
    """The text of `def name...` (top level, or nested at `indent`) up to the next line at its indent."""
    lines = source.splitlines()
    head = re.compile(rf"^{indent}def {re.escape(name)}\b")
    for n, line in enumerate(lines):
        if head.match(line):
            body = [line]
            for nxt in lines[n + 1:]:
                if nxt.strip() and not nxt.startswith(indent + " "):
                    break
                body.append(nxt)
            return "\n".join(body)
    raise KeyError(name)


def emitted(source: str, program: str) -> dict:
    """Collectives in a generated program: {'layer': per layer (the repeat body),
    'outside': the rest of the program, 'kinds': per kind, per layer}."""
    text = _function(source, program)
    layer_fns = re.findall(r"^    def (layer_\w+)\(", text, re.M)
    layer = "\n".join(_function(text, fn, "    ") for fn in layer_fns)
    in_layer = COLLECTIVE_CALL.findall(layer)
    kinds: dict = {}
    for k in in_layer:
        kinds[k] = kinds.get(k, 0) + 1
    return {"layer": len(in_layer), "outside": len(COLLECTIVE_CALL.findall(text)) - len(in_layer),
            "kinds": kinds}


def priced(report, skip=frozenset()) -> dict:
    """Collectives a PhaseReport prices: {'layer', 'outside', 'layer_comm_s'} (a merged
    group counted once; local slices are no collective; layer_comm_s: seconds of one
    layer's collectives). skip: statements not in the step (weight preparation)."""
    seen: set = set()
    out = {"layer": 0, "outside": 0, "layer_comm_s": 0.0}
    for s in report.stmts:
        if s.name in skip:
            continue
        where = "layer" if s.in_repeat else "outside"
        if s.in_repeat:
            out["layer_comm_s"] += s.comm_s
        for desc, _ in s.collectives:
            if desc.startswith("slice("):
                continue
            if " on (" in desc:                      # a merged group: one collective
                if desc in seen:
                    continue
                seen.add(desc)
            out[where] += 1
    return out
