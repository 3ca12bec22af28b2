"""`rocketkv demo`: RocketKV at work on one long prompt, side by side with full KV.

A needle (a magic number) is hidden halfway through about 4k tokens of Paul Graham essays
(the evaluation's `niah_single` task, `tasks.py`). The prompt is prefilled once
(`engine/shared_prefill.py`: dense, as every method's prefill is); then full KV and
RocketKV each compress that prefill their own way and answer. For each method the result
holds the answer, the prompt tokens its cache kept, the KV bytes a decode step reads (the
plan's own accounting, `methods/read_bytes.py`), the bytes its cache holds and the decode
speed. The command's flags live in `rocketkv_jax/cli/demo.py`.

Every method decodes the same number of steps (no early stop), so their speeds compare
like for like; the answer is the text up to the first stop token (the tokenizer's
`stop_ids`), which is what a run that stops there would print (decoding is greedy).
"""

from __future__ import annotations

import dataclasses
import textwrap

from ..engine.shared_prefill import SharedPrefill
from ..methods import make_method
from ..methods.cost import fallback_note
from ..methods.read_bytes import kv_read_bytes
from ..names import DEFAULT_KERNELS, DEMO_CONTEXT, DEMO_TOKEN_BUDGET
from .scoring import score_output
from .tasks import make_sample

TASK = "niah_single"
DEFAULT_NEW_TOKENS = 32
DEFAULT_DEPTH = 50.0  # percent of the haystack before the needle


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One method's run over the shared prefill.

    prompt_kept: prompt tokens its cache holds after compression (of `prompt_tokens`).
    kv_read_bytes: KV bytes one decode step reads, averaged over the decode steps.
    attention: how its decode steps attend, in words.
    """

    label: str
    answer: str
    correct: bool
    prompt_kept: int
    kv_read_bytes: int
    kv_cache_bytes: int
    decode_tokens_per_s: float
    compile_s: float
    attention: str
    plan: dict


@dataclasses.dataclass(frozen=True)
class DemoResult:
    model: str
    prompt_tokens: int
    needle: str
    question: str
    expected: str
    depth: float  # percent, where the needle landed (at a sentence boundary)
    new_tokens: int
    prefill_s: float
    rows: tuple[DemoRow, ...]


def demo_methods(token_budget: int, kernels: str = DEFAULT_KERNELS, stage2_on: bool = False):
    """(label, method) pairs: full KV and RocketKV at `token_budget`; with stage2_on, also
    RocketKV with stage 2's sparse selection forced on."""
    rows = [("full KV", make_method("full")),
            (f"rocketkv M={token_budget}", make_method("rocketkv", token_budget,
                                                      kernels=kernels))]
    if stage2_on:
        rows.append((f"rocketkv M={token_budget}, stage 2 on",
                     make_method("rocketkv", token_budget, kernels=kernels, stage2="on")))
    return rows


def attention_text(plan) -> str:
    """How a plan's decode steps attend, for the demo's notes."""
    d = plan.describe()
    if d.get("dense") and d.get("token_budget", 0) >= d["capacity"]:
        return "dense over every cached token"
    if "k_top" in d and d.get("stage2_path") == "sparse":
        return (f"stage 2: pages of {d['page_size']} scored on {d['top_r']} of "
                f"{d['head_dim']} channels, exact attention on the top {d['k_top']} tokens")
    return fallback_note(plan) or "dense over its cache"


def check_context(config, context: int, new_tokens: int = DEFAULT_NEW_TOKENS) -> None:
    """Refuse a context the model cannot hold, or one with no room for a prompt."""
    limit = config.max_position_embeddings
    if context > limit:
        raise ValueError(f"a {context}-token demo context is longer than the model's "
                         f"context of {limit} tokens; use at most {limit}")
    if context <= 2 * new_tokens:
        raise ValueError(f"a {context}-token demo context leaves no room for a prompt "
                         f"beside {new_tokens} answer tokens; use more than {2 * new_tokens}")


