"""The serving engine: many requests at once on fixed decode slots, with chunked prefill
and a cache of full-KV prompt prefixes (docs/serving.md).

    engine = Engine(params, config, slots=8)
    handle = engine.submit(ServeRequest(prompt_ids, max_tokens=64), on_event)
    ...                                   # on_event(Event) from the engine's thread
    engine.drain()

One thread owns the device. Each turn of its loop:

1. admits the oldest waiting request when a slot is free and its memory fits
   (`kv_memory_bytes` bounds the pools' caches plus the prefill in flight);
2. runs one prefill chunk of the request being prefilled (a long prompt never stalls
   the running requests' tokens for its whole prefill); after its last chunk, compresses
   it with its method's plan, samples its first token and moves it into a row of its
   pool;
3. runs one decode step of every pool that has running rows, and hands each row's token
   to its request.

While rows decode and no other request waits, the prefill chunk runs in the same program
as one pool's decode step (`models.llama.forward_mixed`): the weights are read once for
both, and the running requests' time per token grows by the chunk's own work only. Its
size adapts to keep a turn within `max_stall` times a turn without it (measured once per
set of pools): it starts at `mixed_chunk` tokens, doubles while a turn takes at most
(1 + max_stall) / 2 of a plain turn (so the doubled chunk should still fit) and halves
when a turn takes more than max_stall, between `mixed_chunk` and `prefill_chunk`. With
nothing decoding, or with more requests waiting (each prefill finished adds a row to the
decode batch, and a step of many rows costs little more than a step of one), the prefill
runs `prefill_chunk` tokens at a time.

A pool is one cache of R rows for one plan (the method, budget, prompt bucket and
max-tokens bucket fix the plan, so every row of a pool has the same cache shapes); it
grows 1, 2, 4, ... rows up to `slots` as requests join it, and is dropped when empty
and memory is wanted. Each row decodes at its own position with its own sampling and
PRNG stream. A finished, failed or cancelled request frees its row at once.

Prefix reuse: after a prompt is prefilled, its full keys and values (before
compression) are kept in an LRU cache bounded by `prefix_cache_bytes`. A later prompt
that shares a prefix with one of them (a chat that grows turn by turn) starts from a
copy of it and prefills only from the reuse point: the longest common prefix, cut so the
method's observation window is recomputed and to a whole chunk. Each request compresses
its own copy (RocketKV-MT's rule: the prefix keeps its full KV).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks
from .. import sharding as shd
from ..cache import tree_bytes
from ..kernels.backend import prefill_backend
from ..methods.base import MethodConfigError
from ..methods.cost import check_stage2
from ..methods.registry import make_method, sweep_settings
from ..models.config import ModelConfig
from ..names import DEFAULT_KERNELS
from ..sampling import Sampling, prng_key
from . import serve_programs as sp
from .compile import hashable, hashable_structs, params_struct
from .decode import host_array
from .programs import chunk_program, init_program, prefill_state_struct
from .requests import GenerateError, check_request, check_stop_ids, prompt_bucket
from .serving_api import (
    EngineStopping,
    Event,
    Handle,
    QueueFull,
    RequestRejected,
    ServeRequest,
)
from .turns import Turn, TurnLink

GiB = 1 << 30
log = logging.getLogger(__name__)


def tokens_bucket(n: int) -> int:
    """max_tokens is planned for a power of 4 from 16 (16, 64, 256, 1024, ...), so that
    requests asking for different lengths share a pool: every pool costs a decode step
    of its own per turn, which reads all the weights again. The plan is the method's for
    that many new tokens (RocketKV splits its budget by the whole sequence), as a static
    batch is planned for its longest request; a request's tokens are those of
    `generate` with max_new_tokens = the bucket, cut at its own max_tokens."""
    b = 16
    while b < n:
        b *= 4
    return b


def chunk_sizes(mixed_chunk: int, prefill_chunk: int) -> list[int]:
    """The prefill chunk sizes an engine runs: mixed_chunk doubled while it divides
    prefill_chunk, then prefill_chunk (only prefill_chunk when mixed_chunk is 0)."""
    sizes = [mixed_chunk] if mixed_chunk else []
    while sizes and sizes[-1] * 2 < prefill_chunk and prefill_chunk % (sizes[-1] * 2) == 0:
        sizes.append(sizes[-1] * 2)
    return [*sizes, prefill_chunk]


def fit_chunk(sizes: list[int], want: int, start: int, S: int) -> int:
    """The largest of `sizes` up to `want` that fits a prefill buffer of S positions from
    `start` (a multiple of the smallest size, which always fits where start < S)."""
    return max((c for c in sizes if c <= want and start + c <= S), default=sizes[0])


def next_mixed_chunk(sizes: list[int], C: int, turn_s: float, plain_s: float,
                     max_stall: float) -> int:
    """The next mixed chunk after a turn with a chunk of C tokens took turn_s seconds,
    against plain_s for the same turn without it: the next smaller size past max_stall,
    the next larger where twice the chunk's own cost (2 turn_s - plain_s) would still be
    within max_stall, else C."""
    i = sizes.index(C)
    if turn_s > max_stall * plain_s:
        return sizes[max(0, i - 1)]
    if 2 * turn_s - plain_s <= max_stall * plain_s:
        return sizes[min(len(sizes) - 1, i + 1)]
    return C


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def reuse_point(shared: int, prompt_len: int, window: int, chunk: int) -> int:
    """Where the prefill of a prompt may start from a cached prefix it shares `shared`
    tokens with: before the last `window` tokens (their queries feed stage 1, so they are
    recomputed) and before the last token (its hidden state gives the first logits), at a
    whole chunk (the chunk programs run at multiples of it)."""
    return max(0, min(shared, prompt_len - max(window, 1))) // chunk * chunk


def _ignore(event: Event) -> None:
    """A follower's listener: the leader answers the clients."""


