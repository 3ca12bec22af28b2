"""Accuracy evaluation: NIAH / RULER-style tasks (the quick suite) and NVIDIA's RULER
(the ruler suite, its own generators and scoring), resumable runs, fidelity to full KV,
markdown + PNG reports. The `rocketkv eval` command's flags live in rocketkv_jax/cli/eval.py.

Importing this package does not import JAX or matplotlib (the plot imports it lazily).
"""

from rocketkv_jax.eval.accuracy import AccuracyRun, run_accuracy
from rocketkv_jax.eval.config import EvalConfig
from rocketkv_jax.eval.fidelity import (
    FIDELITY_FILE,
    fidelity_metrics,
    identical_prefix_length,
    kl_per_step,
    run_fidelity,
    token_agreement,
)
from rocketkv_jax.eval.report import PLOT_FILE, TABLE_FILE, render_markdown, write_report
from rocketkv_jax.eval.ruler import RULER_TASK_NAMES, RulerSuite, ruler_score
from rocketkv_jax.eval.runner import (
    FULL_METHOD,
    METHOD_NAMES,
    RESULTS_FILE,
    EngineContractError,
    run_eval,
)
from rocketkv_jax.eval.scoring import (
    METRIC_BY_TASK,
    corpus_score,
    score_output,
    string_match_all,
    string_match_part,
)
from rocketkv_jax.eval.store import ResultsFileError, ResultsStore, read_jsonl, read_records
from rocketkv_jax.eval.suites import QUICK_SUITE, SUITE_NAMES, TaskSuite, make_suite
from rocketkv_jax.eval.tasks import (
    DEFAULT_MAX_NEW_TOKENS,
    TASK_NAMES,
    TaskError,
    TaskSample,
    generate_samples,
    make_sample,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "AccuracyRun",
    "FIDELITY_FILE",
    "FULL_METHOD",
    "METHOD_NAMES",
    "METRIC_BY_TASK",
    "PLOT_FILE",
    "QUICK_SUITE",
    "RULER_TASK_NAMES",
    "RESULTS_FILE",
    "SUITE_NAMES",
    "TABLE_FILE",
    "TASK_NAMES",
    "EngineContractError",
    "EvalConfig",
    "ResultsFileError",
    "ResultsStore",
    "RulerSuite",
    "TaskError",
    "TaskSample",
    "TaskSuite",
    "corpus_score",
    "fidelity_metrics",
    "generate_samples",
    "identical_prefix_length",
    "kl_per_step",
    "make_sample",
    "make_suite",
    "read_jsonl",
    "read_records",
    "render_markdown",
    "run_accuracy",
    "run_eval",
    "ruler_score",
    "run_fidelity",
    "score_output",
    "string_match_all",
    "string_match_part",
    "token_agreement",
    "write_report",
]
