"""Tiny model files written by the tests, numpy only: an HF Llama directory
(`tiny_checkpoint.make_hf_dir`) and the same weights as a Llama GGUF, with hooks to
damage the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from tiny_checkpoint import HF_CONFIG

from rocketkv_jax.convert.hf import expected_hf_shapes
from rocketkv_jax.models.config import ModelConfig

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
GGUF_LAYER_PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def hf_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with the HF names and shapes of `HF_CONFIG`."""
    rng = np.random.default_rng(seed)
    shapes = expected_hf_shapes(ModelConfig.from_hf_dict(HF_CONFIG))
    return {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    i, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{i}.{GGUF_LAYER_PARTS[rest.removesuffix('.weight')]}.weight"


def write_gguf(path: Path, edit_meta=None, *, cfg: dict | None = None,
               quantize: dict[str, object] | None = None) -> Path:
    """`HF_CONFIG`'s model as an F32 Llama GGUF with a byte-level BPE vocabulary.

    `edit_meta(meta)` may change the metadata dict (key -> (value, GGUFValueType or None))
    before it is written; a value of None removes the key. `quantize` maps GGUF tensor
    names to `edit(q8_0_bytes) -> bytes`: those tensors are stored Q8_0 (blocks of a float16
    scale and 32 int8 values), edited first. (q/k rows are not permuted: these files test
    refusals, not numerics.)
    """
    from rocketkv_jax.convert.gguf_tokenizer import _bytes_to_unicode

    cfg = {**HF_CONFIG, **(cfg or {})}
    V = cfg["vocab_size"]
    tokens = list(_bytes_to_unicode().values())[:V - 3] + ["!\"", "<s>", "</s>"]
    T = gguf.GGUFValueType
    meta = {
        "llama.block_count": (cfg["num_hidden_layers"], T.UINT32),
        "llama.context_length": (cfg["max_position_embeddings"], T.UINT32),
        "llama.embedding_length": (cfg["hidden_size"], T.UINT32),
        "llama.feed_forward_length": (cfg["intermediate_size"], T.UINT32),
        "llama.attention.head_count": (cfg["num_attention_heads"], T.UINT32),
        "llama.attention.head_count_kv": (cfg["num_key_value_heads"], T.UINT32),
        "llama.attention.key_length": (cfg["head_dim"], T.UINT32),
        "llama.rope.freq_base": (cfg["rope_theta"], T.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (cfg["rms_norm_eps"], T.FLOAT32),
        "llama.vocab_size": (V, T.UINT32),
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.pre": ("default", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY),
        "tokenizer.ggml.token_type": ([1] * (V - 2) + [3, 3], T.ARRAY),
        "tokenizer.ggml.merges": (["! \""], T.ARRAY),
        "tokenizer.ggml.bos_token_id": (V - 2, T.UINT32),
        "tokenizer.ggml.eos_token_id": (V - 1, T.UINT32),
        "tokenizer.chat_template": ("{% for m in messages %}{{ m.content }}{% endfor %}",
                                    T.STRING),
    }
    if edit_meta is not None:
        edit_meta(meta)
    w = gguf.GGUFWriter(path, "llama")
    for key, (value, kind) in meta.items():
        if value is not None:
            w.add_key_value(key, value, kind)
    for name, t in hf_tensors().items():
        g = gguf_name(name)
        if g in (quantize or {}):
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
            q = np.frombuffer(quantize[g](q.tobytes()), np.uint8).reshape(q.shape)
            w.add_tensor(g, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path
