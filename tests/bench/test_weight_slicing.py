"""benchmarks/weight_slicing.py: the ways of reading per-layer weights compute the
same product (numpy), and XLA:CPU's compiled programs copy a traced-index slice of the
stacked weights before the matmul and nothing when each layer has its own array, unrolled
or in a loop through the per-layer switch (what docs/benchmarks.md's explanation of the
decode roofline gap, and the per-layer layout, rest on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_scripts import load_script

from rocketkv_jax.bench.xla_stats import copy_fusions

ws = load_script("weight_slicing")


def test_the_four_ways_agree_with_numpy():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 32, 48), dtype=np.float32)
    x = rng.standard_normal((4, 32), dtype=np.float32)
    want = sum(x @ w[i] for i in range(3))[:, :32]
    for got in (ws._traced(jnp.asarray(w), jnp.asarray(x)),
                ws._static(jnp.asarray(w), jnp.asarray(x)),
                ws._switch([jnp.asarray(w[i]) for i in range(3)], jnp.asarray(x)),
                ws._separate([jnp.asarray(w[i]) for i in range(3)], jnp.asarray(x))):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 8])
def test_a_traced_slice_is_copied_and_separate_arrays_are_not(batch):
    w = jnp.ones((2, 64, 96), jnp.float32)
    x = jnp.ones((batch, 64), jnp.float32)
    traced = jax.jit(ws._traced).lower(w, x).compile().as_text()
    assert copy_fusions(traced, (64, 96)) >= 1
    for way in (ws._separate, ws._switch):
        text = jax.jit(way).lower([w[0], w[1]], x).compile().as_text()
        assert copy_fusions(text, (64, 96)) == 0
    assert " conditional(" in jax.jit(ws._switch).lower([w[0], w[1]], x).compile().as_text()


def test_quick_run_prints_five_rows(capsys):
    assert ws.main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("traced", "static", "switch", "separate", "numpy"))]
    assert [r[0] for r in rows] == ["traced", "static", "switch", "separate", "numpy"]
    assert float(rows[3][-1]) == 1.0  # the baseline row


def test_numpy_way_agrees_with_the_jitted_ones():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 24, 40), dtype=np.float32)
    x = rng.standard_normal((3, 24), dtype=np.float32)
    np.testing.assert_allclose(ws._numpy(list(w), x),
                               np.asarray(ws._separate([jnp.asarray(a) for a in w],
                                                       jnp.asarray(x))), rtol=1e-5, atol=1e-5)


def test_batches_each_get_a_table_and_the_bandwidth_share(capsys):
    assert ws.main(["--quick", "--batch", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "memory bandwidth:" in out
    assert "x [1, 256]" in out and "x [3, 256]" in out
    assert out.count("of the memory bandwidth") == 2


def test_bad_batch_is_refused(capsys):

    with pytest.raises(SystemExit):
        ws.main(["--quick", "--batch", "8,x"])
    assert "--batch takes a comma list" in capsys.readouterr().err


def test_bf16_ways_agree_with_numpy_on_the_rounded_inputs():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((2, 32, 48), dtype=np.float32), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, 32), dtype=np.float32), jnp.bfloat16)
    w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
    want = sum(x64 @ w64[i] for i in range(2))[:, :32]  # f32 accumulation of bf16 operands
    for got in (ws._traced(w, x), ws._switch([w[0], w[1]], x), ws._separate([w[0], w[1]], x)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bf16_run_has_no_numpy_row(capsys):
    assert ws.main(["--quick", "--dtype", "bfloat16", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16, median" in out
    rows = [line.split()[0] for line in out.splitlines()
            if line.startswith(("traced", "static", "switch", "separate", "numpy"))]
    assert rows == ["traced", "static", "switch", "separate"]


def test_bf16_traced_slice_is_counted_as_a_copy():
    """The copies column counts copy fusions of the weights' own dtype: a bf16 traced-index
    slice is a bf16 copy (an f32-only count read 0 there)."""
    w = jnp.ones((2, 64, 96), jnp.bfloat16)
    x = jnp.ones((1, 64), jnp.bfloat16)
    traced = jax.jit(ws._traced).lower(w, x).compile().as_text()
    assert copy_fusions(traced, (64, 96), jnp.bfloat16) >= 1
    assert copy_fusions(traced, (64, 96)) == 0  # no f32 copy: the count is per dtype
    switch = jax.jit(ws._switch).lower([w[0], w[1]], x).compile().as_text()
    assert copy_fusions(switch, (64, 96), jnp.bfloat16) == 0
