"""Registry and hyperparameter validation: bad settings fail early with clear messages."""

import dataclasses

import jax
import pytest

from rocketkv_jax.methods import (
    KERNEL_BACKENDS,
    METHOD_NAMES,
    DensePlan,
    Full,
    MethodConfigError,
    RocketKV,
    make_method,
    method_hparams,
)
from rocketkv_jax.models.config import ModelConfig

CFG = ModelConfig(
    model_type="llama", vocab_size=32, hidden_size=256, intermediate_size=64, num_layers=1,
    num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
    max_position_embeddings=8192, tie_word_embeddings=True,
)


def test_names():
    assert METHOD_NAMES == ("full", "streaming", "snapkv", "snapkv++", "quest", "sparq",
                            "hybrid", "rocketkv", "topk")
    for name in METHOD_NAMES:
        method = make_method(name, 256)
        assert method.name == name
        plan = method.plan(CFG, 2048, 32)
        hash(plan)
        assert dataclasses.is_dataclass(plan)
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.capacity = 1
        assert plan.capacity % 16 == 0 or name == "full"


def test_full_ignores_budget():
    assert make_method("full") == Full() == make_method("full", 256)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(MethodConfigError, match=r"unknown KV method 'snapkv\+'.*rocketkv"):
        make_method("snapkv+", 256)


def test_unknown_hyperparameter():
    with pytest.raises(MethodConfigError, match=r"no hyperparameter 'sinks'.*window"):
        make_method("snapkv", 256, sinks=4)
    assert "page_size" in method_hparams("quest")


@pytest.mark.parametrize("name", [n for n in METHOD_NAMES if n != "full"])
def test_budget_required_and_positive(name):
    with pytest.raises(MethodConfigError, match="needs a token_budget"):
        make_method(name)
    for bad in (0, -5):
        with pytest.raises(MethodConfigError, match="token_budget must be >= 1"):
            make_method(name, bad)
    for bad in (25.5, float("nan"), "256", True):
        with pytest.raises(MethodConfigError, match="token_budget must be an integer"):
            make_method(name, bad)
    with pytest.raises(MethodConfigError, match=r"token_budget must be < 2\*\*31"):
        make_method(name, 2**31)


@pytest.mark.parametrize("name", ["snapkv", "snapkv++"])
def test_budget_below_window(name):
    with pytest.raises(MethodConfigError, match=r"token_budget \(16\).*window \(32\)"):
        make_method(name, 16)
    make_method(name, 16, window=8)  # a smaller window makes it valid


def test_rocketkv_prompt_budget_below_window_at_plan_time():
    method = make_method("rocketkv", 8)  # fine until the split is known
    # L = 630: int(630 / 78.75**0.578) = 50 < min(2N, L) = 60, so capacity 60 and the
    # prompt budget is 60 - 30 = 30 < 32.
    with pytest.raises(MethodConfigError, match=r"prompt budget of 30 tokens.*window 32"):
        method.plan(CFG, 600, 30)
    # Prompts that fit the prompt budget never run stage 1, so no window is needed.
    plan = make_method("rocketkv", 8).plan(CFG, 16, 30)
    assert plan.prompt_budget >= 16


@pytest.mark.parametrize(("name", "kw"), [
    ("quest", {"page_size": 0}), ("quest", {"page_size": -16}), ("quest", {"page_size": 12}),
    ("hybrid", {"page_size": 3}), ("rocketkv", {"page_size": 6}),
])
def test_bad_page_size(name, kw):
    with pytest.raises(MethodConfigError, match="page_size must be a"):
        make_method(name, 256, **kw)


def test_quest_budget_below_one_page():
    with pytest.raises(MethodConfigError, match="at least one page"):
        make_method("quest", 8)


@pytest.mark.parametrize("name", ["sparq", "hybrid", "rocketkv"])
def test_top_r_checked_against_head_dim(name):
    with pytest.raises(MethodConfigError, match=r"top_r .* \[1, head_dim=64\], got 65"):
        make_method(name, 256, top_r=65).plan(CFG, 2048, 32)
    with pytest.raises(MethodConfigError, match="top_r must be a positive int"):
        make_method(name, 256, top_r=0)
    # stage2="on": at r = D the selection costs more than dense (the cost model's fallback)
    assert make_method(name, 256, top_r=64, stage2="on").plan(CFG, 2048, 32).top_r == 64


