"""Shared fixtures: tiny random HF Llama/Mistral directories and the embedded SmolLM2 GGUF.

torch and transformers are imported lazily inside the fixtures so test modules that do not
need them stay fast to collect. They are optional (the [test] extra has them, [test-core]
does not): every fixture or test that needs them goes through `require_hf_libs` (tests
through the `hf_libs` fixture) and skips, with the reason, where they are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Tests that run the CLI in-process (cli.main(["generate", ...])) would turn on JAX's
# persistent compilation cache in the user's cache directory for the rest of the session;
# keep it off. Tests of the cache itself set the variable for their own subprocesses.
os.environ["ROCKETKV_JAX_COMPILE_CACHE"] = "off"
# The cost model's decisions are pinned to its built-in constants: a calibration file the
# user wrote into their cache (`rocketkv bench --calibrate`) must not change them. Tests of
# the calibration set the variable themselves.
os.environ["ROCKETKV_JAX_COST_FILE"] = "off"

@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop the programs it compiled (`drop_compiled_programs`).

    XLA:CPU maps each executable's machine code into memory regions of its own. A pytest
    process that kept every program it compiled reached the kernel's limit on a process's
    mappings (vm.max_map_count, 65530) about 800 tests in: the next compile failed, and
    jaxlib crashed with a segfault while raising that failure (a core dump held 65,410
    mappings)."""
    yield
    from rocketkv_jax.engine.compile import drop_compiled_programs

    drop_compiled_programs()


HF_LIBS_REASON = "is not installed (the [test] extra; see docs/versions.md)"


def require_hf_libs() -> None:
    """Skip the running test unless torch and transformers import."""
    for name in ("torch", "transformers"):
        pytest.importorskip(name, reason=f"{name} {HF_LIBS_REASON}")


@pytest.fixture(scope="session")
def hf_libs() -> None:
    """Request it in a test or fixture that imports torch or transformers itself."""
    require_hf_libs()


# Small enough to build in milliseconds, large enough for GQA and two layers.
TINY_BASE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def randomize_(model: Any, seed: int) -> None:
    """Replace HF's init (norms of exactly 1, linears of std 0.02) with values that make
    every tensor distinct and the logits O(1), so a transposition or a swapped layer
    shows up as a large error."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / p.shape[1] ** 0.5)


def build_hf_model(kind: str = "llama", seed: int = 0, **overrides: Any) -> Any:
    """A float32 `LlamaForCausalLM` / `MistralForCausalLM` with random weights, eval mode."""
    require_hf_libs()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    cfg_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[kind]
    kwargs = {**TINY_BASE, **overrides}
    attn = kwargs.pop("attn_implementation", "eager")
    config = cfg_cls(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `hf_model_dir(kind, seed=0, max_shard_size=None, save_dtype=None, **cfg)`
    saves a random tiny model with `save_pretrained` once per session and returns its dir."""
    cache: dict[str, Path] = {}

    def make(kind: str = "llama", seed: int = 0, max_shard_size: str | None = None,
             save_dtype: str | None = None, **overrides: Any) -> Path:
        require_hf_libs()
        key = json.dumps([kind, seed, max_shard_size, save_dtype, overrides], sort_keys=True)
        if key not in cache:
            import torch

            model = build_hf_model(kind, seed, **overrides)
            if save_dtype is not None:
                model = model.to(getattr(torch, save_dtype))
            path = tmp_path_factory.mktemp(f"hf-{kind}")
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save_pretrained(path, **kwargs)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(hf_model_dir: Callable[..., Path]) -> Path:
    return hf_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(hf_model_dir: Callable[..., Path]) -> Path:
    return hf_model_dir("llama", seed=1, max_shard_size="20KB")


@pytest.fixture(scope="session")
def tiny_mistral_dir(hf_model_dir: Callable[..., Path]) -> Path:
    return hf_model_dir("mistral", seed=2, sliding_window=8, num_key_value_heads=1)


def _load_hf_state_dict(path: Path) -> dict[str, Any]:
    """All tensors of an HF safetensors directory as float32 numpy (via torch)."""
    require_hf_libs()
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update({k: v.float().numpy() for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="session")
def hf_state_dict() -> Callable[[Path], dict[str, Any]]:
    """`hf_state_dict(dir)`: every tensor of an HF safetensors directory as float32 numpy."""
    return _load_hf_state_dict


@pytest.fixture(scope="session")
def hf_model_builder() -> Callable[..., Any]:
    """`hf_model_builder(kind, seed, **config)`: the in-memory model `hf_model_dir` saves."""
    return build_hf_model


# ----------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from rocketkv_jax.convert import ConversionError, embedded_smollm2_gguf

    try:
        return embedded_smollm2_gguf()
    except ConversionError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2 GGUF converted once per session by the CLI, float32."""
    from rocketkv_jax.cli.convert import main

    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    assert main([str(smollm2_gguf), str(out), "--dtype", "float32", "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def smollm2_gguf_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding (a link to) the GGUF, as transformers' `gguf_file=` wants."""
    d = tmp_path_factory.mktemp("smollm2-gguf")
    os.symlink(smollm2_gguf, d / smollm2_gguf.name)
    return d


@pytest.fixture(scope="session")
def transformers_smollm2(smollm2_gguf_dir: Path, smollm2_gguf: Path) -> Any:
    """transformers' own float32 load of the GGUF (its dequantization and q/k un-permute).

    `from_pretrained(gguf_file=...)` insists on `accelerate`, which is not a project
    dependency; without it we run the same loader (`load_gguf_checkpoint`) by hand.
    """
    require_hf_libs()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = smollm2_gguf.name
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            smollm2_gguf_dir, gguf_file=name, dtype=torch.float32
        ).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(smollm2_gguf_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(parsed["tensors"], strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    model.tie_weights()
    return model.eval()
