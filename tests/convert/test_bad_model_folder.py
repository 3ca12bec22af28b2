"""Malformed Hugging Face model folders as `rocketkv-convert` meets them: sizes in
config.json checked against the tensors present before anything is sized by them, a
safetensors index whose shard paths stay inside the folder, tokenizer files validated at
conversion, and a directory or pipe where a file belongs. Each is one `error:` line
naming the file (and key or line), exit 2, no traceback, nothing written."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from convert_runs import convert_error, run_convert_bounded
from safetensors.numpy import load_file, save_file
from tiny_checkpoint import make_hf_dir

from rocketkv_jax.cli.convert import main
from rocketkv_jax.convert import load_checkpoint
from rocketkv_jax.tokenizer import Tokenizer


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a pipe opened for reading blocks until a writer comes)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def edit_config(d: Path, **values) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(values)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def shard(d: Path, index=lambda weight_map: {"weight_map": weight_map}) -> Path:
    """Split model.safetensors into a.safetensors and b.safetensors with an index whose
    json is `index(weight_map)`."""
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, d / file)
        weight_map.update(dict.fromkeys(part, file))
    (d / "model.safetensors.index.json").write_text(json.dumps(index(weight_map)))
    return d


# --------------------------------------------------------- sizes from config.json
def test_config_claiming_1e9_layers_fails_fast_under_a_memory_limit(tmp_path):
    """It used to list 10**9 layers of tensor names, growing memory ~250 MB/s."""
    src = edit_config(make_hf_dir(tmp_path / "src"), num_hidden_layers=10**9)
    line = run_convert_bounded(src, tmp_path / "out")
    assert f"says 1000000000 layers (num_hidden_layers in {src / 'config.json'})" in line
    assert "the weights hold 2" in line


@pytest.mark.parametrize("values, says", [
    ({"num_attention_heads": 0}, "num_attention_heads must be positive, got 0"),
    ({"num_key_value_heads": 0}, "num_kv_heads must be positive, got 0"),
    ({"vocab_size": 10**15}, "expected (1000000000000000, 32) from the config"),
    ({"max_position_embeddings": 1e20},
     "max_position_embeddings must be < 2**31 (positions are 32-bit)"),
    ({"bos_token_id": -1}, "bos_token_id -1 is not a token id of the 64-token vocabulary"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 64}},
     "high_freq_factor (1.0) must be greater than low_freq_factor (1.0)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "x"}},
     "rope_scaling factor must be a number, got 'x' (str)"),
])
def test_config_values_are_checked(capsys, tmp_path, values, says):
    src = edit_config(make_hf_dir(tmp_path / "src"), **values)
    msg = convert_error(capsys, src, tmp_path / "out")
    assert says in msg, msg


# ------------------------------------------------------------ the safetensors index
@pytest.mark.parametrize("index, says", [
    (lambda wm: {"weight_map": list(wm)}, 'needs a non-empty "weight_map" object'),
    (lambda wm: {"weight_map": {}}, 'needs a non-empty "weight_map" object'),
    (lambda wm: [1, 2], "does not hold a json object"),
    (lambda wm: {"weight_map": {**wm, "lm_head.weight": 5}},
     "weight_map['lm_head.weight'] must be a shard file name, got 5"),
    (lambda wm: {"weight_map": {**wm, "x.weight": "c.safetensors"}},
     "lists c.safetensors, which is missing"),
])
def test_malformed_index_is_one_error_naming_it(capsys, tmp_path, index, says):
    src = shard(make_hf_dir(tmp_path / "src"), index)
    msg = convert_error(capsys, src, tmp_path / "out")
    assert f"{src / 'model.safetensors.index.json'}" in msg and says in msg, msg


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x",
                                  "~/a.safetensors", "a\u0000b"])
def test_shard_paths_outside_the_folder_are_refused(capsys, tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(b"never read")
    src = shard(make_hf_dir(tmp_path / "src"),
                lambda wm: {"weight_map": {**wm, "model.norm.weight": name}})
    msg = convert_error(capsys, src, tmp_path / "out")
    assert "model.safetensors.index.json names" in msg and repr(name) in msg
    assert "not a file name inside" in msg, msg


@pytest.mark.parametrize("link", ["file", "folder"])
def test_symlinks_leading_outside_the_folder_are_refused(capsys, tmp_path, link):
    src = make_hf_dir(tmp_path / "src")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if link == "file":
        shard(src)
        os.replace(src / "a.safetensors", elsewhere / "a.safetensors")
        os.symlink(elsewhere / "a.safetensors", src / "a.safetensors")
    else:
        shard(src, lambda wm: {"weight_map": {k: f"sub/{v}" for k, v in wm.items()}})
        for f in ("a.safetensors", "b.safetensors"):
            os.replace(src / f, elsewhere / f)
        os.symlink(elsewhere, src / "sub")
    msg = convert_error(capsys, src, tmp_path / "out")
    assert f"leads to {elsewhere / 'a.safetensors'}, outside the model folder {src}" in msg


def test_the_hugging_face_cache_layout_is_inside(tmp_path):
    """snapshots/REV/NAME -> ../../blobs/SHA is how the hub cache stores every file."""
    made = shard(make_hf_dir(tmp_path / "made"))
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(made.iterdir())):
        shutil.copy(f, blobs / f"sha{i}")
        os.symlink(f"../../blobs/sha{i}", snapshot / f.name)
    assert main([str(snapshot), str(tmp_path / "out"), "-q"]) == 0
    params, _ = load_checkpoint(tmp_path / "out")
    assert params["embed"].shape == (64, 32)


# ------------------------------------------------------------------ tokenizer files
@pytest.mark.parametrize("name, content, says", [
    ("tokenizer.json", b'{"version": "1.0", "model": 5}', "tokenizer.json is damaged (not a "
     "tokenizer file"),
    ("tokenizer.json", b'{\n  "a": ,\n}', "at line 2 column"),
    ("tokenizer.json", b"\xff\xfe garbage", "tokenizer.json is damaged (not UTF-8 text"),
    ("tokenizer_config.json", b"[1, 2]", "tokenizer_config.json is damaged (not a json object)"),
    ("tokenizer_config.json", b'{"chat_template": "{% if %}"}',
     "tokenizer_config.json is damaged (its chat template has a syntax error at template "
     "line 1"),
    ("tokenizer_config.json", b'{"chat_template": 5}', "chat_template must be a string"),
    ("tokenizer_config.json", b'{"eos_token": 5}', "eos_token must be a string, got 5"),
    ("chat_template.jinja", b"ok\n{{ x }\n", "chat_template.jinja is damaged (its chat "
     "template has a syntax error at template line 2"),
])
def test_damaged_tokenizer_files_are_refused_at_conversion(capsys, tmp_path, name, content,
                                                           says):
    """Not copied and found only at the first prompt, whose advice is to convert again."""
    src = make_hf_dir(tmp_path / "src")
    (src / name).write_bytes(content)
    msg = convert_error(capsys, src, tmp_path / "out")
    assert str(src / name) in msg and says in msg, msg
    assert "replace it with the model's original file" in msg


def test_chat_template_file_is_used(tmp_path):
    """transformers >= 4.43 saves the template in chat_template.jinja; it wins over
    tokenizer_config.json's, as in transformers."""
    src = make_hf_dir(tmp_path / "src")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
    (src / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.content }}>"
                                             "{% endfor %}")
    assert main([str(src), str(tmp_path / "out"), "-q"]) == 0
    tok = Tokenizer(tmp_path / "out")
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}]) == "<w1>"


