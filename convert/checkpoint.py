"""Converted checkpoints on disk: orbax params + our config.json + tokenizer files.

Layout of a checkpoint directory OUT:

    OUT/params/          orbax StandardCheckpointer tree (the params pytree)
    OUT/config.json      `ModelConfig.to_dict()` (has "rocketkv_config_version")
    OUT/tokenizer.json   and friends, when the source had them

A checkpoint appears atomically: everything is written into a hidden sibling temporary
directory which is renamed to OUT at the end, and removed on any failure (Ctrl-C too).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from rocketkv_jax import interrupts
from rocketkv_jax.models.config import ConfigError, ModelConfig
from rocketkv_jax.paths import (
    PathError,
    as_path,
    check_can_create,
    describe_os_error,
    not_a_file,
    remove_stale_temp_dirs,
    temp_prefix,
)
from rocketkv_jax.tokenizer import TokenizerError, check_tokenizer_files

from ..models.params import flatten, unflatten
from .gguf import load_gguf
from .hf import (
    DTYPES,
    ConversionError,
    Params,
    load_hf,
    model_file,
    read_hf_config,
    resolve_dtype,
)

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
# Copied from an HF directory next to the checkpoint when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # transformers >= 4.43 saves the chat template here
    "chat_template.json",
)


def _quiet_orbax() -> None:
    # orbax/absl log every save and restore at INFO/WARNING, and a damaged file at ERROR
    # (multi-line tensorstore specs) before raising; the CLI output is ours: the errors
    # that matter are raised, and said in one line.
    for name in ("absl", "orbax", "jax._src.xla_bridge", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def save_checkpoint(
    out_dir: str | Path,
    params: Params,
    config: ModelConfig,
    extra_files: dict[str, bytes | str] | None = None,
    *,
    force: bool = False,
) -> Path:
    """Write params (orbax), config.json and `extra_files` (name -> content) to `out_dir`.

    Checks `params` against `config.param_shapes()` first. Atomic: `out_dir` either does
    not change or is complete. An existing `out_dir` is an error unless `force`, in which
    case it is replaced. Returns the absolute checkpoint path.
    """
    out = as_path(out_dir, "out_dir", ConversionError).absolute()
    _check_params(params, config)
    check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out.parent, out.name)  # of conversions killed before (SIGKILL)
    _quiet_orbax()
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, "tmp"), dir=out.parent))
    checkpointer = None
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
        interrupts.check()  # a Ctrl-C during the save is honoured once orbax is done
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            if Path(name).name != name or name in (CONFIG_FILE, PARAMS_DIR):
                raise ConversionError(f"extra file name {name!r} is not allowed")
            data = content.encode() if isinstance(content, str) else content
            (tmp / name).write_bytes(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        interrupts.check()
        _move_into_place(tmp, out, force)
    except BaseException:
        if checkpointer is not None and hasattr(checkpointer, "close"):
            try:  # let orbax's background writes end before deleting under them
                checkpointer.close()
            except BaseException:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    checkpointer.close()
    return out


def check_replaceable(out: Path, force: bool) -> None:
    """Raise unless `out` may be written: absent, or (with force) a converted checkpoint or
    an empty directory. --force never deletes a directory that is not ours."""
    if not out.exists() and not out.is_symlink():
        return
    if not force and not out.is_dir():
        raise ConversionError(f"{out} already exists and is not a directory; choose another "
                              f"OUT (--force replaces only a converted checkpoint)")
    if not force:
        raise ConversionError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir() and not out.is_symlink():
        names = {p.name for p in out.iterdir()}
        ours = {PARAMS_DIR, CONFIG_FILE, *TOKENIZER_FILES}
        # a checkpoint, even a damaged one (so --force can rebuild it), or an empty dir
        if names <= ours and (not names or PARAMS_DIR in names or CONFIG_FILE in names):
            return
        others = sorted(names - ours)[:3]
        raise ConversionError(
            f"--force replaces only a converted checkpoint, and {out} is not one (it holds "
            f"{', '.join(others) or 'no params/ or config.json'}); remove it yourself or "
            f"choose another OUT"
        )
    raise ConversionError(
        f"--force replaces only a converted checkpoint directory, and {out} is a file; "
        f"remove it yourself or choose another OUT"
    )


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise ConversionError(f"{out} appeared while converting (another conversion?)")
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name, "old"), dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old / out.name, out)  # put the previous checkpoint back
            os.rmdir(old)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(tmp, out)
    except OSError as e:  # lost a race: another process created `out` meanwhile
        raise ConversionError(f"cannot move the checkpoint into {out}: {e}") from None


def _check_params(params: Params, config: ModelConfig) -> None:
    expected = config.param_shapes()
    flat = flatten(params)
    for key, shape in expected.items():
        if key not in flat:
            raise ConversionError(f"params lack {key!r} (expected shape {shape})")
        if tuple(flat[key].shape) != shape:
            raise ConversionError(
                f"param {key!r} has shape {tuple(flat[key].shape)}, expected {shape}"
            )
    for key in flat.keys() - expected.keys():
        raise ConversionError(f"unexpected param {key!r} with shape {tuple(flat[key].shape)}")


class DamagedCheckpointError(ConversionError):
    """A checkpoint directory whose files are truncated, missing or unreadable."""


REBUILD_HINT = "convert the model again over it: rocketkv-convert SRC {path} --force"


def _damaged(path: Path, what: str, error: BaseException) -> DamagedCheckpointError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    detail = detail.split(" See full TensorStore details")[0][:200]
    return DamagedCheckpointError(
        f"checkpoint {path} is damaged: {what}"
        f"{f' ({type(error).__name__}: {detail})' if detail else ''}; "
        + REBUILD_HINT.format(path=path)
    )


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a converted checkpoint, with a clear error for anything else."""
    path = as_path(path, "path", ConversionError)
    hint = "make one with: rocketkv-convert SRC OUT"
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        what = not_a_file(path) or "is a file"
        raise ConversionError(f"{path} is not a converted checkpoint directory (it {what}); "
                              f"{hint}")
    if not cfg_path.exists() or not (path / PARAMS_DIR).exists():
        raise ConversionError(
            f"{path} is not a converted checkpoint (needs {CONFIG_FILE} and {PARAMS_DIR}/); {hint}"
        )
    problem = not_a_file(cfg_path)
    if problem is not None:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {cfg_path} {problem}; "
                                     + REBUILD_HINT.format(path=path))
    if not (path / PARAMS_DIR).is_dir():
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {path / PARAMS_DIR} is "
                                     f"not a directory; " + REBUILD_HINT.format(path=path))
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {cfg_path} is not valid "
                                     f"json ({e}); " + REBUILD_HINT.format(path=path)) from None
    if isinstance(data, dict) and data.get("rocketkv_config_version", 1) != 1:
        raise ConversionError(
            f"{cfg_path} is rocketkv-jax config version {data['rocketkv_config_version']!r}, "
            f"which this version does not read (it reads version 1); convert the model again "
            f"with this version: rocketkv-convert SRC {path} --force"
        )
    if not isinstance(data, dict) or data.get("rocketkv_config_version") != 1:
        raise ConversionError(
            f"{cfg_path} is not a rocketkv-jax config (a Hugging Face directory?); {hint}"
        )
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ConfigError) as e:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {cfg_path}: {e}; "
                                     + REBUILD_HINT.format(path=path)) from None


