"""Fidelity metrics against hand computations; resumable fidelity runs with fakes."""

import math

import numpy as np
import pytest

from rocketkv_jax.eval.fidelity import (
    fidelity_metrics,
    identical_prefix_length,
    kl_per_step,
    normalize_logprobs,
    run_fidelity,
    token_agreement,
)
from rocketkv_jax.eval.runner import EngineContractError, ResultsFileError
from rocketkv_jax.eval.store import read_records
from rocketkv_jax.eval.tasks import make_sample


class WhitespaceTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


def test_token_agreement_and_prefix_by_hand():
    ref = [5, 6, 7, 8]
    assert token_agreement(ref, [5, 6, 7, 8]) == 1.0
    assert token_agreement(ref, [5, 0, 7, 0]) == 0.5
    assert token_agreement(ref, [5, 6]) == 0.5  # missing positions are misses
    assert identical_prefix_length(ref, [5, 6, 0, 8]) == 2
    assert identical_prefix_length(ref, [0, 6, 7, 8]) == 0
    assert identical_prefix_length(ref, ref) == 4
    assert identical_prefix_length(ref, [5, 6]) == 2
    with pytest.raises(ValueError):
        token_agreement([], [1])


def test_kl_matches_hand_computation():
    with np.errstate(divide="ignore"):
        p = np.log(np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    # Row 0: 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0 = 0.25 ln 2.
    # Row 1: 1.0 ln(1/0.5) = ln 2 (zero-probability reference terms contribute 0).
    # Row 2: identical distributions -> 0.
    expected = np.array([0.25 * math.log(2), math.log(2), 0.0])
    got = kl_per_step(p, q)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert not np.isnan(got).any()


def test_kl_against_independent_numpy_on_random_distributions():
    rng = np.random.default_rng(0)
    logits_p, logits_q = rng.normal(size=(2, 5, 11)) * 2.0
    p = np.exp(logits_p) / np.exp(logits_p).sum(-1, keepdims=True)
    q = np.exp(logits_q) / np.exp(logits_q).sum(-1, keepdims=True)
    expected = np.array([sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr, strict=True))
                         for pr, qr in zip(p, q, strict=True)])  # fmt: skip
    np.testing.assert_allclose(kl_per_step(np.log(p), np.log(q)), expected, rtol=1e-10)


def test_kl_infinite_when_candidate_rules_out_reference_token():
    with np.errstate(divide="ignore"):
        p = np.log(np.array([[0.5, 0.5]]))
        q = np.log(np.array([[1.0, 0.0]]))
    assert np.isinf(kl_per_step(p, q)[0])
    metrics = fidelity_metrics([0], [0], p, q)
    assert metrics["mean_kl"] is None and metrics["kl_per_step"] == [None]


def test_fidelity_metrics_bundle():
    ref_lp = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]))
    cand_lp = np.log(np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]]))
    metrics = fidelity_metrics([0, 1, 2], [0, 0, 2], ref_lp, cand_lp)
    assert metrics["token_agreement"] == pytest.approx(2 / 3)
    assert metrics["identical_prefix"] == 1
    assert metrics["forced_top1_agreement"] == pytest.approx(2 / 3)  # argmax 0, 0, 2
    row0 = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3)
    row1 = 0.1 * math.log(0.1 / 0.5) + 0.8 * math.log(0.8 / 0.4)
    assert metrics["mean_kl"] == pytest.approx((row0 + row1) / 3)
    assert metrics["max_kl"] == pytest.approx(row1)


def test_normalize_logprobs_validates():
    good = np.log(np.array([[0.25, 0.75]], dtype=np.float32))
    np.testing.assert_allclose(np.exp(normalize_logprobs(good, 1, "x")).sum(), 1.0)
    with pytest.raises(EngineContractError, match="shape"):
        normalize_logprobs(good, 2, "x")
    with pytest.raises(EngineContractError, match="not normalized"):
        normalize_logprobs(np.array([[3.0, 1.0]]), 1, "x")
    with pytest.raises(EngineContractError, match="NaN"):
        normalize_logprobs(np.array([[np.nan, 0.0]]), 1, "x")


