"""benchmarks/decode_batched.py --quick: the table's structure, and its bandwidth, bytes and
roofline numbers recomputed here from shapes and the raw measurements."""

from __future__ import annotations

import contextlib
import io
import json
import statistics

import jax
import pytest
from benchmark_scripts import load_script

from rocketkv_jax.bench import measure as bd
from rocketkv_jax.bench.measure import broadcast_rows
from rocketkv_jax.models.params import random_params

db = load_script("decode_batched")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode_batched") / "quick.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = db.main(["--quick", "--json", str(out)])
    return code, buf.getvalue(), json.loads(out.read_text()), out


def _table(stdout: str, title_start: str) -> list[list[str]]:
    lines = stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(title_start))
    rows = []
    for line in lines[i + 1:]:
        if not line.strip() or line.startswith("  "):
            break
        rows.append(line.split())
    return rows


def _quick_grid():
    methods = db.QUICK["methods"].split(",")
    batches = [int(b) for b in db.QUICK["batches"].split(",")]
    contexts = [int(t) for t in db.QUICK["contexts"].split(",")]
    budgets = [int(m) for m in db.QUICK["budgets"].split(",")]
    return methods, batches, contexts, budgets


def test_quick_prints_a_speedup_for_every_cell(quick):
    code, stdout, _, _ = quick
    assert code == 0
    methods, batches, contexts, budgets = _quick_grid()
    header, *rows = _table(stdout, "Decode step speedup vs full KV")
    # "full ms" splits in two; the A/A column (full KV against itself) is on by default
    assert header == ["B", "T", "M", "full", "ms", *methods[1:], db.AA]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
        (B, T, M) for B in batches for T in contexts for M in budgets]
    for r in rows:
        assert all(float(x) > 0 for x in r[3:])
    header, *rows = _table(stdout, "Measured / roofline")
    assert header[5:] == [*methods, db.AA]  # this one has full's own column
    assert "Targets:" in stdout and "wall time" in stdout


def test_every_step_is_recorded_with_its_interleaved_full(quick):
    _, _, res, _ = quick
    methods, batches, contexts, budgets = _quick_grid()
    (rec,) = res["models"]
    cells = {(s["B"], s["T"], s["M"], s["method"]): s for s in rec["steps"]}
    assert set(cells) == {(B, T, M, m) for B in batches for T in contexts for M in budgets
                          for m in [*methods, db.AA]}
    for s in rec["steps"]:
        assert "full" in s["group_methods"] and s["method"] in s["group_methods"]
        assert len(s["times_s"]) == db.QUICK["iters"]
        assert s["median_s"] == pytest.approx(statistics.median(s["times_s"]))
        assert s["speedup"] == pytest.approx(s["full_median_s"] / s["median_s"])
        if s["method"] == "full":
            assert s["speedup"] == pytest.approx(1.0) and s["byte_bound"] == pytest.approx(1.0)


def test_bandwidth_and_roofline_are_consistent(quick):
    _, _, res, _ = quick
    assert [b["when"] for b in res["bandwidth"]] == ["before the grid", "after the grid"]
    for b in res["bandwidth"]:
        assert len(b["copy_all"]) == len(b["read_all"]) == db.QUICK["bandwidth_repeats"]
        assert b["copy_GBps"] == max(b["copy_all"]) and b["read_GBps"] == max(b["read_all"])
        assert 0.1 < b["copy_GBps"] < 10_000 and 0.1 < b["read_GBps"] < 10_000
    bw = max(x for b in res["bandwidth"] for x in b["copy_all"] + b["read_all"]) * 1e9
    assert res["roofline_bandwidth_GBps"] == pytest.approx(bw / 1e9)
    (rec,) = res["models"]
    c = bd.TINY_CONFIG
    params = sum(x.size for x in jax.tree.leaves(random_params(c)))  # untied: embed + head
    assert rec["weights_bytes"] == (params - (c.vocab_size - 1) * c.hidden_size) * 4  # one row
    token = c.num_layers * c.num_kv_heads * 2 * c.head_dim * 4  # K + V, all layers, f32
    full = {(s["B"], s["T"], s["M"]): s for s in rec["steps"] if s["method"] == "full"}
    for s in rec["steps"]:
        if s["method"] == "full":
            assert s["kv_read_bytes"] == s["B"] * (s["T"] + 1) * token
        assert s["step_bytes"] == rec["weights_bytes"] + s["kv_read_bytes"]
        assert s["roofline_s"] == pytest.approx(s["step_bytes"] / bw)
        assert s["over_roofline"] == pytest.approx(s["median_s"] * bw / s["step_bytes"])
        f = full[(s["B"], s["T"], s["M"])]
        assert s["byte_bound"] == pytest.approx(f["step_bytes"] / s["step_bytes"])
        assert s["h100_bound"] is not None and s["h100_bound"] >= 0.99