def _check_orbax_files(path: Path) -> None:
    """Refuse a params/ directory with files or data directories missing, before orbax
    meets them (it then logs tracebacks from its background threads)."""
    params = path / PARAMS_DIR
    need = [params / "_METADATA"]
    if (params / "manifest.ocdbt").is_file():  # OCDBT layout: a data dir per process
        procs = sorted(params.glob("ocdbt.process_*"))
        need += [params / "d"] + (procs or [params / "ocdbt.process_0"])
        need += [p / sub for p in procs for sub in ("manifest.ocdbt", "d")]
    for p in need:
        if not p.exists():
            raise DamagedCheckpointError(
                f"checkpoint {path} is damaged: {p} is missing; " + REBUILD_HINT.format(path=path))
    if (params / "manifest.ocdbt").is_file():
        # List the OCDBT index (its manifest and b-tree nodes, not the array data): a damaged
        # node is refused here, where orbax would leave tensorstore callbacks running that
        # print "Event loop is closed" tracebacks after our error.
        import tensorstore as ts

        try:
            store = ts.KvStore.open({"driver": "ocdbt",
                                     "base": {"driver": "file", "path": f"{params}/"}}).result()
            store.list().result()
        except Exception as e:  # tensorstore's ValueError, or anything else it raises
            raise _damaged(path, f"the index of {params} cannot be read", e) from None


