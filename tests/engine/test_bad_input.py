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
from rocketkv_jax.engine.generate import GenerateError, generate_ids
from rocketkv_jax.engine.shared_prefill import SharedPrefill
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


# ------------------------------------------------------------ flags name themselves
def _one_error(code, out, err):
    assert code == 2 and out == "", (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "100", "--temperature", "1"],
     "--top-k 100 is larger than the model's vocabulary of 61 tokens"),
    (["--method", "magic"], "--method 'magic' is not a KV method"),
])
def test_bad_flags_name_the_flag(ckpt, capsys, argv, message):
    err = _one_error(*_cli(capsys, "--model", str(ckpt), "--prompt", "w1 w2",
                           "--max-new-tokens", "2", *argv))
    assert message in err


@pytest.mark.parametrize("method", ["rocketkv", "full", "snapkv"])
def test_kernels_triton_without_a_gpu_says_so_for_any_prompt(ckpt, capsys, method):
    """Every method runs the prefill kernel, so --kernels triton is refused for each."""
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    for n in (2, 40):  # budget 16 >= the sequence, and budget < the sequence
        err = _one_error(*_cli(capsys, "--model", str(ckpt), "--prompt", words(n),
                               "--method", method, "--token-budget", "16",
                               "--kernels", "triton"))
        assert ("--kernels triton: the Triton kernels need a CUDA GPU, but JAX "
                f"{jax.__version__} runs on cpu; available here: reference, interpret, auto "
                "(= reference here)") in err



def test_kernels_mosaic_without_jax_0112_and_a_hopper_gpu_says_so(ckpt, capsys):
    """--kernels mosaic: one error line naming the requirement (exit 2) where it cannot run."""
    import jax

    from rocketkv_jax.kernels.backend import mosaic_runs_here

    if mosaic_runs_here():
        pytest.skip("the Mosaic GPU kernels run here")
    err = _one_error(*_cli(capsys, "--model", str(ckpt), "--prompt", words(2),
                           "--method", "rocketkv", "--kernels", "mosaic"))
    assert ("--kernels mosaic: the Mosaic GPU kernels need JAX >= 0.11.2 and a CUDA GPU of "
            "compute capability >= 9.0 (Hopper or newer), but ") in err
    assert jax.__version__ in err and "available here: reference" in err

def test_top_k_with_temperature_zero_warns_that_decoding_is_greedy(ckpt, capsys):
    code, _, err = _cli(capsys, "--model", str(ckpt), "--method", "full", "--prompt", "w1 w2",
                        "--max-new-tokens", "2", "--top-k", "5", "--top-p", "0.5")
    assert code == 0, err
    assert "warning: --top-k and --top-p have no effect with --temperature 0" in err


def test_mesh_with_too_many_devices_speaks_cli(ckpt, capsys):
    import jax

    n = jax.device_count() * 2
    err = _one_error(*_cli(capsys, "--model", str(ckpt), "--prompt", "w1 w2",
                           "--mesh", f"data={n}"))
    assert f"--mesh data={n} uses {n} devices" in err
    assert "jax.devices()" not in err and "devices=" not in err


def test_model_given_a_gguf_file_suggests_an_output_dir(tmp_path, capsys):
    gguf = tmp_path / "Tiny-Q4.gguf"
    gguf.write_bytes(b"GGUF\0\0\0\0")
    err = _one_error(*_cli(capsys, "--model", str(gguf), "--prompt", "w1 w2"))
    assert f"rocketkv-convert {gguf} {tmp_path / 'Tiny-Q4'}`" in err
    assert f"--model {tmp_path / 'Tiny-Q4'}" in err


# ------------------------------------------------------------------- the stats line
def test_stats_name_the_method_budget_and_the_dense_fallback():
    from rocketkv_jax.methods import make_method

    prompt = np.random.default_rng(2).integers(1, CFG.vocab_size, 40).tolist()
    sparse = generate_ids(PARAMS, CFG, [prompt], make_method("snapkv", 16, window=8),
                          max_new_tokens=3)
    line = sparse.stats.summary()
    assert "method: snapkv (budget 16) |" in line and "budget 16; dense" not in line
    # snapkv attends densely over its evicted cache: no kernel runs in its decode step
    assert "| kernels: reference (prefill; decode attention dense) |" in line
    dense = generate_ids(PARAMS, CFG, [prompt], make_method("rocketkv", 64), max_new_tokens=3)
    assert dense.stats.dense_fallback
    # bucket 48 + 3 new tokens
    assert "method: rocketkv (budget 64 >= sequence 51: dense attention" in dense.stats.summary()
    full = generate_ids(PARAMS, CFG, [prompt], Full(), max_new_tokens=3).stats.summary()
    assert "method: full |" in full


@pytest.mark.parametrize("method_kernels, prefill_kernels, shown", [
    ("auto", "auto", "reference"),  # what "auto" is on this CPU
    ("interpret", "reference", "prefill reference, decode interpret"),
    ("reference", "interpret", "prefill interpret, decode reference"),
])
def test_stats_name_the_kernels_that_ran(method_kernels, prefill_kernels, shown):
    import jax

    from rocketkv_jax.methods import make_method

    if jax.default_backend() == "gpu":
        pytest.skip("auto is Triton on a GPU")
    prompt = np.random.default_rng(2).integers(1, CFG.vocab_size, 40).tolist()
    method = make_method("quest", 16, page_size=4, kernels=method_kernels, stage2="on")
    out = generate_ids(PARAMS, CFG, [prompt], method, max_new_tokens=3, kernels=prefill_kernels)
    assert f"| kernels: {shown} |" in out.stats.summary()
    assert method.plan(CFG, 48, 3).describe()["kernels"] == shown.rsplit(" ", 1)[-1]


def test_stats_decode_speed_is_na_for_one_token():
    out = generate_ids(PARAMS, CFG, [[1, 2, 3]], Full(), max_new_tokens=1)
    assert "decode: n/a" in out.stats.summary() and "0.0 tok/s" not in out.stats.summary()


def test_batch_mode_prints_one_stats_line_per_batch_on_its_own_line(ckpt, capsys, tmp_path):
    batch = tmp_path / "prompts.txt"
    batch.write_text("w1 w2\nw3 w4 w5\nw6\n")
    code, out, err = _cli(capsys, "--model", str(ckpt), "--method", "full", "--batch-file",
                          str(batch), "--batch-size", "2", "--max-new-tokens", "2")
    assert code == 0, err
    assert len(out.splitlines()) == 3
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if "[stats]" in line]
    assert [line[:len("[stats] batch 1/2 | ")] for line in lines] == [
        "[stats] batch 1/2 | ", "[stats] batch 2/2 | "], err
    assert all("method: full |" in line for line in lines)


# ------------------------------------------------------------ --weight-layout
def test_per_layer_weights_generate_what_stacked_weights_do(ckpt, capsys):
    outs = []
    for layout in ("stacked", "per-layer"):
        code, out, err = _cli(capsys, "--model", str(ckpt), "--method", "rocketkv",
                              "--token-budget", "48", "--prompt", words(60),
                              "--max-new-tokens", "4", "--no-stream",
                              "--weight-layout", layout)
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_per_layer_weights_refuse_a_mesh(ckpt, capsys):
    err = _one_error(*_cli(capsys, "--model", str(ckpt), "--prompt", "w1 w2",
                           "--mesh", "data=1", "--weight-layout", "per-layer"))
    assert "--weight-layout per-layer runs on one device" in err
