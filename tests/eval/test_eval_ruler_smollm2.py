"""CI smoke of `rocketkv eval --suite ruler` on the real SmolLM2 at 2k: NVIDIA's
generators for the model's tokenizer, generation by two methods, RULER's scoring, and a
resumed run that adds nothing.

Not marked slow: about 65 s on 2 busy CPU cores (the SmolLM2 conversion is the shared
session fixture), like the other SmolLM2 tests of the default run.
"""

import json

import pytest

pytest.importorskip("long_context_eval", reason="pip install --no-deps nvidia-long-context-eval")
pytest.importorskip("wonderwords")

from long_context_eval.eval.synthetic.constants import TASKS as RULER_METRICS  # noqa: E402

from rocketkv_jax.cli import main as cli_main  # noqa: E402
from rocketkv_jax.eval.ruler import ruler_family  # noqa: E402
from rocketkv_jax.eval.scoring import postprocess_prediction  # noqa: E402
from rocketkv_jax.tokenizer import Tokenizer  # noqa: E402


def test_ruler_suite_generates_scores_and_resumes_on_smollm2(smollm2_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--suite", "ruler", "--model", str(smollm2_checkpoint), "--methods",
            "rocketkv", "--budgets", "256", "--contexts", "2k", "--tasks", "vt,qa_1",
            "--samples", "1", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][1:]
    assert sorted((r["task"], r["method"]) for r in records) == [
        ("qa_1", "full"), ("qa_1", "rocketkv"), ("vt", "full"), ("vt", "rocketkv")]
    tok = Tokenizer(smollm2_checkpoint)
    for r in records:
        assert r["suite"] == "ruler" and isinstance(r["output"], str)
        assert r["max_new_tokens"] == {"vt": 30, "qa_1": 32}[r["task"]]
        assert 1024 < r["prompt_tokens"] <= 2048 - r["max_new_tokens"]
        prompts = {json.loads(x)["input"] for f in (out / "ruler-data" / r["task"]).rglob("*.jsonl")
                   for x in f.read_text().splitlines()}
        (prompt,) = prompts
        assert len(tok.encode(prompt)) == r["prompt_tokens"]
        metric = RULER_METRICS[ruler_family(r["task"])]["metric_fn_per_sample"]
        assert r["score"] == metric([postprocess_prediction(r["output"])], [r["expected"]])[0] / 100
    # SmolLM2 answers VT with text (it names the chain's first variable: 0.2); on QA it
    # may stop at once (EOS right after "Answer:"), which scores 0 as in RULER
    assert all(r["output"].strip() for r in records if r["task"] == "vt")
    assert all(0.0 <= r["score"] <= 1.0 for r in records)
    assert (out / "table.md").is_file()
    # resumable: a second run adds nothing and regenerates no task file
    before = (out / "results.jsonl").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "ruler-data").rglob("validation.jsonl")}
    assert cli_main(args) == 0
    assert (out / "results.jsonl").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
