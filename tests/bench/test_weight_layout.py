"""benchmarks/weight_layout.py --quick: both layouts run generate and produce the same
tokens (the script's own check, read back from its output), and bad flags are refused."""

from __future__ import annotations

import pytest
from benchmark_scripts import load_script

wl = load_script("weight_layout")


def test_quick_runs_both_layouts_and_they_agree(capsys):
    assert wl.main(["--quick", "--methods", "full,rocketkv"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("full ", "rocketkv "))]
    assert [(r[0], r[1]) for r in rows] == [("full", "stacked"), ("full", "per-layer"),
                                            ("rocketkv", "stacked"), ("rocketkv", "per-layer")]
    assert all(float(r[-1]) > 0 for r in rows)  # decode tok/s
    assert out.count("same tokens: yes") == 2


@pytest.mark.parametrize("argv, message", [
    (["--context", "0"], "--context must be >= 1"),
    (["--model", "tiny", "--context", "4096", "--new-tokens", "8"], "needs 4103 positions"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit):
        wl.main(argv)
    assert message in capsys.readouterr().err