def load_checkpoint(
    path: str | Path,
    *,
    dtype: str | np.dtype | None = None,
    shardings: Any = None,
    check_weights: bool = False,
) -> tuple[Params, ModelConfig]:
    """Restore (params, config) from a converted checkpoint.

    dtype: cast every param to this dtype ("bfloat16" / "float32"); default: as stored.
    shardings: a pytree matching params whose leaves are `jax.sharding.Sharding`s (or one
      Sharding for all leaves); each array is restored directly into its sharding.
      Default: the first local device.
    check_weights: refuse a param holding a NaN or Inf, naming it (one pass over every
      weight; conversion already checks, this catches a file damaged after it).
    Returns params as `jax.Array`s with shapes `config.param_shapes()`.
    """
    path = as_path(path, "path", ConversionError).absolute()
    config = read_checkpoint_config(path)
    _check_orbax_files(path)
    _quiet_orbax()
    checkpointer = ocp.StandardCheckpointer()
    try:  # closed on every path: an open one's threads print tracebacks at exit
        stored_flat = _stored_arrays(checkpointer, path, config)
        abstract = _restore_targets(stored_flat, config, dtype, shardings)
        try:
            params = checkpointer.restore(path / PARAMS_DIR, unflatten(abstract))
        except Exception as e:  # TensorStore: a truncated or missing data file
            raise _damaged(path, f"the arrays under {path / PARAMS_DIR} cannot be read "
                           f"(a truncated or missing file)", e) from None
    finally:
        checkpointer.close()
    if check_weights:
        check_finite_params(params, path)
    return params, config


def _stored_arrays(checkpointer: Any, path: Path, config: ModelConfig) -> dict[str, Any]:
    """Flat params key -> orbax array metadata, checked against `config.param_shapes()`
    and the dtypes conversion writes, before anything is allocated."""
    try:
        meta = checkpointer.metadata(path / PARAMS_DIR).item_metadata
    except Exception as e:  # orbax raises a zoo of types for a broken directory
        raise _damaged(path, f"{path / PARAMS_DIR} is not a readable orbax checkpoint",
                       e) from None
    if meta is None or getattr(meta, "tree", None) is None:  # its data directories are gone
        raise DamagedCheckpointError(
            f"checkpoint {path} is damaged: {path / PARAMS_DIR} has no readable array "
            f"metadata (files or data directories deleted?); "
            + REBUILD_HINT.format(path=path))
    stored_flat = flatten(dict(meta.tree))
    expected = config.param_shapes()
    if stored_flat.keys() != expected.keys():
        diff = sorted(stored_flat.keys() ^ expected.keys())
        raise DamagedCheckpointError(f"checkpoint {path} does not match its config.json: "
                                     f"params {diff}; " + REBUILD_HINT.format(path=path))
    for key, shape in expected.items():
        if tuple(stored_flat[key].shape) != shape:
            raise DamagedCheckpointError(
                f"checkpoint {path}: param {key!r} has shape {tuple(stored_flat[key].shape)}, "
                f"config.json says {shape}; " + REBUILD_HINT.format(path=path)
            )
        if np.dtype(stored_flat[key].dtype) not in DTYPES.values():  # what conversion writes
            raise DamagedCheckpointError(
                f"checkpoint {path}: param {key!r} is stored as {stored_flat[key].dtype}, "
                f"not one of {', '.join(DTYPES)}; " + REBUILD_HINT.format(path=path)
            )
    return stored_flat


