"""benchmarks/attention_slicing.py: the four ways compute the same attention as numpy's
softmax over every layer, and XLA:CPU's compiled programs copy blocks of a layer's cache
out of the stacked array before the dots and nothing from one array per layer (what
docs/benchmarks.md's account of full KV's attention against its roofline rests on)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_scripts import load_script

at = load_script("attention_slicing")


def _numpy_layers(q, k, v, visible):
    """The ways' loop in numpy: layer i's query is q plus the sum of earlier outputs."""
    B, H, D = q.shape
    K = k.shape[2]
    G = H // K
    h = np.zeros_like(q)
    for i in range(k.shape[0]):
        qg = (q + h).reshape(B, K, G, D) / np.sqrt(D)
        s = np.einsum("bkgd,bksd->bkgs", qg, k[i])
        s = np.where(visible[:, :, None, :], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        h = h + np.einsum("bkgs,bksd->bkgd", p, v[i]).reshape(B, H, D)
    return h


@pytest.mark.parametrize("B,K,G,S", [(1, 2, 4, 40), (3, 3, 3, 37)])
def test_the_four_ways_agree_with_numpy(B, K, G, S):
    rng = np.random.default_rng(2)
    D, L = 16, 3
    k = rng.standard_normal((L, B, K, S, D), dtype=np.float32)
    v = rng.standard_normal((L, B, K, S, D), dtype=np.float32)
    q = rng.standard_normal((B, K * G, D), dtype=np.float32)
    visible = rng.random((B, K, S)) < 0.7
    visible[..., 0] = True
    want = _numpy_layers(q, k, v, visible)
    for name, (fn, stacked) in at.ways([16, 40]).items():  # 16 leaves a partial last block
        kv = (jnp.asarray(k), jnp.asarray(v)) if stacked else (list(k), list(v))
        got = fn(jnp.asarray(q), *kv, jnp.asarray(visible))
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("B", [1, 4])
def test_stacked_ways_copy_cache_blocks_and_whole_separate_does_not(B):
    L, K, G, S, D = 2, 3, 3, 96, 64
    k = jnp.ones((L, B, K, S, D), jnp.float32)
    q = jnp.ones((B, K * G, D), jnp.float32)
    visible = jnp.ones((B, K, S), bool)
    copies = {}
    for name, (fn, stacked) in at.WAYS.items():
        args = (q, k, k, visible) if stacked else (q, [k[0], k[1]], [k[0], k[1]], visible)
        copies[name] = at.block_copies(jax.jit(fn).lower(*args).compile().as_text(), B, K, D)
    assert copies["blockwise, stacked"] >= 2  # a key block and a value block per layer
    assert copies["whole, stacked"] >= 2
    assert copies["whole, separate"] == 0


def test_quick_run_prints_the_four_rows(capsys):
    assert at.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "memory bandwidth:" in out
    rows = [line.split(",")[0] for line in out.splitlines()
            if line.startswith(("blockwise,", "whole,"))]
    assert rows == ["blockwise", "whole", "blockwise", "whole"]


def test_blocks_add_one_blockwise_row_per_size(capsys):
    assert at.main(["--quick", "--blocks", "16,64"]) == 0
    out = capsys.readouterr().out
    rows = [line[:26].strip() for line in out.splitlines()
            if line.startswith(("blockwise,", "whole,"))]
    assert rows[4:] == ["blockwise, stacked, 16", "blockwise, stacked, 64"]
    assert "(block 512 slots)" in out  # decode_block_size at batch 8, 3 KV heads, D 64


@pytest.mark.parametrize("flag, message", [
    (["--batch", "8,x"], "--batch 'x' is not a whole number"),
    (["--blocks", "0"], "--blocks must be positive, got '0'"),
    (["--context", "0"], "--context must be positive, got '0'"),
])
def test_bad_lists_are_refused(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        at.main(["--quick", *flag])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
