"""Meshes, hardware, and the cost model (einpart.passes.shard: mesh, hardware, cost).

The closed-form checks compare the cost model with Pope et al. 2022
("Efficiently Scaling Transformer Inference", arXiv 2211.05102, sec. 3.2.1 and
3.2.2) on a plain feed-forward layer at PaLM 540B sizes on 64 TPU v4 chips.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest

from einpart.errors import EinpartError
from einpart.ir import layout as lay
from einpart.ir.parser import parse, parse_file
from einpart.passes.shard import plan
from einpart.passes.shard.cost import (Pricer, enumerate_layouts, price_moves, reshard_time,
                                       stmt_indices, stmt_strategies)
from einpart.passes.shard.hardware import PRESETS, TPU_V4, Link, load_hardware
from einpart.passes.shard.mesh import parse_mesh
from einpart.ir.verify import index_sizes

GiB = 2 ** 30


# ------------------------------------------------------------------ meshes
def test_mesh_forms():
    assert parse_mesh("x=4,y=4,z=4") == (("x", 4), ("y", 4), ("z", 4))
    assert parse_mesh("(x=2, y=4)") == (("x", 2), ("y", 4))
    assert parse_mesh("2x4") == (("x", 2), ("y", 4))
    assert parse_mesh("8") == (("x", 8),)
    assert parse_mesh("2x2x2x2x2")[-1] == ("a4", 2)


@pytest.mark.parametrize("text, words", [
    ("x=4,x=2", "named twice"), ("x=0", "at least 1"), ("x=a", "positive integer"), ("", "empty"),
    ("2xq", "expected sizes"), ("x4", "expected sizes"), ("1x=2", "identifier"), ("x=", "NAME=SIZE"),
])
def test_mesh_errors_are_one_line(text, words):
    with pytest.raises(EinpartError) as e:
        parse_mesh(text)
    assert words in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- hardware
def test_presets_have_the_papers_constants():
    tpu = PRESETS["tpu-v4"]
    assert (tpu.flops_bf16, tpu.flops_int8, tpu.hbm_bandwidth, tpu.hbm_bytes) == (275e12, 275e12, 1.2e12, 32 * GiB)
    assert tpu.link.bandwidth == 270e9 and tpu.combine == "min"
    assert PRESETS["tpu-v4-torus"].link.bandwidth * 3 == 270e9
    assert PRESETS["h100"].link.bandwidth == 450e9 and PRESETS["h200"].hbm_bytes == 141e9
    assert set(PRESETS) >= {"tpu-v4", "h100", "h200", "cpu"}


def test_gpu_axes_spanning_nodes_use_the_network():
    links = PRESETS["h100"].axis_links((("x", 2), ("y", 8)))
    assert links["y"].bandwidth == 450e9          # the minor axis stays inside a node of 8
    assert links["x"].bandwidth == 50e9           # the major axis crosses nodes


def test_hardware_files(tmp_path):
    t = tmp_path / "chip.toml"
    t.write_text('base = "tpu-v4"\nname = "mine"\nhbm_bytes = 16e9\n[axes.z]\nbandwidth = 1e9\n')
    hw = load_hardware(str(t))
    assert hw.name == "mine" and hw.hbm_bytes == 16e9 and hw.flops_bf16 == 275e12
    assert hw.axis_links((("x", 2), ("z", 2)))["z"] == Link(1e9, TPU_V4.link.latency)
    j = tmp_path / "chip.json"
    j.write_text(json.dumps({"flops_bf16": 1e12, "flops_int8": 2e12, "hbm_bandwidth": 1e11, "hbm_bytes": 8e9,
                             "link": {"bandwidth": 1e10, "latency": 1e-6}, "combine": "sum"}))
    assert load_hardware(str(j)).combine == "sum"


@pytest.mark.parametrize("body, field", [
    ('base = "tpu-v4"\nflops_bf16 = "fast"\n', "flops_bf16"),
    ('base = "tpu-v4"\nhbm_bytes = -1\n', "hbm_bytes"),
    ('base = "tpu-v4"\nspeed = 3\n', "speed"),
    ('flops_bf16 = 1.0\n', "flops_int8"),
    ('base = "tpu-v4"\ncombine = "max"\n', "combine"),
    ('base = "tpu-v4"\n[link]\nbandwidth = 0\n', "link.bandwidth"),
    ('base = "tpu-v4"\n[link]\nlatncy = 1\n', "link.latncy"),
    ('base = "tpu-v9"\n', "base"),
    ('flops_bf16 = [1\n', "TOML"),
])
def test_hardware_file_errors_name_the_field(tmp_path, body, field):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(EinpartError) as e:
        load_hardware(str(f))
    assert field in str(e.value) and "\n" not in str(e.value)


def test_unknown_hardware():
    with pytest.raises(EinpartError, match="not a preset"):
        load_hardware("tpu-v99")


# ------------------------------------------------------------- collectives
def test_alpha_beta_collectives():
    hw = replace(TPU_V4, link=Link(100e9, 1e-6))
    p = Pricer(hw, (("x", 4), ("y", 2)))
    assert p.time("all_gather", 8e6, ("x",)) == pytest.approx(0.75 * 8e6 / 100e9 + 3e-6)
    assert p.time("psum", 8e6, ("x", "y")) == pytest.approx(2 * 7 / 8 * 8e6 / 100e9 + 2 * 4e-6)
    assert p.time("psum_scatter", 8e6, ("y",)) == pytest.approx(0.5 * 8e6 / 100e9 + 1e-6)
    assert p.time("slice", 8e6, ("x",)) == 0.0
    torus = Pricer(replace(hw, combine="sum"), (("x", 4), ("y", 2)))
    assert torus.time("all_gather", 8e6, ("x", "y")) == pytest.approx(7 / 8 * 8e6 / 200e9 + 4e-6)


def test_fast_reshard_price_matches_layout_reshard():
    """The planner prices reshards as a*bytes+b from layout.reshard's moves; that must
    equal walking the moves with price_moves for every pair of layouts."""
    mesh = (("x", 2), ("y", 4), ("z", 2))
    pricer = Pricer(TPU_V4, mesh)
    idx = ("a", "b", "c")
    sizes = {"a": 16, "b": 32, "c": 8}
    layouts = enumerate_layouts(idx, [sizes], mesh)
    rng = random.Random(0)
    for _ in range(400):
        src, dst = rng.choice(layouts), rng.choice(layouts)
        moves = lay.reshard(src, {i: dst.get(i, ()) for i in idx}, idx)
        want, _ = price_moves(moves, src, idx, sizes, pricer, 2)
        key = lambda lt: tuple(tuple(lt.get(i, ())) for i in idx)  # noqa: E731
        got = reshard_time(tuple(sizes[i] for i in idx), 2, key(src), key(dst), pricer)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_positional_reshard_makes_layout_reshards_moves():
    """cost._positional_reshard (the planner's fast path) returns layout.reshard's
    moves, in its order, for every pair of layouts of three indices on a
    three-axis mesh: all-to-alls, their ordering cycles and the gathers."""
    from einpart.passes.shard.cost import _positional_reshard
    mesh = (("x", 2), ("y", 2), ("z", 2))
    idx = ("a", "b", "c")
    layouts = enumerate_layouts(idx, [{"a": 8, "b": 8, "c": 8}], mesh)
    key = lambda lt: tuple(tuple(lt.get(i, ())) for i in idx)  # noqa: E731
    kinds = set()
    for src in layouts:
        for dst in layouts:
            moves = lay.reshard(src, dst, idx)
            want = tuple((c.kind, idx.index(c.index), c.axes, idx.index(c.other) if c.other else -1) for c in moves)
            assert _positional_reshard(key(src), key(dst)) == want, (src, dst)
            kinds |= {c.kind for c in moves}
    assert kinds == {"all_gather", "slice", "all_to_all"}
    assert len(layouts) > 50


def test_reshard_table_prices_every_pair_as_reshard_coeffs_does():
    """ReshardTable prices a pair through the same pair without the tensor axes
    unsharded in both (cost.unsharded_dropped), shared by the pairs that differ
    only there: the (a, b) it gives is reshard_coeffs' of the full pair, bit for
    bit, for every pair of layouts of three indices on a mesh whose axes have
    different sizes and links (asked in two overlapping batches, with repeats)."""
    import numpy as np
    from einpart.passes.shard.cost import ReshardTable, reshard_coeffs, unsharded_dropped
    mesh = (("x", 2), ("y", 4), ("z", 2))
    pricer = Pricer(TPU_V4, mesh)
    idx = ("a", "b", "c")
    layouts = enumerate_layouts(idx, [{"a": 16, "b": 16, "c": 16}], mesh)
    key = lambda lt: tuple(tuple(lt.get(i, ())) for i in idx)  # noqa: E731
    tab = ReshardTable(pricer)
    ids = [tab.id(key(lt)) for lt in layouts]
    half = len(ids) // 2
    tab.coeffs(ids[:half] + ids[:3], ids[half // 2:])
    a, b = tab.coeffs(ids, ids)
    shared = 0
    for r, i in enumerate(ids):
        for c, j in enumerate(ids):
            src, want = tab.layouts[i], tab.layouts[j]
            ra, rb = (0.0, 0.0) if src == want else reshard_coeffs(src, want, pricer)
            assert (a[r, c], b[r, c]) == (ra, rb), (src, want)
            shared += unsharded_dropped(src, want) != (src, want)
    assert shared > len(ids)                  # the shortcut was taken
    assert len(tab._priced) < len(ids) ** 2 - len(ids)
    assert np.count_nonzero(a) > len(ids)     # not all free


def test_enumerated_splits_are_legal_and_complete():
    gr = parse_file("examples/palm.ein")
    sizes = index_sizes(gr)
    mesh = (("x", 2), ("y", 2))
    s = gr.stmt("q")
    splits = enumerate_layouts(stmt_indices(s), [sizes], mesh)
    assert all(lay.split_problem(s, sp, sizes, dict(mesh)) is None for sp in splits)
    # each of 2 axes to one of 5 indices or none, with orders: 1 + 2*5 + 5*6 = 41, less
    # the 2 orders that split b (B = 2) four ways
    assert len(splits) == 39
    assert len(enumerate_layouts(("b", "d"), [{"b": 2, "d": 3}], mesh)) == 3   # none, b@x, b@y


def test_reduce_variants_agree_with_plan_stmt():
    """Every strategy's reduction and stored layout are what layout.plan_stmt derives."""
    gr = parse_file("examples/palm.ein")
    sizes = index_sizes(gr)
    mesh = (("x", 2), ("y", 4))
    pricer = Pricer(PRESETS["cpu"], mesh)
    types = gr.types()
    for name in ("q", "mlp", "mx", "z", "x0", "logits"):
        s = gr.stmt(name)
        for st in stmt_strategies(s, types, [sizes], pricer, PRESETS["cpu"], sizes):
            for v in st.variants:
                tys = dict(types)
                for r in lay.stmt_refs(s):
                    tys[r.name] = lay.with_layout(types[r.name], {j: st.split.get(i, ())
                                                                  for i, j in zip(r.indices, types[r.name].indices)})
                s2 = replace(s, type=lay.with_layout(s.type, dict(zip(s.type.indices, v.out))))
                comm = lay.plan_stmt(s2, tys, st.split)
                assert comm.reduce == v.reduce and not comm.result
                assert all(not cs for _, cs in comm.operands)


# -------------------------------------------------- Pope et al. closed forms
FFN = """
size B = 64, T = 1, E = 18432, F = 73728
index b: B, t: T, e: E, f: F
input x[b, t, e] : bf16
param w_in[e, f] : bf16
param w_out[f, e] : bf16
h[b, t, f] : bf16 = x[b, t, e] * w_in[e, f]
a[b, t, f] : bf16 = gelu(h[b, t, f])
y[b, t, e] : bf16 = a[b, t, f] * w_out[f, e]
output y
"""
XYZ = ("x", "y", "z")
NO_LATENCY = replace(TPU_V4, link=Link(270e9, 0.0))   # the closed forms have no latency term


def ffn_plan(fix):
    return plan(parse(FFN), "x=4,y=4,z=4", NO_LATENCY, "prefill", memory_limit=None, fix=fix).phases["prefill"]


def ffn_comm(fix) -> float:
    return sum(s.comm_s for s in ffn_plan(fix).stmts)


TWO_D = {"x": {"e": XYZ}, "w_in": {"e": ("x",), "f": ("y", "z")},
         "w_out": {"f": ("y", "z"), "e": ("x",)},
         "h": ({"e": ("x",), "f": ("y", "z")}, {"f": ("y", "z", "x")}),
         "a": {"f": ("y", "z", "x")},
         "y": ({"f": ("y", "z"), "e": ("x",)}, {"e": ("x", "y", "z")})}


BLE = 64 * 1 * 18432 * 2          # bytes of the activations (bf16)
BW = 270e9
N = 64


def test_closed_form_1d_weight_stationary():
    """Sec. 3.2.1: all-gather the input and reduce-scatter the output over all n
    chips: 2BLE/bw, independent of n (exactly 2(n-1)/n BLE/bw)."""
    comm = ffn_comm({"x": {"e": XYZ}, "w_in": {"f": XYZ}, "w_out": {"f": XYZ},
                     "h": {"f": XYZ}, "a": {"f": XYZ}, "y": ({"f": XYZ}, {"e": XYZ})})
    assert comm == pytest.approx(2 * (N - 1) / N * BLE / BW, rel=1e-9)
    assert comm == pytest.approx(2 * BLE / BW, rel=0.02)          # the paper's form, within 2%


def test_closed_form_2d_weight_stationary():
    """Sec. 3.2.2: E split X = 4 ways, F split YZ = 16 ways (X = sqrt(n)/2 at
    F = 4E): 2BLE/(X bw) + 2BLF/(YZ bw) = 8BLE/(sqrt(n) bw); with the (k-1)/k
    factors of each collective exactly 0.84375 of that."""
    comm = ffn_comm(TWO_D)
    ble_f = 4 * BLE
    exact = (2 * (15 / 16) * BLE / 4 + 2 * (3 / 4) * ble_f / 16) / BW
    assert comm == pytest.approx(exact, rel=1e-9)
    paper = 8 * BLE / (math.sqrt(N) * BW)
    assert 0.80 <= comm / paper <= 1.0                              # "about": 0.84 of the paper's form
    one_d = 2 * (N - 1) / N * BLE / BW
    assert comm < 0.5 * one_d                                       # 2D wins at 64 chips


def test_free_plan_is_no_worse_than_the_forced_ones():
    """With only the input and output layouts pinned, the planner does at least as
    well as 2D weight-stationary (the optimum of the paper's family here)."""
    free = ffn_plan({"x": {"e": XYZ}}).step_s
    assert free <= ffn_plan(TWO_D).step_s * (1 + 1e-9)
