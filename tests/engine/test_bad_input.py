"""Bad input at the generate boundary: token ids outside the vocabulary, the context
limit (P + N - 1 positions), flags; each ends in one clear error, never wrong output."""

import numpy as np
import pytest
from tiny_checkpoint import (
    OUT_OF_VOCAB_WORD,
    make_tiny_checkpoint,
    tiny_checkpoint_config,
    tiny_params,
    words,
)

from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.generate import GenerateError, SharedPrefill, generate_ids
from rocketkv_jax.methods import Full

CFG = tiny_checkpoint_config()
PARAMS = tiny_params(CFG)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _cli(capsys, *args):
    code = cli_main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------ ids outside the vocab
@pytest.mark.parametrize("bad", [CFG.vocab_size, CFG.vocab_size + 195, -1])
def test_generate_ids_refuses_ids_outside_the_vocabulary(bad):
    with pytest.raises(GenerateError, match=rf"token id {bad} at position 2.*vocabulary of 61"):
        generate_ids(PARAMS, CFG, [[1, 2, 3], [4, 5, bad, 6]], Full(), max_new_tokens=2)


def test_shared_prefill_refuses_ids_outside_the_vocabulary():
    with pytest.raises(GenerateError, match=r"prompt 0 holds token id 61 .*vocabulary of 61"):
        SharedPrefill(PARAMS, CFG, [[1, 61]], max_new_tokens=2)


def test_cli_refuses_a_tokenizer_id_outside_the_model_vocabulary(ckpt, capsys):
    code, out, err = _cli(capsys, "--model", str(ckpt), "--method", "full",
                          "--prompt", f"w1 w2 {OUT_OF_VOCAB_WORD}", "--max-new-tokens", "2")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "token id 70" in err and "vocabulary of 61" in err


# ------------------------------------------------------------------ context limit
def test_prompt_of_the_whole_context_with_one_new_token_is_served():
    ctx = CFG.max_position_embeddings
    prompt = np.random.default_rng(1).integers(1, CFG.vocab_size, ctx).tolist()
    out = generate_ids(PARAMS, CFG, [prompt], Full(), max_new_tokens=1, stop_ids=[])
    assert len(out.tokens[0]) == 1
    # P + N - 1 == ctx is served, one more token is not
    out = generate_ids(PARAMS, CFG, [prompt[:-3]], Full(), max_new_tokens=4, stop_ids=[])
    assert len(out.tokens[0]) == 4
    with pytest.raises(GenerateError, match=r"needs 65 positions.*at most 4"):
        generate_ids(PARAMS, CFG, [prompt[:-3]], Full(), max_new_tokens=5)


def test_cli_prompt_of_the_whole_context_with_one_new_token(ckpt, capsys):
    code, out, err = _cli(capsys, "--model", str(ckpt), "--method", "full", "--prompt",
                          words(CFG.max_position_embeddings), "--max-new-tokens", "1")
    assert code == 0, err
