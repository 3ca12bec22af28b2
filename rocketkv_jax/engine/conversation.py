"""Conversations that keep their KV cache across turns: later turns cost only their tokens.

    conv = Conversation(params, config, make_method("rocketkv-mt", 256), capacity=4096)
    conv.append(document_and_question_ids)      # prefills the turn against the history
    reply = conv.generate(64).tokens[0]         # the reply joins the history too
    conv.append(next_question_ids)               # prefills only the new tokens

The history of B rows lives on the device with a static capacity (per-row lengths are
data). A turn is prefilled chunk by chunk with `models.llama.prefill_chunk`, started at
each row's history length (a traced start per row), so it attends causally over the whole
cached history and writes only its own keys and values. The last token of a reply is
never fed to the model by decode; it is prefilled with the next turn.

How each method lives across turns (`conversation_mode`):

- "direct" (`full`, `topk`): nothing is ever evicted, so decode runs on the full history
  itself with the method's plan; `topk` is the oracle that reads every key of every turn.
- "multi_turn" (`rocketkv-mt`, `snapkv-mt`; docs/algorithm.md): the full history
  is kept; each `generate` compresses a temporary copy with the method's plan (stage 1 over
  the full history, planned for this turn's history bucket and max_new_tokens) and decodes
  on it through `methods.multiturn.MultiTurnPlan`, which appends every new token to both
  the copy and the full history. The copy is dropped after the turn.
- "single_turn" (every other method): the single-turn method applied as it is, permanent
  eviction, the baseline that loses information. The history up to the first `generate` is
  prefilled and compressed once, into a cache grown to hold the rest of the conversation;
  later turns cannot be prefilled against a compressed cache (prefill attention reads a
  buffer whose slot is the position), so their tokens are fed one decode step at a time
  (`forward_decode`: the method's append and attention); nothing evicted comes back.

The stage-1 observation window needs the queries of the history's last W tokens (W = the
method's window). Decode never keeps queries, and a turn may be shorter than W, so a turn
of t < W tokens (multi_turn, and single_turn before its compression) re-prefills the
history's last W - t tokens with it: the window then holds the real queries of the
history's last W positions, as a one-shot prefill of the whole history would. That prefill
also recomputes those tokens' keys and values with exact attention over the history; for
tokens of a reply (which decode computed under the turn's sparse attention, in every layer
after the first) these replace the decoded ones, so the last W - t positions of the full
history hold what a one-shot prefill computes there, given the tokens before them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from ..cache import tree_bytes
from ..kernels.backend import resolve_backend
from ..methods.base import DensePlan, round_capacity
from ..methods.full import Full
from ..methods.multiturn import MultiTurnPlan, is_multi_turn
from ..methods.stage2 import TwoStagePlan
from ..methods.topk import TopK
from ..models.config import ModelConfig
from ..names import DEFAULT_KERNELS, DEFAULT_PREFILL_CHUNK
from ..sampling import Sampling, prng_key
from . import conversation_programs as programs
from .compile import hashable, hashable_structs, params_struct, unflatten
from .conversation_programs import decode_cache, grown_plan
from .decode import LoopSettings, decode_program, run_decode
from .generate import GREEDY, kernels_summary
from .requests import (
    GenerateError,
    check_callbacks,
    check_config,
    check_method,
    check_pad_id,
    check_sampling,
    check_stop_ids,
    check_token_ids,
    length_bucket,
    stop_tuple,
)

__all__ = ["Conversation", "ConversationError", "Reply", "TurnStats", "conversation_mode",
           "decode_cache"]
MODES = ("direct", "multi_turn", "single_turn")


class ConversationError(GenerateError):
    """A turn the conversation cannot take: empty, over capacity, bad token ids."""


def conversation_mode(method) -> str:
    """How `method` lives across turns (see the module docstring)."""
    if is_multi_turn(method):
        return "multi_turn"
    if isinstance(method, Full | TopK):
        return "direct"
    return "single_turn"


# --------------------------------------------------------------- the conversation
@dataclasses.dataclass
class TurnStats:
    """What one turn cost. prefilled: tokens run through prefill (or fed by decode steps)
    this turn, summed over rows, the re-prefilled window tokens included; cached: the
    history per row after the turn; cache_bytes: the KV the conversation holds."""

    prefilled: int = 0
    prefill_s: float = 0.0
    generated: int = 0  # tokens of the replies, the first (from the prefill logits) included
    start_s: float = 0.0  # the turn's compression (multi_turn, first single_turn) + 1st token
    decode_s: float = 0.0  # the decode steps after the first token
    rows: int = 1
    compile_s: float = 0.0
    cached: tuple[int, ...] = ()
    cache_bytes: int = 0
    plan: str = ""
    kernels: str = ""  # which kernel backends ran (`generate.kernels_summary`)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (each row's first token comes from the
        prefill logits, so it is not counted)."""
        decoded = self.generated - self.rows
        return decoded / self.decode_s if self.decode_s > 0 and decoded > 0 else 0.0

    def summary(self) -> str:
        cached = "/".join(map(str, self.cached))
        return (f"[turn] prefilled {self.prefilled} new tokens ({self.prefill_s:.2f} s) | "
                f"history {cached} tokens | KV cache {self.cache_bytes / 2**20:.1f} MiB | "
                f"reply {self.generated} tokens (first after {self.start_s:.2f} s, then "
                f"{self.decode_tokens_per_s:.1f} tok/s) | "
                f"compile {self.compile_s:.1f} s" + (f" | {self.plan}" if self.plan else "")
                + (f" | kernels: {self.kernels}" if self.kernels else ""))


