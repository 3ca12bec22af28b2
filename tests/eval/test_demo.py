"""`rocketkv demo`'s run (rocketkv_jax/eval/demo.py): a needle prompt answered by full KV
and RocketKV from one shared prefill, checked against `generate_ids` run per method.

The logic runs on a tiny random checkpoint (its answers are noise); the slow test runs
SmolLM2, which finds the needle with both methods. The command: tests/cli/test_demo_command.py.
"""

from __future__ import annotations

import pytest

from rocketkv_jax.eval.demo import format_demo, run_demo

CONTEXT, BUDGET, NEW = 448, 64, 8


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config

    from rocketkv_jax import load_model

    config = tiny_checkpoint_config(max_position_embeddings=512, eos_token_ids=(3,))
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", config))


def make_prompt(model) -> str:
    """The demo's prompt, built independently through the eval task's public API."""
    from rocketkv_jax.eval.tasks import make_sample

    return make_sample("niah_single", model.tokenizer, context_length=CONTEXT, index=0,
                       seed=0, depth=50.0, max_new_tokens=NEW).prompt


def test_demo_rows_match_generate_and_count_kv_reads(tiny_model):
    from rocketkv_jax import generate_ids, make_method

    r = run_demo(tiny_model, context=CONTEXT, token_budget=BUDGET, new_tokens=NEW)
    c = tiny_model.config
    assert NEW < r.prompt_tokens <= CONTEXT - NEW
    assert [row.label for row in r.rows][:2] == ["full KV", f"rocketkv M={BUDGET}"]
    # a third row forces stage 2 on exactly when the default plan attends densely
    dense = r.rows[1].plan.get("stage2_path") == "dense"
    assert len(r.rows) == (3 if dense else 2)
    if dense:
        assert r.rows[2].plan["stage2_path"] == "sparse"
    tok = tiny_model.tokenizer
    ids = tok.encode(make_prompt(tiny_model))
    assert len(ids) == r.prompt_tokens
    stop = tok.stop_ids(c.eos_token_ids)
    for row, method in zip(r.rows, (make_method("full"), make_method("rocketkv", BUDGET),
                                    make_method("rocketkv", BUDGET, stage2="on")),
                           strict=False):
        # the answer is what generate_ids prints when it stops at the tokenizer's stop ids
        out = generate_ids(tiny_model.params, c, [ids], method, max_new_tokens=NEW,
                           stop_ids=stop)
        expected = tok.decode([t for t in out.tokens[0] if t not in stop]).strip()
        assert row.answer == expected, row.label
        assert row.correct == (r.expected in row.answer)
        assert row.decode_tokens_per_s > 0 and row.kv_cache_bytes > 0
    # full KV reads every cached token at each step: n + 1 .. n + NEW - 1 tokens before
    # decode steps 2..NEW, K and V, f32, every layer and KV head
    n = r.prompt_tokens
    per_token = c.num_layers * c.num_kv_heads * 2 * c.head_dim * 4
    steps = range(n + 1, n + NEW)
    assert r.rows[0].kv_read_bytes == sum(s * per_token for s in steps) // len(steps)
    assert r.rows[0].prompt_kept == n
    # RocketKV's stage 1 evicted prompt tokens and its steps read fewer bytes
    for row in r.rows[1:]:
        assert BUDGET <= row.prompt_kept < n
        assert row.prompt_kept == row.plan["prompt_budget"]
        assert row.kv_read_bytes < r.rows[0].kv_read_bytes
    if dense:  # stage 2 reads about the budget: k_top tokens plus the page scoring
        assert r.rows[2].kv_read_bytes < r.rows[1].kv_read_bytes
        assert r.rows[2].kv_read_bytes <= 1.5 * BUDGET * per_token
    text = format_demo(r)
    assert r.needle in text and r.question in text
    for row in r.rows:
        assert row.label in text and f"{row.prompt_kept} of {n}" in text


def test_demo_refuses_a_context_the_model_cannot_hold(tiny_model):
    with pytest.raises(ValueError, match="longer than the model's context of 512"):
        run_demo(tiny_model, context=4096)


@pytest.mark.slow
def test_demo_smollm2_both_methods_find_the_needle(smollm2_checkpoint):
    from rocketkv_jax import load_model

    r = run_demo(load_model(smollm2_checkpoint))
    assert 3900 < r.prompt_tokens <= 4096
    full, rocket = r.rows[:2]
    assert full.correct and r.expected in full.answer
    assert rocket.correct and r.expected in rocket.answer
    for row in r.rows[1:]:
        assert row.correct
        assert row.prompt_kept < r.prompt_tokens / 2  # stage 1 evicted most of the prompt
        assert row.kv_read_bytes < full.kv_read_bytes / 3
