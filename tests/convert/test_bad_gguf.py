"""Malformed GGUF files as `rocketkv-convert` meets them: every size the file claims is
bounded before anything is allocated for it, every metadata value is checked for its
type and range, and each fault is one `error:` line naming the file (and key), exit 2."""

from __future__ import annotations

import random
import struct
import warnings
from pathlib import Path

import gguf
import pytest
from convert_runs import convert_error, run_convert_bounded
from crafted import write_gguf

from rocketkv_jax.cli.convert import main

T = gguf.GGUFValueType


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_the_crafted_file_converts(good_gguf, tmp_path):
    assert main([str(good_gguf), str(tmp_path / "out"), "-q"]) == 0


def _set(key, value, kind):
    return lambda meta: meta.update({key: (value, kind)})


@pytest.mark.parametrize("edit, says", [
    (_set("llama.attention.head_count", 0, T.UINT32),
     "llama.attention.head_count is 0, but must be >= 1"),
    (_set("llama.attention.head_count_kv", 0, T.UINT32),
     "llama.attention.head_count_kv is 0, but must be >= 1"),
    (_set("llama.block_count", "2", T.STRING),
     "llama.block_count must be an integer, got string"),
    (_set("llama.embedding_length", None, None), "llama.embedding_length is missing"),
    (_set("llama.context_length", 0, T.UINT32), "llama.context_length is 0"),
    (_set("llama.rope.freq_base", float("nan"), T.FLOAT32),
     "llama.rope.freq_base is nan, but must be a finite positive number"),
    (_set("llama.rope.scaling.factor", -2.0, T.FLOAT32), "llama.rope.scaling.factor is -2.0"),
    (_set("tokenizer.ggml.bos_token_id", 1000, T.UINT32),
     "tokenizer.ggml.bos_token_id is 1000, but must be >= 0 and < 64"),
    (_set("tokenizer.ggml.eos_token_id", 64, T.UINT32),
     "tokenizer.ggml.eos_token_id is 64, but must be >= 0 and < 64"),
    (_set("tokenizer.ggml.token_type", [1] * 10, T.ARRAY),
     "tokenizer.ggml.token_type lists 10 token types for 64 tokens"),
    (_set("tokenizer.ggml.token_type", [1] * 63 + [9], T.ARRAY),
     "tokenizer.ggml.token_type item 63 is 9, not a token type"),
    (_set("tokenizer.ggml.tokens", [1, 2, 3], T.ARRAY),
     "tokenizer.ggml.tokens must be an array of strings, got array of int32"),
    (_set("tokenizer.ggml.tokens", None, None), "tokenizer.ggml.tokens is missing"),
    (_set("llama.vocab_size", 10, T.UINT32),
     "tokenizer.ggml.tokens lists 64 tokens, more than the 10 rows of the embedding"),
    (_set("tokenizer.ggml.merges", ["abc"], T.ARRAY),
     "tokenizer.ggml.merges item 0 'abc' is not two tokens separated by one space"),
    (_set("tokenizer.ggml.add_bos_token", 1, T.UINT8),
     "tokenizer.ggml.add_bos_token must be true or false, got uint8"),
    (_set("tokenizer.chat_template", "x\n{% for %}", T.STRING),
     "tokenizer.chat_template has a syntax error at template line 2"),
    (_set("general.architecture", 5, T.UINT32),
     "general.architecture must be a string, got uint32"),
])
def test_bad_metadata_value_names_the_file_and_key(capsys, tmp_path, edit, says):
    src = write_gguf(tmp_path / "m.gguf", edit)
    msg = convert_error(capsys, src, tmp_path / "out")
    assert f"{src}: GGUF metadata " in msg and says in msg, msg


def test_layer_count_beyond_the_tensors_is_refused_before_sizing_anything(capsys, tmp_path):
    src = write_gguf(tmp_path / "m.gguf", _set("llama.block_count", 10**9, T.UINT32))
    msg = convert_error(capsys, src, tmp_path / "out")
    assert "says 1000000000 layers (llama.block_count in m.gguf)" in msg
    assert "the weights hold 2 (model.layers.0 to model.layers.1)" in msg


def test_a_quantized_block_with_an_infinite_scale_is_refused_by_name(capsys, tmp_path):
    """inf * 0 in the dequantization: the NaN is named, with no numpy warning lines."""
    def inf_scale(q: bytes) -> bytes:
        return b"\x00\x7c\x00" + q[3:]  # first block: scale float16 +inf, first value 0

    src = write_gguf(tmp_path / "m.gguf", quantize={"blk.1.ffn_up.weight": inf_scale})
    with warnings.catch_warnings(record=True) as caught:  # a user would see them on stderr
        warnings.simplefilter("always")
        msg = convert_error(capsys, src, tmp_path / "out")
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []
    assert "tensor blk.1.ffn_up.weight (model.layers.1.mlp.up_proj.weight) in m.gguf" in msg
    assert "NaN" in msg and "Inf" in msg, msg


# ----------------------------------------------------------------- the layout
def _field_offset(path: Path, key: str) -> int:
    """Byte offset of metadata `key`'s value (after its name and type)."""
    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(key) + 4