V = 7


def _dist(prompt, method, budget, step):
    """Deterministic fake next-token log-probs; compressed methods drift with small budgets."""
    rng = np.random.default_rng(abs(hash((len(prompt), step))) % 2**32)
    logits = rng.normal(size=V)
    if method != "full":
        logits = logits + np.random.default_rng(budget + step).normal(size=V) * (64 / budget)
    return logits - np.log(np.exp(logits).sum())


class FakeEngine:
    def __init__(self, fail_after=None):
        self.greedy_calls, self.forced_calls = [], []
        self.fail_after = fail_after

    def _tick(self):
        if self.fail_after is not None and len(self.greedy_calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")

    def greedy(self, prompt, method, budget, n):
        self._tick()
        self.greedy_calls.append((method, budget))
        return [int(np.argmax(_dist(prompt, method, budget, i))) for i in range(n)]

    def forced(self, prompt, forced_tokens, method, budget):
        self.forced_calls.append((method, budget))
        return np.stack([_dist(prompt, method, budget, i) for i in range(len(forced_tokens))])


def _samples():
    tok = WhitespaceTokenizer()
    return [make_sample("niah_single", tok, context_length=512, index=i, seed=0) for i in (0, 1)]


def _run(tmp_path, engine, n_tokens=6):
    return run_fidelity(
        engine.forced,
        engine.greedy,
        _samples(),
        methods=["full", "snapkv", "rocketkv"],
        budgets=[32, 256],
        n_tokens=n_tokens,
        out_dir=tmp_path,
        show_progress=False,
    )


def test_run_fidelity_records_match_direct_computation(tmp_path):
    engine = FakeEngine()
    records = read_records(_run(tmp_path, engine))
    assert len(records) == 2 * (1 + 4)
    refs = {r["sample"]: r for r in records if r["method"] == "full"}
    assert all(r["argmax_agreement"] == 1.0 for r in refs.values())
    samples = _samples()
    for r in records:
        if r["method"] == "full":
            continue
        sample = samples[r["sample"]]
        ref_tokens = refs[r["sample"]]["reference_tokens"]
        ref_lp = np.stack([_dist(sample.prompt, "full", 512, i) for i in range(6)])
        lp = np.stack([_dist(sample.prompt, r["method"], r["budget"], i) for i in range(6)])
        expected_kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)
        assert r["mean_kl"] == pytest.approx(expected_kl.mean(), rel=1e-9)
        assert r["kl_per_step"] == pytest.approx(list(expected_kl), rel=1e-9)
        assert r["token_agreement"] == token_agreement(ref_tokens, r["tokens"])
    # Full KV is called with budget = context length.
    assert ("full", 512) in engine.greedy_calls


def test_run_fidelity_resumes_without_duplicates(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, FakeEngine(fail_after=3))
    path = tmp_path / "fidelity.jsonl"
    before = path.read_bytes()
    assert 0 < len(read_records(path)) < 10
    engine = FakeEngine()
    _run(tmp_path, engine)
    assert path.read_bytes().startswith(before)
    records = read_records(path)
    keys = [(r["method"], r["budget"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)) == 10
    # Sample 0's reference was already on disk: full greedy reran only for sample 1.
    assert engine.greedy_calls.count(("full", 512)) == 1
    again = FakeEngine()
    _run(tmp_path, again)
    assert again.greedy_calls == [] and again.forced_calls == []


def test_run_fidelity_refuses_other_token_count(tmp_path):
    _run(tmp_path, FakeEngine())
    with pytest.raises(ResultsFileError,
                       match=r"fidelity_tokens \(--fidelity-tokens\): 6 in the file, 8 now"):
        _run(tmp_path, FakeEngine(), n_tokens=8)