def run_demo(model, *, context: int = DEMO_CONTEXT, token_budget: int = DEMO_TOKEN_BUDGET,
             new_tokens: int = DEFAULT_NEW_TOKENS, depth: float = DEFAULT_DEPTH,
             seed: int = 0, kernels: str = DEFAULT_KERNELS) -> DemoResult:
    """Hide a needle in a `context`-token prompt for `model` (a `load_model` Model) and
    answer it with full KV and with RocketKV at `token_budget`, `new_tokens` greedy steps
    each. Where RocketKV's default plan attends densely over its stage-1 cache (the cost
    model's choice on this device), a third row forces stage 2 on, so both stages show.
    Raises ValueError (TaskError among them) when the model or the essays cannot hold or
    fill the context.
    """
    tok, config = model.tokenizer, model.config
    check_context(config, context, new_tokens)
    sample = make_sample(TASK, tok, context_length=context, index=0, seed=seed, depth=depth,
                         max_new_tokens=new_tokens)
    ids = tok.encode(sample.prompt)
    n = len(ids)
    shared = SharedPrefill(model.params, config, [ids], max_new_tokens=new_tokens,
                           kernels=kernels)
    stop = set(tok.stop_ids(config.eos_token_ids))
    elem = model.params["embed"].dtype.itemsize  # the cache holds K/V in the params' dtype

    def run(label, method) -> DemoRow:
        out = shared.generate(method, stop_ids=())  # every method decodes new_tokens steps
        plan = method.plan(config, shared.tokens.shape[1], new_tokens)
        tokens = out.tokens[0]
        first_stop = next((j for j, t in enumerate(tokens) if t in stop), len(tokens))
        answer = tok.decode(tokens[:first_stop]).strip()
        steps = range(n + 1, n + new_tokens)  # the cache before decode steps 2..new_tokens
        read = sum(kv_read_bytes(plan, s, config, elem) for s in steps) // max(1, len(steps))
        d = plan.describe()
        return DemoRow(
            label=label, answer=answer,
            correct=score_output(TASK, answer, sample.answers) == 1.0,
            prompt_kept=min(n, d.get("prompt_budget", n)), kv_read_bytes=read,
            kv_cache_bytes=out.stats.kv_cache_bytes,
            decode_tokens_per_s=out.stats.decode_tokens_per_s, compile_s=out.stats.compile_s,
            attention=attention_text(plan), plan=d)

    rows = [run(label, m) for label, m in demo_methods(token_budget, kernels)]
    if rows[-1].plan.get("stage2_path") == "dense":  # the cost model chose dense here
        rows.append(run(*demo_methods(token_budget, kernels, stage2_on=True)[-1]))
    question = sample.prompt.rsplit("Question: ", 1)[-1].split("\n", 1)[0]
    return DemoResult(
        model=model.path.name, prompt_tokens=n, needle=sample.metadata["needles"][0],
        question=question, expected=sample.answers[0],
        depth=sample.metadata.get("actual_depth", depth), new_tokens=new_tokens,
        prefill_s=shared.prefill_s, rows=tuple(rows))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_demo(r: DemoResult) -> str:
    """The demo's report: the task, one line per method, how each one attends."""
    lines = [
        f"model: {r.model}",
        f"prompt: {r.prompt_tokens} tokens of Paul Graham essays with a needle at "
        f"{r.depth:.0f}% depth:",
        f"  {r.needle!r}",
        f"question: {r.question}",
        f"prefill: {r.prefill_s:.1f} s (compile not counted), once for every method; then "
        f"{r.new_tokens} decode steps each",
        "",
    ]
    table = [("method", "answer (first line)", "prompt kept", "KV read / step", "KV cache",
              "decode")]
    for row in r.rows:
        first = (row.answer.splitlines() or [""])[0]  # the whole text: DemoRow.answer
        mark = "" if row.correct else " (wrong)"
        table.append((row.label, f"{first}{mark}",
                      f"{row.prompt_kept} of {r.prompt_tokens}", _mb(row.kv_read_bytes),
                      _mb(row.kv_cache_bytes), f"{row.decode_tokens_per_s:.1f} tok/s"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip()
              for t in table]
    full = r.rows[0]
    lines.append("")
    for row in r.rows:
        ratio = full.kv_read_bytes / row.kv_read_bytes if row.kv_read_bytes else float("inf")
        speed = (row.decode_tokens_per_s / full.decode_tokens_per_s
                 if full.decode_tokens_per_s else float("nan"))
        extra = "" if row is full else (f"; {ratio:.1f}x fewer KV bytes per step, "
                                        f"{speed:.2f}x full KV's decode speed")
        lines.append(textwrap.fill(f"{row.label}: {row.attention}{extra}", 100,
                                   subsequent_indent="  "))
    return "\n".join(lines)
