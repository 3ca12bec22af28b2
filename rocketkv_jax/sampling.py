"""Next-token sampling as a pure function of logits and a PRNG key, and the key of a seed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from . import checks


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:  # stored as plain Python numbers: a static jit key
        object.__setattr__(self, "temperature", checks.temperature(self.temperature))
        object.__setattr__(self, "top_k", checks.top_k(self.top_k))
        object.__setattr__(self, "top_p", checks.top_p(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Pick the next token per row. logits [B, V] float32 -> [B] int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] mass strictly above each
        cutoff = jnp.min(jnp.where(before < sampling.top_p, sorted_logits, jnp.inf), axis=-1)
        logits = jnp.where(logits < cutoff[:, None], -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def prng_key(seed: int, *fold: int) -> np.ndarray:
    """The PRNG key data ([2] uint32, threefry) of `seed`, an integer in [0, 2**64): its
    high and low 32 bits, which is what `jax.random.key(seed)` gives with 64-bit ints
    enabled. Every seed gets its own key (JAX's default 32-bit mode would keep only the
    low 32 bits, and a seed of 2**63 or more does not convert at all). Each `fold` value
    (e.g. a conversation's turn number, >= 0) is folded in with `jax.random.fold_in`, so
    derived streams never collide with another seed's as `seed + turn` would."""
    seed = checks.seed(seed)
    key = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
    for i in fold:
        key = np.asarray(jax.random.fold_in(key, checks.integer(i, "fold", high=2**32)))
    return key
