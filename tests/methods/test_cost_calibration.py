"""The cost model's constants per backend and their calibration file: `rocketkv bench
--calibrate` end to end on this CPU (tiny shapes), plans that read the file it writes, and
the refusals of a damaged file, a file from another device and a missing one."""

from __future__ import annotations

import json

import pytest

from rocketkv_jax import cli
from rocketkv_jax.methods import make_method
from rocketkv_jax.methods.cost import (
    BUILTIN_CONSTANTS,
    PALLAS_CONSTANTS,
    REFERENCE_CONSTANTS,
    constants_for,
)
from rocketkv_jax.methods.cost_file import (
    COST_FILE_ENV,
    CostConstants,
    CostFileError,
    default_path,
    device_identity,
    write,
)
from rocketkv_jax.models.config import ModelConfig

LLAMA = ModelConfig(  # Llama-3.1-8B attention: 32 / 8 heads, D = 128
    model_type="llama", vocab_size=1024, hidden_size=4096, intermediate_size=14336,
    num_layers=2, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache, and no ROCKETKV_JAX_COST_FILE (conftest sets it to off)."""
    monkeypatch.setenv("ROCKETKV_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(COST_FILE_ENV)
    return tmp_path / "cache"


def fallback(method: str, budget: int, T: int, kernels: str = "reference") -> str:
    plan = make_method(method, budget, kernels=kernels).plan(LLAMA, T, 256)
    return getattr(plan, "fallback", "")


def test_builtins_per_backend_without_a_file(user_cache):
    assert constants_for("reference") == REFERENCE_CONSTANTS
    assert constants_for("triton") == PALLAS_CONSTANTS
    assert constants_for("interpret") == PALLAS_CONSTANTS  # plans as Triton does
    # the Pallas kernels' byte counts make stage 2 pay off where the CPU references do not
    assert fallback("rocketkv", 4096, 32768, "reference") == "cost"
    assert fallback("rocketkv", 4096, 32768, "interpret") == ""


def test_calibrate_writes_constants_plans_then_use(user_cache, capsys):
    assert cli.main(["bench", "--calibrate", "--calibrate-shape", "tiny"]) == 0
    out = capsys.readouterr().out
    path = default_path()
    assert path.is_file() and str(path) in out and "reference" in out
    data = json.loads(path.read_text())
    assert data["device"] == device_identity()
    measured = CostConstants(**data["backends"]["reference"])
    assert constants_for("reference") == measured
    assert set(data["backends"]) == {"reference"}  # no Triton kernels run on this CPU
    assert constants_for("interpret") == BUILTIN_CONSTANTS["triton"]  # never timed
    secs = data["measurements"]["seconds"]
    assert all(t > 0 for G in secs.values() for t in _leaves(G))


def _leaves(d):
    for v in d.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_a_calibration_file_changes_the_decision(user_cache):
    """The cost model accepts what the calibration writes: constants that make gathering
    dearer turn a sparse plan dense, cheaper ones the other way."""
    ident = device_identity()
    assert fallback("rocketkv", 256, 32768) == ""
    write(default_path(ident), {"reference": CostConstants(4, 24, 60.0, 5, 5)}, ident)
    assert fallback("rocketkv", 256, 32768) == "cost"
    write(default_path(ident), {"reference": CostConstants(1, 1, 1, 1, 1)}, ident)
    assert fallback("rocketkv", 4096, 32768) == ""


def test_env_var_file_and_off(user_cache, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine.json"
    assert cli.main(["bench", "--calibrate", "--calibrate-shape", "tiny",
                     "--calibrate-file", str(mine)]) == 0
    assert f"{COST_FILE_ENV}={mine}" in capsys.readouterr().out
    assert not default_path().exists()
    ident = device_identity()
    write(mine, {"reference": CostConstants(1, 2, 3, 4, 5)}, ident)
    monkeypatch.setenv(COST_FILE_ENV, str(mine))
    assert constants_for("reference") == CostConstants(1, 2, 3, 4, 5)
    monkeypatch.setenv(COST_FILE_ENV, "off")
    assert constants_for("reference") == REFERENCE_CONSTANTS


def _generate_error(capsys, *argv) -> str:
    code = cli.main(["generate", "--model", "none", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


BAD_FILES = {
    "not json": ("{not json", "not JSON"),
    "not ours": (json.dumps({"format": "something else"}), "its 'format' is not"),
    "negative": (None, "gather_factor must be a positive finite number"),
    "missing field": (None, "must have exactly the fields"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_damaged_file_is_refused(user_cache, case):
    ident = device_identity()
    path = default_path(ident)
    write(path, {"reference": REFERENCE_CONSTANTS}, ident)
    text, message = BAD_FILES[case]
    if text is None:
        data = json.loads(path.read_text())
        if case == "negative":
            data["backends"]["reference"]["gather_factor"] = -1.0
        else:
            del data["backends"]["reference"]["rank_bytes"]
        text = json.dumps(data)
    path.write_text(text)
    with pytest.raises(CostFileError, match=message) as e:
        constants_for("reference")
    assert str(path) in str(e.value) and "rocketkv bench --calibrate" in str(e.value)


def test_a_file_from_another_device_is_refused(user_cache, tmp_path, monkeypatch):
    other = {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}
    path = tmp_path / "h100.json"
    write(path, {"reference": REFERENCE_CONSTANTS, "triton": PALLAS_CONSTANTS}, other)
    monkeypatch.setenv(COST_FILE_ENV, str(path))
    with pytest.raises(CostFileError, match="measured on NVIDIA H100 80GB HBM3 \\(gpu\\), but "
                       "this process runs on .* \\(cpu\\)"):
        constants_for("reference")


def test_refusals_are_one_cli_error_line(user_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(COST_FILE_ENV, str(tmp_path / "absent.json"))
    err = _generate_error(capsys, "--prompt", "hi", "--method", "rocketkv")
    assert f"{COST_FILE_ENV}={tmp_path / 'absent.json'}: no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    monkeypatch.setenv(COST_FILE_ENV, str(bad))
    err = _generate_error(capsys, "--prompt", "hi", "--method", "rocketkv")
    assert "is not a usable cost-constants file: not JSON" in err
