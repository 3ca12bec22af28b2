"""engine/turns.py: the turns a leader publishes for its followers (multi-host serving),
over a dict-backed key-value client that behaves like the distributed runtime's (its
timeout message, allow_overwrite, directory reads); the real one runs in
tests/server/test_serve_multihost.py."""

from __future__ import annotations

import pytest

from rocketkv_jax.engine import turns
from rocketkv_jax.engine.serving_api import ServeRequest
from rocketkv_jax.engine.turns import Turn, TurnLink, decode_turn, encode_turn
from rocketkv_jax.sampling import Sampling


class FakeKV:
    def __init__(self):
        self.d, self.waits, self.on_wait = {}, 0, None

    def key_value_set(self, key, value, allow_overwrite=False):
        if key in self.d and not allow_overwrite:
            raise RuntimeError(f"ALREADY_EXISTS: key {key}")
        self.d[key] = value

    def blocking_key_value_get(self, key, timeout_in_ms):
        if key not in self.d:
            self.waits += 1
            if self.on_wait is not None:
                self.on_wait()
            if key not in self.d:
                raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: "
                                   f"{key} and duration: {timeout_in_ms}ms")
        return self.d[key]

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.d.items() if k.startswith(prefix)]

    def key_value_delete(self, key):
        self.d.pop(key, None)


REQ = ServeRequest((5, 6, 7), 9, method="snapkv", token_budget=64,
                   sampling=Sampling(0.7, top_k=5, top_p=0.9), seed=11, stop_ids=(2, 3))


@pytest.mark.parametrize("turn", [
    Turn(),
    Turn(requests=(("req-0", REQ), ("req-1", ServeRequest((1,), 4, token_budget=None))),
         cancel=("req-0",)),
    Turn(close=True),
])
def test_a_turn_survives_its_encoding(turn):
    assert decode_turn(encode_turn(turn)) == turn


def test_followers_read_the_leaders_turns_in_order():
    kv = FakeKV()
    leader, a, b = (TurnLink(kv, i, 3) for i in range(3))
    sent = [Turn(requests=(("req-0", REQ),)), Turn(cancel=("req-0",)), Turn(close=True)]
    for t in sent:
        leader.publish(t)
    assert [a.receive() for _ in sent] == sent == [b.receive() for _ in sent]
    assert leader.leader and not a.leader


def test_a_follower_waits_through_timeouts_for_the_next_turn():
    kv = FakeKV()
    leader, follower = TurnLink(kv, 0, 2), TurnLink(kv, 1, 2)

    def publish_on_third_wait():
        if kv.waits == 3:
            leader.publish(Turn(cancel=("req-9",)))

    kv.on_wait = publish_on_third_wait
    assert follower.receive() == Turn(cancel=("req-9",))
    assert kv.waits == 3


def test_other_errors_are_raised():
    class Broken(FakeKV):
        def blocking_key_value_get(self, key, timeout_in_ms):
            raise RuntimeError("UNAVAILABLE: the coordination service is gone")

    with pytest.raises(RuntimeError, match="UNAVAILABLE"):
        TurnLink(Broken(), 1, 2).receive()


def test_the_leader_deletes_only_turns_every_follower_has_read(monkeypatch):
    monkeypatch.setattr(turns, "ACK_EVERY", 2)
    monkeypatch.setattr(turns, "PRUNE_EVERY", 4)
    kv = FakeKV()
    leader, fast, slow = (TurnLink(kv, i, 3) for i in range(3))
    for _ in range(4):
        leader.publish(Turn())
    # no follower has acknowledged anything at the 4th turn: nothing is deleted
    assert sorted(k for k in kv.d if "/turn/" in k) == [f"rocketkv/turns/turn/{n}"
                                                        for n in range(4)]
    for _ in range(4):
        fast.receive()
    for _ in range(2):
        slow.receive()
    for _ in range(4):
        leader.publish(Turn())
    # fast read 4, slow read 2: turns 0 and 1 go, 2.. stay for slow
    assert sorted(int(k.rsplit("/", 1)[1]) for k in kv.d if "/turn/" in k) == list(
        range(2, 8))
    assert [slow.receive() for _ in range(6)] == [Turn()] * 6


@pytest.mark.parametrize("process, processes", [(0, 1), (2, 2), (-1, 2)])
def test_a_link_needs_two_processes_and_a_valid_id(process, processes):
    with pytest.raises(ValueError, match="2 or more processes"):
        TurnLink(FakeKV(), process, processes)


def test_engine_refusals():
    from rocketkv_jax.engine.scheduler import Engine
    from rocketkv_jax.models.config import ModelConfig
    from rocketkv_jax.models.params import random_params
    from rocketkv_jax.sharding import make_mesh

    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                      rope_theta=1e4, max_position_embeddings=128, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="needs a mesh"):
        Engine(random_params(cfg), cfg, link=TurnLink(FakeKV(), 0, 2))
    # a follower takes no requests, and a close stops it while it waits for the leader
    follower = Engine(random_params(cfg), cfg, mesh=make_mesh(1, 1),
                      link=TurnLink(FakeKV(), 1, 2))
    with pytest.raises(RuntimeError, match="takes its requests from the leader"):
        follower.submit(ServeRequest((1, 2), 2), lambda ev: None)
    follower.close()
    assert not follower._thread.is_alive()