@dataclasses.dataclass
class Reply:
    tokens: list[list[int]]  # generated ids per row, a final stop id included if hit
    stats: TurnStats


class Conversation:
    """B rows of multi-turn conversation over one model and KV method (see module doc).

    capacity: the most tokens a row's history may hold (prompt turns and replies); static,
      so no turn recompiles for growth. A turn or reply that would pass it raises
      ConversationError naming the numbers. At most the model's context.
    prefill_chunk: turn tokens per prefill chunk (None: one chunk per turn).
    stop_ids: a reply stops after one of these (default: the config's EOS ids).
    kernels: the prefill attention's backend ("auto": the Pallas kernel on a GPU); the
      decode's sparse attention runs the method's own `kernels`.
    """

    def __init__(self, params, config: ModelConfig, method, *, capacity: int, batch: int = 1,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                 stop_ids: Sequence[int] | None = None, pad_id: int = 0,
                 kernels: str = DEFAULT_KERNELS):
        check_config(config)
        check_method(method)
        capacity = checks.capacity(capacity, error=ConversationError)
        ctx = config.max_position_embeddings
        if capacity > ctx:
            raise ConversationError(
                f"capacity {capacity} is larger than the model's context of {ctx} tokens; "
                f"use at most {ctx}")
        batch = checks.count(batch, "batch", ConversationError)
        prefill_chunk = checks.prefill_chunk(prefill_chunk, error=ConversationError)
        check_stop_ids(stop_ids)
        pad_id = check_pad_id(pad_id, config.vocab_size)
        if getattr(method, "skip_layers", 0):
            raise ConversationError(
                f"{method.name}: skip_layers is not supported in conversations yet; pass "
                f"skip_layers=0")
        self.kernels = resolve_backend(kernels)
        self.params, self.config, self.method = params, config, method
        self.capacity, self.batch, self.pad_id = capacity, batch, pad_id
        self.stop_ids = stop_tuple(config, stop_ids)
        self.mode = conversation_mode(method)
        self.window = 0 if self.mode == "direct" else getattr(method, "window", 0)
        chunk = prefill_chunk or capacity
        self.chunk = chunk
        # buffer: capacity rounded to 16, or to whole chunks when a turn can need several,
        # so every chunk of a turn fits inside it (`_prefill_plan`)
        self.size = (round_capacity(capacity) if capacity <= chunk
                     else -(-capacity // chunk) * chunk)
        self._params_s = params_struct(params)
        self.reset()

    # ---- state
    def reset(self) -> None:
        """Forget every row's history (the buffers are zeroed, nothing recompiles)."""
        init, _ = programs.init_program(self.config, self.batch, self.size, self.window,
                                self._params_s)
        self._history, self._q_obs, self._x_last = init()
        self._tokens: list[list[int]] = [[] for _ in range(self.batch)]
        self._cached = np.zeros(self.batch, np.int64)  # history tokens in the KV cache
        self._logits = None  # [B, V] of each row's last cached token, when it is the last
        self._plan = None  # single_turn: the plan fixed by the first compression
        self._replies = 0  # `generate` calls since the start or the last reset

    @property
    def history(self) -> list[list[int]]:
        """Every row's token ids so far: turns and replies."""
        return [list(t) for t in self._tokens]

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self._tokens]

    @property
    def compressed(self) -> bool:
        """single_turn: the history was compressed (later turns are fed by decode)."""
        return self._plan is not None

    def cache_bytes(self) -> int:
        return tree_bytes((self._history, self._q_obs))

    # ---- turns
    def append(self, turns) -> TurnStats:
        """Add one turn per row and prefill it against the history: a list of token ids
        (one row) or one list per row. Returns the turn's stats; the next `generate`
        answers from the logits of each row's last token."""
        turns = self._rows(turns)
        for b, t in enumerate(turns):
            if len(t) == 0:
                raise ConversationError(
                    f"row {b}: the turn is empty; a turn needs at least one token")
            try:
                check_token_ids(t, self.config.vocab_size, f"row {b}'s turn")
            except GenerateError as e:
                raise ConversationError(str(e)) from None
            self._check_room(b, len(t), f"this turn has {len(t)} tokens")
        for b, t in enumerate(turns):
            self._tokens[b].extend(int(x) for x in t)
        stats = TurnStats()
        self._sync(stats)
        return self._finish_stats(stats)

    def generate(self, max_new_tokens: int, *, sampling: Sampling = GREEDY, seed: int = 0,
                 on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None
                 ) -> Reply:
        """Decode a reply per row from the history; the reply joins the history.

        seed: any integer in [0, 2**64). The n-th reply since the conversation started (or
        was reset), n = 0, 1, ..., samples with `prng_key(seed, n)`: one seed gives each
        turn its own stream, and the same seed replays the same conversation.
        on_step(step, tokens [B], done [B]) is called as tokens are produced.
        """
        max_new_tokens = checks.max_new_tokens(max_new_tokens, error=ConversationError)
        check_sampling(sampling)
        key = prng_key(checks.seed(seed, error=ConversationError), self._replies)
        check_callbacks(on_step=on_step)
        if not all(self._tokens):
            raise ConversationError("the conversation is empty: append a turn before "
                                    "generating")
        for b in range(self.batch):
            self._check_room(b, max_new_tokens, f"a reply of up to {max_new_tokens} tokens")
        stats = TurnStats()
        self._sync(stats)  # a previous reply's last token
        loop = LoopSettings(max_new_tokens, sampling, self.stop_ids, self.pad_id)
        lengths = jnp.asarray(self._cached, jnp.int32)
        first = self.mode == "single_turn" and self._plan is None
        size = (0 if self.compressed  # decodes on its own cache: no history bucket
                else min(length_bucket(int(self._cached.max())), self.size))
        if self.mode == "single_turn" and not first:
            plan = dplan = self._plan
        else:
            plan = self.method.plan(self.config, size, max_new_tokens)
            dplan = plan
            if first:
                grow = self.capacity - int(self._cached.min())
                plan = dplan = grown_plan(plan, plan.capacity + grow)
            elif self.mode == "multi_turn" and not isinstance(plan, DensePlan):
                dplan = MultiTurnPlan(plan)
        mode = "direct" if dplan is plan and not first and self.mode == "multi_turn" \
            else self.mode
        start, t_start, state_s = programs.start_program(
            self.config, mode, plan, size, loop, first,
            hashable_structs(self._history), hashable_structs(self._q_obs), self._params_s)
        decode, t_decode = decode_program(self.config, dplan, loop, state_s, self._params_s)
        finish, t_finish = programs.finish_program(isinstance(plan, TwoStagePlan),
                                                   hashable(unflatten(state_s).cache))
        stats.compile_s += t_start + t_decode + t_finish
        stats.plan = _plan_summary(plan)
        stats.kernels = kernels_summary(self.kernels, dplan)

        t0 = time.perf_counter()
        state = start(self.params, self._history, self._q_obs, self._logits, lengths,
                      jnp.asarray(key))
        self._history = None  # donated (or compressed away)
        run = run_decode(decode, self.params, state, lengths, self.batch, on_step)
        self._history = finish(run.state.cache, run.state.step, run.state.n_generated)
        stats.start_s = run.first_token_at - t0
        stats.decode_s = run.decode_s
        stats.rows = self.batch
        if first:
            self._plan = plan
        self._replies += 1
        replies = run.tokens
        for b, r in enumerate(replies):
            self._tokens[b].extend(r)
            self._cached[b] += len(r) - 1
        self._logits = None
        stats.generated = sum(map(len, replies))
        return Reply(replies, self._finish_stats(stats))

    # ---- internals
    def _rows(self, turns) -> list[list[int]]:
        if isinstance(turns, np.ndarray):
            turns = turns.tolist()
        if isinstance(turns, str | bytes) or not isinstance(turns, Sequence):
            raise ConversationError(
                f"a turn must be a list of token ids (or one list per row), got "
                f"{type(turns).__name__}; tokenize text first (Tokenizer.encode)")
        turns = list(turns)
        if self.batch == 1 and (not turns or not isinstance(turns[0], Sequence | np.ndarray)):
            turns = [turns]  # one row's token ids
        if len(turns) != self.batch:
            raise ConversationError(f"expected {self.batch} turns (one per row), got "
                                    f"{len(turns)}")
        for b, t in enumerate(turns):
            if isinstance(t, str | bytes) or not isinstance(t, Sequence | np.ndarray):
                raise ConversationError(f"row {b}: a turn must be a list of token ids, got "
                                        f"{type(t).__name__}")
        return [list(t) for t in turns]

    def _check_room(self, b: int, n: int, what: str) -> None:
        h = len(self._tokens[b])
        if h + n > self.capacity:
            raise ConversationError(
                f"row {b}: the history holds {h} tokens and {what}: {h + n} > the "
                f"conversation's capacity of {self.capacity} tokens. Start a conversation "
                f"with a larger capacity (Conversation(capacity=...), rocketkv chat "
                f"--capacity N; at most the model's context of "
                f"{self.config.max_position_embeddings}) or reset() it")

    def _finish_stats(self, stats: TurnStats) -> TurnStats:
        stats.cached = tuple(int(c) for c in self._cached)
        stats.cache_bytes = self.cache_bytes()
        return stats

    def _sync(self, stats: TurnStats) -> None:
        """Bring every row's uncached tokens into the KV cache; logits of the last one."""
        pending = [len(t) - int(c) for t, c in zip(self._tokens, self._cached, strict=True)]
        if max(pending) == 0 and self._logits is not None:
            return
        t0 = time.perf_counter()
        if self.compressed:
            self._feed(stats)
        else:
            self._prefill(stats)
        jax.block_until_ready(self._logits)
        stats.prefill_s += time.perf_counter() - t0

    def _prefill_plan(self):
        """Per row, where the prefill starts (a), and the chunk length C, chunk count."""
        e = np.array([len(t) for t in self._tokens], np.int64)  # lengths once in
        h = self._cached
        W = self.window  # 0 for direct; single_turn only prefills before its compression
        a = np.maximum(0, np.minimum(h, e - W))
        n_max = int((e - a).max())
        C = min(self.chunk, length_bucket(max(n_max, 1)), self.size)
        n_chunks = -(-n_max // C)
        # every chunk must end inside the buffer: start earlier, re-running history tokens
        a = np.maximum(0, np.minimum(a, self.size - n_chunks * C))
        return a, e, C, n_chunks

    def _prefill(self, stats: TurnStats) -> None:
        a, e, C, n_chunks = self._prefill_plan()
        tokens = np.full((self.batch, n_chunks * C), self.pad_id, np.int32)
        for b, t in enumerate(self._tokens):
            tokens[b, :e[b] - a[b]] = t[a[b]:e[b]]
        chunk, t_chunk = programs.chunk_program(self.config, self.batch, C, self.size, self.window,
                                           self._params_s, self.kernels)
        logits, t_logits = programs.logits_program(self.config, self.batch, self._params_s)
        stats.compile_s += t_chunk + t_logits
        lengths = jnp.asarray(e, jnp.int32)
        for c in range(n_chunks):
            self._history, self._q_obs, self._x_last = chunk(
                self.params, self._history, self._q_obs, self._x_last,
                jnp.asarray(tokens[:, c * C:(c + 1) * C]), jnp.asarray(a + c * C, jnp.int32),
                lengths)
        self._logits = logits(self.params, self._x_last)
        stats.prefilled += int((e - a).sum())
        self._cached = e

    def _feed(self, stats: TurnStats) -> None:
        counts = np.array([len(t) - c for t, c in zip(self._tokens, self._cached,
                                                      strict=True)], np.int64)
        F = length_bucket(int(counts.max()))
        tokens = np.full((self.batch, F), self.pad_id, np.int32)
        for b, t in enumerate(self._tokens):
            tokens[b, :counts[b]] = t[self._cached[b]:]
        feed, t_feed = programs.feed_program(self.config, self._plan, F,
                                     hashable_structs(self._history), self._params_s)
        stats.compile_s += t_feed
        self._history, self._logits = feed(
            self.params, self._history, jnp.asarray(tokens),
            jnp.asarray(self._cached, jnp.int32), jnp.asarray(counts, jnp.int32))
        stats.prefilled += int(counts.sum())
        self._cached = self._cached + counts


def _plan_summary(plan) -> str:
    name = getattr(plan, "name", "")
    if isinstance(plan, DensePlan):
        return f"{name}: dense (nothing evicted)"
    kept = getattr(plan, "prompt_budget", None)
    return f"{name}: keeps {kept} history tokens" if kept is not None else name
