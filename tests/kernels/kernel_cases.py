"""Random, non-zero test inputs for the kernel tests (numpy, seeded)."""

from __future__ import annotations

import numpy as np

TOLERANCES = {
    # dtype name -> (rtol, atol) against the f32-computing reference
    "float32": (2e-5, 2e-5),
    "bfloat16": (2e-2, 2e-2),
}


def random_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal values pushed away from 0 (inputs are never zeros)."""
    x = rng.standard_normal(shape)
    return (x + np.where(x >= 0, 0.05, -0.05)).astype(np.float32)


def page_metadata(
    keys: np.ndarray, lengths: np.ndarray, page_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise page max/min of keys [B, K, C, D] over valid tokens, as the cache keeps them.

    Slots at or past lengths[b] count as -inf (max) / +inf (min), so partial pages hold the
    max/min of their valid tokens and empty pages are all -inf / +inf.

    Returns (page_max, page_min), each [B, K, P, D] float32 with P = ceil(C / page_size).
    """
    b, kv, c, d = keys.shape
    p = -(-c // page_size)
    padded = np.zeros((b, kv, p * page_size, d), np.float32)
    padded[:, :, :c] = keys
    valid = (np.arange(p * page_size)[None, :] < lengths[:, None])[:, None, :, None]
    pages_max = np.where(valid, padded, -np.inf).reshape(b, kv, p, page_size, d).max(axis=3)
    pages_min = np.where(valid, padded, np.inf).reshape(b, kv, p, page_size, d).min(axis=3)
    return pages_max.astype(np.float32), pages_min.astype(np.float32)


def distinct_indices(
    rng: np.random.Generator,
    batch: int,
    kv_heads: int,
    capacity: int,
    budget: int,
    lengths: np.ndarray | None = None,
    num_invalid: int = 0,
) -> np.ndarray:
    """[B, K, M] int32 distinct token slots per (b, k) (a random permutation), -1 padded.

    Valid slots are drawn from [0, lengths[b]); `num_invalid` further random entries are -1.
    """
    out = np.full((batch, kv_heads, budget), -1, np.int32)
    for b in range(batch):
        n_tokens = capacity if lengths is None else int(lengths[b])
        for k in range(kv_heads):
            chosen = rng.permutation(n_tokens)[:budget]
            out[b, k, : len(chosen)] = chosen
            if num_invalid:
                out[b, k, rng.permutation(budget)[:num_invalid]] = -1
            out[b, k] = out[b, k, rng.permutation(budget)]  # -1 entries anywhere, not only last
    return out


def channel_sets(rng: np.random.Generator, batch: int, kv_heads: int, dim: int, r: int):
    """[B, K, R] int32 distinct channels per (b, k)."""
    return np.stack(
        [np.stack([rng.permutation(dim)[:r] for _ in range(kv_heads)]) for _ in range(batch)]
    ).astype(np.int32)
