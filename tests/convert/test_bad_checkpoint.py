"""A damaged converted checkpoint as `rocketkv generate --model PATH` meets it: a
config.json of the wrong shape or values, a directory or pipe where a file belongs, a
damaged orbax index, arrays of a dtype conversion never writes. Each is one `error:` line
naming the file and how to rebuild it, exit 2, no traceback (none from orbax's threads)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_checkpoint import make_tiny_checkpoint, tiny_checkpoint_config, tiny_params

from rocketkv_jax.cli import main as cli_main
from rocketkv_jax.convert import ConversionError, convert_any, load_checkpoint
from rocketkv_jax.model_store import ModelNotFoundError, load_model
from rocketkv_jax.models.params import flatten, unflatten
from rocketkv_jax.tokenizer import Tokenizer, TokenizerError

REBUILD = "rocketkv-convert SRC {ckpt} --force"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "good")


def generate_error(capsys, ckpt: Path) -> str:
    rc = cli_main(["generate", "--model", str(ckpt), "--method", "full", "--prompt", "w1",
                   "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    assert lines[0].startswith("error: "), err
    return lines[0]


def _config(**values):
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg.update(values)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


def _drop(key):
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        del cfg[key]
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


def _replace(name, make):
    def edit(ckpt: Path) -> None:
        p = ckpt / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
        make(p)
    return edit


@pytest.mark.parametrize("damage, says", [
    (_config(num_layers=10**9), "config.json says (1000000000, 48)"),
    (_config(num_heads=0), "num_heads must be positive, got 0"),
    (_config(rms_norm_eps=float("nan")), "rms_norm_eps must be a finite number, got nan"),
    (_config(eos_token_ids="ab"), "eos_token_ids must be a list of token ids, got 'ab'"),
    (_config(eos_token_ids=[1000]), "eos_token_id 1000 is not a token id of the 61-token"),
    (_config(rope_scaling="x"), "rope_scaling must be an object or null, got 'x'"),
    (_config(rope_scaling={"factor": 2.0, "foo": 1}), "rope_scaling has unknown key(s) foo"),
    (_config(rope_scaling={"factor": "x"}), "rope_scaling factor must be a number, got 'x' (str)"),
    (_config(foo=1), "config has unknown key(s) foo"),
    (_drop("hidden_size"), "config is missing key(s) hidden_size"),
    (_config(rocketkv_config_version=2), "is rocketkv-jax config version 2, which this "
     "version does not read"),
    (lambda c: (c / "config.json").write_bytes(b"\xff{"), "config.json is not valid json"),
    (_replace("config.json", Path.mkdir), "config.json is a directory, not a file"),
    (_replace("config.json", os.mkfifo), "config.json is not a regular file"),
    (_replace("params", lambda p: p.write_text("x")), "params is not a directory"),
])
def test_damaged_config_is_one_error_with_the_fix(capsys, tmp_path, good_checkpoint, damage,
                                                  says):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    damage(ckpt)
    msg = generate_error(capsys, ckpt)
    assert says in msg and str(ckpt) in msg, msg
    assert REBUILD.format(ckpt=ckpt) in msg, msg


@pytest.mark.parametrize("damage, says", [
    (lambda c: (c / "tokenizer.json").write_text("{}"), "tokenizer.json is damaged"),
    (_replace("tokenizer.json", Path.mkdir), "tokenizer.json is a directory, not a file"),
    (lambda c: (c / "tokenizer_config.json").write_text('{"chat_template": "{% for %}"}'),
     "its chat template has a syntax error at template line 1"),
])
def test_damaged_tokenizer_is_one_error(capsys, tmp_path, good_checkpoint, damage, says):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    damage(ckpt)
    msg = generate_error(capsys, ckpt)
    assert says in msg and str(ckpt) in msg and "convert the model again" in msg, msg


def test_model_path_that_is_a_pipe(capsys, tmp_path):
    os.mkfifo(tmp_path / "model")
    msg = generate_error(capsys, tmp_path / "model")
    assert "is not a regular file (a pipe, socket or device), not a converted checkpoint" in msg


def test_arrays_of_a_dtype_conversion_never_writes(capsys, tmp_path):
    config = tiny_checkpoint_config()
    ints = unflatten({k: v.astype(np.int32) for k, v in flatten(tiny_params(config)).items()})
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", config, ints)
    msg = generate_error(capsys, ckpt)
    assert "is stored as int32, not one of bfloat16, float32" in msg, msg


@pytest.mark.parametrize("keep", [0, 40])
def test_damaged_orbax_index_prints_no_background_tracebacks(tmp_path, good_checkpoint, keep):
    """The index node file (params/d/*) cut or overwritten: orbax used to leave tensorstore
    callbacks that printed "Event loop is closed" tracebacks after the error, about one
    run in three; the index is now listed first. A fresh process, as a user runs it."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, ckpt)
    node = next((ckpt / "params" / "d").iterdir())
    node.write_bytes(node.read_bytes()[:keep] + bytes(range(40)))
    for _ in range(3):
        r = subprocess.run([sys.executable, "-P", "-m", "rocketkv_jax.cli", "generate",
                            "--model", str(ckpt), "--method", "full", "--prompt", "w1"],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
        assert f"the index of {ckpt / 'params'} cannot be read" in lines[0], lines[0]


# -------------------------------------------------------------- the Python API
@pytest.mark.parametrize("call, error, says", [
    (lambda: convert_any(None, "out"), ConversionError,
     "src must be a path (str or os.PathLike), got NoneType None"),
    (lambda: load_checkpoint(3), ConversionError,
     "path must be a path (str or os.PathLike), got int 3"),
    (lambda: load_model(3.5), ModelNotFoundError, "the model must be a checkpoint directory"),
    (lambda: Tokenizer(None), TokenizerError, "directory must be a path"),
])
def test_api_arguments_of_the_wrong_type_fail_at_our_boundary(call, error, says):
    with pytest.raises(error, match=re.escape(says)):
        call()


def test_api_dtype_and_shardings_of_the_wrong_type(good_checkpoint):
    with pytest.raises(ConversionError, match="unsupported dtype 5; choose bfloat16"):
        load_checkpoint(good_checkpoint, dtype=5)
    with pytest.raises(TypeError, match="shardings must be None, a jax.sharding.Sharding or"):
        load_checkpoint(good_checkpoint, shardings=[1, 2])
