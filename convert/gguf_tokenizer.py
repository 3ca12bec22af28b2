"""The tokenizer of a GGUF file, rebuilt from its `tokenizer.ggml.*` metadata with the
`tokenizers` library: byte-level BPE only (the `gpt2` kind llama.cpp writes for Llama-3,
SmolLM, Qwen and friends). Every id and list is checked against the vocabulary first."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from gguf import TokenType
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

from rocketkv_jax.tokenizer import compile_chat_template

from .gguf_file import GGUFFile
from .hf import ConversionError

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

SPECIAL_TOKENS = ("bos", "eos", "unknown", "padding", "eot", "eom")
# llama.cpp's token types: gguf.TokenType (1 normal .. 6 byte) and 0, "undefined"
TOKEN_TYPES = frozenset({0} | {int(t) for t in TokenType})


def special_token_ids(gguf: GGUFFile, vocab: int | None = None) -> dict[str, int]:
    """{"bos": id, ...} for each `tokenizer.ggml.<kind>_token_id` present, each an index
    into the token list (and below `vocab`, the embedding's rows)."""
    tokens = gguf.strings("tokenizer.ggml.tokens", None)
    limits = [n for n in (vocab, None if tokens is None else len(tokens)) if n is not None]
    limit = min(limits) if limits else None
    ids = {}
    for kind in SPECIAL_TOKENS:
        i = gguf.integer(f"tokenizer.ggml.{kind}_token_id", None, minimum=0, below=limit)
        if i is not None:
            ids[kind] = i
    return ids



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


def build_tokenizer(gguf: GGUFFile) -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the byte-level BPE the GGUF metadata describes."""
    kind = gguf.string("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise ConversionError(
            f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') can be rebuilt; "
            f"convert the HF model directory instead, which carries tokenizer.json"
        )
    tokens: list[str] = gguf.strings("tokenizer.ggml.tokens")
    if not tokens:
        raise gguf.error("tokenizer.ggml.tokens", "is empty")
    merges = []
    for i, m in enumerate(gguf.strings("tokenizer.ggml.merges", [])):
        pair = tuple(m.split(" "))
        if len(pair) != 2 or not all(pair):
            raise gguf.error("tokenizer.ggml.merges",
                             f"item {i} {m!r} is not two tokens separated by one space")
        merges.append(pair)
    types = gguf.integers("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise gguf.error("tokenizer.ggml.token_type", f"lists {len(types)} token types for "
                         f"{len(tokens)} tokens (tokenizer.ggml.tokens)")
    bad = next((i for i, t in enumerate(types) if t not in TOKEN_TYPES), None)
    if bad is not None:
        raise gguf.error("tokenizer.ggml.token_type", f"item {bad} is {types[bad]}, not a "
                         f"token type ({min(TOKEN_TYPES)} to {max(TOKEN_TYPES)})")
    ids = special_token_ids(gguf)
    special_ids = set(ids.values())

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
    pre = gguf.string("tokenizer.ggml.pre", "default")
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

    bos_id, eos_id = ids.get("bos"), ids.get("eos")
    add_bos = gguf.flag("tokenizer.ggml.add_bos_token", False) and bos_id is not None
    add_eos = gguf.flag("tokenizer.ggml.add_eos_token", False) and eos_id is not None
    single = (["bos"] if add_bos else []) + ["$A"] + (["eos"] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=[tokens[bos_id] if s == "bos" else tokens[eos_id] if s == "eos" else s
                for s in single],
        special_tokens=[(tokens[i], i) for i, s in ((bos_id, add_bos), (eos_id, add_eos)) if s],
    )
    tok.add_tokens([t for t in added if not t.special])
    tok.add_special_tokens([t for t in added if t.special])
    return tok


def gguf_tokenizer_files(gguf: GGUFFile, hf_config: dict[str, Any]) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json as text."""
    tokenizer = build_tokenizer(gguf)
    tokens = gguf.strings("tokenizer.ggml.tokens")
    ids = special_token_ids(gguf)
    names = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token",
             "padding": "pad_token"}
    special = {name: tokens[ids[k]] for k, name in names.items() if k in ids}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": gguf.flag("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": gguf.flag("tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": hf_config["max_position_embeddings"],
    }
    template = gguf.string("tokenizer.chat_template", None)
    if template is not None:  # checked here: a broken one would fail at the first chat
        compile_chat_template(template, lambda problem: gguf.error(
            "tokenizer.chat_template", problem.removeprefix("its chat template ")))
    if template is not None:
        tokenizer_config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False),
    }
