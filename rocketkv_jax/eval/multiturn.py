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
JSON line per turn in <out>/multiturn.jsonl (resumed: finished (method, budget, context,
sample) conversations are skipped), <out>/multiturn.md, the accuracy table by turn, and
<out>/multiturn.png, its plot.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rocketkv_jax.eval.scoring import string_match_all
from rocketkv_jax.eval.tasks import (
    TaskError,
    _cyclic,
    _distinct,
    _key,
    _number,
    fit_units,
    insert_at_depths,
    load_sentences,
    sample_rng,
)

TASK = "multiturn_kv"
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
    keys = _distinct(lambda: _key(rng), num_turns)
    values = _distinct(lambda: _number(rng, 7), num_turns)
    needles = [f"The special magic number for {k} is: {v}." for k, v in
               zip(keys, values, strict=True)]
    depths = [rng.uniform(0, 100) for _ in needles]
    start = rng.randrange(len(sentences))

    def first_turn(n: int) -> tuple[str, list[float]]:
        context, actual = insert_at_depths(_cyclic(sentences, start, n),
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


def run_multiturn(params, config, tokenizer, *, methods: Sequence[str],
                  budgets: Sequence[int], contexts: Sequence[int], samples: int, seed: int,
                  num_turns: int, out_dir: Path, max_new_tokens: int = ANSWER_TOKENS,
                  prefill_chunk: int | None = 4096, progress: bool = True) -> Path:
    """The grid, appended to <out_dir>/multiturn.jsonl (finished conversations skipped).
    `full` runs once per context (it has no budget). Returns the results path."""
    from rocketkv_jax.conversation import Conversation
    from rocketkv_jax.methods import make_method

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    done = {(r["method"], r["token_budget"], r["context"], r["sample"])
            for r in load_results(path)}
    grid = [(m, None if m == "full" else b) for m in methods
            for b in (budgets if m != "full" else budgets[:1])]
    with path.open("a") as f:
        for context in contexts:
            data = [make_multiturn_sample(tokenizer, context_length=context, index=i,
                                          seed=seed, num_turns=num_turns,
                                          max_new_tokens=max_new_tokens)
                    for i in range(samples)]
            for name, budget in grid:
                conv = None
                for s in data:
                    if (name, budget, context, s.index) in done:
                        continue
                    if conv is None:
                        conv = Conversation(params, config, make_method(name, budget),
                                            capacity=context, prefill_chunk=prefill_chunk)
                    for row in run_conversation(conv, tokenizer, s,
                                                max_new_tokens=max_new_tokens):
                        f.write(json.dumps({"method": name, "token_budget": budget,
                                            "context": context, "sample": s.index,
                                            "seed": seed, **row}) + "\n")
                    f.flush()
                    if progress:
                        print(f"multi-turn: {name} budget {budget} context {context} sample "
                              f"{s.index} done", file=sys.stderr, flush=True)
    return path


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def _list(text: str | None, default: tuple, what: str, parse=str) -> tuple:
    if not text:
        return default
    try:
        items = tuple(parse(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise TaskError(f"--{what}: {text!r} is not a comma list") from None
    if not items:
        raise TaskError(f"--{what} is empty")
    return tuple(dict.fromkeys(items))


def cmd_multiturn(args) -> int:
    """`rocketkv eval --multi-turn N`: validate, load the model, run, write the table."""
    from rocketkv_jax.eval.cli import parse_token_count
    from rocketkv_jax.names import METHOD_NAMES, MULTI_TURN_METHOD_NAMES

    def error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    turns = args.multi_turn
    if turns < 1:
        return error(f"--multi-turn must be >= 1 (questions per conversation), got {turns}")
    known = (*METHOD_NAMES, *MULTI_TURN_METHOD_NAMES)
    try:
        methods = _list(args.methods, DEFAULTS["methods"], "methods")
        budgets = _list(args.budgets, DEFAULTS["budgets"], "budgets",
                        lambda x: parse_token_count(x, "budget"))
        contexts = _list(args.contexts, DEFAULTS["contexts"], "contexts",
                         lambda x: parse_token_count(x, "context"))
    except (TaskError, ValueError) as e:
        return error(str(e))
    bad = [m for m in methods if m not in known]
    if bad:
        return error(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(known)}")
    samples = args.samples or DEFAULTS["samples"]
    max_new = args.max_new_tokens or ANSWER_TOKENS
    from rocketkv_jax.cli import enable_compilation_cache
    from rocketkv_jax.model_store import load_model

    model = load_model(args.model)
    ctx = model.config.max_position_embeddings
    if max(contexts) > ctx:
        return error(f"--contexts {max(contexts)} is longer than the model's context of {ctx}")
    enable_compilation_cache()
    out = Path(args.out)
    try:
        path = run_multiturn(model.params, model.config, model.tokenizer, methods=methods,
                             budgets=budgets, contexts=contexts, samples=samples,
                             seed=args.seed, num_turns=turns, out_dir=out,
                             max_new_tokens=max_new, progress=not args.no_progress)
    except TaskError as e:
        return error(str(e))
    rows = load_results(path)
    table = accuracy_by_turn(rows)
    (out / TABLE_FILE).write_text(
        f"Multi-turn KV retrieval, {turns} turns: accuracy (%) by turn\n\n{table}\n")
    plot = plot_accuracy_by_turn(rows, out / PLOT_FILE)
    print(f"\nMulti-turn KV retrieval, accuracy (%) by turn:\n\n{table}")
    print(f"wrote {path}, {out / TABLE_FILE}, {plot}")
    return 0