def test_report_reprints_the_tables(quick):
    _, stdout, _, path = quick
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert db.main(["--report", str(path)]) == 0
    title = "Decode step speedup vs full KV"
    assert _table(buf.getvalue(), title) == _table(stdout, title)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert db.main(["--report", str(path), "--markdown"]) == 0
    assert "| B | T | M | full ms |" in buf.getvalue()


def test_methods_that_do_not_fit_together_are_split_into_groups():
    sizes = {"full": 10, "a": 1, "b": 9, "c": 8, "d": 30}
    groups, skipped = db.group_methods(sizes, room=20)
    assert skipped == ["d"]
    assert groups == [["full", "a", "c"], ["full", "b"]]  # smallest first, first fit
    assert all(sum(sizes[m] for m in g) <= 20 for g in groups)
    assert db.group_methods({"full": 5}, room=20) == ([["full"]], [])


def test_report_finishes_a_partial_run(quick, tmp_path):
    _, _, res, _ = quick
    partial = {k: v for k, v in res.items()
               if k not in ("targets", "h100_bound", "roofline_bandwidth_GBps", "wall_s")}
    partial["bandwidth"] = res["bandwidth"][:1]  # killed before the second measurement
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(partial))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert db.main(["--report", str(path)]) == 0
    out = buf.getvalue()
    assert "a partial run" in out and "Targets:" in out
    assert f"{res['bandwidth'][0]['best_GBps']:.1f} GB/s" in out


def test_aa_times_full_against_itself_beside_full(quick):
    """The A/A column: the same step as full KV on its own cache copy, in full's group; its
    spread is reported with the targets and stays out of the method cells."""
    _, stdout, res, _ = quick
    (rec,) = res["models"]
    full = {(s["B"], s["T"], s["M"]): s for s in rec["steps"] if s["method"] == "full"}
    aa = [s for s in rec["steps"] if s["method"] == db.AA]
    assert len(aa) == len(full)
    for s in aa:
        f = full[s["B"], s["T"], s["M"]]
        assert s["group"] == 0 and s["plan"] == f["plan"] == "DensePlan"
        assert s["kv_read_bytes"] == f["kv_read_bytes"] and s["byte_bound"] == pytest.approx(1)
        assert s["speedup"] == pytest.approx(f["median_s"] / s["median_s"])
    t = res["targets"]
    assert t["aa"]["cells"] == len(aa)
    assert t["aa"]["min"] == pytest.approx(min(s["speedup"] for s in aa))
    assert t["cells"] == len(rec["steps"]) - 2 * len(aa)  # neither full nor A/A is a method
    assert "A/A (full KV against itself)" in stdout


def test_no_aa_drops_the_column(tmp_path):
    out = tmp_path / "no-aa.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert db.main(["--quick", "--batches", "1", "--methods", "rocketkv", "--no-aa",
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {s["method"] for s in res["models"][0]["steps"]} == {"full", "rocketkv"}
    assert "aa" not in res["targets"]


