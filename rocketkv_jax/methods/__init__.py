"""KV-cache methods: frozen dataclasses of hyperparameters whose `plan(config,
prompt_len, max_new_tokens)` resolves a static plan with pure `compress`, `append`
and `attend` functions (see DESIGN.md).

Every method except `full` takes a token budget M (K+V tokens' worth read per decode step
per KV head) and derives its parameters from it. When M >= L = prompt_len +
max_new_tokens a method resolves to `DensePlan`: no eviction, exact dense attention, the
same tokens as `full`. Plans also give `read_tokens(context)` (tokens' worth read per step
per KV head when the uncompressed sequence, prompt + generated, has `context` tokens) and
`describe()` (their resolved parameters). Build methods by name with `make_method`.
"""

from ..names import KERNEL_BACKENDS
from .base import DensePlan, MethodConfigError
from .budget import RocketKVSplit, rocketkv_split
from .full import Full
from .hybrid import Hybrid
from .quest import Quest, QuestPlan
from .registry import (
    METHOD_NAMES,
    METHOD_VARIANTS,
    make_method,
    method_hparams,
    sweep_settings,
)
from .rocketkv import RocketKV
from .snapkv import PromptEvictionPlan, SnapKV, SnapKVPlusPlus
from .sparq import SparQ, SparQPlan
from .stage2 import TwoStagePlan
from .streaming import Streaming, StreamingPlan
from .topk import TopK, TopKPlan

__all__ = [
    "KERNEL_BACKENDS",
    "METHOD_NAMES",
    "METHOD_VARIANTS",
    "DensePlan",
    "Full",
    "Hybrid",
    "MethodConfigError",
    "PromptEvictionPlan",
    "Quest",
    "QuestPlan",
    "RocketKV",
    "RocketKVSplit",
    "SnapKV",
    "SnapKVPlusPlus",
    "SparQ",
    "SparQPlan",
    "Streaming",
    "StreamingPlan",
    "TopK",
    "TopKPlan",
    "TwoStagePlan",
    "make_method",
    "method_hparams",
    "rocketkv_split",
    "sweep_settings",
]