# -------------------------------------------------- a directory or pipe for a file
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer_config.json"])
@pytest.mark.parametrize("kind", ["directory", "pipe"])
def test_a_directory_or_pipe_where_a_file_belongs(capsys, tmp_path, name, kind):
    src = make_hf_dir(tmp_path / "src")
    (src / name).unlink(missing_ok=True)
    if kind == "directory":
        (src / name).mkdir()
    else:
        os.mkfifo(src / name)
    with deadline(60):
        msg = convert_error(capsys, src, tmp_path / "out")
    what = "is a directory, not a file" if kind == "directory" else "is not a regular file"
    assert f"{src / name} {what}" in msg, msg


def test_out_that_is_a_file(capsys, tmp_path):
    src = make_hf_dir(tmp_path / "src")
    (tmp_path / "out").write_text("mine")
    rc = main([str(src), str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "out already exists and is not a directory; choose another OUT" in err
    assert (tmp_path / "out").read_text() == "mine"


def test_source_that_is_a_pipe(capsys, tmp_path):
    os.mkfifo(tmp_path / "model")
    with deadline(60):
        msg = convert_error(capsys, tmp_path / "model", tmp_path / "out")
    assert "model is not a regular file (a pipe, socket or device)" in msg


# ------------------------------------------------------------------ fuzzing
def test_fuzzed_safetensors_are_one_clean_error_each(capsys, tmp_path):
    """Truncations and seeded overwrites of the header (its length, shapes, offsets)."""
    made = make_hf_dir(tmp_path / "made")
    data = (made / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    blobs = [data[:n] for n in (0, 7, 8, 9, header_end - 1, header_end, len(data) - 1)]
    for _ in range(30):
        b = bytearray(data)
        at = rng.randrange(0, header_end)
        b[at] = rng.choice(b"0123456789[]{},:\"\xff")
        blobs.append(bytes(b))
    for i, blob in enumerate(blobs):
        src = tmp_path / f"src{i}"
        shutil.copytree(made, src)
        (src / "model.safetensors").write_bytes(blob)
        rc = main([str(src), str(tmp_path / f"out{i}"), "-q"])
        err = capsys.readouterr().err
        if rc == 0:
            continue
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (i, rc, err)
        assert "ROCKETKV_DEBUG" not in err, (i, err)
        assert str(src) in err or "(model.safetensors)" in err, (i, err)  # names the file
