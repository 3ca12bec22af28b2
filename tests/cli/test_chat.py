"""`rocketkv chat` on a tiny checkpoint (word-level tokenizer, no chat template): the JSON
turns mode, the interactive loop on stdin, /reset and clear errors."""

import io
import json

import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params, words

from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.methods import Full
from rocketkv_jax.tokenizer import Tokenizer

CFG = tiny_checkpoint_config()
PARAMS = tiny_params(CFG)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _chat(capsys, ckpt, *args):
    code = cli_main(["chat", "--model", str(ckpt), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_turns_keep_the_history(ckpt, tmp_path, capsys):
    turns = [words(12, seed=1), words(3, seed=2), "/reset", words(12, seed=1)]
    f = tmp_path / "turns.json"
    f.write_text(json.dumps([turns[0], {"content": turns[1]}, *turns[2:]]))
    code, out, err = _chat(capsys, ckpt, "--turns", str(f), "--method", "full",
                           "--capacity", "48", "--max-new-tokens", "5")
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x.get("turn") for x in lines] == [1, 2, None, 3] and lines[2] == {"reset": True}
    tok = Tokenizer(ckpt)
    ids1, ids2 = tok.encode(turns[0]), tok.encode(" " + turns[1])
    reply1 = generate_ids(PARAMS, CFG, [ids1], Full(), max_new_tokens=5).tokens[0]
    history = ids1 + reply1 + ids2
    reply2 = generate_ids(PARAMS, CFG, [history], Full(), max_new_tokens=5).tokens[0]
    assert lines[0]["reply"] == tok.decode(reply1)
    # turn 2 answers from the whole history, and prefilled only the reply's last token
    # and its own tokens
    assert lines[1]["reply"] == tok.decode(reply2)
    assert lines[1]["prefilled"] == 1 + len(ids2)
    assert lines[1]["history"] == len(history) + len(reply2)
    # after /reset the same first turn gives the same reply from an empty history
    assert lines[3]["reply"] == lines[0]["reply"] and lines[3]["history"] == lines[0]["history"]
    assert err.count("[turn ") == 3 and "prefilled" in err and "tok/s" in err


def test_interactive_loop_with_reset(ckpt, capsys, monkeypatch):
    lines = [words(10, seed=3), words(2, seed=4), "/reset", words(10, seed=3), "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code, out, err = _chat(capsys, ckpt, "--method", "rocketkv-mt", "--token-budget", "40",
                           "--capacity", "48", "--max-new-tokens", "4")
    assert code == 0, err
    replies = [r.strip() for r in out.replace("> ", "\n").splitlines() if r.strip()]
    assert len(replies) == 3 and replies[0] == replies[2]  # /reset forgot turns 1-2
    assert "(conversation reset)" in err and err.count("[turn ") == 3


def test_a_turn_past_the_capacity_is_a_clear_error(ckpt, tmp_path, capsys):
    f = tmp_path / "turns.json"
    f.write_text(json.dumps([words(30, seed=5), words(20, seed=6)]))
    code, out, err = _chat(capsys, ckpt, "--turns", str(f), "--method", "full",
                           "--capacity", "40", "--max-new-tokens", "4")
    assert code == 2 and len(out.splitlines()) == 1  # turn 1 answered, turn 2 refused
    assert "error: row 0: the history holds 34 tokens and this turn has 20 tokens" in err
    assert "capacity of 40" in err and "--capacity" in err


@pytest.mark.parametrize("content, message", [
    ("[]", "non-empty JSON list"),
    ('["ok", ""]', "turn 1: the prompt is empty"),
    ('["ok", 5]', "turn 1 is not a non-empty string"),
    ("{", "not valid JSON"),
])
def test_bad_turns_files_are_clear_errors(ckpt, tmp_path, capsys, content, message):
    f = tmp_path / "turns.json"
    f.write_text(content)
    code, out, err = _chat(capsys, ckpt, "--turns", str(f))
    assert code == 2 and out == "" and message in err and err.startswith("error: ")


def test_bad_flags_are_clear_errors(ckpt, capsys):
    code, _, err = _chat(capsys, ckpt, "--capacity", "1000", "--method", "full")
    assert code == 2 and "larger than the model's context of 64" in err
    code, _, err = _chat(capsys, ckpt, "--method", "nope")
    assert code == 2 and "not a KV method" in err
