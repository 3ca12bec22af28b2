"""`skip_layers` end to end on the tiny decoder: with skip_layers=S the model's layers < S
attend exactly as full KV does and the others exactly as the method does.

The reference is a Python loop over the layers (the model's own projections and MLP) that
gives each layer the cache and plan it should have: `full`'s for layers < S, the method's
for the rest. It knows nothing of layer groups or the two-stack cache, and for S = 0 it is
the decode step as it was before skip_layers existed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_decoder import tiny_config, tiny_params

from rocketkv_jax.engine.generate import generate_ids, make_decode_step, make_prefill
from rocketkv_jax.engine.shared_prefill import SharedPrefill
from rocketkv_jax.methods import MethodConfigError, make_method
from rocketkv_jax.methods.skip_layers import LayeredCache
from rocketkv_jax.models.layers import rms_norm
from rocketkv_jax.models.llama import _mlp_block, _project_qkv, forward_prefill, unembed
from rocketkv_jax.models.rope import inverse_frequencies

CFG = dataclasses.replace(tiny_config(), num_layers=4)
L, T, N = CFG.num_layers, 64, 6
LENGTHS = (64, 50)
METHODS = {  # budgets small enough that every method evicts or selects at T = 64
    "rocketkv": (16, {"window": 8}),
    "quest": (16, {"page_size": 4}),
    "snapkv": (24, {"window": 8}),
    "snapkv++": (24, {"window": 8}),
    "hybrid": (16, {}),
}


def reference_decoder(params, layer_plans, tokens, lengths):
    """(prefill logits, jitted step): layer i runs layer_plans[i] on its own stacked cache
    (one per distinct plan, built by forward_prefill with that plan)."""
    plans = list(dict.fromkeys(layer_plans))
    stacks, logits = [], None
    for plan in plans:
        logits, cache = forward_prefill(params, CFG, tokens, lengths, plan, all_logits=False)
        stacks.append(cache)
    inv_freq = inverse_frequencies(CFG)

    @jax.jit
    def step(tok, pos, stacks):
        stacks = list(stacks)
        x = params["embed"][tok][:, None]  # [B, 1, E]
        for i, plan in enumerate(layer_plans):
            j = plans.index(plan)
            p = jax.tree.map(lambda a, i=i: a[i], params["layers"])
            h = rms_norm(x, p["attn_norm"], CFG.rms_norm_eps)
            q, k, v = _project_qkv(p, CFG, h, pos[:, None], inv_freq)
            stacks[j] = plan.append(stacks[j], k[:, :, 0], v[:, :, 0], pos, i)
            c = jax.tree.map(lambda a, i=i: a[i], stacks[j])
            attn = plan.attend(q[:, :, 0], c, pos, CFG.sliding_window)  # [B, H, D]
            x = _mlp_block(p, CFG, x + attn.reshape(x.shape[0], 1, -1) @ p["wo"])
        return unembed(params, CFG, x[:, 0]), tuple(stacks)

    return logits, step, tuple(stacks)


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), max(lengths)), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(1, CFG.vocab_size, n)
    return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


def decode(prefill_logits, step, cache, lengths, forced):
    """Logits [N + 1, B, V] of the prefill and N decode steps fed the `forced` tokens."""
    out, pos = [prefill_logits], lengths
    for tok in forced:
        logits, cache = step(tok, pos, cache)
        out.append(logits)
        pos = pos + 1
    return np.stack([np.asarray(a, np.float64) for a in out])


def reference_logits(params, layer_plans, tokens, lengths, forced):
    logits, step, stacks = reference_decoder(params, layer_plans, tokens, lengths)
    return decode(logits, step, stacks, lengths, forced)


@pytest.mark.parametrize(("method", "S"), [
    ("rocketkv", 0), ("rocketkv", 1), ("rocketkv", L - 1), ("quest", 2), ("snapkv", 1),
    ("snapkv++", L - 1), ("hybrid", 2),
])
def test_skipped_layers_are_full_kv_and_the_rest_the_method(method, S):
    params = tiny_params(CFG)
    budget, over = METHODS[method]
    plan = make_method(method, budget, skip_layers=S, **over).plan(CFG, T, N)
    own = make_method(method, budget, **over).plan(CFG, T, N)
    full = make_method("full").plan(CFG, T, N)
    tokens, lengths = prompts()

    ref_logits, ref_step, ref_stacks = reference_decoder(
        params, [full] * S + [own] * (L - S), tokens, lengths)
    # teacher-force both with the reference's greedy tokens, so one wrong layer shows
    forced, cache, logits = [], ref_stacks, ref_logits
    for _ in range(N):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        forced.append(tok)
        logits, cache = ref_step(tok, lengths + len(forced) - 1, cache)
    want = decode(ref_logits, ref_step, ref_stacks, lengths, forced)

    prefill_logits, cache = make_prefill(CFG, plan)(params, tokens, lengths)
    if S:
        assert isinstance(cache, LayeredCache)
        assert cache.dense.k.shape[0] == S and cache.sparse.k.shape[0] == L - S
        # the skipped layers hold every prompt token, the others the method's own cache
        full_k = np.asarray(ref_stacks[0].k)
        for b, n in enumerate(LENGTHS):
            np.testing.assert_array_equal(np.asarray(cache.dense.k[:, b, :, :n]),
                                          full_k[:S, b, :, :n])
        for a, b_ in zip(jax.tree.leaves(cache.sparse), jax.tree.leaves(ref_stacks[1]),
                         strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b_)[S:])
    else:
        assert plan == own  # skip_layers=0 is the method itself
    step = make_decode_step(CFG, plan)
    got = decode(prefill_logits, lambda t, p, c: step(params, t, p, c), cache, lengths, forced)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    if S:  # and the skipped layers matter: the method alone gives other logits, unless it
        # is full KV at this size anyway (a method may fall back to dense attention)
        alone = reference_logits(params, [own] * L, tokens, lengths, forced)
        dense = reference_logits(params, [full] * L, tokens, lengths, forced)
        if np.abs(alone - dense).max() > 1e-4:  # ten times the tolerance above
            assert np.abs(alone[1:] - got[1:]).max() > 1e-4


@pytest.mark.parametrize("S", [0, 2])
def test_generate_with_skip_layers_equals_the_reference(S):
    """generate_ids (one program: prefill, compress, while_loop) gives the reference's
    greedy tokens; for S = 0 that is the decode step from before skip_layers."""
    params = tiny_params(CFG)
    method = make_method("rocketkv", 16, window=8, skip_layers=S)
    tokens, lengths = prompts((40, 29), seed=1)
    rows = [np.asarray(tokens[b, :n]).tolist() for b, n in enumerate((40, 29))]
    out = generate_ids(params, CFG, rows, method, max_new_tokens=N, stop_ids=[])
    Tb = out.stats.prompt_bucket  # the plan is resolved for the bucketed prompt
    tokens = jnp.pad(tokens, ((0, 0), (0, Tb - tokens.shape[1])))
    plan_of = make_method("rocketkv", 16, window=8)
    layer_plans = ([make_method("full").plan(CFG, Tb, N)] * S
                   + [plan_of.plan(CFG, Tb, N)] * (L - S))
    logits, step, cache = reference_decoder(params, layer_plans, tokens, lengths)
    want, pos = [], lengths
    for _ in range(N):
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        want.append(np.asarray(tok))
        logits, cache = step(tok, pos, cache)
        pos = pos + 1
    assert out.tokens == np.stack(want, axis=1).tolist()
    # and from a shared prefill (the eval's path: compress_layers on the stored k, v, q)
    shared = SharedPrefill(params, CFG, rows, max_new_tokens=N)
    assert shared.generate(method, stop_ids=[]).tokens == out.tokens


def test_skip_layers_is_validated():
    for bad in (-1, 1.5, True, "2"):
        for name in METHODS:
            with pytest.raises(MethodConfigError, match="skip_layers"):
                make_method(name, METHODS[name][0], skip_layers=bad)
    for S in (L, L + 3):  # at least one layer must run the method
        with pytest.raises(MethodConfigError, match=f"0..{L - 1}"):
            make_method("quest", 16, page_size=4, skip_layers=S).plan(CFG, T, N)
    plan = make_method("quest", 16, page_size=4, skip_layers=L - 1).plan(CFG, T, N)
    assert plan.skip_layers == L - 1 and plan.describe()["skip_layers"] == L - 1
    # a budget that covers everything is dense on every layer already
    dense = make_method("rocketkv", 4096, skip_layers=2).plan(CFG, T, N)
    assert dense == make_method("rocketkv", 4096).plan(CFG, T, N)
    for name in ("streaming", "sparq", "topk"):  # methods without the setting say so
        with pytest.raises(MethodConfigError, match="skip_layers"):
            make_method(name, 16, skip_layers=2)