def _tensor_info_offset(path: Path, i: int) -> int:
    return gguf.GGUFReader(path).tensors[i].field.offset


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _layout_cases(path: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (damaged file bytes, what the error says)."""
    data = path.read_bytes()
    tokens = _field_offset(path, "tokenizer.ggml.tokens")  # item type u32, count u64, items
    types = _field_offset(path, "tokenizer.ggml.token_type")
    # uint8 items, 10**18 of them: gguf-py alone reads the rest of the file byte by byte,
    # then loops on empty reads at its end, growing memory until killed
    huge_array = bytearray(data)
    struct.pack_into("<IQ", huge_array, types, 0, 10**18)
    template = _field_offset(path, "tokenizer.chat_template")  # length u64, bytes
    info = _tensor_info_offset(path, 0)  # name length u64, name, n_dims u32, dims u64...
    name_len = struct.unpack_from("<Q", data, info)[0]
    return {
        "item count 10**18": (bytes(huge_array),
                              "item count of metadata 'tokenizer.ggml.token_type'"),
        "string count": (_patch(data, tokens + 4, "<Q", 10**18),
                         "item count of metadata 'tokenizer.ggml.tokens'"),
        "key/value count": (_patch(data, 16, "<Q", 10**12), "the key/value count at byte 16"),
        "tensor count": (_patch(data, 8, "<Q", 10**12), "the tensor count at byte 8"),
        "string length": (_patch(data, template, "<Q", 2**63),
                          "metadata 'tokenizer.chat_template'"),
        "dimension count": (_patch(data, info + 8 + name_len, "<I", 7), "has 7 dimensions"),
        "dimension": (_patch(data, info + 8 + name_len + 4, "<Q", 2**40),
                      "more than the file holds"),
        "tensor type": (_patch(data, info + 8 + name_len + 4 + 16, "<I", 999),
                        "unknown tensor type 999"),
        "data offset": (_patch(data, info + 8 + name_len + 4 + 16 + 4, "<Q", 2**40),
                        "ending past the end of the file"),
        "truncated data": (data[:-100], "ending past the end of the file"),
        "truncated header": (data[:tokens + 100], "claims 64 items, more than the 88 bytes"),
        "version": (_patch(data, 4, "<I", 7), "its version 7 is not supported"),
        "nested array": (_patch(data, tokens, "<I", 9), "is an array of arrays"),
        "value type": (_patch(data, tokens - 4, "<I", 77), "unknown value type 77"),
    }


@pytest.mark.parametrize("case", ["item count 10**18", "string count", "key/value count",
                                  "tensor count",
                                  "string length", "dimension count", "dimension",
                                  "tensor type", "data offset", "truncated data",
                                  "truncated header", "version", "nested array", "value type"])
def test_sizes_in_the_header_are_bounded_by_the_file(capsys, tmp_path, good_gguf, case):
    data, says = _layout_cases(good_gguf)[case]
    src = tmp_path / "m.gguf"
    src.write_bytes(data)
    msg = convert_error(capsys, src, tmp_path / "out")
    assert str(src) in msg and says in msg, msg


@pytest.mark.parametrize("case", ["item count 10**18", "string length"])
def test_huge_counts_fail_fast_under_a_memory_limit(tmp_path, good_gguf, case):
    """gguf-py alone loops on the 10**18-item array, growing memory until the limit's
    MemoryError (about a minute here; until the machine kills it without a limit)."""
    src = tmp_path / "m.gguf"
    src.write_bytes(_layout_cases(good_gguf)[case][0])
    run_convert_bounded(src, tmp_path / "out")


def test_fuzzed_files_are_one_clean_error_each(capsys, tmp_path, good_gguf):
    """Truncations at many offsets and seeded overwrites of header numbers: each either
    converts (a change inside a token's text) or is one clean error."""
    data = good_gguf.read_bytes()
    header_end = gguf.GGUFReader(good_gguf).data_offset
    rng = random.Random(0)
    blobs = [data[:n] for n in sorted({0, 3, 4, 8, 23, 24, header_end - 1, header_end,
                                       *(rng.randrange(len(data)) for _ in range(12))})]
    for _ in range(60):
        b = bytearray(data)
        at = rng.randrange(4, header_end - 8)
        kind = rng.randrange(3)
        if kind == 0:
            struct.pack_into("<Q", b, at, rng.choice([2**63, 2**64 - 1, 2**32, 10**9, 0]))
        elif kind == 1:
            struct.pack_into("<I", b, at, rng.choice([2**32 - 1, 0, 5, 9, 13]))
        else:
            b[at] ^= 1 << rng.randrange(8)
        blobs.append(bytes(b))
    for i, blob in enumerate(blobs):
        src, out = tmp_path / f"f{i}.gguf", tmp_path / f"out{i}"
        src.write_bytes(blob)
        rc = main([str(src), str(out), "-q"])
        err = capsys.readouterr().err
        if rc == 0:
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (i, rc, err)
        assert "ROCKETKV_DEBUG" not in err and src.name in err, (i, err)
