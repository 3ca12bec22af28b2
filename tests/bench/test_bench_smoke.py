"""`rocketkv bench --quick` end to end, its byte accounting against hand computations, and the
cache the benchmark builds (one prefill forward, then each method's compress) against
`make_prefill`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax import checks
from rocketkv_jax.bench import measure as bd
from rocketkv_jax.bench.config import QUICK, model_contexts, resolve_config
from rocketkv_jax.bench.roofline import read_split
from rocketkv_jax.cli import build_parser
from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.cli.bench import cmd_bench
from rocketkv_jax.engine.generate import make_prefill
from rocketkv_jax.methods import METHOD_NAMES, make_method
from rocketkv_jax.methods.read_bytes import kv_read_bytes


def bench_main(argv: list[str]) -> int:
    return cli_main(["bench", *argv])


def _main(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench_main(argv)
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    # --stage2 on: the hand computations below are of the sparse paths (at these sizes the
    # cost model would run them densely)
    code, stdout = _main(["--quick", "--no-progress", "--json", str(out), "--stage2", "on"])
    return code, stdout, json.loads(out.read_text()), out


def _table(stdout: str, title_start: str) -> list[list[str]]:
    """Rows (split on whitespace) of the printed table whose title starts with title_start."""
    lines = stdout.splitlines()
    i = next(n for n, line in enumerate(lines) if line.startswith(title_start))
    rows = []
    for line in lines[i + 1:]:
        if not line.strip() or line.startswith("  "):
            break
        rows.append(line.split())
    return rows


def test_quick_prints_a_ratio_for_every_method(quick_run):
    code, stdout, _, _ = quick_run
    assert code == 0
    header, *rows = _table(stdout, "Decode step speedup vs full KV")
    methods = [m for m in QUICK["methods"].split(",") if m != "full"]
    assert header == ["T", "M", "full", "ms", *methods]  # "full ms" splits in two
    assert len(rows) == 1  # one context x one budget
    cells = rows[0][3:]
    assert len(cells) == len(methods)
    for cell in cells:
        ratio = float(cell)
        assert math.isfinite(ratio) and ratio > 0
    assert float(rows[0][2]) > 0  # full ms


def test_quick_prints_every_section(quick_run):
    _, stdout, _, _ = quick_run
    for title in ("Decode step compile time", "Analytic KV bytes read per decode step",
                  "XLA bytes accessed per decode step", "XLA KV multiplier",
                  "Per-step reads at T=", "Peak memory from XLA's memory analysis",
                  "Llama-3.1-8B roofline at 32k", "H100 bound per method"):
        assert title in stdout, title


def test_full_kv_bytes_match_hand_computation(quick_run):
    _, _, res, _ = quick_run
    (model,) = res["models"]
    cfg = bd.TINY_CONFIG
    full = next(s for s in model["steps"] if s["method"] == "full")
    S = full["T"] + 1  # cached tokens at the first decode step
    hand = cfg.num_layers * cfg.num_kv_heads * S * 2 * cfg.head_dim * 4  # f32
    assert full["kv_read_bytes"] == hand == 2 * 2 * 1025 * 2 * 64 * 4
    assert full["read_tokens"] == full["attended"] == S and full["selection"] == 0
    assert model["weights_bytes"] > 0
    # XLA counts the layer loop once; the loop-aware number counts it per layer
    assert full["xla_loop_bytes"] > full["xla_bytes"] > 0


def test_rocketkv_bytes_match_hand_computation(quick_run):
    """docs/algorithm.md's split by hand for T=1024, N=32, M=128, D=64, then stage 2's reads:
    R of D channels of one bound per page for scoring, K and V of k_top tokens."""
    _, _, res, _ = quick_run
    s = next(s for s in res["models"][0]["steps"] if s["method"] == "rocketkv")
    T, N, M, D = 1024, 32, 128, 64
    assert (s["T"], s["M"]) == (T, M)
    L = T + N
    c = L / M
    a = min(0.2 + 0.06 * math.log2(c), 0.8)
    capacity = max(int(L / c**a), min(2 * N, L))  # 470
    prompt_budget = capacity - N  # 438
    c2 = capacity / M
    page = math.ceil(math.sqrt(c2))  # 2
    r = int(D * page / c2)  # 34
    cached = min(T, prompt_budget) + 1  # kept prompt + the first new token
    scoring = math.ceil(math.ceil(cached / page) * r / (2 * D))
    attended = M // 2
    assert (capacity, prompt_budget, page, r) == (470, 438, 2, 34)
    assert (s["attended"], s["selection"]) == (attended, scoring) == (64, 59)
    layers, kv_heads = bd.TINY_CONFIG.num_layers, bd.TINY_CONFIG.num_kv_heads
    assert s["kv_read_bytes"] == (attended + scoring) * layers * kv_heads * 2 * D * 4


def test_report_reprints_the_tables(quick_run):
    _, stdout, _, path = quick_run
    code, again = _main(["--report", str(path)])
    assert code == 0
    strip = [line for line in stdout.splitlines() if not line.startswith(("wall", "wrote"))]
    assert [line for line in again.splitlines() if not line.startswith("wall")] == strip


def test_report_as_markdown_has_the_same_cells(quick_run, capsys):
    _, stdout, _, path = quick_run
    code, md = _main(["--report", str(path), "--markdown"])
    assert code == 0
    header, *rows = _table(stdout, "Decode step speedup vs full KV")
    lines = md.split("Decode step speedup vs full KV", 1)[1].splitlines()
    table = [line for line in lines[2:] if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    assert cells[0] == ["T", "M", "full ms", *header[4:]] and set(cells[1]) == {"---"}
    assert [c for row in cells[2:2 + len(rows)] for c in row] == [c for r in rows for c in r]
    code, text = _main(["--report", str(path)])  # markdown does not stick to later reports
    assert code == 0 and _table(text, "Decode step speedup vs full KV") == [header, *rows]
    assert bench_main(["--quick", "--markdown"]) == 2  # formats a report, measures nothing
    assert "--markdown only formats" in capsys.readouterr().err


def test_quest_and_sparq_split_by_hand():
    cfg = bd.TINY_CONFIG
    T, N, M, S = 1024, 32, 128, 1025
    quest = make_method("quest", M).plan(cfg, T, N)  # page 16: max + min per page
    assert read_split(quest, S) == (M, math.ceil(S / 16))
    # r = D * M / (2 L) key channels; its sparse path forced (the tiny model's D = 16 rows are
    # one memory line, so the cost model sends it dense)
    sparq = make_method("sparq", M, stage2="on").plan(cfg, T, N)
    r = int(cfg.head_dim * M / (2 * (T + N)))
    assert read_split(sparq, S) == (M // 2, math.ceil(S * r / (2 * cfg.head_dim)))
    full = make_method("full").plan(cfg, T, N)
    assert kv_read_bytes(full, S, cfg, 2, batch=3) == 3 * 2 * 2 * S * 2 * cfg.head_dim * 2


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_capture_then_compress_equals_make_prefill(name):
    """One prefill forward + the method's compress per layer == make_prefill(config, plan)."""
    bm = bd.load_bench_model("tiny", seed=1)
    T, N, B = 192, 16, 1
    plan = make_method(name, 64).plan(bm.config, T, N)
    raw, _ = bd.capture_prefill(bm, T, B)
    ours, _ = bd.compress_cache(plan, raw)
    tokens = jnp.asarray(bm.prompt_ids(T))[None]
    _, ref = make_prefill(bm.config, plan)(bm.params, tokens, jnp.full((B,), T, jnp.int32))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_loop_aware_bytes_scale_with_layers():
    """XLA counts the scanned layer body once; the loop-aware count grows with depth."""
    import dataclasses

    from rocketkv_jax.models.params import random_params

    got = {}
    for layers in (2, 4):
        cfg = dataclasses.replace(bd.TINY_CONFIG, num_layers=layers)
        params = random_params(cfg, 0)
        plan = make_method("full").plan(cfg, 64, 8)
        cs = bd.compile_step(cfg, plan, params, bd.abstract_cache(cfg, plan, params, 64, 1), 1)
        got[layers] = (cs.bytes_accessed, cs.loop_bytes)
    assert got[4][1] > 1.8 * got[2][1]  # about twice the layers' traffic
    assert got[4][0] < 1.5 * got[2][0]  # the plain number barely moves


