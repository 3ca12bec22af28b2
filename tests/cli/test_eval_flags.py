"""`eval` subcommand: parsing, validation messages and exit codes, full pipeline with fakes."""

import argparse
import re

import numpy as np
import pytest

from rocketkv_jax.checks import token_count
from rocketkv_jax.cli.eval import SMOKE_DEFAULTS, eval_config, run_eval_command
from rocketkv_jax.cli.eval import add_parser as add_eval_parser


class WhitespaceTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


def fake_generate(prompts, method, token_budget, max_new_tokens):
    return [" " + " ".join(re.findall(r"is: (\d{7})\.", p)[:1]) for p in prompts]


def fake_greedy(prompt, method, budget, n):
    return [1, 2, 3, 4][:n] if method == "full" else [1, 2, 0, 4][:n]


def fake_forced(prompt, tokens, method, budget):
    probs = np.full((len(tokens), 5), 0.1)
    probs[:, 1] = 0.6 if method == "full" else 0.5
    probs[:, 0] += 0.0 if method == "full" else 0.1
    return np.log(probs)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="rocketkv")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv])


def _run(argv, capsys, **kwargs):
    code = run_eval_command(
        _parse(argv), fake_generate, WhitespaceTokenizer(), fake_forced, fake_greedy, **kwargs
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--methods", "--budgets", "--contexts", "--tasks", "--samples",
                 "--seed", "--out", "--fidelity-tokens", "--smoke"):  # fmt: skip
        assert flag in out
    assert "rocketkv,topk" in out or "topk" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "full,rocketkv,magic"], "unknown method 'magic'"),
        (["--tasks", "niah_single,haystack"], "unknown task 'haystack'"),
        (["--budgets", "256,0"], "budget must be positive"),
        (["--budgets", "-5"], "budget must be positive"),
        (["--budgets", "lots"], "budget 'lots' is not a whole number"),
        (["--contexts", "2k,16k"], "16384 exceed the model's limit of 8192"),
        (["--contexts", "3x"], "context length '3x' is not a whole number"),
        (["--methods", ","], "--methods is empty"),
    ],
)
def test_bad_input_returns_nonzero_with_clear_message(argv, message, capsys, tmp_path):
    code, out, err = _run([*argv, "--out", str(tmp_path)], capsys, max_context_length=8192)
    assert code == 2
    assert message in err
    assert err.startswith("error:")
    assert "Traceback" not in err + out
    assert not (tmp_path / "results.jsonl").exists()


def test_context_too_small_for_prompt_is_a_clean_error(capsys, tmp_path):
    code, _, err = _run(
        ["--smoke", "--contexts", "64", "--out", str(tmp_path), "--no-progress"], capsys
    )
    assert code == 2 and "template alone" in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["--fidelity-tokens", "-1"], "argument --fidelity-tokens: must be >= 0, got -1"),
    (["--fidelity-samples", "0"], "argument --fidelity-samples: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--max-new-tokens", "nan"], "argument --max-new-tokens: must be an integer"),
])
def test_count_flags_are_checked_as_they_are_parsed(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_token_count():
    assert token_count("2k", "x") == 2048
    assert token_count(" 4K ", "x") == 4096
    assert token_count("300", "x") == 300
    with pytest.raises(ValueError, match="x '1.5k' is not a whole number"):
        token_count("1.5k", "x")


def test_smoke_defaults_and_explicit_flags_win():
    config = eval_config(_parse(["--smoke"]))
    assert config.methods == SMOKE_DEFAULTS["methods"]
    assert config.contexts == (1024,) and config.samples == 2
    config = eval_config(_parse(["--smoke", "--samples", "3", "--methods", "snapkv"]))
    assert config.samples == 3
    assert config.methods == ("full", "snapkv")  # full KV is always the reference
    config = eval_config(_parse(["--budgets", "1k,256,1k", "--contexts", "2k,4096"]))
    assert config.budgets == (1024, 256) and config.contexts == (2048, 4096)


def test_smoke_run_writes_all_outputs(capsys, tmp_path):
    argv = ["--smoke", "--out", str(tmp_path), "--no-progress"]
    code, out, err = _run(argv, capsys, max_context_length=8192)
    assert code == 0, err
    for name in ("results.jsonl", "fidelity.jsonl", "table.md", "accuracy_vs_budget.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "table.md").read_text()
    # niah_single answered, qa not: full KV 50%, every compressed cell too.
    assert "| full KV | 50.0 | 50.0 |" in table
    assert "| rocketkv | 50.0 | 50.0 |" in table
    assert "| streaming | 75.0 | 75.0 |" in table  # greedy agreement 3 of 4
    assert "Accuracy (mean score %)" in out
    # Re-running resumes: nothing new, same bytes.
    before = (tmp_path / "results.jsonl").read_bytes()
    assert _run(argv, capsys)[0] == 0
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_fidelity_skipped_without_logprob_functions(capsys, tmp_path):
    args = _parse(["--smoke", "--tasks", "niah_single", "--out", str(tmp_path), "--no-progress"])
    code = run_eval_command(args, fake_generate, WhitespaceTokenizer())
    assert code == 0
    assert "fidelity skipped" in capsys.readouterr().err
    assert not (tmp_path / "fidelity.jsonl").exists()
