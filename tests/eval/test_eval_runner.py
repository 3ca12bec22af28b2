"""Runner: grid, batching, records, resumability after a kill, truncated last line."""

import json
import re

import pytest

from rocketkv_jax.eval.runner import (
    EngineContractError,
    ResultsFileError,
    record_key,
    run_eval,
)
from rocketkv_jax.eval.store import read_records


class WhitespaceTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


class CharTokenizer:
    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class FakeGenerate:
    """Answers NIAH from the prompt; 'forgets' the needle below budget 128; may crash."""

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, prompts, method, token_budget, max_new_tokens):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append((list(prompts), method, token_budget, max_new_tokens))
        outputs = []
        for prompt in prompts:
            found = re.findall(r"is: (\d{7})\.", prompt)
            sees = method == "full" or token_budget >= 128
            outputs.append(f" {found[0]}." if found and sees else " I do not know.")
        return outputs


GRID = dict(
    methods=["full", "snapkv", "rocketkv"],
    budgets=[64, 128],
    context_lengths=[512],
    tasks=["niah_single", "qa"],
    samples_per_task=3,
    seed=0,
    batch_size=2,
    show_progress=False,
)
TOTAL = (1 + 2 * 2) * 1 * 2 * 3  # (full + 2 methods x 2 budgets) x contexts x tasks x samples


def _run(out_dir, generate, **overrides):
    kwargs = dict(GRID, **overrides)
    return run_eval(generate, WhitespaceTokenizer(), out_dir=out_dir, **kwargs)


def test_full_run_records(tmp_path):
    generate = FakeGenerate()
    path = _run(tmp_path, generate)
    records = read_records(path)
    assert len(records) == TOTAL
    assert len({record_key(r) for r in records}) == TOTAL
    full = [r for r in records if r["method"] == "full"]
    assert len(full) == 6 and all(r["budget"] is None for r in full)
    for r in records:
        assert set(r) >= {
            "method", "budget", "task", "context_length", "depth", "sample",
            "prompt_tokens", "expected", "output", "score",
        }  # fmt: skip
        assert r["prompt_tokens"] + r["max_new_tokens"] <= 512
    niah = {(r["method"], r["budget"]): r["score"] for r in records if r["task"] == "niah_single"}
    assert niah[("full", None)] == 1.0
    assert niah[("snapkv", 64)] == 0.0 and niah[("snapkv", 128)] == 1.0


def test_batches_share_method_budget_and_respect_batch_size(tmp_path):
    generate = FakeGenerate()
    _run(tmp_path, generate)
    assert sum(len(p) for p, *_ in generate.calls) == TOTAL
    assert all(1 <= len(p) <= 2 for p, *_ in generate.calls)
    # 5 (method, budget) x 2 tasks (different answer allowances) x ceil(3 / 2) batches
    assert len(generate.calls) == 5 * 2 * 2
    full_calls = [c for c in generate.calls if c[1] == "full"]
    assert all(budget == 512 for _, _, budget, _ in full_calls)  # full: budget = context


def test_resume_after_kill_appends_only_missing_records(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, FakeGenerate(fail_after=4))
    path = tmp_path / "results.jsonl"
    first_bytes = path.read_bytes()
    first = read_records(path)
    assert 0 < len(first) < TOTAL
    generate = FakeGenerate()
    _run(tmp_path, generate)
    final_bytes = path.read_bytes()
    assert final_bytes.startswith(first_bytes)  # finished lines untouched, byte for byte
    records = read_records(path)
    keys = [record_key(r) for r in records]
    assert len(keys) == len(set(keys)) == TOTAL
    assert sum(len(p) for p, *_ in generate.calls) == TOTAL - len(first)
    # Resuming a finished run generates nothing and changes nothing.
    again = FakeGenerate()
    _run(tmp_path, again)
    assert again.calls == [] and path.read_bytes() == final_bytes


def test_truncated_last_line_is_dropped_and_redone(tmp_path):
    path = _run(tmp_path, FakeGenerate())
    complete = path.read_bytes()
    lines = complete.splitlines(keepends=True)
    killed = b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2]  # half-written record
    path.write_bytes(killed)
    assert len(read_records(path)) == TOTAL - 1  # reading alone drops it, file unchanged
    assert path.read_bytes() == killed
    generate = FakeGenerate()
    _run(tmp_path, generate)
    assert sum(len(p) for p, *_ in generate.calls) == 1
    assert path.read_bytes() == complete  # deterministic fake: identical bytes


def test_last_line_without_newline_but_complete_is_kept(tmp_path):
    path = _run(tmp_path, FakeGenerate())
    complete = path.read_bytes()
    path.write_bytes(complete.rstrip(b"\n"))
    generate = FakeGenerate()
    _run(tmp_path, generate)
    assert generate.calls == []
    assert path.read_bytes() == complete


def test_corrupt_middle_line_raises(tmp_path):
    path = _run(tmp_path, FakeGenerate())
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b"{garbage\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(ResultsFileError, match=r"results.jsonl:4: damaged line"):
        _run(tmp_path, FakeGenerate())


def test_duplicate_records_raise(tmp_path):
    path = _run(tmp_path, FakeGenerate())
    first = path.read_bytes().splitlines(keepends=True)[1]  # line 1 is the header
    with path.open("ab") as handle:
        handle.write(first)
    with pytest.raises(ResultsFileError, match="two records"):
        _run(tmp_path, FakeGenerate())


def test_other_seed_or_tokenizer_in_out_dir_raises(tmp_path):
    _run(tmp_path, FakeGenerate(), samples_per_task=1)
    with pytest.raises(ResultsFileError, match="seed"):
        _run(tmp_path, FakeGenerate(), seed=1)
    with pytest.raises(ResultsFileError, match="differs from the recorded one"):
        run_eval(
            FakeGenerate(),
            CharTokenizer(),
            out_dir=tmp_path,
            **dict(GRID, samples_per_task=2, context_lengths=[512]),
        )


def test_more_samples_later_extend_the_run(tmp_path):
    path = _run(tmp_path, FakeGenerate(), samples_per_task=2)
    before = path.read_bytes()
    _run(tmp_path, FakeGenerate(), samples_per_task=3)
    assert path.read_bytes().startswith(before)
    assert len(read_records(path)) == TOTAL


def test_engine_contract_and_argument_errors(tmp_path):
    with pytest.raises(EngineContractError, match="list of 2 strings"):
        _run(tmp_path, lambda prompts, *a: ["only one"])
    with pytest.raises(ValueError, match="unknown method"):
        _run(tmp_path, FakeGenerate(), methods=["full", "magic"])
    with pytest.raises(ValueError, match="positive integer"):
        _run(tmp_path, FakeGenerate(), budgets=[0])
    with pytest.raises(ValueError, match="unknown task"):
        _run(tmp_path, FakeGenerate(), tasks=["niah"])


def test_records_are_json_lines(tmp_path):
    path = _run(tmp_path, FakeGenerate(), samples_per_task=1)
    for line in path.read_text().splitlines():
        assert isinstance(json.loads(line), dict)