def test_streaming_sinks():
    with pytest.raises(MethodConfigError, match=r"must exceed sinks \(4\)"):
        make_method("streaming", 4)
    with pytest.raises(MethodConfigError, match="sinks must be an int >= 0"):
        make_method("streaming", 64, sinks=-1)


def test_kernels_backend_name():
    assert KERNEL_BACKENDS == ("reference", "interpret", "triton", "mosaic", "auto")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        make_method("rocketkv", 256, kernels="cuda")
    # the plan holds the backend that runs: "auto" resolved for this process's device
    resolved = "triton" if jax.default_backend() == "gpu" else "reference"
    assert make_method("rocketkv", 256, kernels="auto").plan(CFG, 2048, 32).kernels == resolved
    assert make_method("rocketkv", 256).plan(CFG, 2048, 32).kernels == resolved  # the default
    assert make_method("rocketkv", 256, kernels="interpret").plan(CFG, 2048, 32).kernels == (
        "interpret")
    # Methods without kernels accept (and drop) the setting, but still check the name.
    assert make_method("snapkv", 256, kernels="triton") == make_method("snapkv", 256)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        make_method("streaming", 256, kernels="gpu")


def test_none_keeps_default():
    assert make_method("rocketkv", 256, page_size=None) == RocketKV(256)


def test_resolved_rocketkv_parameters():
    """M = 256, T = 2048, N = 32, D = 64 (the numbers quoted in the report). Stage 2 forced
    on: at this size the cost model runs it densely over the stage-1 cache (test_dense_fallback)."""
    plan = make_method("rocketkv", 256, stage2="on").plan(CFG, 2048, 32)
    d = plan.describe()
    assert {k: d[k] for k in ("capacity", "prompt_budget", "window", "kernel_size",
                              "page_size", "top_r", "k_top", "stage2_dense")} == {
        "capacity": 944, "prompt_budget": 903, "window": 32, "kernel_size": 63,
        "page_size": 2, "top_r": 35, "k_top": 128, "stage2_dense": False}
    # At the end: 903 + 32 = 935 tokens, 468 pages x 35 channels / (2 * 64) = 128 tokens'
    # worth of scoring + 128 exact tokens: the budget.
    assert plan.read_tokens(2080) == 256


@pytest.mark.parametrize("kernels", ["reference", "interpret", "auto"])
def test_kernel_backends_give_zeros_when_nothing_is_selected(kernels):
    import jax.numpy as jnp

    from rocketkv_jax.methods.sparse_ops import sparse_decode_attention

    q = jnp.ones((1, 1, 2, 4))
    k = jnp.ones((1, 1, 8, 4))
    out = sparse_decode_attention(q, k, k, jnp.full((1, 1, 2), -1, jnp.int32), kernels=kernels)
    assert (out == 0).all()  # no selected slot -> zeros, never NaN


def test_unknown_kernel_backend_is_rejected():
    import jax.numpy as jnp

    from rocketkv_jax.methods.sparse_ops import sparse_decode_attention

    q = jnp.ones((1, 1, 2, 4))
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        sparse_decode_attention(q, q, q, jnp.zeros((1, 1, 2), jnp.int32), kernels="cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        make_method("rocketkv", 256, kernels="cuda")


def test_budget_covering_sequence_resolves_dense():
    for name in METHOD_NAMES[1:]:
        plan = make_method(name, 2080).plan(CFG, 2048, 32)
        assert isinstance(plan, DensePlan)
        assert plan.describe()["dense"] and plan.read_tokens(1000) == 1000


def test_pool_kernel_clamped_odd_to_span():
    # span = T - window = 40 - 8 = 32 -> 31 (odd, <= span); span 11 -> 11; kernel 7 unchanged.
    assert make_method("snapkv++", 16, window=8).plan(CFG, 40, 4).kernel_size == 31
    assert make_method("snapkv++", 16, window=8).plan(CFG, 19, 4).kernel_size == 11
    assert make_method("snapkv", 16, window=8).plan(CFG, 40, 4).kernel_size == 7
