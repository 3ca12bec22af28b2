"""Text users give (prompts, batch files, chat turns, documents): bytes that are not UTF-8,
JSON prompts of the wrong type, whitespace-only prompts, directories given as files. Each
is one `error:` line that names the file (or flag, or standard input) and the line, exit
code 2, no traceback, and in a batch nothing is printed before every prompt is checked."""

import io
import json
import os
import subprocess
import sys

import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, words

from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.tokenizer import Tokenizer, TokenizerError
from rocketkv_jax.user_text import TextError, check_utf8, decode_utf8

CFG = tiny_checkpoint_config()
# stdin strict, as in a UTF-8 locale such as en_US.UTF-8 (a C locale would escape)
ENV = {**os.environ, "ROCKETKV_JAX_COMPILE_CACHE": "off", "PYTHONIOENCODING": "utf-8:strict"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _one_error(capsys, argv):
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _generate(ckpt, *args):
    return ["generate", "--model", str(ckpt), "--method", "full", "--max-new-tokens", "2",
            *args]


# ------------------------------------------------------------------ not UTF-8
def test_prompt_flag_with_an_undecodable_byte(ckpt, capsys):
    # what Python makes of `--prompt $'w1 \xff'`: the byte as a lone surrogate
    err = _one_error(capsys, _generate(ckpt, "--prompt", "w1 \udcff w2"))
    assert err == "error: --prompt: not UTF-8 text (byte 0xff at character 4)"


def test_prompt_file_names_the_file_and_the_line(ckpt, capsys, tmp_path):
    f = tmp_path / "essay.txt"
    f.write_bytes(b"w1 w2\nw3\nw4 \xc3\x28 w5\n")
    err = _one_error(capsys, _generate(ckpt, "--prompt-file", str(f)))
    assert err.startswith(f"error: {f}:3: not UTF-8 text (byte 0xc3 at byte 4 of the line)")


def test_batch_file_names_the_file_and_the_line(ckpt, capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"w1\nw2 w3\n\xfe w4\n")
    err = _one_error(capsys, _generate(ckpt, "--batch-file", str(f)))
    assert f"{f}:3: not UTF-8 text (byte 0xfe" in err


def test_a_json_escape_that_is_not_text(ckpt, capsys, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "w1"}\n{"prompt": "w1 \\udcff"}\n')
    err = _one_error(capsys, _generate(ckpt, "--batch-file", str(f)))
    assert err == f"error: {f}:2: not UTF-8 text (byte 0xff at character 4)"


def test_stdin_that_is_not_utf8(ckpt):
    r = subprocess.run([sys.executable, "-m", "rocketkv_jax.cli", *_generate(ckpt)],
                       input=b"w1 w2\nw3 \xff\n", capture_output=True, env=ENV, timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"" and "Traceback" not in err, err
    assert err.startswith("error: standard input:2: not UTF-8 text (byte 0xff")


def test_chat_turns_document_and_system_text(ckpt, capsys, tmp_path):
    chat = ["chat", "--model", str(ckpt), "--method", "full", "--capacity", "40"]
    turns = tmp_path / "turns.json"
    turns.write_text(json.dumps(["w1 w2", "w3 \udcff"]))
    err = _one_error(capsys, [*chat, "--turns", str(turns)])
    assert err == f"error: {turns}: turn 1: not UTF-8 text (byte 0xff at character 4)"
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'["w1", "w2 \xff"]')
    assert f"{bad}:1: not UTF-8 text" in _one_error(capsys, [*chat, "--turns", str(bad)])
    doc = tmp_path / "doc.txt"
    doc.write_bytes(b"w1\n\xff\n")
    turns.write_text('["w1"]')
    err = _one_error(capsys, [*chat, "--turns", str(turns), "--document", str(doc)])
    assert f"{doc}:2: not UTF-8 text" in err
    err = _one_error(capsys, [*chat, "--turns", str(turns), "--system", "be \udcfe"])
    assert err == "error: --system: not UTF-8 text (byte 0xfe at character 4)"


def test_interactive_chat_keeps_the_session_after_a_bad_line(ckpt):
    """One line that is not UTF-8 costs one error message; the turns before and after it
    are answered and the session ends normally."""
    p = subprocess.run(
        [sys.executable, "-m", "rocketkv_jax.cli", "chat", "--model", str(ckpt), "--method",
         "full", "--capacity", "40", "--max-new-tokens", "2"],
        input=b"w1 w2\nw3 \xff w4\nw5 w6\n/quit\n", capture_output=True, env=ENV,
        timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if "error:" in line] == [
        "error: input line 2: not UTF-8 text (byte 0xff at character 4)"]
    assert "[turn 1]" in err and "[turn 2]" in err  # the lines before and after it


def test_interactive_chat_in_process_keeps_the_session(ckpt, capsys, monkeypatch):
    lines = [words(3), "w1 \udcff", words(2, seed=1), "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    code = cli_main(["chat", "--model", str(ckpt), "--method", "full", "--capacity", "40",
                     "--max-new-tokens", "2"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("error: input line 2: not UTF-8 text (byte 0xff at character 4)") == 1
    assert err.count("[turn ") == 2


# ------------------------------------------------------------------ batch files
@pytest.mark.parametrize("value", ["5", "[\"w1\"]", "null", "{\"text\": \"w1\"}", "true"])
def test_json_prompt_of_the_wrong_type(ckpt, capsys, tmp_path, value):
    f = tmp_path / "prompts.jsonl"
    f.write_text(f'{{"prompt": "w1 w2"}}\n{{"prompt": {value}}}\n')
    err = _one_error(capsys, _generate(ckpt, "--batch-file", str(f)))
    assert err.startswith(f"error: {f}:2: a JSON line needs a string 'prompt' field")


@pytest.mark.parametrize("line", ['{"prompt": "  "}', "   ", "", '{"prompt": ""}'])
def test_every_prompt_is_checked_before_any_output(ckpt, capsys, tmp_path, line):
    """A bad prompt on line 5 with batches of 2: nothing is printed for lines 1-4."""
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(["w1 w2", "w3", "w4 w5", "w6", line, "w7"]) + "\n")
    err = _one_error(capsys, _generate(ckpt, "--batch-file", str(f), "--batch-size", "2"))
    assert err.startswith(f"error: {f}:5: the prompt is empty")


def test_a_prompt_too_long_for_the_context_is_found_before_any_output(ckpt, capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(["w1 w2", "w3", words(CFG.max_position_embeddings), "w4"]) + "\n")
    err = _one_error(capsys, _generate(ckpt, "--batch-file", str(f), "--batch-size", "1"))
    assert err.startswith(f"error: {f}:3: the prompt has 64 tokens; with max_new_tokens=2")


def test_whitespace_only_prompts_follow_one_rule(ckpt, capsys, tmp_path):
    err = _one_error(capsys, _generate(ckpt, "--prompt", " \t\n "))
    assert err == "error: --prompt: the prompt is empty (only whitespace)"
    f = tmp_path / "p.txt"
    f.write_text(" \n\t\n")
    assert _one_error(capsys, _generate(ckpt, "--prompt-file", str(f))) == (
        f"error: {f}: the prompt is empty (only whitespace)")
    turns = tmp_path / "turns.json"
    turns.write_text('["w1", " \\t "]')
    err = _one_error(capsys, ["chat", "--model", str(ckpt), "--turns", str(turns)])
    assert err == f"error: {turns}: turn 1: the prompt is empty (only whitespace)"


def test_a_batch_file_line_holding_a_form_feed_is_one_prompt(ckpt, capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("w1 \x0c w2\r\nw3\n")
    code = cli_main(_generate(ckpt, "--batch-file", str(f)))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [json.loads(x)["prompt"] for x in out.splitlines()] == ["w1 \x0c w2", "w3"]


# ------------------------------------------------------------------ files
@pytest.mark.parametrize("flag, what", [("--prompt-file", "prompt file"),
                                        ("--batch-file", "batch file")])
def test_a_directory_given_as_a_file(ckpt, capsys, tmp_path, flag, what):
    err = _one_error(capsys, _generate(ckpt, flag, str(tmp_path)))
    assert err == f"error: {what} {tmp_path} is a directory, not a file"
    err = _one_error(capsys, _generate(ckpt, flag, str(tmp_path / "none.txt")))
    assert err == f"error: {what} {tmp_path / 'none.txt'} does not exist"


def test_chat_files_that_are_directories(ckpt, capsys, tmp_path):
    chat = ["chat", "--model", str(ckpt)]
    assert _one_error(capsys, [*chat, "--turns", str(tmp_path)]) == (
        f"error: turns file {tmp_path} is a directory, not a file")
    turns = tmp_path / "t.json"
    turns.write_text('["w1"]')
    assert _one_error(capsys, [*chat, "--turns", str(turns), "--document", str(tmp_path)]) == (
        f"error: document {tmp_path} is a directory, not a file")


# ------------------------------------------------------------------ the library
def test_tokenizer_refuses_what_is_not_text(ckpt):
    tok = Tokenizer(ckpt)
    with pytest.raises(TokenizerError, match=r"not UTF-8 text \(byte 0xff at character 4\)"):
        tok.encode("w1 \udcff")
    with pytest.raises(TokenizerError, match="expected text"):
        tok.encode(5)
    with pytest.raises(TokenizerError, match="token ids"):
        tok.decode([1, 2.5])
    with pytest.raises(TokenizerError, match="must be a path"):
        Tokenizer(5)
    assert tok.decode(tok.encode("w1 w2")) == "w1 w2"
    with pytest.raises(TokenizerError, match="not UTF-8 text"):
        tok.char_spans("w1 \udcff")


def test_char_spans_locate_each_token_in_the_text(ckpt):
    tok = Tokenizer(ckpt)
    text = "w3 w10  w7 w12"
    ids, spans = tok.encode(text, add_special_tokens=False), tok.char_spans(text, False)
    assert len(spans) == len(ids) == 4
    assert [tok.decode([i]) for i in ids] == [text[a:b] for a, b in spans]
    assert spans[2][0] == text.index("w7")


def test_positions_are_counted_in_lines():
    with pytest.raises(TextError, match=r"^f:2: not UTF-8 text \(byte 0x80 at byte 3 "):
        decode_utf8(b"ab\ncd\x80", "f")
    with pytest.raises(TextError, match=r"line 2, character 2\)"):
        check_utf8("ab\nc\udc80", "x")
    with pytest.raises(TextError, match=r"lone surrogate U\+D800"):
        check_utf8("\ud800", "x")


@pytest.mark.parametrize("command, message", [
    ("generate", "error: no prompt: give --prompt"),
    ("chat", "error: standard input is closed"),
])
def test_closed_stdin(ckpt, command, message):
    r = subprocess.run(["sh", "-c", 'exec "$0" "$@" <&-', sys.executable, "-m",
                        "rocketkv_jax.cli", command, "--model", str(ckpt)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(message), r.stderr
