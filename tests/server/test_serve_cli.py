"""`rocketkv serve`'s flags (parsed only: the engine is not built here)."""

from __future__ import annotations

import pytest

from rocketkv_jax.cli import build_parser
from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.cli.serve import served_name


def test_help_explains(capsys):
    assert cli_main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for words in ("/v1/chat/completions", "127.0.0.1", "SIGTERM", "--api-key",
                  "ROCKETKV_JAX_API_KEY", "(default: 8000)", "429 with Retry-After"):
        assert words in out


def test_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.method, args.token_budget, args.slots,
            args.max_queue, args.prefill_chunk, args.max_body_mb) == (
        "127.0.0.1", 8000, "rocketkv", 256, 8, 64, 256, 8)
    assert (args.kv_memory, args.prefix_cache, args.api_key) == (4.0, 1.0, None)
    assert args.stage2 == "auto"
    args = build_parser().parse_args(["serve", "--prefix-cache", "0", "--kv-memory", "1.5"])
    assert (args.prefix_cache, args.kv_memory) == (0.0, 1.5)


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "argument --port: must be < 65536"),
    (["--port", "0"], "argument --port: must be >= 1"),
    (["--slots", "0"], "argument --slots: must be >= 1"),
    (["--max-queue", "-1"], "argument --max-queue: must be >= 0"),
    (["--prefill-chunk", "8"], "argument --prefill-chunk: must be >= 16"),
    (["--kv-memory", "0"], "argument --kv-memory: must be a finite number > 0"),
    (["--prefix-cache", "-1"], "argument --prefix-cache: must be a finite number >= 0"),
    (["--max-body-mb", "0"], "argument --max-body-mb: must be >= 1"),
    (["--token-budget", "x"], "argument --token-budget: must be an integer"),
    (["--kernels", "cuda"], "argument --kernels: invalid choice"),
    (["--stage2", "sometimes"], "argument --stage2: invalid choice"),
])
def test_bad_flags_are_one_error_line(capsys, argv, message):
    assert cli_main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "error:" in line]
    assert out == "" and len(lines) == 1 and message in lines[0], err


def test_a_bad_method_is_refused_before_loading(capsys):
    assert cli_main(["serve", "--method", "magic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --method magic: unknown KV method 'magic'")
    assert err.count("\n") == 1


def test_the_served_name():
    assert served_name(None) == "smollm2"
    assert served_name("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert served_name("/data/ckpts/my-llama/") == "my-llama"


@pytest.mark.parametrize("argv, message", [
    (["--distributed", "10.0.0.1:7777"], "give ADDRESS:PORT,PROCESSES,ID"),
    (["--distributed", "10.0.0.1,2,0"], "give ADDRESS:PORT,PROCESSES,ID"),
    (["--distributed", "10.0.0.1:7777,two,0"], "PROCESSES and ID are whole numbers"),
    (["--distributed", "10.0.0.1:7777,1,0"], "needs 2 or more processes"),
    (["--distributed", "10.0.0.1:7777,2,2"], "an ID from 0 to PROCESSES - 1"),
    (["--distributed", "10.0.0.1:7777,2,0"], "--distributed needs --mesh"),
    (["--mesh", "data=1", "--weight-layout", "per-layer"], "per-layer runs on one device"),
])
def test_bad_distributed_and_layout_flags_are_refused_before_loading(capsys, argv, message):
    assert cli_main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
