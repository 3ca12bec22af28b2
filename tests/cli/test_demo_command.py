"""`rocketkv demo` (rocketkv_jax/cli/demo.py): the command prints the side-by-side table,
and bad flags or a context past the model end in one `error:` line (the run itself:
tests/eval/test_demo.py)."""

from __future__ import annotations

import pytest

from rocketkv_jax.cli import main as cli_main

CONTEXT, BUDGET = 448, 64


@pytest.fixture(scope="module")
def tiny_checkpoint_dir(tmp_path_factory):
    from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config

    config = tiny_checkpoint_config(max_position_embeddings=512, eos_token_ids=(3,))
    return make_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", config)


def test_demo_command_prints_the_table(tiny_checkpoint_dir, capsys):
    code = cli_main(["demo", "--model", str(tiny_checkpoint_dir), "--context", str(CONTEXT),
                     "--token-budget", str(BUDGET), "--kernels", "reference"])
    out = capsys.readouterr().out
    assert code == 0
    assert "full KV" in out and f"rocketkv M={BUDGET}" in out and "KV read / step" in out


@pytest.mark.parametrize("flags, message", [
    (["--context", "10"], "--context"),
    (["--token-budget", "0"], "--token-budget"),
])
def test_demo_refuses_bad_flags(flags, message, capsys):
    assert cli_main(["demo", *flags]) == 2
    assert message in capsys.readouterr().err


def test_demo_context_past_the_model_is_one_error_line(tiny_checkpoint_dir, capsys):
    code = cli_main(["demo", "--model", str(tiny_checkpoint_dir), "--context", "4096"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "512" in err
