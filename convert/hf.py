"""Hugging Face safetensors directory -> params pytree.

The HF tensor naming is the canonical one here: the GGUF reader maps its names onto it and
reuses `check_tensor_shapes` and `assemble_params`, so both sources are validated against
`ModelConfig.param_shapes()` the same way. No torch, no transformers: tensors are read with
`safetensors.safe_open(framework="flax")` (the numpy reader cannot hold bf16) and kept as
host numpy arrays (`ml_dtypes.bfloat16` for bf16).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from rocketkv_jax import interrupts
from rocketkv_jax.models.config import ConfigError, ModelConfig
from rocketkv_jax.paths import as_path, not_a_file

from ..models.params import unflatten

Params = dict[str, Any]

DTYPES: dict[str, np.dtype] = {  # names.CHECKPOINT_DTYPES
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}

# params key -> (HF name, with "{i}" for the layer index; stored transposed?)
HF_TENSORS: dict[str, tuple[str, bool]] = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
    "layers/attn_norm": ("model.layers.{i}.input_layernorm.weight", False),
    "layers/wq": ("model.layers.{i}.self_attn.q_proj.weight", True),
    "layers/wk": ("model.layers.{i}.self_attn.k_proj.weight", True),
    "layers/wv": ("model.layers.{i}.self_attn.v_proj.weight", True),
    "layers/wo": ("model.layers.{i}.self_attn.o_proj.weight", True),
    "layers/mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", False),
    "layers/w_gate": ("model.layers.{i}.mlp.gate_proj.weight", True),
    "layers/w_up": ("model.layers.{i}.mlp.up_proj.weight", True),
    "layers/w_down": ("model.layers.{i}.mlp.down_proj.weight", True),
    # present only when the config asks for them (see `ModelConfig.param_shapes`)
    "layers/bq": ("model.layers.{i}.self_attn.q_proj.bias", False),
    "layers/bk": ("model.layers.{i}.self_attn.k_proj.bias", False),
    "layers/bv": ("model.layers.{i}.self_attn.v_proj.bias", False),
    "layers/bo": ("model.layers.{i}.self_attn.o_proj.bias", False),
    "layers/b_gate": ("model.layers.{i}.mlp.gate_proj.bias", False),
    "layers/b_up": ("model.layers.{i}.mlp.up_proj.bias", False),
    "layers/b_down": ("model.layers.{i}.mlp.down_proj.bias", False),
    "layers/q_norm": ("model.layers.{i}.self_attn.q_norm.weight", False),
    "layers/k_norm": ("model.layers.{i}.self_attn.k_norm.weight", False),
}

# Non-parameter buffers some exporters write; skipped without complaint.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


class ConversionError(ValueError):
    """Input that cannot be converted: missing files, corrupt data, mismatched shapes."""


def resolve_dtype(dtype: str | np.dtype) -> np.dtype:
    """"bfloat16" / "float32" (or the numpy dtype itself) -> numpy dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    try:
        resolved = np.dtype(dtype)
    except TypeError:  # not a dtype at all: 5, an object
        resolved = None
    if resolved not in DTYPES.values():
        raise ConversionError(f"unsupported dtype {dtype!r}; choose bfloat16 or float32")
    return resolved


