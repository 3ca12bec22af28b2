"""benchmarks/serve_load.py's flags: what it refuses before it loads a model or starts a
server (its runs are measured, not tested: docs/serving.md)."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_script

sl = load_script("serve_load")


@pytest.mark.parametrize("argv, message", [
    (["--stage2", "sometimes"], "argument --stage2: invalid choice"),
    (["--phases", "static,warmup"], "unknown phases ['warmup']"),
    (["--clients", "0"], "--clients must be >= 1"),
    (["--mixed-chunk", "-1"], "--mixed-chunk must be >= 0"),
])
def test_bad_flags_are_refused_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sl.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