def test_cli_wiring_help_and_bad_input(capsys):
    parser = build_parser()
    args = parser.parse_args(["bench", "--quick", "--budgets", "64"])
    assert args.func is cmd_bench
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--quick", "--contexts", "--budgets", "--methods", "--peers",
                 "--kvpress-python", "--json", "--prefill"):
        assert flag in help_text
    assert bench_main(["--quick", "--warmup", "30", "--iters", "30"]) == 2
    assert "must be <= --new-tokens" in capsys.readouterr().err
    assert bench_main(["--quick", "--methods", "full,nope"]) == 2
    assert re.search(r"unknown method", capsys.readouterr().err)
    assert checks.token_count("4k", "x") == 4096 and checks.token_count("1000", "x") == 1000
    full = resolve_config()
    assert full.peers and full.models == ("smollm2", "llama8b-shape")
    assert full.contexts == (4096, 8192, 16384, 32768)
    assert full.budgets == (256, 512, 1024, 2048, 4096) and len(full.methods) == 9
    quick = resolve_config(quick=True)
    assert not quick.peers and quick.models == ("tiny",)
    assert quick.methods == ("full", "rocketkv")
    assert resolve_config(models="none").models == ()


def test_model_contexts_clamp_to_the_model():
    cfg = bd.TINY_CONFIG  # 4096 positions
    assert model_contexts(cfg, [1024, 4096, 8192], 256) == [(1024, "1k"), (3840, "4k*")]


@pytest.mark.parametrize("content, message", [
    (None, "results file {p} is a directory, not a file"),
    (b'{"a": 1}', "{p} is not a results file of `rocketkv bench --json PATH`"),
    (b'{"args": [1', "{p}:1: not JSON"),
    (b'{"args": "\xff"}', "{p}:1: not UTF-8 text (byte 0xff"),
])
def test_report_of_a_file_that_is_not_a_results_file(capsys, tmp_path, content, message):
    p = tmp_path / "r.json"
    if content is None:
        p.mkdir()
    else:
        p.write_bytes(content)
    assert bench_main(["--report", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(p=p)) and err.count("\n") == 1, err


def test_json_path_is_checked_before_the_grid_runs(capsys, tmp_path):
    assert bench_main(["--quick", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert bench_main(["--quick", "--json", str(tmp_path / "f" / "r.json")]) == 2
    assert f"{tmp_path / 'f'} is a file, not a directory" in capsys.readouterr().err