# ------------------------------------------------------------------------- naming
def hf_tensor_index(config: ModelConfig) -> dict[str, tuple[str, int | None, bool]]:
    """Every HF tensor the model needs: HF name -> (params key, layer index or None, transposed)."""
    shapes = config.param_shapes()
    index = {}
    for key, (pattern, transposed) in HF_TENSORS.items():
        if key not in shapes:  # lm_head when embeddings are tied
            continue
        if key.startswith("layers/"):
            for i in range(config.num_layers):
                index[pattern.format(i=i)] = (key, i, transposed)
        else:
            index[pattern] = (key, None, transposed)
    return index


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape ([out, in] for Linear weights), derived from `param_shapes()`."""
    shapes = config.param_shapes()
    expected = {}
    for name, (key, layer, transposed) in hf_tensor_index(config).items():
        shape = shapes[key][1:] if layer is not None else shapes[key]
        expected[name] = tuple(reversed(shape)) if transposed else tuple(shape)
    return expected


def check_tensor_shapes(
    config: ModelConfig,
    found: dict[str, tuple[int, ...]],
    *,
    describe: Callable[[str], str] = str,
    optional: Iterable[str] = (),
    layers_key: str = "num_hidden_layers in config.json",
    source: str = "the weights",
) -> None:
    """Raise `ConversionError` naming the first missing, unexpected or misshapen tensor.

    `found` maps HF names to the shapes the source holds. `describe(hf_name)` spells a
    tensor for the message (the GGUF reader adds its own name and file). Tensors in
    `optional` may be present or absent (a tied `lm_head.weight`); when present their
    shape must still match the embedding. `layers_key` names where the layer count came
    from, `source` where the tensors are. Nothing is sized by the config before its layer
    count matches the weights.
    """
    check_layer_count(config, found, layers_key)
    expected = expected_hf_shapes(config)
    optional = set(optional)
    for name, shape in expected.items():
        if name not in found:
            raise ConversionError(
                f"missing tensor {describe(name)} in {source}: expected shape {shape} from "
                f"the config"
            )
        if tuple(found[name]) != shape:
            raise ConversionError(
                f"tensor {describe(name)} has shape {tuple(found[name])}, expected {shape} "
                f"from the config (config and weights disagree)"
            )
    for name, shape in found.items():
        if name in expected or name.endswith(IGNORED_SUFFIXES):
            continue
        if name in optional:
            want = expected["model.embed_tokens.weight"]
            if tuple(shape) != want:
                raise ConversionError(
                    f"tensor {describe(name)} has shape {tuple(shape)}, expected {want} "
                    f"(tied to the embedding)"
                )
            continue
        raise ConversionError(
            f"unexpected tensor {describe(name)} with shape {tuple(shape)}: "
            f"not part of a {config.model_type} model with this config"
        )


def check_layer_count(config: ModelConfig, found: Iterable[str], layers_key: str) -> None:
    """The config's layer count must be the number of layers the weights hold.

    Checked before anything is built per layer: a config claiming 10**9 layers over
    2-layer weights is refused at once instead of listing 10**9 layers of tensor names.
    After it, every per-layer structure is bounded by the tensors actually present.
    """
    layers = sorted({int(m.group(1)) for n in found if (m := _LAYER_NAME.match(n))})
    if len(layers) == config.num_layers:
        return  # a gap (layers 0, 1, 3 of 3) is named as a missing tensor after this
    if not layers:
        held = "no model.layers.* tensors"
    elif layers == list(range(len(layers))):
        held = f"{len(layers)} (model.layers.0 to model.layers.{layers[-1]})"
    else:
        shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
        held = f"{len(layers)} (model.layers indices {shown})"
    raise ConversionError(
        f"the config says {config.num_layers} layers ({layers_key}) but the weights hold "
        f"{held}; config and weights disagree"
    )


def assemble_params(
    config: ModelConfig,
    get_tensor: Callable[[str], np.ndarray],
    dtype: str | np.dtype = "bfloat16",
    *,
    progress: bool = True,
    desc: str = "converting",
    describe: Callable[[str], str] = str,
) -> Params:
    """Read every tensor through `get_tensor(hf_name)` into the stacked params pytree.

    `get_tensor` returns the HF-orientation array (any float dtype). Returns nested dicts
    of host numpy arrays in `dtype`, shapes exactly `config.param_shapes()`. Call
    `check_tensor_shapes` first: this only asserts. A tensor with a NaN or Inf (in the
    source, or after the cast to `dtype`) is refused with `describe(hf_name)`: such a model
    converts fine and then generates garbage.
    """
    dtype = resolve_dtype(dtype)
    flat = {key: np.empty(shape, dtype) for key, shape in config.param_shapes().items()}
    index = hf_tensor_index(config)
    bar = tqdm(index.items(), desc=desc, unit="tensor", disable=not progress, leave=False)
    for name, (key, layer, transposed) in bar:
        interrupts.check()  # a deferred Ctrl-C (see rocketkv_jax.interrupts)
        w = np.asarray(get_tensor(name))
        if not np.issubdtype(w.dtype, np.floating) and w.dtype != DTYPES["bfloat16"]:
            raise ConversionError(f"tensor {name} has non-float dtype {w.dtype}")
        if transposed:
            w = w.T
        target = flat[key] if layer is None else flat[key][layer]
        assert w.shape == target.shape, (name, w.shape, target.shape)
        with np.errstate(all="ignore"):  # overflow to Inf is refused below, by name
            target[...] = w.astype(dtype)
        if not np.isfinite(target).all():
            _refuse_non_finite(describe(name), w, target)
    return unflatten(flat)


def _refuse_non_finite(name: str, source: np.ndarray, stored: np.ndarray) -> None:
    nan = int(np.isnan(stored).sum())
    inf = int(np.isinf(stored).sum())
    where = ("in the source" if not np.isfinite(source).all()
             else f"after the cast to {stored.dtype} (values beyond its range)")
    raise ConversionError(
        f"tensor {name} holds {nan} NaN and {inf} Inf values {where}; the weights are "
        f"damaged (re-download them) and would generate garbage"
    )


# ---------------------------------------------------------------- HF directory
def read_hf_config(src: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """`src/config.json` -> (ModelConfig, raw dict). Rejects features the model lacks."""
    path = src / "config.json"
    if not path.exists() and not path.is_symlink():
        raise ConversionError(
            f"{src} has no config.json: expected a Hugging Face model directory "
            f"(config.json + model.safetensors) or a .gguf file"
        )
    raw = read_json_object(src, "config.json")
    try:
        config = ModelConfig.from_hf_dict(raw)  # ConfigError for unsupported architectures
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):  # transformers maps both names to SiLU
        raise ConfigError(f"unsupported hidden_act {act!r} in {path}: only 'silu' (= 'swish') "
                          f"is implemented")
    return config, raw


def model_file(folder: Path, name: str, named_by: Path | None = None) -> Path:
    """`folder / name` for a file the converter reads, refused unless it stays inside
    `folder` and is a regular file.

    `name` comes from a file (`named_by`, e.g. the shard names of an index) or is one of
    our fixed names. It must be a relative path without "..", and its real path (symlinks
    resolved) must lie inside the folder's: a downloaded model cannot make the converter
    read /etc/passwd or ../other. The one outside target allowed is the Hugging Face hub
    cache's own layout, where snapshots/REV/NAME is a symlink to ../../blobs/SHA.
    """
    where = f"{named_by} names {name!r}" if named_by is not None else f"{folder / name}"
    rel = PurePosixPath(name)
    if (not name or "\0" in name or rel.is_absolute() or ".." in rel.parts
            or rel.parts[:1] == ("~",)):
        raise ConversionError(
            f"{where}, which is not a file name inside {folder}; refusing to read it "
            f"(files named by a model must be relative paths inside its folder)"
        )
    path = folder / name
    root, real = folder.resolve(), path.resolve()
    in_hub_blobs = root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"
    if not real.is_relative_to(root) and not in_hub_blobs:
        raise ConversionError(
            f"{where}: {path} leads to {real}, outside the model folder {folder}; refusing "
            f"to read it (copy the file into the folder instead of linking it)"
        )
    problem = not_a_file(path)
    if problem is not None:
        if named_by is not None and problem == "does not exist":
            raise ConversionError(f"{named_by} lists {name}, which is missing")
        raise ConversionError(f"{path} {problem}")
    return path


def read_json_object(folder: Path, name: str) -> dict[str, Any]:
    """The json object in `folder / name` (see `model_file`), or a ConversionError."""
    path = model_file(folder, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid json: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a json object")
    return data


def read_safetensors_index(src: Path) -> dict[str, Path]:
    """`model.safetensors.index.json`'s weight_map: tensor name -> shard file, each shard
    checked by `model_file`."""
    index_path = src / "model.safetensors.index.json"
    weight_map = read_json_object(src, index_path.name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(
            f"{index_path} is not a valid safetensors index: it needs a non-empty "
            f"\"weight_map\" object (tensor name -> shard file)"
        )
    files, checked = {}, {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise ConversionError(
                f"{index_path} is not a valid safetensors index: weight_map[{name!r}] "
                f"must be a shard file name, got {shard!r}"
            )
        if shard not in checked:
            checked[shard] = model_file(src, shard, named_by=index_path)
        files[name] = checked[shard]
    return files


def safetensors_files(src: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from `model.safetensors.index.json` or `model.safetensors`."""
    index_path = src / "model.safetensors.index.json"
    single = src / "model.safetensors"
    if index_path.exists() or index_path.is_symlink():
        return read_safetensors_index(src)
    if single.exists() or single.is_symlink():
        model_file(src, single.name)
        return {}  # names come from the file header; see `read_safetensors_headers`
    raise ConversionError(
        f"{src} has no model.safetensors or model.safetensors.index.json "
        f"(only safetensors weights are supported, not pytorch_model.bin)"
    )


