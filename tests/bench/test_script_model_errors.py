"""A benchmark script given a --model that cannot load says so in one error line and exits
2, as the `rocketkv` commands do, instead of ending in a traceback."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_script

SCRIPTS = ("bf16_speed", "eval_cost", "long_prompt", "serve_load")


def _missing(tmp_path):
    return tmp_path / "no-such-model", "does not exist"


def _damaged_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    return ckpt, "config.json"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("model", [_missing, _damaged_config], ids=["missing", "damaged"])
def test_bad_model_is_one_error_line(script, model, tmp_path, capsys):
    path, said = model(tmp_path)
    with pytest.raises(SystemExit) as e:
        load_script(script).main(["--model", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert str(path) in err and said in err, err
