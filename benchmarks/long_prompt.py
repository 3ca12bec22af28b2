"""End to end on one long prompt: prefill + N decode tokens, full KV against each method.

    python benchmarks/long_prompt.py --model smollm2 --context 8k
    python benchmarks/long_prompt.py --model llama8b-shape --layers 2 --context 32k
    python benchmarks/long_prompt.py --model qwen2.5-coder-0.5b --context 32000 --methods rocketkv

For a real model (`smollm2`, `qwen2.5-coder-0.5b`, or a checkpoint path) the prompt is a
single-needle retrieval task (the eval's `niah_single`: a magic number hidden in Paul
Graham essays, asked with the chat template), so the table also says whether each method
still finds the needle. For `llama8b-shape` (random weights, few layers of the
Llama-3.1-8B shape) the prompt is random ids. Each method runs one `generate_ids` call of
exactly `--new-tokens` tokens (no stop ids) with the chunked prefill; the time end to end is
prefill + decode (compile time is reported apart, it is paid once per shape). The weights
run in the layout `rocketkv generate` picks (`--weight-layout`, default auto). The ratio is
method / full (< 1: faster), measured in the same run. "CPU s" is this process's CPU time
for the call (all threads): on a machine shared with other jobs it moves less than the
wall time, so its ratio is the steadier comparison; it holds the compile unless
`--warmup` rounds ran first.

Each method's decode step is also set against its own byte roofline: (the weights one step
reads + the KV bytes its plan reads at the mean cached length, `methods.read_bytes`) / this
CPU's memory bandwidth, measured at the start of the run (best of a numpy copy and a jitted
read, `bench.measure.measure_bandwidth`). "step / roofline" = 1 is a step at bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from rocketkv_jax import checks
from rocketkv_jax.bench.measure import measure_bandwidth
from rocketkv_jax.bench.script import model_load_errors_exit
from rocketkv_jax.cli.common import flag
from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.methods import make_method
from rocketkv_jax.models.params import with_layout
from rocketkv_jax.names import DEFAULT_PREFILL_CHUNK, WEIGHT_LAYOUTS


@dataclasses.dataclass
class Row:
    method: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_tok_s: float
    compile_s: float
    kv_cache_bytes: int
    cpu_s: float = 0.0  # this process's CPU seconds for the call (all threads)
    step_bytes: int = 0  # weights + KV read by the mean decode step (the roofline's bytes)
    answer: str = ""
    found: bool | None = None

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def median_row(rows: list[Row]) -> Row:
    """The run whose end-to-end time is the median (the lower one for an even count)."""
    return sorted(rows, key=lambda r: r.total_s)[(len(rows) - 1) // 2]


def build_prompt(args):
    """(params, config, prompt ids, answers or None, tokenizer or None, description)."""
    T = checks.token_count(args.context, "--context")
    if args.model == "llama8b-shape":
        from rocketkv_jax.bench.measure import load_bench_model

        m = load_bench_model("llama8b-shape", layers=args.layers, vocab=args.vocab)
        ids = np.random.default_rng(0).integers(3, m.config.vocab_size, T - args.new_tokens)
        return m.params, m.config, ids.tolist(), None, None, m.note
    from rocketkv_jax.eval.tasks import make_sample
    from rocketkv_jax.model_store import load_model

    with model_load_errors_exit():
        m = load_model(None if args.model == "smollm2" else args.model)
    if T > m.config.max_position_embeddings:
        raise SystemExit(f"error: --context {args.context} is {T} tokens, past the model's "
                         f"context of {m.config.max_position_embeddings}; give at most that")

    class ChatTokenizer:  # the task fits its text so that the chat-wrapped prompt fits
        def encode(self, text):
            return m.tokenizer.encode_chat(text)

        def decode(self, ids):
            return m.tokenizer.decode(ids)

    sample = make_sample("niah_single", ChatTokenizer(), context_length=T, index=0,
                         seed=0, depth=50.0, max_new_tokens=args.new_tokens)
    ids = m.tokenizer.encode_chat(sample.prompt)
    note = f"{args.model}: real weights, {m.config.num_layers} layers; niah_single at 50% depth"
    return m.params, m.config, ids, sample.answers, m.tokenizer, note


def step_bytes(params, config, method, prompt_len: int, new_tokens: int) -> int:
    """Bytes the mean decode step reads: every weight matrix (one embedding row) and the KV
    its plan reads with prompt + half the new tokens cached, in the params' dtype."""
    from rocketkv_jax.bench.roofline import llama_weight_bytes, model_dims
    from rocketkv_jax.methods.read_bytes import kv_read_bytes

    elem = jax.tree.leaves(params)[0].dtype.itemsize
    plan = method.plan(config, prompt_len, new_tokens)
    return (llama_weight_bytes(model_dims(config), elem)
            + kv_read_bytes(plan, prompt_len + new_tokens // 2, config, elem))


def run_method(params, config, ids, name, args, tokenizer, answers) -> Row:
    method = make_method(name, args.budget)
    bar = tqdm(desc=f"{name} prefill", unit="chunk", leave=False, file=sys.stderr)

    def on_chunk(done, total):
        bar.total = total
        bar.update(done - bar.n)

    cpu0 = time.process_time()
    out = generate_ids(params, config, [ids], method, max_new_tokens=args.new_tokens,
                       stop_ids=(), prefill_chunk=args.chunk or None,
                       on_prefill_chunk=on_chunk)
    cpu = time.process_time() - cpu0  # the first call of a shape also pays its compile
    bar.close()
    s = out.stats
    row = Row(name, len(ids), s.prefill_s, s.decode_s, s.decode_tokens_per_s, s.compile_s,
              s.kv_cache_bytes, cpu_s=cpu,
              step_bytes=step_bytes(params, config, method, len(ids), args.new_tokens))
    if tokenizer is not None:
        row.answer = tokenizer.decode(list(out.tokens[0])).strip()
        row.found = all(a.lower() in row.answer.lower() for a in answers)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--model", default="smollm2",
                    help="smollm2, qwen2.5-coder-0.5b, a checkpoint path, or llama8b-shape "
                         "(random weights)")
    ap.add_argument("--context", default="8k",
                    help="prompt + new tokens, e.g. 8k or 32000 (at most the model's context)")
    ap.add_argument("--methods", default="full,rocketkv",
                    help="comma-separated; full is the reference of the ratio column")
    ap.add_argument("--budget", type=flag(checks.token_budget), default=256,
                    help="token budget M of every method")
    ap.add_argument("--new-tokens", type=flag(checks.count), default=64,
                    help="tokens decoded per method")
    ap.add_argument("--chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                    help="prefill chunk in tokens (0: the whole prompt in one chunk)")
    ap.add_argument("--layers", type=int, default=2, help="layers of llama8b-shape")
    ap.add_argument("--vocab", type=int, default=8192, help="vocabulary of llama8b-shape")
    ap.add_argument("--repeat", type=int, default=1,
                    help="interleaved rounds over the methods; each row is the median run")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed rounds first (they compile, so the CPU s column of the "
                         "timed rounds holds no compile)")
    ap.add_argument("--weight-layout", default="auto", choices=("auto", *WEIGHT_LAYOUTS),
                    help="the weights' layout, as `rocketkv generate --weight-layout` (auto: "
                         "per-layer on a CPU for large layers, `models.params.auto_layout`)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    for name in methods:  # an unknown name or a bad budget fails before loading
        try:
            make_method(name, args.budget)
        except ValueError as e:
            ap.error(str(e))

    params, config, ids, answers, tokenizer, note = build_prompt(args)
    params, layout = with_layout(params, args.weight_layout, jax.default_backend())
    note += f"; {layout} weights"
    bandwidth = measure_bandwidth(2**30, 5)
    bw = bandwidth["best_GBps"] * 1e9
    t0 = time.perf_counter()
    runs: dict[str, list[Row]] = {name: [] for name in methods}
    for i in range(args.warmup + args.repeat):  # interleaved, so load drifts hit every method
        for name in methods:
            row = run_method(params, config, ids, name, args, tokenizer, answers)
            if i >= args.warmup:
                runs[name].append(row)
    rows = [median_row(r) for r in runs.values()]
    wall = time.perf_counter() - t0
    print(f"# {note}; prompt {len(ids)} tokens + {args.new_tokens} new, M = {args.budget}, "
          f"prefill chunk {args.chunk}; median of {args.repeat} interleaved round(s) after "
          f"{args.warmup} warm-up; "
          f"jax {jax.__version__} on {platform.machine()}, "
          f"{os.cpu_count()} cores; memory bandwidth {bw / 1e9:.1f} GB/s (best of a copy and "
          f"a read of 1 GiB); wall {wall:.0f} s")
    ref = next((r for r in rows if r.method == "full"), None)
    head = "| method | prefill s | prefill tok/s | decode tok/s | end to end s | vs full |"
    head += " CPU s | CPU vs full | KV cache | compile s | step ms | step / roofline |"
    head += " needle |" if tokenizer is not None else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        ratio = f"{r.total_s / ref.total_s:.2f}" if ref is not None else "-"
        cpu_ratio = f"{r.cpu_s / ref.cpu_s:.2f}" if ref is not None and ref.cpu_s else "-"
        line = (f"| {r.method} | {r.prefill_s:.1f} | {r.prompt_tokens / r.prefill_s:.0f} | "
                f"{r.decode_tok_s:.1f} | {r.total_s:.1f} | {ratio} | {r.cpu_s:.0f} | "
                f"{cpu_ratio} | {r.kv_cache_bytes / 2**20:.0f} MiB | {r.compile_s:.1f} | "
                f"{r.decode_s / args.new_tokens * 1e3:.1f} | "
                f"{r.decode_s / args.new_tokens / (r.step_bytes / bw):.2f} |")
        if tokenizer is not None:
            line += f" {'found' if r.found else 'missed'} |"
        print(line, flush=True)
    if tokenizer is not None:
        for r in rows:
            print(f"# {r.method} answered: {r.answer[:120]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"note": note, "args": vars(args), "bandwidth": bandwidth,
                       "runs": {name: [dataclasses.asdict(r) | {"total_s": r.total_s}
                                       for r in rs] for name, rs in runs.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
