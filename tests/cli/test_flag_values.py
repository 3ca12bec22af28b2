"""Numbers users give: every numeric flag of every command and the API argument behind it
refuse NaN, infinities, non-numbers and values outside their range with one rule
(`rocketkv_jax.checks`), and a seed is any integer in [0, 2**64) whose 64 bits all count."""

import argparse
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params, words

from rocketkv_jax import checks
from rocketkv_jax.cli import build_parser
from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.engine.conversation import Conversation, ConversationError
from rocketkv_jax.engine.generate import GenerateError, generate_ids
from rocketkv_jax.methods import Full
from rocketkv_jax.sampling import Sampling, prng_key

CFG = tiny_checkpoint_config()
PARAMS = tiny_params(CFG)
COMMANDS = ("generate", "chat", "bench", "eval")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _numeric_flags():
    """(command, flag) of every flag whose value is a number, found by its type."""
    out = []
    for command, p in _subparsers().items():
        for a in p._actions:
            if a.option_strings and hasattr(a.type, "check"):
                out.append((command, a.option_strings[0]))
    return out


NUMERIC_FLAGS = _numeric_flags()


def test_every_numeric_flag_is_checked():
    """No flag of any command parses a bare int or float (which would take NaN,
    infinities and any range): each goes through `checks.flag`."""
    bare = [(c, a.option_strings[0]) for c, p in _subparsers().items()
            for a in p._actions if a.type in (int, float)]
    assert bare == []
    flags = {f"{c} {f}" for c, f in NUMERIC_FLAGS}
    for expected in ("generate --temperature", "generate --top-p", "generate --seed",
                     "generate --prefill-chunk", "chat --capacity", "chat --seed",
                     "bench --prefill-memory-gb", "bench --seed", "eval --seed",
                     "eval --skip-layers", "eval --samples", "eval --fidelity-tokens",
                     "eval --fidelity-samples", "eval --batch-size", "eval --max-new-tokens",
                     "eval --multi-turn"):
        assert expected in flags


def _parse_error(capsys, argv):
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (argv, code, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("command, name", NUMERIC_FLAGS)
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999", "-1", "abc", ""])
def test_numeric_flags_refuse_meaningless_numbers(capsys, command, name, bad):
    line = _parse_error(capsys, [command, f"{name}={bad}"])
    assert f"argument {name}: must be" in line, line


@pytest.mark.parametrize("argv, message", [
    (["generate", "--temperature", "-0.5"], "must be 0 or a finite number >= 1e-06 (0 = greedy)"),
    (["generate", "--temperature", "1e-300"], "must be 0 or a finite number >= 1e-06"),
    (["generate", "--top-p", "0"], "must be in (0, 1] (1 = off), got 0.0"),
    (["generate", "--top-p", "1.5"], "must be in (0, 1]"),
    (["generate", "--top-k", "2.5"], "must be an integer, got '2.5'"),
    (["generate", "--max-new-tokens", "0"], "must be >= 1, got 0"),
    (["generate", "--token-budget", "0"], "must be >= 1 (KV tokens read per decode step"),
    (["generate", "--token-budget", str(2**31)], "must be < 2**31"),
    (["generate", "--batch-size", "0"], "must be >= 1"),
    (["generate", "--prefill-chunk", "15"], "must be >= 16 (tokens per prefill chunk; 0 ="),
    (["generate", "--seed", str(2**64)], "must be < 2**64"),
    (["generate", "--seed", "1.0"], "must be an integer"),
    (["chat", "--capacity", "1"], "must be >= 2 (tokens of history per row)"),
    (["chat", "--top-p", "nan"], "must be in (0, 1]"),
    (["bench", "--warmup", "-1"], "must be >= 0"),
    (["bench", "--prefill-memory-gb", "0"], "must be a finite number > 0"),
    (["eval", "--seed", "-3"], "must be >= 0"),
])
def test_flag_errors_name_the_flag_and_the_rule(capsys, argv, message):
    line = _parse_error(capsys, argv)
    assert f"argument {argv[1]}: " in line and message in line, line


def test_the_flag_and_the_api_say_the_same_rule(capsys):
    line = _parse_error(capsys, ["generate", "--temperature", "nan"])
    with pytest.raises(ValueError) as e:
        Sampling(temperature=math.nan)
    rule = "must be 0 or a finite number >= 1e-06 (0 = greedy), got nan"
    assert rule in line and str(e.value) == "temperature " + rule


def test_zero_prefill_chunk_means_one_pass():
    args = build_parser().parse_args(["generate", "--prefill-chunk", "0"])
    assert args.prefill_chunk is None
    assert build_parser().parse_args(["generate"]).prefill_chunk == 4096


def test_bench_token_counts_are_positive():
    from rocketkv_jax.bench.config import BenchError, token_counts

    for bad in ("0", "-4k", "0k"):
        with pytest.raises(BenchError, match="must be positive"):
            token_counts(bad, "contexts")


# ------------------------------------------------------------------------ the API
@pytest.mark.parametrize("kw, message", [
    (dict(temperature=math.nan), "temperature must be 0 or a finite number >= 1e-06"),
    (dict(temperature=math.inf), "temperature must be 0 or a finite number >= 1e-06"),
    (dict(temperature=1e-39), "temperature must be 0 or a finite number >= 1e-06"),
    (dict(temperature="0.7"), "temperature must be a number"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=math.nan), "top_p must be in (0, 1]"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
])
def test_sampling_refuses_meaningless_numbers(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Sampling(**kw)


def test_sampling_keeps_plain_numbers():
    s = Sampling(np.float32(0.5), np.int64(3), 1)
    assert (s.temperature, s.top_k, s.top_p) == (0.5, 3, 1.0)
    assert type(s.top_k) is int and hash(s) == hash(Sampling(0.5, 3, 1.0))


# ------------------------------------------------------------------------ seeds
def test_prng_key_is_jaxs_64_bit_key():
    """Our key of a seed is what JAX's own `key(seed)` gives with 64-bit ints enabled
    (computed in a process that enables them), for seeds past 32 and 63 bits too."""
    seeds = [0, 1, 2**32 + 1, 2**40 + 7, 2**63, 2**64 - 1]
    code = ("import jax, jax.numpy as jnp, numpy as np\n"
            f"for s in {seeds}:\n"
            "    print(*np.asarray(jax.random.key_data(jax.random.key(jnp.uint64(s)))))")
    env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    want = [list(map(int, line.split())) for line in r.stdout.splitlines()]
    assert [prng_key(s).tolist() for s in seeds] == want


@pytest.mark.parametrize("a, b", [(1, 2**32 + 1), (0, 2**32), (5, 2**63 + 5),
                                  (2**63, 2**64 - 1), (7, 2**40 + 7)])
def test_distinct_seeds_sample_differently(a, b):
    """Seeds that agree in their low 32 bits (all JAX's 32-bit mode would keep) give
    different samples; the same seed gives the same ones."""
    assert prng_key(a).tolist() != prng_key(b).tolist()
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12]]
    s = Sampling(temperature=5.0)  # near uniform over 61 tokens: equal by chance ~61**-32

    def run(seed):
        return generate_ids(PARAMS, CFG, prompts, Full(), max_new_tokens=8, sampling=s,
                            seed=seed, stop_ids=[]).tokens

    assert run(a) != run(b)
    assert run(b) == run(b)


