"""benchmarks/ruler_anatomy.py: one RULER sample of a run, prefilled once and taken apart
per method: replayed answers checked against the run's records, KL against full KV, and
the needle tokens each cache keeps."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from benchmark_scripts import load_script
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params, words

from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.eval.model_fns import engine_identity, eval_method
from rocketkv_jax.model_store import load_model

ra = load_script("ruler_anatomy")

TASK, CONTEXT, BUDGET, MAX_NEW = "niah_single_1", 256, 40, 6
NEEDLE = "w7 w8 w9"


def test_needle_tokens_are_those_overlapping_each_occurrence():
    text = "ab 123 cd 123"
    spans = [(0, 2), (3, 4), (4, 6), (7, 9), (10, 13)]
    assert ra.needle_tokens(spans, text, ["123"]) == [1, 2, 4]
    assert ra.needle_tokens(spans, text, ["23 c"]) == [2, 3]
    assert ra.needle_tokens(spans, text, ["999", ""]) == []


def test_held_and_first_divergence():
    pos = np.array([[[5, 9, -1], [1, 2, 3]]])  # [1 layer, 2 heads, 3 slots]
    np.testing.assert_array_equal(ra.held(pos, [9, 3]), [[[True, False], [False, True]]])
    lp = np.log(np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]]))
    assert ra.first_divergence(lp, [0, 1, 1]) == 2
    assert ra.first_divergence(lp, [0, 1, 0]) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model and a results directory holding one RULER sample of it: full KV,
    rocketkv and snapkv++ recorded with their real answers, hybrid with a wrong one."""
    d = tmp_path_factory.mktemp("anatomy")
    ckpt = make_tiny_checkpoint(d / "ckpt", tiny_checkpoint_config(max_position_embeddings=256))
    model = load_model(ckpt, progress=False)
    prompt = f"{words(90, seed=1)} {NEEDLE} {words(60, seed=2)}"
    ids = model.tokenizer.encode(prompt)
    sha = hashlib.sha1(prompt.encode()).hexdigest()[:16]
    methods = ["full", "rocketkv", "hybrid", "snapkv++", "topk"]
    identity = {**engine_identity(model, methods, kernels="reference"), "suite": "ruler"}
    rows = [{"record": "header", "run": "r", "identity": identity}]
    for name, budget in [("full", None), ("rocketkv", BUDGET), ("snapkv++", BUDGET),
                         ("hybrid", BUDGET)]:
        out = generate_ids(model.params, model.config, [ids],
                           eval_method(name, budget, kernels="reference"),
                           max_new_tokens=MAX_NEW).tokens[0]
        text = model.tokenizer.decode(out) if name != "hybrid" else "not its answer"
        rows.append({"run": "r", "method": name, "budget": budget, "task": TASK,
                     "context_length": CONTEXT, "sample": 0, "prompt_tokens": len(ids),
                     "max_new_tokens": MAX_NEW, "expected": [NEEDLE], "output": text,
                     "score": 0.0, "prompt_sha1": sha})
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = d / "ruler-data" / TASK / "ctx256"
    cache.mkdir(parents=True)
    (cache / "validation.jsonl").write_text(json.dumps({"index": 0, "input": prompt}) + "\n")
    return d, ckpt, ids


def _anatomy(run, capsys, *extra):
    d, ckpt, _ = run
    code = ra.main(["--task", TASK, "--context", str(CONTEXT), "--sample", "0", "--budgets",
                    str(BUDGET), "--out", str(d), "--model", str(ckpt),
                    "--json", str(d / "a.json"), *extra])
    return code, capsys.readouterr()


def test_one_sample_taken_apart(run, capsys):
    code, printed = _anatomy(run, capsys)
    assert code == 0, printed.err
    report = json.loads((run[0] / "a.json").read_text())
    rows = {(r["method"], r["budget"]): r for r in report["rows"]}
    assert [m for m, _ in rows] == ["full KV", "rocketkv", "rocketkv stage 1", "hybrid",
                                    "snapkv++", "topk"]
    # the replay from one prefill gives what generate_ids gave for each record
    assert rows[("full KV", None)]["as_recorded"] is True
    assert rows[("rocketkv", BUDGET)]["as_recorded"] is True
    assert rows[("snapkv++", BUDGET)]["as_recorded"] is True
    assert rows[("hybrid", BUDGET)]["as_recorded"] is False
    assert rows[("rocketkv stage 1", BUDGET)]["as_recorded"] is None  # the run has no such cell
    full = rows[("full KV", None)]
    assert full["mean_kl"] == 0.0 and full["first_step_off"] is None
    assert full["needle_kept_least"] == 1.0 and full["prompt_kept"] == len(run[2])
    # snapkv++ keeps exactly its budget of the prompt; rocketkv's stage 1 keeps more
    assert rows[("snapkv++", BUDGET)]["prompt_kept"] == BUDGET
    assert rows[("rocketkv", BUDGET)]["prompt_kept"] > BUDGET
    assert rows[("rocketkv", BUDGET)]["prompt_kept"] == rows[("rocketkv stage 1", BUDGET)][
        "prompt_kept"]
    assert all(r["mean_kl"] > 0 for k, r in rows.items() if k[0] not in ("full KV", "topk"))
    assert report["needle_tokens"] == [90, 91, 92]
    assert full["needle_kept_per_token"] == [1.0, 1.0, 1.0]
    assert "| full KV | - |" in printed.out and "| hybrid | 40 |" in printed.out


def test_bad_input_is_one_error(run, capsys, tmp_path):
    code, printed = _anatomy(run, capsys, "--sample", "3")
    assert code == 2 and "no full-KV record of niah_single_1 at 256 tokens, sample 3" in printed.err
    config = tiny_checkpoint_config(max_position_embeddings=256)
    other = make_tiny_checkpoint(tmp_path / "other", config, tiny_params(config, seed=1))
    code, printed = _anatomy(run, capsys, "--model", str(other))
    assert code == 2 and "is not the model of" in printed.err
    code = ra.main(["--task", TASK, "--context", "256", "--sample", "0",
                    "--out", str(tmp_path)])
    assert code == 2 and "no results file at" in capsys.readouterr().err
    code, printed = _anatomy(run, capsys, "--model", str(tmp_path / "nowhere"))
    assert code == 2 and printed.err.startswith("error: ") and "nowhere" in printed.err
    shutil.rmtree(other / "params")  # a checkpoint directory without its weights
    code, printed = _anatomy(run, capsys, "--model", str(other))
    assert code == 2 and printed.err.startswith("error: ")
    assert "not a converted checkpoint" in printed.err
    with pytest.raises(SystemExit) as e:
        _anatomy(run, capsys, "--json", str(tmp_path / "no-dir" / "a.json"))
    assert e.value.code == 2 and "--json: no directory" in capsys.readouterr().err
