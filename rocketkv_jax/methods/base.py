"""Pieces shared by the compressed-KV methods: budget validation, static capacity rounding,
and the dense plan every method resolves to when its budget covers the whole sequence.

The rule for a budget that covers everything: when `token_budget >= L = T + N` a method
keeps every token and attends densely, so it generates exactly what `full` generates
(`DensePlan`). Methods never evict or approximate when they could afford not to.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from .. import checks
from ..cache import KVCache, append_token, cache_from_prompt, visible_slots
from .dense import dense_decode_attention, dense_decode_attention_stacked, keep_all

CAPACITY_MULTIPLE = 16  # cache capacities are multiples of 16 (and of the page size)
# describe()["kernels"] of a plan whose decode attention is dense (jnp under XLA): no kernel
# backend runs in its decode step. Sparse plans name the resolved backend instead.
NO_KERNELS = "none"


class MethodConfigError(ValueError):
    """A KV method's hyperparameters cannot work (raised at construction or plan time)."""


def check_token_budget(name: str, token_budget: object) -> None:
    """Raise if `token_budget` is not a positive int."""
    if token_budget is None:
        raise MethodConfigError(
            f"method {name!r} needs a token_budget (KV tokens read per decode step per KV "
            "head), e.g. 256"
        )
    checks.token_budget(token_budget, f"{name}: token_budget", MethodConfigError)


def check_positive_int(name: str, what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MethodConfigError(f"{name}: {what} must be a positive int, got {value!r}")


def check_page_size(name: str, page_size: object) -> None:
    """Raise unless `page_size` is a positive power of two."""
    check_positive_int(name, "page_size", page_size)
    if page_size & (page_size - 1):  # type: ignore[operator]
        raise MethodConfigError(
            f"{name}: page_size must be a power of two (1, 2, 4, 8, 16, ...), got {page_size}"
        )


def check_top_r(name: str, top_r: int, head_dim: int) -> None:
    """Raise unless 1 <= top_r <= head_dim (checked at plan time, when D is known)."""
    if not 1 <= top_r <= head_dim:
        raise MethodConfigError(
            f"{name}: top_r (channels kept for approximate scores) must be in [1, head_dim="
            f"{head_dim}], got {top_r}"
        )


def round_capacity(tokens: int, page_size: int = 1) -> int:
    """Smallest multiple of lcm(16, page_size) that holds `tokens` slots."""
    multiple = math.lcm(CAPACITY_MULTIPLE, max(page_size, 1))
    return max(multiple, -(-tokens // multiple) * multiple)


def cached_tokens(context: int, prompt_len: int, prompt_budget: int) -> int:
    """Tokens held by a cache whose prompt part was cut to `prompt_budget`, when the
    uncompressed sequence has `context` tokens (prompt_len prompt + the rest generated)."""
    generated = max(0, context - prompt_len)
    return min(context - generated, prompt_budget) + generated


class AppendsTokens:
    """Plan mixin: `append` writes the new token at slot `length` and keeps its page's
    max/min current (what every method does at decode)."""

    query_window = 0  # trailing queries `compress` reads; stage-1 plans read their window

    def append(self, cache: KVCache, k, v, position, layer=None) -> KVCache:
        """k, v [B, K, D]; position [B] -> cache with the token written (into `layer` of
        a stacked cache when given; see `append_token`)."""
        return append_token(cache, k, v, position, layer)


class KeepsEveryToken(AppendsTokens):
    """Plan mixin for methods without prompt eviction: `compress` keeps every prompt token
    and builds page max/min when `metadata_page_size` > 0."""

    metadata_page_size = 0

    def compress(self, k, v, q, lengths) -> KVCache:
        """Keep every prompt token. k, v [B, K, T, D]; lengths [B] (q unused)."""
        keep = keep_all(lengths, k.shape[1], k.shape[2])  # [B, K, T]
        return cache_from_prompt(k, v, keep, lengths, self.capacity, self.metadata_page_size)


@dataclasses.dataclass(frozen=True)
class DensePlan(KeepsEveryToken):
    """What every method resolves to when its budget covers the whole sequence (M >= L):
    no eviction, exact dense attention, i.e. `full` under the method's name. Quest and
    SparQ also resolve to it where their selection would cost more than dense (`fallback`).

    `name` is left out of equality and hashing: the dense fallbacks of all methods are the
    same computation, so as a static jit argument they share one compiled program.
    """

    name: str = dataclasses.field(compare=False)
    capacity: int
    prompt_len: int
    token_budget: int
    # why a budgeted method attends densely: "budget" (M >= L), "cost" (its selection would
    # cost more than dense attention, `cost.py`) or "off" (stage2="off")
    fallback: str = dataclasses.field(default="budget", compare=False)
    # "blockwise" (reads the cache once) or "reference", the materialised softmax that
    # benchmarks/decode_batched.py --attention-baseline times beside it
    attention: str = "blockwise"

    def attend(self, q, cache: KVCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D], dense over every visible slot."""
        visible = visible_slots(cache, query_pos, sliding_window)
        return dense_decode_attention(q, cache, visible, self.attention)

    def attend_stacked(self, q, stack: KVCache, layer, query_pos, sliding_window) -> jax.Array:
        """`attend` on layer `layer` of the stacked cache, read where it lies."""
        return dense_decode_attention_stacked(q, stack, layer, query_pos, sliding_window,
                                              self.attention)

    def read_tokens(self, context: int) -> int:
        return context

    def describe(self) -> dict:
        return {**dataclasses.asdict(self), "dense": True, "kernels": NO_KERNELS}
