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


def test_static_bound_is_full_kvs_time_over_rocketkvs_without_decode():
    # rocketkv: 30 s prefill + 10 s decode + 2 s compile; full KV: 30 s + 40 s + 2 s
    rows = [{"method": "rocketkv", "wall_s": 42.0, "tokens": 100, "tok_per_s": 100 / 42,
             "prefill_s": 30.0, "decode_s": 10.0, "compile_s": 2.0},
            {"method": "full", "wall_s": 72.0, "tokens": 100, "tok_per_s": 100 / 72,
             "prefill_s": 30.0, "decode_s": 40.0, "compile_s": 2.0}]
    bound = sl.static_bound(rows)
    assert bound["static_rocketkv_vs_full"] == pytest.approx(72 / 42)
    assert bound["prefill_share_rocketkv"] == pytest.approx(30 / 42)
    assert bound["prefill_share_full"] == pytest.approx(30 / 72)
    assert bound["static_ceiling_rocketkv_vs_full"] == pytest.approx(72 / 32)
