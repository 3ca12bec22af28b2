"""Why a method's RULER answer differs from full KV's: one sample, one prefill, each stage
of RocketKV taken apart.

    python benchmarks/ruler_anatomy.py --task niah_single_3 --context 32k --sample 1 \\
        [--budgets 256,1024] [--out docs/eval/ruler-qwen] [--model qwen2.5-coder-0.5b] \\
        [--json FILE]

Takes one sample of a `rocketkv eval --suite ruler` run: its records in <out>/results.jsonl,
its prompt from the run's cache <out>/ruler-data (matched by the records' prompt_sha1). It
loads the run's model (checked against the results file's header), prefills the prompt
once, and for full KV and each method at each budget reports:

  answer   the greedy answer decoded from that prefill, RULER's score of it, and whether
           it is the answer the run recorded (the run decoded it in a batch of prompts)
  KL       KL(full KV || method) of the next-token distributions, teacher-forced on full
           KV's answer: its mean and max over the answer's steps, and the first step where
           the method's most likely token is not full KV's (0-based)
  kept     the prompt tokens the method's cache keeps after compression, and of the tokens
           that spell the expected answer in the prompt (its needle) the fraction that each
           layer's KV heads keep: the least and the mean over layers x KV heads; then, per
           method, the needle tokens that the fewest layer x heads keep

Methods: rocketkv; its stage 1 alone ("rocketkv stage 1": the same stage-1 cache, attended
densely, i.e. stage 2 off); hybrid (stage 2 alone, on the whole prompt); snapkv++ (stage 1's
selection at the whole budget); topk (the exact top-k oracle). Each with the settings the
run recorded. Prints Markdown; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from rocketkv_jax import checks
from rocketkv_jax.bench.grid import machine_line
from rocketkv_jax.cache import KVCache
from rocketkv_jax.engine.shared_prefill import SharedPrefill
from rocketkv_jax.eval.fidelity import kl_per_step, normalize_logprobs
from rocketkv_jax.eval.model_fns import eval_method, method_settings
from rocketkv_jax.eval.ruler import cached_prompts, ruler_score
from rocketkv_jax.eval.store import ResultsFileError, read_results
from rocketkv_jax.model_store import load_errors, load_model, model_identity
from rocketkv_jax.models.params import with_layout

# (label, method name, stage2 mode); None keeps the mode eval ran
METHODS = (
    ("rocketkv", "rocketkv", None),
    ("rocketkv stage 1", "rocketkv", "off"),
    ("hybrid", "hybrid", None),
    ("snapkv++", "snapkv++", None),
    ("topk", "topk", None),
)


class AnatomyError(Exception):
    """Input this script cannot take apart; the message says what to change."""


# ------------------------------------------------------------------ pure pieces
def needle_tokens(spans: list[tuple[int, int]], text: str, values: list[str]) -> list[int]:
    """Indices of the tokens (by their character spans in `text`) that overlap any
    occurrence of any of `values` in `text`, in order."""
    hit = set()
    for value in values:
        start = text.find(value)
        while value and start >= 0:
            end = start + len(value)
            hit.update(i for i, (a, b) in enumerate(spans) if a < end and b > start)
            start = text.find(value, start + 1)
    return sorted(hit)


def held(pos: np.ndarray, positions: list[int]) -> np.ndarray:
    """pos [..., C]: a cache's original token position per slot (-1 empty) -> [...,
    len(positions)] bool: whether each of `positions` is in that cache."""
    return (pos[..., :, None] == np.asarray(positions)[None, :]).any(axis=-2)


def first_divergence(logprobs: np.ndarray, forced: list[int]) -> int | None:
    """The first step whose most likely token is not forced[step], or None."""
    off = np.flatnonzero(np.argmax(logprobs, axis=-1) != np.asarray(forced))
    return int(off[0]) if off.size else None


# ------------------------------------------------------------------ the run's sample
def sample_records(out: Path, task: str, context: int, sample: int) -> tuple[dict, dict]:
    """(header, {(method, budget): record}) of one sample of the run in `out`."""
    results = out / "results.jsonl"
    if not results.is_file():
        raise AnatomyError(f"no results file at {results}")
    try:
        contents = read_results(results)
    except ResultsFileError as e:
        raise AnatomyError(str(e)) from None
    if contents.header is None or contents.header["identity"].get("suite") != "ruler":
        raise AnatomyError(f"{results} is not a `rocketkv eval --suite ruler` run")
    records = {(r["method"], r["budget"]): r for r in contents.records
               if (r.get("task"), r.get("context_length"), r.get("sample"))
               == (task, context, sample)}
    if not any(method == "full" for method, _ in records):
        raise AnatomyError(f"{results} has no full-KV record of {task} at {context} tokens, "
                           f"sample {sample}")
    return contents.header, records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--task", required=True, help="a RULER task of the run, e.g. niah_single_3")
    ap.add_argument("--context", required=True,
                    type=lambda t: checks.token_count(t, None, argparse.ArgumentTypeError),
                    help="its context length, e.g. 32k")
    ap.add_argument("--sample", required=True, type=int, help="the sample's index")
    ap.add_argument("--budgets", default="256,1024",
                    type=lambda t: checks.token_counts(t, "budget", argparse.ArgumentTypeError),
                    help="token budgets (default: 256,1024)")
    ap.add_argument("--out", type=Path, default=Path("docs/eval/ruler-qwen"),
                    help="the eval's results directory (default: docs/eval/ruler-qwen)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b",
                    help="the run's model, a name or a checkpoint (default: qwen2.5-coder-0.5b)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.json and not args.json.parent.is_dir():  # found now, not after the prefill
        ap.error(f"--json: no directory {args.json.parent}")
    try:
        report = anatomy(args)
    except AnatomyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def anatomy(args) -> dict:
    header, records = sample_records(args.out, args.task, args.context, args.sample)
    identity = header["identity"]
    full_record = next(r for (m, _), r in records.items() if m == "full")
    prompt = cached_prompts(args.out / "ruler-data").get(full_record["prompt_sha1"])
    if prompt is None:
        raise AnatomyError(f"the prompt of this sample is not in {args.out / 'ruler-data'}; "
                           "rerun the eval's command there to generate it again")
    try:
        model = load_model(args.model, progress=False)
    except load_errors() as e:
        raise AnatomyError(str(e)) from None
    if model_identity(model) != identity["model"]:
        raise AnatomyError(f"{args.model} is not the model of {args.out} (its config, dtype, "
                           "weights or tokenizer differ from the results file's header)")
    params, _ = with_layout(model.params, "auto", jax.default_backend())
    tok, config = model.tokenizer, model.config
    ids = tok.encode(prompt)
    if len(ids) != full_record["prompt_tokens"]:
        raise AnatomyError(f"the prompt is {len(ids)} tokens; the run recorded "
                           f"{full_record['prompt_tokens']}")
    expected = [str(e) for e in full_record["expected"]]
    needle = needle_tokens(tok.char_spans(prompt), prompt, expected)
    kernels, stop = identity["kernels"], tok.stop_ids(config.eos_token_ids)

    t0 = time.perf_counter()
    shared = SharedPrefill(params, config, [ids], max_new_tokens=full_record["max_new_tokens"],
                           prefill_chunk=identity["prefill_chunk"], kernels=kernels)
    prefill_s = time.perf_counter() - t0

    def method(name, budget, stage2=None):
        m = eval_method(name, budget, kernels=kernels)
        if method_settings(m) != identity["methods"][name]:
            raise AnatomyError(f"{name}'s settings differ from the run's: "
                               f"{method_settings(m)} against {identity['methods'][name]}")
        return eval_method(name, budget, kernels=kernels, stage2=stage2) if stage2 else m

    def answer(m):
        tokens = shared.generate(m, stop_ids=stop).tokens[0]
        return tokens, tok.decode([t for t in tokens if t not in stop])

    full = method("full", None)
    forced, full_text = answer(full)
    reference = normalize_logprobs(shared.forced_logprobs(full, [forced])[0], len(forced),
                                   "full KV")
    rows, lost = [], {}
    cells = [("full KV", full, None, full_record)] + [
        (label, method(name, budget, stage2), budget,
         records.get((name, budget)) if stage2 is None else None)
        for budget in args.budgets for label, name, stage2 in METHODS]
    for label, m, budget, record in cells:
        text = full_text if m is full else answer(m)[1]
        lp = normalize_logprobs(shared.forced_logprobs(m, [forced])[0], len(forced), label)
        kl = kl_per_step(reference, lp)
        _, cache = shared.compressed(m)
        row = {"method": label, "budget": budget, "answer": text,
               "score": ruler_score(args.task, text, expected),
               "as_recorded": None if record is None else text == record["output"],
               "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
               "first_step_off": first_divergence(lp, forced)}
        if isinstance(cache, KVCache) and needle:
            pos = np.asarray(cache.pos)[:, 0]  # [layers, kv heads, slots]
            kept = held(pos, needle)  # [Ly, K, n]
            share = kept.mean(axis=-1)  # [Ly, K]
            row.update(prompt_kept=int(np.asarray(cache.length).reshape(-1)[0]),
                       needle_kept_least=float(share.min()),
                       needle_kept_mean=float(share.mean()))
            per_token = kept.mean(axis=(0, 1))
            row["needle_kept_per_token"] = [round(float(x), 4) for x in per_token]
            lost[(label, budget)] = [(needle[i], tok.decode([ids[needle[i]]]),
                                      float(per_token[i])) for i in np.argsort(per_token)[:4]
                                     if per_token[i] < 1.0]
        rows.append(row)

    print_report(args, full_record, len(ids), needle, prefill_s, rows, lost)
    return {"task": args.task, "context": args.context, "sample": args.sample,
            "prompt_tokens": len(ids), "needle_tokens": needle, "prefill_s": prefill_s,
            "machine": machine_line(), "rows": rows,
            "lost": [{"method": m, "budget": b, "tokens": t} for (m, b), t in lost.items()]}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_report(args, full_record, n_tokens, needle, prefill_s, rows, lost) -> None:
    span = f"tokens {needle[0]}-{needle[-1]}" if needle else "not found in the prompt"
    print(f"# {args.task}, sample {args.sample}, {args.context}-token context\n")
    print(f"`python benchmarks/ruler_anatomy.py --task {args.task} --context {args.context} "
          f"--sample {args.sample} --budgets {','.join(map(str, args.budgets))} "
          f"--out {args.out} --model {args.model}`\n")
    print(f"{machine_line()}\n")
    print(f"Prompt: {n_tokens} tokens, prefilled once in {prefill_s:.0f} s. Expected: "
          f"{', '.join(map(str, full_record['expected']))} ({len(needle)} needle tokens, "
          f"{span}).\n")
    print("| method | budget | answer | score | as recorded | mean KL | max KL | "
          "first step off (0-based) | prompt kept | needle kept (least / mean) |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        answer = r["answer"].strip().replace("|", "\\|").replace("\n", " ")
        answer = answer if len(answer) <= 60 else answer[:57] + "..."
        recorded = {None: "-", True: "yes", False: "no"}[r["as_recorded"]]
        kept = (f"{r['needle_kept_least']:.2f} / {r['needle_kept_mean']:.2f}"
                if "needle_kept_least" in r else "-")
        print(f"| {r['method']} | {r['budget'] or '-'} | `{answer}` | {100 * r['score']:.0f} "
              f"| {recorded} | {r['mean_kl']:.3f} | {r['max_kl']:.2f} "
              f"| {_fmt(r['first_step_off'], 'd')} | {r.get('prompt_kept', '-')} | {kept} |")
    if lost:
        print("\nNeedle tokens the fewest layer x KV heads keep (position `token` share):\n")
        for (label, budget), tokens in lost.items():
            if tokens:
                cells = ", ".join(f"{p} `{t}` {share:.2f}" for p, t, share in tokens)
                print(f"- {label} at {budget}: {cells}")


if __name__ == "__main__":
    sys.exit(main())
