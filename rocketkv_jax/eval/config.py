"""The settings of one `rocketkv eval` run (`EvalConfig`) and the grids it runs by default.

The CLI (`rocketkv_jax/cli/eval.py`) turns flags into an EvalConfig; the runs
(`accuracy.py`, `multiturn.py`) take one. JAX-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..names import DEFAULT_KERNELS, EVAL_STAGE2, METHOD_NAMES
from .ruler import DEFAULT_TEMPLATE as RULER_DEFAULT_TEMPLATE
from .ruler import RULER_TASK_NAMES
from .tasks import TASK_NAMES

DEFAULTS = {
    # every method but the top-k oracle, which reads every key by design
    "methods": tuple(m for m in METHOD_NAMES if m != "topk"),
    "budgets": (64, 128, 256, 512, 1024),
    "contexts": (2048, 4096, 8192),
    "tasks": TASK_NAMES,
    "samples": 5,
    "fidelity_tokens": 32,
    "fidelity_samples": 1,
}
# NVIDIA's RULER (`--suite ruler`), sized for a 32k model: 4k-16k for every task (32k as a
# second run with the NIAH tasks only). Accuracy is the point of this suite, so fidelity
# is off unless --fidelity-tokens N asks for it.
RULER_DEFAULTS = {
    "methods": METHOD_NAMES,
    "budgets": (256, 512, 1024, 2048),
    "contexts": (4096, 8192, 16384),
    "tasks": RULER_TASK_NAMES,
    "samples": 10,
    "fidelity_tokens": 0,
    "fidelity_samples": 1,
}
SMOKE_DEFAULTS = {
    "methods": ("full", "streaming", "rocketkv"),
    "budgets": (128, 256),
    "contexts": (1024,),
    "tasks": ("niah_single", "qa"),
    "samples": 2,
    "fidelity_tokens": 8,
    "fidelity_samples": 1,
}
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class EvalConfig:
    """Validated eval settings (lists deduplicated, order kept)."""

    model: str | None
    methods: tuple[str, ...]
    budgets: tuple[int, ...]
    contexts: tuple[int, ...]
    tasks: tuple[str, ...]
    samples: int
    seed: int
    out: Path
    fidelity_tokens: int
    fidelity_samples: int
    batch_size: int
    progress: bool
    max_new_tokens: int | None = None
    suite: str = "quick"
    ruler_template: str = RULER_DEFAULT_TEMPLATE
    kernels: str = DEFAULT_KERNELS
    skip_layers: int = 0
    stage2: str = EVAL_STAGE2
    multi_turn: int | None = None  # questions per conversation; None: single-turn eval
    force: bool = False