def read_safetensors_headers(src: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape) for every tensor of the directory, from headers only."""
    files = safetensors_files(src)
    shards = sorted(set(files.values())) if files else [src / "model.safetensors"]
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for shard in shards:
        try:
            with safe_open(shard, framework="flax") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    if name in found:
                        raise ConversionError(
                            f"tensor {name} appears in both {found[name][0].name} and {shard.name}"
                        )
                    found[name] = (shard, shape)
        except (SafetensorError, OSError) as e:
            raise ConversionError(
                f"{shard} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
    for name, shard in files.items():
        if name not in found:
            raise ConversionError(f"tensor {name} is listed for {shard.name} but not stored there")
    return found


def load_hf(
    src: str | Path, dtype: str | np.dtype = "bfloat16", *, progress: bool = True
) -> tuple[Params, ModelConfig]:
    """Read an HF Llama/Mistral/Qwen2/Qwen3 safetensors directory into (params, config).

    Validates every tensor name and shape before reading any data. Params are nested
    dicts of host numpy arrays in `dtype` with the layout of `config.param_shapes()`.
    """
    src = as_path(src, "src", ConversionError)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a model directory ({not_a_file(src) or 'a file'})")
    config, _ = read_hf_config(src)
    headers = read_safetensors_headers(src)
    optional = ["lm_head.weight"] if config.tie_word_embeddings else []
    check_tensor_shapes(
        config,
        {name: shape for name, (_, shape) in headers.items()},
        describe=lambda n: f"{n} ({headers[n][0].name})" if n in headers else n,
        optional=optional,
        layers_key=f"num_hidden_layers in {src / 'config.json'}",
        source=f"the safetensors files of {src}",
    )

    open_files: dict[Path, Any] = {}
    cpu = jax.devices("cpu")[0]

    def get_tensor(name: str) -> np.ndarray:
        shard = headers[name][0]
        try:
            if shard not in open_files:
                open_files[shard] = safe_open(shard, framework="flax")
            with jax.default_device(cpu):
                return np.asarray(open_files[shard].get_tensor(name))
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read tensor {name} from {shard}: {e}") from None

    try:
        params = assemble_params(config, get_tensor, dtype, progress=progress, desc=src.name,
                                 describe=lambda n: f"{n} ({headers[n][0].name})")
    finally:
        open_files.clear()
    return params, config
