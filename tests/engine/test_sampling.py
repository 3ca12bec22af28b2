"""Sampling against numpy: greedy is argmax, top-k / top-p never leave their sets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rocketkv_jax.sampling import Sampling, sample


def _logits(seed=0, B=3, V=50):
    return np.random.default_rng(seed).normal(size=(B, V)).astype(np.float32) * 3


def _draws(logits, sampling, n=400):
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sample(jnp.asarray(logits), k, sampling))(keys))  # [n, B]


def test_greedy_is_argmax():
    logits = _logits()
    got = sample(jnp.asarray(logits), jax.random.key(1), Sampling())
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_stays_in_the_k_best(k):
    logits = _logits(1)
    draws = _draws(logits, Sampling(temperature=1.0, top_k=k))
    for b in range(logits.shape[0]):
        allowed = set(np.argsort(-logits[b])[:k].tolist())
        assert set(draws[:, b].tolist()) <= allowed
        if k > 1:
            assert len(set(draws[:, b].tolist())) > 1


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_top_p_matches_numpy_nucleus(p):
    logits = _logits(2)
    draws = _draws(logits, Sampling(temperature=0.7, top_p=p), n=2000)
    for b in range(logits.shape[0]):
        z = logits[b] / 0.7
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        csum = np.cumsum(probs[order])
        nucleus = order[: int(np.searchsorted(csum, p) + 1)]  # smallest prefix reaching p
        seen = set(draws[:, b].tolist())
        assert seen <= set(nucleus.tolist())
        # every nucleus member with >= 2% renormalised mass shows up in 2000 draws
        mass = probs[nucleus] / probs[nucleus].sum()
        assert {int(t) for t, m in zip(nucleus, mass, strict=True) if m > 0.02} <= seen


def test_same_seed_same_tokens_different_seed_differs():
    logits = jnp.asarray(_logits(3, B=8))
    s = Sampling(temperature=1.0)
    a = sample(logits, jax.random.key(5), s)
    b = sample(logits, jax.random.key(5), s)
    c = sample(logits, jax.random.key(6), s)
    assert (a == b).all() and not (a == c).all()


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_bad_sampling_rejected(kw):
    with pytest.raises(ValueError):
        Sampling(**kw)
