"""RocketKV-MT (multi-turn): keep the full KV of every turn, compress a temporary copy per turn.

docs/algorithm.md: each turn's prefill attends to the full history; stage 1
builds a temporary compressed copy for that turn's decode only; decode appends each new
token to both the full cache and the temporary copy; the next turn starts again from the
full cache. `rocketkv-mt` and `snapkv-mt` are `rocketkv` and `snapkv` with the marker
`multi_turn = True`: in a single-turn `generate` they are the same computation as their
base method (one turn has nothing to reach back for), and a `conversation.Conversation`
reads the marker to keep the full history.

`MultiTurnPlan` wraps the turn's resolved plan (the inner plan) in the model's plan
protocol: its cache is a `TurnCache` (full, temporary), `append` writes the new token into
both, `attend` reads only the temporary copy with the inner plan's attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from ..cache import KVCache, append_token
from .rocketkv import RocketKV
from .snapkv import SnapKV


class RocketKVMT(RocketKV):
    """RocketKV-MT: RocketKV's two stages on a per-turn temporary copy of the full history."""

    name: ClassVar[str] = "rocketkv-mt"
    multi_turn: ClassVar[bool] = True


class SnapKVMT(SnapKV):
    """SnapKV on a per-turn temporary copy of the full history (SnapKV-MT)."""

    name: ClassVar[str] = "snapkv-mt"
    multi_turn: ClassVar[bool] = True


MULTI_TURN_CLASSES = (RocketKVMT, SnapKVMT)  # their names: names.MULTI_TURN_METHOD_NAMES


def is_multi_turn(method) -> bool:
    """True for a method that keeps the full history across turns (`*-mt`)."""
    return bool(getattr(method, "multi_turn", False))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TurnCache:
    """A multi-turn decode cache: `full` the whole history (a stacked KVCache whose slot is
    the token's position, no page metadata), `temp` the inner plan's compressed copy."""

    full: KVCache
    temp: Any


@dataclasses.dataclass(frozen=True)
class MultiTurnPlan:
    """Decode with `inner` on the temporary copy while the full history grows too."""

    inner: Any

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def query_window(self) -> int:
        return self.inner.query_window

    def compress(self, k, v, q, lengths) -> TurnCache:
        raise NotImplementedError(
            "MultiTurnPlan builds no cache from a prompt: a conversation compresses the "
            "inner plan's copy of its full history (conversation.decode_cache)")

    def append(self, cache: TurnCache, k, v, position, layer) -> TurnCache:
        """k, v [B, K, D], position [B]: write the token into the full history (at slot =
        position) and into the temporary copy (the inner plan's append)."""
        full = append_token(cache.full, k, v, position, layer)
        return TurnCache(full, self.inner.append(cache.temp, k, v, position, layer))

    def attend(self, q, cache: TurnCache, query_pos, sliding_window) -> jax.Array:
        """q [B, H, D] -> [B, H, D]: the inner plan's attention over the temporary copy."""
        return self.inner.attend(q, cache.temp, query_pos, sliding_window)

    def read_tokens(self, context: int) -> int:
        return self.inner.read_tokens(context)

    def describe(self) -> dict:
        return {**self.inner.describe(), "multi_turn": True}