@pytest.mark.parametrize("seed, message", [
    (-1, "seed must be >= 0"), (2**64, r"seed must be < 2\*\*64"),
    (1.0, "seed must be an integer"), ("3", "seed must be an integer"),
    (True, "seed must be an integer"),
])
def test_seeds_outside_the_range_are_refused(seed, message):
    with pytest.raises(GenerateError, match=message):
        generate_ids(PARAMS, CFG, [[1, 2]], Full(), max_new_tokens=2, seed=seed)
    conv = Conversation(PARAMS, CFG, Full(), capacity=32)
    conv.append([1, 2, 3])
    with pytest.raises(ConversationError, match=message):
        conv.generate(2, seed=seed)


def test_conversation_turns_fold_their_number_into_the_key():
    """Reply n of a conversation samples with prng_key(seed, n): no `seed + n`, so the
    largest seed works at every turn, and a reset replays the same stream."""
    s = Sampling(temperature=5.0)
    seed = 2**64 - 1
    conv = Conversation(PARAMS, CFG, Full(), capacity=60, stop_ids=[])
    conv.append([1, 2, 3])
    first = conv.generate(8, sampling=s, seed=seed).tokens
    conv.append([4, 5])
    second = conv.generate(8, sampling=s, seed=seed).tokens
    conv.reset()
    conv.append([1, 2, 3])
    assert conv.generate(8, sampling=s, seed=seed).tokens == first
    assert first != second
    # reply 0 is the stream of prng_key(seed, 0), what generate_ids' key would be for it
    assert prng_key(seed, 0).tolist() != prng_key(seed).tolist()
    assert prng_key(seed, 1).tolist() != prng_key(seed, 0).tolist()


def test_cli_takes_the_largest_seed(ckpt, capsys, tmp_path):
    code = cli_main(["generate", "--model", str(ckpt), "--method", "full", "--prompt",
                     "w1 w2", "--max-new-tokens", "3", "--temperature", "1",
                     "--seed", str(2**64 - 1)])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip(), err
    turns = tmp_path / "turns.json"
    turns.write_text(f'["{words(3)}", "{words(2, seed=1)}", "{words(2, seed=2)}"]')
    code = cli_main(["chat", "--model", str(ckpt), "--method", "full", "--turns", str(turns),
                     "--capacity", "40", "--max-new-tokens", "3", "--temperature", "1",
                     "--seed", str(2**64 - 1)])
    out, err = capsys.readouterr()
    assert code == 0 and len(out.splitlines()) == 3, err


def test_checks_accept_numpy_numbers_and_refuse_bools():
    assert checks.seed(np.uint64(2**64 - 1)) == 2**64 - 1
    assert checks.max_new_tokens(np.int32(4)) == 4
    with pytest.raises(ValueError, match="must be an integer"):
        checks.max_new_tokens(True)
    assert checks.prefill_chunk(None) is None
