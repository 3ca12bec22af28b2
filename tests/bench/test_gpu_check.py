"""benchmarks/gpu_check.py: its CPU smoke runs every part (so the GPU check cannot rot
between GPU leases), a part that fails or overruns is recorded while the next runs, and a
part stuck in a call that never returns is recorded as hung and ends the process."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from benchmark_scripts import load_script

gpu_check = load_script("gpu_check")

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_runs_every_part_and_writes_results(tmp_path):
    out = tmp_path / "check"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] and results["smoke"]
    parts = results["parts"]
    assert {k: p["status"] for k, p in parts.items()} == dict.fromkeys("abcdef", "ok")
    assert parts["a"]["counts"].get("SKIPPED", 0) > 0  # tests/gpu skips on a CPU
    # two pytest runs: the Triton tests, then the Mosaic ones
    assert [n.split(" (", 1)[0] for n in parts["a"]["notes"] if n.startswith("`-k")] == [
        "`-k 'not mosaic'`", "`-k 'mosaic'`"]
    for key in "bcde":
        assert parts[key]["rows"], key
        assert not any("error" in row for row in parts[key]["rows"]), parts[key]["rows"]
    kernels = {(row["kernel"], row["impl"]) for row in parts["b"]["rows"]}
    assert {k for k, _ in kernels} == {"sparse_decode_attention", "approx_scores",
                                       "prefill_attention"}
    assert {i for _, i in kernels} == {"interpret", "reference"}
    assert {row["method"] for row in parts["c"]["rows"]} == {"full", "rocketkv M=64"}
    assert all(row["generated"] == 16 for row in parts["d"]["rows"])
    assert {row["backend"] for row in parts["e"]["rows"]} == {"reference"}
    from rocketkv_jax.methods.cost_file import read

    _, constants = read(out / "cost-constants.json")  # the cost model accepts it
    assert set(constants) == {"reference"}
    summary = (out / "summary.md").read_text()
    for key, name in gpu_check.PARTS.items():
        assert f"## {key}. {name}" in summary
    assert (out / "pytest.log").is_file() and (out / "pytest-mosaic.log").is_file()
    assert "SKIPPED" in (out / "pytest-mosaic.log").read_text()
    from rocketkv_jax.kernels.backend import mosaic_jax_ok

    if mosaic_jax_ok():  # the Mosaic kernels in the Mosaic GPU interpreter beside Triton's
        rows = parts["f"]["rows"]
        assert {(row["kernel"], row["impl"]) for row in rows} == {
            (k, i) for k in ("sparse_decode_attention", "approx_scores")
            for i in ("interpret", "mosaic")}
        assert not any("error" in row for row in rows), rows
        assert all(row["vs_triton"] > 0 for row in rows if row["impl"] == "mosaic")
    else:
        assert parts["f"]["notes"][0].startswith("not run: the Mosaic GPU kernels need JAX")
        assert not parts["f"].get("rows")


def make_check(tmp_path, parts="ab", total_s=60.0):
    args = argparse.Namespace(out=tmp_path, smoke=True, parts=parts, total_s=total_s,
                              budgets=dict.fromkeys(gpu_check.PARTS, 30.0))
    check = gpu_check.Check(args)
    check.state["installed"] = True
    return check


def test_a_failing_part_is_recorded_and_the_next_runs(tmp_path):
    check = make_check(tmp_path)

    def broken(check, rec):
        check.add_row(rec, {"x": 1})
        raise RuntimeError("planted failure")

    def fine(check, rec):
        check.add_row(rec, {"x": 2})

    gpu_check.run_part(check, "a", broken)
    gpu_check.run_part(check, "b", fine)
    saved = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert saved["a"]["status"] == "error" and "planted failure" in saved["a"]["error"]
    assert saved["a"]["rows"] == [{"x": 1}]  # what it measured before failing is kept
    assert saved["b"]["status"] == "ok" and saved["b"]["rows"] == [{"x": 2}]
    assert "planted failure" in (tmp_path / "summary.md").read_text()


def test_a_part_past_its_budget_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "ALARM_GRACE_S", 0.1)
    check = make_check(tmp_path)
    check.args.budgets["a"] = 0.3

    def endless(check, rec):
        while True:
            time.sleep(0.01)

    t0 = time.perf_counter()
    gpu_check.run_part(check, "a", endless)
    assert time.perf_counter() - t0 < 5
    assert check.results["parts"]["a"]["status"] == "timeout"


def test_no_time_left_skips_the_part(tmp_path):
    check = make_check(tmp_path, total_s=1.0)
    gpu_check.run_part(check, "a", lambda check, rec: pytest.fail("must not run"))
    assert check.results["parts"]["a"]["status"] == "skipped"


HUNG = textwrap.dedent("""
    import argparse, json, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from benchmark_scripts import load_script

    gpu_check = load_script("gpu_check")
    gpu_check.ALARM_GRACE_S, gpu_check.HANG_GRACE_S = 0.1, 0.5
    args = argparse.Namespace(out=Path({out!r}), smoke=True, parts="abc", total_s=60.0,
                              budgets=dict.fromkeys(gpu_check.PARTS, 0.3))
    check = gpu_check.Check(args)
    check.state["installed"] = True

    def stuck(check, rec):
        check.add_row(rec, {{"x": 1}})
        # A call that never returns to Python, as a GPU kernel that never ends: the
        # alarm's handler cannot run in this thread.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)

    gpu_check.run_part(check, "a", lambda check, rec: None)
    gpu_check.run_part(check, "b", stuck)
    print("not reached")
""")


def test_a_part_stuck_in_a_call_is_recorded_as_hung_and_ends_the_process(tmp_path):
    script = HUNG.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, r.stderr[-3000:]
    assert time.perf_counter() - t0 < 60  # not the 60 s sleep
    assert "not reached" not in r.stdout
    parts = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert parts["a"]["status"] == "ok"
    assert parts["b"]["status"] == "hung" and "never ends" in parts["b"]["error"]
    assert parts["b"]["rows"] == [{"x": 1}]  # what it measured before is kept
    assert parts["c"]["status"] == "not run"
    assert "b. kernels | hung" in (tmp_path / "summary.md").read_text()