def test_targets_count_slow_cells_and_keep_the_oracle_apart():
    def step(method, speedup, B=8, T=32768, M=256):
        return {"B": B, "T": T, "M": M, "method": method, "speedup": speedup, "plan": "P",
                "fallback": "", "byte_bound": 3.0, "over_roofline": 1.5}

    steps = [step("full", 1.0), step("rocketkv", 2.7), step("quest", 0.96),
             step("sparq", 0.94, M=2048), step("topk", 0.80, M=2048),
             step(db.AA, 0.97, M=2048), step(db.AA, 1.02)]
    per_layer = [step("full", 1.0), step("rocketkv", 2.1), step(db.AA, 1.01, M=2048)]
    t = db.targets({"models": [{"model": "llama8b-shape", "steps": steps},
                               {"model": "llama8b-shape", "layout": "per-layer",
                                "steps": per_layer}]})
    assert t["cells"] == 4 and t["oracle_cells"] == 1
    assert [(s["method"], s["M"]) for s in t["slower_than_full_by_5pct"]] == [("sparq", 2048)]
    assert t["slower_than_full_by_5pct"][0]["aa"] == 0.97  # the noise of its own cell
    # the per-layer run's A/A of the same (B, T, M) is another cell's noise
    assert t["aa"] == {"cells": 3, "min": 0.97, "max": 1.02, "outside_5pct": 0}
    assert [s["method"] for s in t["oracle_slower_than_full_by_5pct"]] == ["topk"]
    assert t["worst"]["method"] == "sparq"
    r = t["rocketkv_by_layout"]["stacked"]
    assert r["fraction_of_bound"] == pytest.approx(0.9) and r["met_80pct"]
    assert r["met_2x_roofline"]
    r = t["rocketkv_by_layout"]["per-layer"]
    assert r["fraction_of_bound"] == pytest.approx(0.7) and not r["met_80pct"]


def test_both_layouts_run_the_same_cells_as_models_of_their_own(tmp_path):
    out = tmp_path / "layouts.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = db.main(["--quick", "--batches", "1", "--methods", "rocketkv",
                        "--layout", "stacked,per-layer", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    recs = {r["layout"]: r for r in res["models"]}
    assert set(recs) == {"stacked", "per-layer"}
    assert "per-layer weights" in recs["per-layer"]["label"]
    assert "per-layer weights" in buf.getvalue()

    def cells(r):
        return sorted((s["B"], s["T"], s["M"], s["method"]) for s in r["steps"])

    assert cells(recs["stacked"]) == cells(recs["per-layer"]) != []


def test_attention_baseline_runs_beside_full_and_stays_out_of_the_targets(tmp_path):
    out = tmp_path / "baseline.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = db.main(["--quick", "--batches", "1", "--methods", "rocketkv",
                        "--attention-baseline", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    steps = {s["method"]: s for s in res["models"][0]["steps"]}
    ref = steps[db.REFERENCE]
    assert ref["group"] == 0 and "full" in ref["group_methods"]  # interleaved with full
    assert ref["speedup"] == pytest.approx(steps["full"]["median_s"] / ref["median_s"])
    assert ref["kv_read_bytes"] == steps["full"]["kv_read_bytes"]
    assert res["targets"]["cells"] == 1  # rocketkv only
    assert db.REFERENCE in buf.getvalue()


@pytest.mark.parametrize("layout", ["columns", "stacked,stacked", ","])
def test_bad_layout_is_refused(layout, capsys):
    assert db.main(["--quick", "--layout", layout]) != 0
    assert "--layout" in capsys.readouterr().err


@pytest.mark.parametrize("name,kw", [("full", {}), ("quest", {"token_budget": 64}),
                                     ("rocketkv", {"token_budget": 64, "stage2": "on"}),
                                     ("snapkv", {"token_budget": 64, "skip_layers": 1})])
def test_one_row_compressed_then_broadcast_equals_compressing_every_row(name, kw):
    import numpy as np

    from rocketkv_jax.methods.registry import make_method
    from rocketkv_jax.models.plan import compress_layers

    cfg = bd.load_bench_model("tiny").config
    T, B = 200, 3
    plan = make_method(name, **kw).plan(cfg, T, 16)
    base = bd.synthetic_capture(cfg, T + 40, 1, seed=1)
    rows = db.batch_capture(base, T, B)
    want = compress_layers(plan, rows.k, rows.v, rows.q, rows.lengths)
    one = db.batch_capture(base, T, 1)
    struct = jax.eval_shape(lambda r: compress_layers(plan, r.k, r.v, r.q, r.lengths),
                            db.capture_struct(cfg, T, B))
    got = broadcast_rows(compress_layers(plan, one.k, one.v, one.q, one.lengths), struct)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_broadcast_rows_refuses_a_leaf_that_is_not_one_row():
    x = {"a": jax.numpy.zeros((2, 2, 5))}
    with pytest.raises(ValueError, match="cannot broadcast"):
        broadcast_rows(x, {"a": jax.ShapeDtypeStruct((2, 4, 5), jax.numpy.float32)})