def _restore_targets(stored_flat: dict[str, Any], config: ModelConfig,
                     dtype: str | np.dtype | None, shardings: Any) -> dict[str, Any]:
    """Flat params key -> the ShapeDtypeStruct (with its sharding) to restore into."""
    expected = config.param_shapes()
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        sharding_flat = dict.fromkeys(expected, shardings or default)
    else:
        if not isinstance(shardings, dict):
            raise TypeError(f"shardings must be None, a jax.sharding.Sharding or a dict "
                            f"pytree matching params, got {type(shardings).__name__}")
        sharding_flat = flatten(shardings)
        if sharding_flat.keys() != expected.keys():
            diff = sorted(sharding_flat.keys() ^ expected.keys())
            raise ValueError(f"shardings must be a pytree matching params; differs at {diff}")
    cast = None if dtype is None else resolve_dtype(dtype)
    return {
        key: jax.ShapeDtypeStruct(
            shape, cast if cast is not None else stored_flat[key].dtype,
            sharding=sharding_flat[key],
        )
        for key, shape in expected.items()
    }


def check_finite_params(params: Params, path: str | Path) -> None:
    """Raise ConversionError naming the first param with a NaN or Inf."""
    import jax.numpy as jnp

    for key, x in flatten(params).items():
        if not bool(jnp.isfinite(x).all()):
            nan, inf = int(jnp.isnan(x).sum()), int(jnp.isinf(x).sum())
            raise ConversionError(
                f"checkpoint {path}: param {key!r} holds {nan} NaN and {inf} Inf values; the "
                f"checkpoint is damaged: convert the model again (rocketkv-convert SRC OUT "
                f"--force)"
            )


# ------------------------------------------------------------------ conversion
def is_gguf(src: Path) -> bool:
    if src.suffix.lower() == ".gguf":
        return True
    try:
        with open(src, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def convert_any(
    src: str | Path,
    out: str | Path,
    dtype: str = "bfloat16",
    progress: bool = True,
    *,
    force: bool = False,
) -> ModelConfig:
    """Convert an HF safetensors directory or a Llama `.gguf` file into a checkpoint at `out`.

    Everything is read and validated before anything is written; `out` appears atomically
    (see `save_checkpoint`). Raises `ConversionError` / `ConfigError` for bad input.
    Returns the model's config.
    """
    src = as_path(src, "src", ConversionError)
    out_path = as_path(out, "out", ConversionError).absolute()
    resolve_dtype(dtype)
    if not src.is_dir() and not_a_file(src) is not None:
        raise ConversionError(f"{src} {not_a_file(src)}")
    if src.resolve() == out_path.resolve() or out_path.resolve() in src.resolve().parents:
        raise ConversionError(f"output {out_path} would overwrite the source {src}")
    check_replaceable(out_path, force)  # after: the source check names the real problem
    try:  # before the (long) reading and dequantising
        check_can_create(out_path, "write the checkpoint")
    except PathError as e:
        raise ConversionError(str(e)) from None
    try:
        with interrupts.deferred():  # Ctrl-C is honoured between tensors and after the save
            return _convert(src, out_path, dtype, progress, force)
    except OSError as e:  # reading the source, or writing OUT (a full disk)
        raise ConversionError(describe_os_error(e, f"convert {src} into {out_path}")) from None


def _convert(src: Path, out_path: Path, dtype: str, progress: bool, force: bool) -> ModelConfig:
    if src.is_dir():
        read_hf_config(src)  # a folder without config.json is said as such first
        extra: dict[str, bytes | str] = {
            name: model_file(src, name).read_bytes() for name in TOKENIZER_FILES
            if (src / name).exists() or (src / name).is_symlink()
        }
        # checked now, not at the first prompt, whose advice would be to convert again
        _check_tokenizer(extra, src, "replace it with the model's original file")
        params, config = load_hf(src, dtype, progress=progress)
    elif is_gguf(src):
        params, config, _, extra = load_gguf(src, dtype, progress=progress)
    else:
        raise ConversionError(
            f"{src} is neither a Hugging Face model directory nor a .gguf file"
        )
    save_checkpoint(out_path, params, config, extra, force=force)
    return config


def _check_tokenizer(files: dict[str, bytes | str], src: Path, repair: str) -> None:
    """Refuse tokenizer files that `rocketkv_jax.tokenizer.Tokenizer` could not load. A
    source without tokenizer.json converts (the weights alone serve the Python API)."""
    if "tokenizer.json" not in files:
        return
    try:
        check_tokenizer_files(files, src, repair)
    except TokenizerError as e:
        raise ConversionError(str(e)) from None


__all__ = [
    "ConfigError",
    "ConversionError",
    "convert_any",
    "load_checkpoint",
    "read_checkpoint_config",
    "save_checkpoint",
]
