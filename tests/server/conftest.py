"""The server's tests: SmolLM2's real tokenizer (built from the embedded GGUF's tokenizer
files, as rocketkv-convert writes them, without converting the weights) and a fake engine."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer_dir(smollm2_gguf, tmp_path_factory):
    from rocketkv_jax.convert.gguf import gguf_hf_config, open_gguf
    from rocketkv_jax.convert.gguf_tokenizer import gguf_tokenizer_files

    gguf = open_gguf(smollm2_gguf)
    d = tmp_path_factory.mktemp("smol-tokenizer")
    for name, text in gguf_tokenizer_files(gguf, gguf_hf_config(gguf)).items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from rocketkv_jax.tokenizer import Tokenizer

    return Tokenizer(smol_tokenizer_dir)
