"""Serving on several hosts: one engine per process, running the same turns in order.

In a `jax.distributed` run every process holds its shards of the weights and caches, and
every program must run on all of them, in the same order, with the same inputs. Process 0,
the leader, serves HTTP and takes requests. At the start of each turn of its engine loop it
publishes what came in since the last turn (new requests, cancellations, a stop) under the
turn's number in the distributed runtime's key-value store. Every other process, a
follower, reads turn n, applies it to its own engine and runs the same turn. An engine's
decisions depend only on that input and on the programs' outputs, which every process
gathers whole (`decode.host_array`), so the engines stay in step. Mixed prefill+decode
turns, whose chunk follows measured time, are off under a mesh, so time decides nothing.

The key-value store is the coordination service that `jax.distributed.initialize()`
starts. It carries small messages without a device collective, so an idle follower waits
on a read with a timeout instead of inside a collective that could time out.
"""

from __future__ import annotations

import dataclasses
import json

from ..sampling import Sampling
from .serving_api import ServeRequest

# A follower's read of the next turn waits this long, then reads again (an idle server
# runs no turns for as long as no request comes) unless its engine was closed meanwhile.
WAIT_MS = 5_000
# Followers report the last turn they read every ACK_EVERY turns; the leader deletes the
# turns every follower has read every PRUNE_EVERY turns.
ACK_EVERY = 16
PRUNE_EVERY = 256


@dataclasses.dataclass(frozen=True)
class Turn:
    """What a turn starts with: requests submitted since the last turn (id, request),
    ids cancelled since then, and whether the engine stops (then nothing else runs)."""

    requests: tuple[tuple[str, ServeRequest], ...] = ()
    cancel: tuple[str, ...] = ()
    close: bool = False


def encode_turn(turn: Turn) -> str:
    return json.dumps({
        "requests": [[rid, _request_dict(r)] for rid, r in turn.requests],
        "cancel": list(turn.cancel), "close": turn.close})


def decode_turn(text: str) -> Turn:
    d = json.loads(text)
    return Turn(requests=tuple((rid, _request(r)) for rid, r in d["requests"]),
                cancel=tuple(d["cancel"]), close=bool(d["close"]))


def _request_dict(r: ServeRequest) -> dict:
    return {**dataclasses.asdict(r), "sampling": dataclasses.asdict(r.sampling)}


def _request(d: dict) -> ServeRequest:
    stop = d["stop_ids"]
    return ServeRequest(prompt=tuple(d["prompt"]), max_tokens=d["max_tokens"],
                        method=d["method"], token_budget=d["token_budget"],
                        sampling=Sampling(**d["sampling"]), seed=d["seed"],
                        stop_ids=None if stop is None else tuple(stop))


class TurnLink:
    """The leader's or a follower's end of the turns, over a key-value client with
    `key_value_set(key, value, allow_overwrite=)`, `blocking_key_value_get(key,
    timeout_in_ms)`, `key_value_dir_get(prefix)` and `key_value_delete(key)` (the
    distributed runtime's client; tests pass a dict-backed one)."""

    def __init__(self, client, process: int, processes: int, prefix: str = "rocketkv/turns"):
        if processes < 2 or not 0 <= process < processes:
            raise ValueError(f"process {process} of {processes}: a link needs 2 or more "
                             f"processes")
        self.client, self.process, self.processes = client, process, processes
        self.prefix = prefix
        self.next = 0  # the next turn's number
        self._pruned = 0  # turns below this are deleted

    @classmethod
    def from_runtime(cls) -> TurnLink:
        """The link of this process of a `jax.distributed` run."""
        import jax

        # the coordination service's client, as jax's own multihost_utils reaches it
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("serving on several processes needs jax.distributed."
                               "initialize() first")
        return cls(client, jax.process_index(), jax.process_count())

    @property
    def leader(self) -> bool:
        return self.process == 0

    def _key(self, n: int) -> str:
        return f"{self.prefix}/turn/{n}"

    def publish(self, turn: Turn) -> None:
        """The leader: turn number `next` is `turn`."""
        self.client.key_value_set(self._key(self.next), encode_turn(turn))
        self.next += 1
        if self.next % PRUNE_EVERY == 0:
            self._prune()

    def receive(self, stopped=lambda: False) -> Turn:
        """A follower: the next turn, waiting for the leader as long as it takes, or a
        closing turn once `stopped()` (checked every WAIT_MS)."""
        while True:
            try:
                text = self.client.blocking_key_value_get(self._key(self.next), WAIT_MS)
                break
            except Exception as e:  # the runtime's timeout; anything else is raised
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
                if stopped():
                    return Turn(close=True)
        self.next += 1
        if self.next % ACK_EVERY == 0:
            self.client.key_value_set(f"{self.prefix}/ack/{self.process}", str(self.next),
                                      allow_overwrite=True)
        return decode_turn(text)

    def _prune(self) -> None:
        """Delete the turns every follower has read."""
        acks = dict(self.client.key_value_dir_get(f"{self.prefix}/ack/"))
        if len(acks) < self.processes - 1:
            return
        done = min(int(v) for v in acks.values())
        for n in range(self._pruned, done):
            self.client.key_value_delete(self._key(n))
        self._pruned = max(self._pruned, done)
