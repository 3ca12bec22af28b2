"""The choices users make by name, and the defaults the CLI shows: KV methods, their named
variants, kernel backends, stage-2 modes, weight layouts, the prefill chunk, the demo's
context and budget.

Written once here, in a module that imports nothing (so `rocketkv --help` and
`import rocketkv_jax.eval` do not pay for JAX). The method registry
(`methods/registry.py`) maps each name to its class, and a test checks that the classes
cover exactly these names; the CLI, eval and bench import the names from here.
"""

from __future__ import annotations

# KV-cache methods, in the order tables and sweeps list them.
METHOD_NAMES: tuple[str, ...] = (
    "full",
    "streaming",
    "snapkv",
    "snapkv++",
    "quest",
    "sparq",
    "hybrid",
    "rocketkv",
    "topk",
)

# Named settings of the methods above that the official RocketKV code runs as methods of
# their own: a fixed stage-1 share (`rocket_r0.x`) and its per-query-head top-k oracle.
# name -> (base method, the settings it fixes)
METHOD_VARIANTS: dict[str, tuple[str, dict]] = {
    "rocket_r0.3": ("rocketkv", {"stage1_share": 0.3}),
    "rocket_r0.5": ("rocketkv", {"stage1_share": 0.5}),
    "rocket_r0.7": ("rocketkv", {"stage1_share": 0.7}),
    "topk_head": ("topk", {"per_head": True}),
}
METHOD_VARIANT_NAMES: tuple[str, ...] = tuple(METHOD_VARIANTS)

# Multi-turn methods (`methods/multiturn.py`, docs/algorithm.md): a conversation
# keeps the full history and compresses a temporary copy per turn. In one turn they are
# their base method, so the single-turn sweeps (eval, bench) leave them out.
MULTI_TURN_METHOD_NAMES: tuple[str, ...] = ("rocketkv-mt", "snapkv-mt")

# Kernel backends: the one option `kernels` (`--kernels`, `make_method(kernels=)`,
# `generate_ids(kernels=)`, ...; the choice itself is made in `kernels/backend.py`):
# "reference" the pure-jnp reference beside each kernel (XLA, any device), "interpret" the
# Pallas kernel in the Pallas interpreter (CPU tests, slow), "triton" the Pallas kernel
# lowered through Triton (CUDA GPU), "mosaic" the Mosaic GPU decode kernels (JAX >= 0.11.2,
# Hopper GPU), "auto" (the default everywhere) Triton on a GPU while JAX has it, else
# Mosaic on a Hopper GPU, else the reference.
KERNEL_BACKENDS: tuple[str, ...] = ("reference", "interpret", "triton", "mosaic", "auto")
DEFAULT_KERNELS = "auto"
KERNELS_HELP = (  # `--kernels` of generate, chat, eval and bench
    "kernel backend of the prefill attention and of the methods' sparse decode attention: "
    "auto (the Pallas kernels on a CUDA GPU, the jnp references elsewhere), reference (jnp, "
    "any device), triton (Pallas lowered through Triton, CUDA GPU), mosaic (the Mosaic GPU "
    "decode kernels: JAX >= 0.11.2 and a Hopper GPU; prefill runs the reference), interpret "
    "(Pallas in the interpreter: CPU tests, slow). The stats line says which ran")

# Stage-2 modes of the methods with a sparse selection (hybrid, rocketkv, quest, sparq;
# `--stage2`, `make_method(stage2=)`): "auto" runs the selection only where the cost model
# (`methods/cost.py`) says it reads less than dense attention over the method's cache,
# "on" / "off" force it.
STAGE2_MODES: tuple[str, ...] = ("auto", "on", "off")
# eval measures each method's own selection, so its sparse stage 2 always runs. The "auto"
# of generate and serve attends densely where selection costs more (methods/cost.py):
# more accurate, but at a short context it turns hybrid or sparq into full KV and
# rocketkv into its stage 1, and a table of that would not compare the methods.
EVAL_STAGE2 = "on"

# The model's prefill attention also takes "dense" (`models.llama.prefill_chunk`): the
# materialised [B, H, T, S] softmax kept as the baseline of benchmarks and tests.

# The dtypes a converted checkpoint stores (`rocketkv-convert --dtype`, `convert.hf.DTYPES`).
CHECKPOINT_DTYPES: tuple[str, ...] = ("bfloat16", "float32")

# Weight layouts (`generate --weight-layout`, `models.params.unstack_layers`): one array per
# weight over all layers (the checkpoint's), or one array per layer (a switch per matmul).
WEIGHT_LAYOUTS: tuple[str, ...] = ("stacked", "per-layer")

# Prompt tokens per prefill chunk (`generate --prefill-chunk`, `generate_ids(prefill_chunk=)`,
# `Conversation(prefill_chunk=)`): activations stay O(chunk), and a prompt of n chunks
# compiles once for any length in it. The smallest chunk is `checks.MIN_PREFILL_CHUNK`.
DEFAULT_PREFILL_CHUNK = 4096

# `rocketkv demo` (`eval/demo.py`): prompt plus answer tokens of its needle prompt, and
# RocketKV's token budget there.
DEMO_CONTEXT = 4096
DEMO_TOKEN_BUDGET = 256
