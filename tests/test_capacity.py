"""`einpart plan --report context`: the longest context that fits, from the
planner's own KV-cache accounting, against Table 1 of Pope et al. 2022
(PaLM 540B, 64 TPU v4 chips, 30% of HBM for the cache):

    batch   multihead   multiquery, heads   multiquery, batch
    128       1,320           660               43,000
    512         330           165               10,700

The multihead variant is palm.ein with one key/value head per query head
(derived below, line by line); the multiquery one is palm.ein as shipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from einpart.cli import main
from einpart.errors import EinpartError
from einpart.ir import parse
from einpart.ir.model import Reference, init_params
from einpart.passes import run_pipeline
from einpart.passes.shard.capacity import Variant, context_report, format_context

PALM = Path(__file__).resolve().parents[1] / "examples" / "palm.ein"
BIG = {"D": 18432, "F": 73728, "L": 118, "V": 256000}
MESH = "x=4,y=4,z=4"
# palm.ein's multiquery lines, and their multihead form (one K/V head per query head h)
MULTIHEAD = [
    ("param wk[d, k]", "param wk[d, h, k]"), ("param wv[d, k]", "param wv[d, h, k]"),
    ("state k_cache[b, s, k]", "state k_cache[b, s, h, k]"), ("state v_cache[b, s, k]", "state v_cache[b, s, h, k]"),
    ("kn[b, t, k] = h1[b, t, d] * wk[d, k]", "kn[b, t, h, k] = h1[b, t, d] * wk[d, h, k]"),
    ("vn[b, t, k] = h1[b, t, d] * wv[d, k]", "vn[b, t, h, k] = h1[b, t, d] * wv[d, h, k]"),
    ("kr[b, t, k] = rope(kn[b, t, k], t, k)", "kr[b, t, h, k] = rope(kn[b, t, h, k], t, k)"),
    ("kc[b, s, k] = write(k_cache[b, s, k], kr[b, t, k])", "kc[b, s, h, k] = write(k_cache[b, s, h, k], kr[b, t, h, k])"),
    ("vc[b, s, k] = write(v_cache[b, s, k], vn[b, t, k])", "vc[b, s, h, k] = write(v_cache[b, s, h, k], vn[b, t, h, k])"),
    ("qr[b, t, h, k] * kc[b, s, k]", "qr[b, t, h, k] * kc[b, s, h, k]"),
    ("p[b, h, t, s] * vc[b, s, k]", "p[b, h, t, s] * vc[b, s, h, k]"),
]


def multihead_text() -> str:
    text = PALM.read_text()
    for old, new in MULTIHEAD:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def bf16(text: str, **sizes):
    return run_pipeline(parse(text, sizes=sizes), "cast{dtype=bf16}").graph


def test_multihead_palm_is_palm_with_per_head_kv():
    """With every head's K/V weights equal to palm's one head, the multihead spec computes palm."""
    mq, mh = parse(PALM.read_text()), parse(multihead_text())
    p = init_params(mq, 0)
    H = 4
    ph = dict(p, wk=np.repeat(p["wk"][:, :, None, :], H, axis=2), wv=np.repeat(p["wv"][:, :, None, :], H, axis=2))
    toks = np.random.default_rng(0).integers(0, 256, (2, 6))
    a, _ = Reference(mq, p).step(toks, 0, Reference(mq, p).new_state(2))
    b, _ = Reference(mh, ph).step(toks, 0, Reference(mh, ph).new_state(2))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_table1_of_pope_et_al():
    mh = bf16(multihead_text(), H=64, K=128, **BIG)       # 64 heads of 128: one per chip
    mq = bf16(PALM.read_text(), H=48, K=256, **BIG)        # PaLM 540B: one K/V head of 256
    rep = context_report([Variant("multihead", mh, "heads"), Variant("multiquery", mq, "heads"),
                          Variant("multiquery", mq, "batch")], MESH, "tpu-v4", [128, 512], 0.3)
    got = {(r.variant, r.layout, r.batch): r for r in rep.rows}
    paper = {("multihead", "heads", 128): 1320, ("multiquery", "heads", 128): 660, ("multiquery", "batch", 128): 43000,
             ("multihead", "heads", 512): 330, ("multiquery", "heads", 512): 165, ("multiquery", "batch", 512): 10700}
    for key, want in paper.items():
        assert abs(got[key].max_context - want) <= 0.1 * want, (key, got[key].max_context, want)
    # the layouts are the planner's, as pinned: one head per chip, replicated, split over the batch
    assert got["multihead", "heads", 128].cache_layout["k_cache"]["h"] == ("x", "y", "z")
    assert not any(got["multiquery", "heads", 128].cache_layout["k_cache"].values())
    assert got["multiquery", "batch", 512].cache_layout["v_cache"]["b"] == ("x", "y", "z")
    # and the numbers are the cache's bytes: K and V, bf16, 118 layers, per chip
    budget = 0.3 * 32 * 2 ** 30
    per_token = {"multihead": 2 * 64 * 128 * 2 * 118 / 64, "multiquery": 2 * 256 * 2 * 118}
    for (v, layout, b), r in got.items():
        per_chip = per_token[v] * b / (64 if layout == "batch" else 1)
        assert r.kv_bytes_per_token == pytest.approx(per_chip)
        assert r.max_context == int(budget // per_chip)
    table = format_context(rep, "palm.ein")
    assert "multiquery                   batch: b@(x,y,z)" in table and "42,653" in table


def test_cli_report_before_and_after_kv_groups(tmp_path, capsys):
    spec = tmp_path / "palm_multihead.ein"
    spec.write_text(multihead_text())
    code = main(["plan", str(spec), "--set", "D=18432,F=73728,L=118,V=256000,H=64,K=128", "--mesh", MESH,
                 "--hardware", "tpu-v4", "--report", "context", "--batch", "128,512", "--kv-fraction", "0.3",
                 "--kv-groups", "1", "--pipeline", "cast{dtype=bf16}", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {(r["variant"], r["layout"], r["batch"]): r["max_context"] for r in json.loads(out)["rows"]}
    assert rows == {
        ("cast{dtype=bf16}", "heads", 128): 1332, ("cast{dtype=bf16}", "heads", 512): 333,
        # multihead split over the batch holds as much per chip as split over the heads
        ("cast{dtype=bf16}", "batch", 128): 1332, ("cast{dtype=bf16}", "batch", 512): 333,
        # pooled into one head of 128: replicated it costs what 64 heads one per chip did; split over batch, 64x less
        ("multiquery{groups=1}", "heads", 128): 1332, ("multiquery{groups=1}", "heads", 512): 333,
        ("multiquery{groups=1}", "batch", 128): 85307, ("multiquery{groups=1}", "batch", 512): 21326}
    budget = 0.3 * 32 * 2 ** 30
    assert rows["multiquery{groups=1}", "batch", 128] == int(budget // (2 * 128 * 2 * 118 * 128 / 64))
    assert main(["plan", str(spec), "--mesh", "2x4", "--report", "context", "--batch", "4",
                 "--kv-layout", "auto"]) == 0
    assert "auto: " in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--batch", "4", "--kv-fraction", "0"], "--kv-fraction 0: must be in (0, 1]"),
    ([], "--report context needs --batch (one or more sizes, e.g. --batch 128,512)"),
    (["--batch", "4", "--kv-layout", "rows"], "--kv-layout: expected heads, batch, auto, got 'rows'"),
    (["--batch", "4,x"], "--batch 4,x: expected positive integers, e.g. 128 or 128,512"),
    (["--batch", "4", "--set", "H=6", "--mesh", "4"], "--kv-layout heads: 6 key/value heads cannot be split over 4 chips"),
])
def test_cli_report_bad_input(tmp_path, capsys, argv, message):
    spec = tmp_path / "palm_multihead.ein"
    spec.write_text(multihead_text())
    mesh = [] if "--mesh" in argv else ["--mesh", "2x4"]
    assert main(["plan", str(spec), "--report", "context", *mesh, *argv]) == 1
    assert capsys.readouterr().err == message + "\n"


def test_plain_plan_takes_one_batch(capsys):
    assert main(["plan", "palm", "--mesh", "2", "--batch", "2,4"]) == 1
    assert capsys.readouterr().err == "--batch 2,4: one batch size per plan (several only with --report context)\n"


def test_no_cache_is_an_error():
    g = parse("size B = 2, D = 4, E = 4\nindex b: B, d: D, e: E\ninput x[b, d]\nparam w[d, e]\n"
              "y[b, e] = x[b, d] * w[d, e]\noutput y\n")
    with pytest.raises(EinpartError) as e:
        context_report([Variant("x", g, "heads")], "2", "cpu", [2], 0.3)
    assert str(e.value) == "--report context: the spec has no KV cache write"
