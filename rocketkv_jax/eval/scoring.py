"""RULER's string-match scoring rules, per sample.

RULER (NVIDIA, scripts/eval/synthetic/constants.py) scores a batch in percent:

- ``string_match_all``: per sample, the fraction of reference strings contained in the
  prediction (case-insensitive substring test); used for NIAH, variable tracking and
  common/frequent words extraction.
- ``string_match_part``: per sample, 1 if any reference string is contained, else 0;
  used for QA.

Here each function scores ONE prediction in [0, 1]; `corpus_score` gives RULER's batch
number (mean x 100, rounded to 2 decimals). Before matching, predictions go through
RULER's post-processing: strip, and replace control characters with newlines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_CONTROL_CHARS = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's post-processing: strip, control characters -> newline, strip again."""
    return _CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str):
        raise TypeError("references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError("references must contain at least one expected string")


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of `references` contained in `prediction`, case-insensitive, in [0, 1]."""
    _check_references(references)
    text = postprocess_prediction(prediction).lower()
    return sum(1.0 for r in references if r.lower() in text) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any of `references` is contained in `prediction` (case-insensitive), else 0.0."""
    _check_references(references)
    text = postprocess_prediction(prediction).lower()
    return 1.0 if any(r.lower() in text for r in references) else 0.0


Metric = Callable[[str, Sequence[str]], float]

METRIC_BY_TASK: dict[str, Metric] = {
    "niah_single": string_match_all,
    "niah_multikey": string_match_all,
    "niah_multivalue": string_match_all,
    "variable_tracking": string_match_all,
    "common_words": string_match_all,
    "qa": string_match_part,
}


def score_output(task: str, prediction: str, references: Sequence[str]) -> float:
    """Score one prediction for `task` with that task's RULER metric, in [0, 1]."""
    try:
        metric = METRIC_BY_TASK[task]
    except KeyError:
        known = ", ".join(METRIC_BY_TASK)
        raise ValueError(f"no metric for task {task!r}; known tasks: {known}") from None
    return metric(prediction, references)


def corpus_score(
    metric: Metric, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> float:
    """RULER's batch score: mean per-sample `metric` x 100, rounded to 2 decimals."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("cannot score an empty batch")
    total = sum(metric(p, r) for p, r in zip(predictions, references, strict=True))
    return round(total / len(predictions) * 100, 2)