@dataclasses.dataclass
class _Request:
    id: str
    req: ServeRequest
    on_event: Callable[[Event], None]
    plan: object
    T: int  # prompt bucket (what the plan compresses)
    S: int  # prefill positions: T in whole chunks
    W: int  # the plan's observation window
    pool_key: tuple
    prefill_bytes: int
    key: np.ndarray  # [2] uint32
    submitted_at: float
    phase: str = "queued"  # queued, prefill, decode, done
    cancelled: bool = False
    state: object = None  # the prefill state while prefilling
    next_start: int = 0  # next chunk's first position
    padded: np.ndarray | None = None
    cached_tokens: int = 0
    pool: _Pool | None = None
    row: int = -1
    generated: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Pool:
    key: tuple
    plan: object
    cache: object
    rows: list  # _Request or None per row

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)


@dataclasses.dataclass
class _Prefix:
    tokens: np.ndarray
    k: jax.Array
    v: jax.Array
    S: int
    nbytes: int


class Engine:
    """A serving engine for one model: `submit` requests, get their tokens as `Event`s.

    slots: requests decoding at once (over all pools); max_queue: requests waiting
    beyond them before `submit` raises QueueFull; prefill_chunk: prompt tokens per
    prefill chunk while no request decodes; mixed_chunk: prompt tokens per turn while
    requests decode, run in one program with their decode step (smaller keeps their
    tokens flowing while a long prompt prefills, larger prefills faster; a divisor of
    prefill_chunk; 0: off, the prefill then runs prefill_chunk tokens at a time in a
    program of its own; one device only, so off under a mesh); max_stall: how much
    longer than a plain decode turn a turn with a mixed chunk may take (the chunk adapts,
    see above; None: always mixed_chunk tokens); kv_memory_bytes: the
    pools' caches plus the prefill in flight; prefix_cache_bytes: full-KV prefixes kept
    for reuse (0: none); kernels: the kernel backend (names.KERNEL_BACKENDS); stage2:
    the stage-2 mode (names.STAGE2_MODES) of every request whose method has one
    (hybrid, rocketkv, quest, sparq; "auto": sparse where the cost model says it pays);
    fault_hook(stage, request_id): called at "prefill" and "decode" of each request
    (tests inject failures with it); link: this process's end of the turns when a
    `jax.distributed` run serves on several processes (`turns.TurnLink`; a mesh is then
    required): the leader's engine takes the requests and publishes each turn's input,
    a follower's engine runs the turns it reads (`wait` until the leader stops).
    """

    def __init__(self, params, config: ModelConfig, *, slots: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 256, mixed_chunk: int = 16,
                 max_stall: float | None = 1.75, kv_memory_bytes: int = 4 * GiB,
                 prefix_cache_bytes: int = 1 * GiB, kernels: str = DEFAULT_KERNELS,
                 stage2: str = "auto", mesh=None,
                 fault_hook: Callable[[str, str], None] | None = None,
                 link: TurnLink | None = None):
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.slots = checks.integer(slots, "slots", low=1)
        self.max_queue = checks.integer(max_queue, "max_queue", low=0)
        self.chunk = checks.integer(prefill_chunk, "prefill_chunk", low=1)
        self.mixed_chunk = checks.integer(mixed_chunk, "mixed_chunk", low=0)
        if self.mixed_chunk and self.chunk % self.mixed_chunk:
            raise ValueError(f"mixed_chunk ({mixed_chunk}) must divide prefill_chunk "
                             f"({prefill_chunk}): chunks start at multiples of it")
        if max_stall is not None and (isinstance(max_stall, bool) or not isinstance(
                max_stall, (int, float)) or not 1 < max_stall < float("inf")):
            raise ValueError(f"max_stall must be a number > 1 or None, got {max_stall!r}")
        self.max_stall = max_stall
        self._sizes = chunk_sizes(self.mixed_chunk, self.chunk)
        self._mixed_i = 0  # the mixed chunk's index in _sizes
        self._plain_s: dict[tuple, float] = {}  # a plain turn's seconds per set of pools
        self._compiled = False  # a program was compiled in this turn
        self.kv_memory = checks.integer(kv_memory_bytes, "kv_memory_bytes", low=1, high=1 << 62)
        self.prefix_limit = checks.integer(prefix_cache_bytes, "prefix_cache_bytes", low=0,
                                           high=1 << 62)
        self.kernels = kernels
        check_stage2("Engine", stage2)
        self.stage2 = stage2
        self.prefill_kernels = prefill_backend(kernels)
        self.mesh = mesh
        self._rows_step = 1  # pools grow in multiples of the data axis
        if mesh is not None:
            if self.mixed_chunk:
                log.info("mixed_chunk is off under a mesh (forward_mixed runs on one "
                         "device): prefills run prefill_chunk tokens between decode steps")
            self.mixed_chunk = 0
            shd.check_mesh(config, mesh)
            params = shd.place_params(params, config, mesh)
            self._rows_step = mesh.shape[shd.DATA]
        if link is None and jax.process_count() > 1:
            raise ValueError(f"this is process {jax.process_index()} of "
                             f"{jax.process_count()}: pass link=TurnLink.from_runtime() so "
                             f"that every process runs the same turns")
        if link is not None and mesh is None:
            raise ValueError("an engine on several processes needs a mesh over their devices")
        self._link = link
        self._inbox: list[_Request] = []  # the leader's: submitted, not yet published
        self._cancels: list[str] = []  # the leader's: cancelled, not yet published
        self.fault_hook = fault_hook
        self.params = params
        self._params_s = params_struct(params)
        self._lock = threading.Condition()
        self._queue: collections.deque[_Request] = collections.deque()
        self._all: dict[str, _Request] = {}
        self._prefilling: _Request | None = None
        self._pools: dict[tuple, _Pool] = {}
        self._prefixes: collections.OrderedDict[int, _Prefix] = collections.OrderedDict()
        self._ids = itertools.count()
        self._programs: set = set()
        self._cache_structs: dict = {}
        self._stopping = False
        self._closed = False
        self._counts = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="rocketkv-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- the public surface
    def submit(self, request: ServeRequest, on_event: Callable[[Event], None]) -> Handle:
        """Check and queue a request; raises RequestRejected (what to fix), QueueFull or
        EngineStopping at once. `on_event` is then called from the engine's thread."""
        if self._link is not None and not self._link.leader:
            raise RuntimeError("a follower's engine takes its requests from the leader")
        r = self._prepare(request, on_event)
        with self._lock:
            if self._stopping or self._closed:
                raise EngineStopping("the server is shutting down and admits no new requests")
            waiting = len(self._queue) + len(self._inbox)
            if waiting >= self.max_queue + max(0, self.slots - self._busy()):
                self._counts["queue_full"] += 1
                raise QueueFull(f"{waiting} requests are waiting, the most this "
                                f"server queues; retry later", retry_after=1.0)
            (self._inbox if self._link is not None else self._queue).append(r)
            self._all[r.id] = r
            self._counts["submitted"] += 1
            self._lock.notify_all()
        return Handle(r.id, self.cancel)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            r = self._all.get(request_id)
            if r is not None and r.phase != "done":
                self._cancel_soon(r)
                self._lock.notify_all()

    def _cancel_soon(self, r: _Request) -> None:
        """r ends as cancelled at the next turn; on several processes, at the next turn
        of every process (the flag goes out with the turn's input)."""
        if self._link is None:
            r.cancelled = True
        elif r.id not in self._cancels:
            self._cancels.append(r.id)

    def stats(self) -> dict:
        """Counters: requests submitted/finished/cancelled/failed, what is queued,
        prefilling and decoding, the slots and pools and their bytes, the prefix cache
        (entries, bytes, lookups, hits, reused tokens) and the programs compiled."""
        with self._lock:
            pools = list(self._pools.values())
            prefix_bytes = sum(p.nbytes for p in self._prefixes.values())
            return {
                **{k: self._counts[k] for k in ("submitted", "finished", "cancelled",
                                                 "failed", "queue_full", "prefix_lookups",
                                                 "prefix_hits", "prefix_hit_tokens",
                                                 "prefill_chunks", "mixed_chunks")},
                "queued": len(self._queue) + len(self._inbox),
                "prefilling": int(self._prefilling is not None),
                "running": self._busy(),
                "slots": self.slots,
                "pools": len(pools),
                "pool_rows": sum(len(p.rows) for p in pools),
                "kv_bytes": self._used_bytes(),
                "kv_memory_bytes": self.kv_memory,
                "prefix_entries": len(self._prefixes),
                "prefix_bytes": prefix_bytes,
                "programs": len(self._programs),
                "stopping": self._stopping,
            }

    def drain(self, timeout: float | None = None) -> bool:
        """Admit nothing new; finish every accepted request, then stop the engine's
        thread. True when everything finished within `timeout` seconds."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            ok = self._lock.wait_for(lambda: not self._all, timeout)
        self.close()
        return ok

    def close(self) -> None:
        """Stop now: requests still open end with an "error" event."""
        with self._lock:
            self._stopping = self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for r in list(self._all.values()):
            self._fail(r, "the server stopped before this request finished")

    def wait(self) -> None:
        """Until the engine's thread stops (a follower: when the leader's engine stops)."""
        self._thread.join()

    @property
    def draining(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------- checks and plans
    def _prepare(self, request: ServeRequest, on_event, rid: str | None = None) -> _Request:
        if not isinstance(request, ServeRequest):
            raise RequestRejected(f"expected a ServeRequest, got {type(request).__name__}")
        if not callable(on_event):
            raise RequestRejected("on_event must be a function")
        config = self.config
        try:
            check_request(config, [list(request.prompt)], request.max_tokens)
            checks.seed(request.seed, error=GenerateError)
        except GenerateError as e:
            raise RequestRejected(str(e)) from None
        if not isinstance(request.sampling, Sampling):
            raise RequestRejected("sampling must be a Sampling")
        if request.method.endswith("-mt"):
            raise RequestRejected(
                f"method {request.method!r}: the server already keeps every prompt's full KV "
                f"for reuse and compresses each request's own copy (RocketKV-MT's rule); "
                f"ask for {request.method[:-3]!r}")
        try:
            method = make_method(request.method, request.token_budget, **sweep_settings(
                request.method, kernels=self.kernels, stage2=self.stage2))
        except MethodConfigError as e:
            raise RequestRejected(str(e)) from None
        P, N = len(request.prompt), request.max_tokens
        ctx = config.max_position_embeddings
        T = prompt_bucket(P, ctx - N, None)
        S = -(-T // self.chunk) * self.chunk
        plan = method.plan(config, T, max(N, min(tokens_bucket(N), ctx - T)))
        W = getattr(plan, "query_window", 0)
        one = self._cache_struct(plan, S, T, W)
        pool_key = (plan, hashable(one))
        prefill_bytes = tree_bytes(prefill_state_struct(config, 1, S, W, self._params_s, None))
        alone = prefill_bytes + tree_bytes(one)
        if alone > self.kv_memory:
            raise RequestRejected(
                f"this request needs {alone / GiB:.2f} GiB of KV memory ({P} prompt tokens, "
                f"max_tokens {N}, {request.method}), more than the server's "
                f"{self.kv_memory / GiB:.2f} GiB (--kv-memory); shorten the prompt, lower "
                f"max_tokens or use a smaller token budget")
        stop = config.eos_token_ids if request.stop_ids is None else request.stop_ids
        try:
            check_stop_ids(stop)
        except GenerateError as e:
            raise RequestRejected(str(e)) from None
        stop = tuple(sorted({int(t) for t in stop}))
        request = dataclasses.replace(request, stop_ids=stop)
        return _Request(id=rid or f"req-{next(self._ids)}", req=request, on_event=on_event,
                        plan=plan, T=T, S=S, W=W, pool_key=pool_key,
                        prefill_bytes=prefill_bytes, key=prng_key(request.seed),
                        submitted_at=time.perf_counter())

    def _cache_struct(self, plan, S, T, W):
        key = (plan, S, T, W)
        if key not in self._cache_structs:
            self._cache_structs[key] = sp.cache_struct(self.config, plan, S, T, W,
                                                       self._params_s, 1)
        return self._cache_structs[key]

    # ------------------------------------------------------------- memory
    def _busy(self) -> int:
        return sum(p.busy for p in self._pools.values())  # a prefilling request holds its row

    def _used_bytes(self) -> int:
        pools = sum(tree_bytes(p.cache) for p in self._pools.values())
        return pools + (self._prefilling.prefill_bytes if self._prefilling else 0)

    def _row_bytes(self, key) -> int:
        return tree_bytes(jax.tree.unflatten(*key[1]))

    def _reserve(self, r: _Request) -> bool:
        """Give r a row of its pool (made or grown as needed) if memory allows."""
        pool = self._pools.get(r.pool_key)
        if pool is not None and None in pool.rows:
            pool.rows[pool.rows.index(None)] = r
            r.pool, r.row = pool, pool.rows.index(r)
            return True
        have = len(pool.rows) if pool else 0
        step = self._rows_step
        rows = min(-(-self.slots // step) * step, max(step, 2 * have))
        extra = (rows - have) * self._row_bytes(r.pool_key) + r.prefill_bytes
        while self._used_bytes() + extra > self.kv_memory:
            idle = [k for k, p in self._pools.items() if p.busy == 0 and p is not pool]
            if not idle:
                return False
            del self._pools[idle[0]]
        one_s = r.pool_key[1]
        if pool is None:
            pool_s = sp.with_rows(one_s, rows)
            empty = self._program(("empty", pool_s), lambda: sp.empty_pool_program(
                pool_s, self.mesh))
            pool = self._pools[r.pool_key] = _Pool(r.pool_key, r.plan, empty(),
                                                    [None] * rows)
        else:
            grow = self._program(("grow", hashable_structs(pool.cache), rows),
                                 lambda: sp.grow_program(hashable_structs(pool.cache), rows,
                                                         self.mesh))
            pool.cache = grow(pool.cache)
            pool.rows += [None] * (rows - have)
        r.pool, r.row = pool, pool.rows.index(None)
        pool.rows[r.row] = r
        return True

    def _put(self, x, rows: bool = False):
        """A host value as the programs take it: on the mesh, split over "data" (`rows`)
        or whole on every device."""
        if self.mesh is None:
            return jnp.asarray(x)
        return shd.put_batch(x, self.mesh) if rows else shd.put_replicated(x, self.mesh)

    def _program(self, key, build):
        if key not in self._programs:
            self._programs.add(key)
            self._compiled = True  # (or found compiled): this turn's time is not a step's
        return build()[0]

    # ------------------------------------------------------------- the loop
    def _run(self) -> None:
        while self._next_turn():
            self._turn()

    def _next_turn(self) -> bool:
        """Wait for work and take the turn's input; False when the engine stops. On
        several processes the leader publishes the input and followers read it: the same
        requests under the same ids, the same cancellations."""
        link = self._link
        if link is not None and not link.leader:
            turn = link.receive(stopped=lambda: self._closed)
            if turn.close:
                return False
            new = [self._prepare(req, _ignore, rid=rid) for rid, req in turn.requests]
            with self._lock:
                self._all.update((r.id, r) for r in new)
                self._counts["submitted"] += len(new)
        else:
            with self._lock:
                self._lock.wait_for(lambda: self._closed or self._has_work())
                if link is None:
                    return not self._closed
                new, self._inbox = self._inbox, []
                turn = Turn(requests=tuple((r.id, r.req) for r in new),
                            cancel=tuple(self._cancels), close=self._closed)
                self._cancels = []
            link.publish(turn)
            if turn.close:
                return False
        with self._lock:
            self._queue.extend(new)
            self._mark_cancelled(turn.cancel)
        return True

    def _mark_cancelled(self, ids) -> None:
        for rid in ids:
            r = self._all.get(rid)
            if r is not None and r.phase != "done":
                r.cancelled = True

    def _turn(self) -> None:
        """One turn: reap cancelled requests, admit, run a prefill chunk and the pools'
        decode steps (module docstring)."""
        self._reap_cancelled()
        if self._prefilling is None:
            self._admit()
        r = self._prefilling
        pools = [p for p in self._pools.values() if self._live(p)]
        shape = tuple((p.key, len(p.rows)) for p in pools)
        adapt = self.max_stall is not None
        # with requests waiting behind it, a prefill runs whole chunks: each one
        # finished adds a row to the decode batch, which costs little more per step
        mixed = r is not None and pools and self.mixed_chunk and not self._queue
        if mixed and adapt and shape not in self._plain_s:
            r = None  # one plain turn first: what a turn costs without the chunk
        t0, self._compiled = time.perf_counter(), False
        if mixed and r is not None:
            C = self._fit(r, self._sizes[self._mixed_i])
            self._mixed_turn(r, pools[0], C)
            for pool in pools[1:]:
                self._decode_step(pool)
            if adapt and not self._compiled:
                self._adapt(C, time.perf_counter() - t0, self._plain_s[shape])
            return
        if r is not None:
            self._guard(r, self._prefill_one_chunk)
        for pool in pools:
            self._decode_step(pool)
        if r is None and pools and not self._compiled:
            self._plain_s[shape] = time.perf_counter() - t0

    def _fit(self, r: _Request, want: int) -> int:
        return fit_chunk(self._sizes, want, r.next_start, r.S)

    def _adapt(self, C: int, turn_s: float, plain_s: float) -> None:
        C = next_mixed_chunk(self._sizes, C, turn_s, plain_s, self.max_stall)
        self._mixed_i = self._sizes.index(C)

    def _has_work(self) -> bool:
        return bool(self._queue or self._inbox or self._cancels or self._prefilling
                    or any(p.busy for p in self._pools.values()))

    def _reap_cancelled(self) -> None:
        with self._lock:
            open_ = [*self._queue, *(r for p in self._pools.values() for r in p.rows if r)]
        for r in open_:
            if r.cancelled:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        """Start the oldest waiting request's prefill if a slot is free and it fits (only
        the engine's thread changes pools; the lock guards the queue)."""
        with self._lock:
            if not self._queue or self._busy() >= self.slots:
                return
            r = self._queue[0]
        if not self._reserve(r):
            return
        with self._lock:
            self._queue.remove(r)
            r.phase = "prefill"
            self._prefilling = r
        self._guard(r, self._start_prefill)

    def _start_prefill(self, r: _Request) -> None:
        P, C = len(r.req.prompt), self.chunk
        prompt = np.asarray(r.req.prompt, np.int32)
        r.padded = np.zeros((1, r.S), np.int32)
        r.padded[0, :P] = prompt
        start, entry = 0, None
        if self.prefix_limit:
            self._counts["prefix_lookups"] += 1
            for key, e in reversed(self._prefixes.items()):
                s = reuse_point(common_prefix(e.tokens, prompt), P, r.W, C)
                if s > start:
                    start, entry, hit = s, e, key
        if entry is not None:
            self._prefixes.move_to_end(hit)
            seed = self._program(("seed", entry.S, r.S, r.W), lambda: sp.seed_program(
                self.config, entry.S, r.S, r.W, self._params_s, self.mesh))
            r.state = seed(entry.k, entry.v)
            self._counts["prefix_hits"] += 1
            self._counts["prefix_hit_tokens"] += start
        else:
            init = self._program(("init", r.S, r.W), lambda: init_program(
                self.config, 1, r.S, r.W, self._params_s, self.mesh))
            r.state = init()
        r.next_start, r.cached_tokens = start, start

    def _prefill_one_chunk(self, r: _Request) -> None:
        """r's next prefill chunk in a program of its own: prefill_chunk tokens, or
        mixed_chunk where a whole chunk no longer fits (after mixed turns)."""
        s = r.next_start
        C = self._fit(r, self.chunk)
        if self.fault_hook is not None:
            self.fault_hook("prefill", r.id)
        chunk = self._program(("chunk", r.S, r.W, C), lambda: chunk_program(
            self.config, 1, C, r.S, r.W, self._params_s, self.mesh, self.prefill_kernels))
        r.state = chunk(self.params, r.state, self._put(r.padded[:, s:s + C]),
                        self._put(np.int32(s)), self._lengths(r))
        self._counts["prefill_chunks"] += 1
        self._after_chunk(r, C)

    def _lengths(self, r: _Request):
        return self._put(np.asarray([len(r.req.prompt)], np.int32))

    def _after_chunk(self, r: _Request, C: int) -> None:
        """r's chunk of C tokens ran; after its last one, compress r's prompt, sample its
        first token and move it into its pool's row."""
        r.next_start += C
        if r.next_start < len(r.req.prompt):
            return
        lengths = self._lengths(r)
        self._keep_prefix(r)
        one_s = r.pool_key[1]
        finish = self._program(("finish", r.plan, r.S, r.T, r.W), lambda: sp.finish_program(
            self.config, r.plan, r.S, r.T, r.W, self._params_s, one_s, self.mesh))
        sampling = r.req.sampling
        put = self._put
        tok, one = finish(self.params, r.state, lengths, put(r.key),
                          put(np.float32(sampling.temperature)), put(np.int32(sampling.top_k)),
                          put(np.float32(sampling.top_p)))
        pool = r.pool
        insert = self._program(("insert", hashable_structs(pool.cache)), lambda: sp.insert_program(
            hashable_structs(pool.cache), one_s, self.mesh))
        pool.cache = insert(pool.cache, one, put(np.int32(r.row)))
        r.state, r.padded = None, None
        with self._lock:
            self._prefilling = None
            r.phase = "decode"
        self._emit_token(r, int(host_array(tok)[0]))

    def _keep_prefix(self, r: _Request) -> None:
        """Keep r's full prompt keys/values for later prompts that extend it."""
        if not self.prefix_limit:
            return
        nbytes = tree_bytes((r.state.k, r.state.v))
        if nbytes > self.prefix_limit:
            return
        tokens = np.asarray(r.req.prompt, np.int32)
        for key, e in list(self._prefixes.items()):  # a prompt this one extends is redundant
            if len(e.tokens) <= len(tokens) and common_prefix(e.tokens, tokens) == len(e.tokens):
                del self._prefixes[key]
        self._prefixes[id(r)] = _Prefix(tokens, r.state.k, r.state.v, r.S, nbytes)
        while sum(p.nbytes for p in self._prefixes.values()) > self.prefix_limit:
            self._prefixes.popitem(last=False)

    @staticmethod
    def _live(pool: _Pool) -> list[_Request]:
        """The pool's decoding rows (a row may also be held by a request still
        prefilling)."""
        return [r for r in pool.rows if r is not None and r.phase == "decode"]

    def _step_inputs(self, pool: _Pool, live: list[_Request]) -> list:
        """The decode step's per-row inputs: token, position, PRNG seed and step,
        temperature, top_k, top_p (unused rows get placeholders)."""
        R = len(pool.rows)
        tokens, positions, steps = (np.zeros(R, np.int32) for _ in range(3))
        seeds = np.zeros((R, 2), np.uint32)
        temperature, top_p = np.zeros(R, np.float32), np.ones(R, np.float32)
        top_k = np.zeros(R, np.int32)
        for r in live:
            i, n = r.row, len(r.generated)
            tokens[i], positions[i] = r.generated[-1], len(r.req.prompt) + n - 1
            seeds[i], steps[i] = r.key, n
            s = r.req.sampling
            temperature[i], top_k[i], top_p[i] = s.temperature, s.top_k, s.top_p
        return [self._put(x, rows=True) for x in (tokens, positions, seeds, steps,
                                                  temperature, top_k, top_p)]

    def _step_failed(self, pool: _Pool, live: list[_Request], e: Exception) -> None:
        """The pool's cache is gone with a failed step: drop the pool, fail its rows."""
        with self._lock:
            self._pools.pop(pool.key, None)
        log.exception("decode step of a pool of %d rows failed", len(pool.rows))
        for r in live:
            self._fail(r, f"decode step failed: {type(e).__name__}: {e}")

    def _emit_rows(self, live: list[_Request], nxt: np.ndarray) -> None:
        for r in live:
            if r.cancelled:
                continue
            self._guard(r, lambda r: self._decode_hook_and_emit(r, int(nxt[r.row])))

    def _decode_step(self, pool: _Pool) -> None:
        live = self._live(pool)
        if not live:
            return
        try:
            cache_s = hashable_structs(pool.cache)
            step = self._program(("step", pool.plan, cache_s), lambda: sp.step_program(
                self.config, pool.plan, cache_s, self._params_s, self.mesh))
            nxt, pool.cache = step(self.params, pool.cache, *self._step_inputs(pool, live))
            nxt = host_array(nxt)
        except Exception as e:
            self._step_failed(pool, live, e)
            return
        self._emit_rows(live, nxt)

    def _mixed_turn(self, r: _Request, pool: _Pool, C: int) -> None:
        """One program for the pool's decode step and r's next C prompt tokens
        (`forward_mixed`). A failure of the program fails r and the pool's rows (both
        gave it their buffers); a failure in r's own fault hook fails r only."""
        if self.fault_hook is not None:
            self._guard(r, lambda r: self.fault_hook("prefill", r.id))
            if r.phase == "done":  # its own hook failed it: the pool decodes alone
                self._decode_step(pool)
                return
        live, s = self._live(pool), r.next_start
        try:
            cache_s = hashable_structs(pool.cache)
            mixed = self._program(
                ("mixed", pool.plan, cache_s, r.S, r.W, C), lambda: sp.mixed_program(
                    self.config, pool.plan, cache_s, r.S, r.W, C, self._params_s,
                    self.prefill_kernels))
            nxt, pool.cache, r.state = mixed(
                self.params, pool.cache, *self._step_inputs(pool, live), r.state,
                self._put(r.padded[:, s:s + C]), self._put(np.int32(s)), self._lengths(r))
            nxt = host_array(nxt)
        except Exception as e:
            self._step_failed(pool, live, e)
            self._fail(r, f"prefill failed: {type(e).__name__}: {e}")
            return
        self._counts["mixed_chunks"] += 1
        self._emit_rows(live, nxt)
        self._guard(r, lambda r: self._after_chunk(r, C))

    def _decode_hook_and_emit(self, r: _Request, token: int) -> None:
        if self.fault_hook is not None:
            self.fault_hook("decode", r.id)
        self._emit_token(r, token)

    def _emit_token(self, r: _Request, token: int) -> None:
        r.generated.append(token)
        self._send(r, Event("token", token=token))
        if token in r.req.stop_ids:
            self._finish(r, "stop")
        elif len(r.generated) >= r.req.max_tokens:
            self._finish(r, "length")

    # ------------------------------------------------------------- endings
    def _guard(self, r: _Request, fn) -> None:
        """Run fn(r); an exception fails r only."""
        try:
            fn(r)
        except Exception as e:
            log.exception("request %s failed", r.id)
            self._fail(r, f"{type(e).__name__}: {e}")

    def _usage(self, r: _Request) -> dict:
        return {"prompt_tokens": len(r.req.prompt), "completion_tokens": len(r.generated),
                "cached_prompt_tokens": r.cached_tokens}

    def _release(self, r: _Request, count: str) -> bool:
        with self._lock:
            if r.phase == "done":
                return False
            r.phase = "done"
            if r in self._queue:
                self._queue.remove(r)
            if self._prefilling is r:
                self._prefilling = None
            if r.pool is not None and r.row >= 0 and r.pool.rows[r.row] is r:
                r.pool.rows[r.row] = None
            r.state = r.padded = None
            self._all.pop(r.id, None)
            self._counts[count] += 1
            self._lock.notify_all()
        return True

    def _finish(self, r: _Request, reason: str) -> None:
        if self._release(r, "cancelled" if reason == "cancelled" else "finished"):
            self._send(r, Event("done", finish_reason=reason, usage=self._usage(r)))

    def _fail(self, r: _Request, message: str) -> None:
        if self._release(r, "failed"):
            self._send(r, Event("error", finish_reason="error", error=message,
                                usage=self._usage(r)))

    def _send(self, r: _Request, event: Event) -> None:
        try:
            r.on_event(event)
        except Exception:  # a broken listener must not stop the engine
            log.exception("the listener of request %s failed; cancelling it", r.id)
            with self._lock:
                self._cancel_soon(r)

