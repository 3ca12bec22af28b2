"""`rocketkv serve` under load: concurrent clients on localhost against static batching.

    python benchmarks/serve_load.py --model smollm2 --clients 8 --requests 16
    python benchmarks/serve_load.py --model smollm2 --phases leak --leak-requests 500

Phases (`--phases`, all by default):

  static    the same prompts through `generate_ids` in batches of --clients (static
            batching: every batch waits for its longest request), rocketkv and full;
            with each method's prefill / decode / compile seconds and the bound they
            put on rocketkv against full KV (`static_bound`);
  serve     a `rocketkv serve` subprocess on a free localhost port; --clients streaming
            clients (OpenAI's completions API over server-sent events) take the requests
            from one list until it is empty, once with rocketkv and once with full KV
            (the `method` field of each request); throughput (completion tokens / wall
            seconds), time to first token and time per output token at p50/p95;
  prefill   while --clients - 1 streams decode, one more client sends an 8k-token prompt:
            the p95 gap between tokens of the running streams before it arrives and while
            it prefills (chunked prefill at work);
  leak      --leak-requests requests straight into an in-process engine, with some
            cancelled and some failed by an injected fault; its counters at the end must
            show no row, prefill or request left (exit 1 otherwise).

Prompts are the eval's needle-in-a-haystack texts of --prompt-tokens lengths (a range
"1024-4096" spreads them evenly), each with --new-tokens new tokens (a range likewise),
no stop ids (`ignore_eos`), so every run generates the same counts. The JSON (--out)
holds every number and the machine; the table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np

from rocketkv_jax import checks
from rocketkv_jax.bench.grid import machine_line
from rocketkv_jax.bench.script import model_load_errors_exit
from rocketkv_jax.models.params import with_layout
from rocketkv_jax.names import STAGE2_MODES, WEIGHT_LAYOUTS


def span(text: str, name: str) -> tuple[int, int]:
    """"N" or "LO-HI" as (LO, HI), positive integers, LO <= HI."""
    lo, _, hi = text.partition("-")
    try:
        lo_v = checks.integer(int(lo), name, low=1)
        hi_v = checks.integer(int(hi), name, low=lo_v) if hi else lo_v
    except ValueError as e:
        raise SystemExit(f"error: {name} {text!r}: {e}") from None
    return lo_v, hi_v


def spread(lo: int, hi: int, n: int) -> list[int]:
    return [int(round(x)) for x in np.linspace(lo, hi, n)] if n > 1 else [lo]


def pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def make_prompts(model, lengths):
    from rocketkv_jax.eval.tasks import make_sample

    tok = model.tokenizer
    out = []
    for i, n in enumerate(lengths):
        text = make_sample("niah_single", tok, context_length=n, index=i, seed=11).prompt
        out.append((text, tok.encode(text)))
    return out


# ------------------------------------------------------------------ static batching
def run_static(model, prompts, new_tokens, clients, method, budget, stage2="auto"):
    from rocketkv_jax.engine.generate import generate_ids
    from rocketkv_jax.methods import make_method
    from rocketkv_jax.methods.registry import sweep_settings

    kv = make_method(method, budget, **sweep_settings(method, stage2=stage2))
    t0, produced = time.perf_counter(), 0
    parts = {"prefill_s": 0.0, "decode_s": 0.0, "compile_s": 0.0}
    for i in range(0, len(prompts), clients):
        batch = [ids for _, ids in prompts[i:i + clients]]
        n = max(new_tokens[i:i + clients])
        out = generate_ids(model.params, model.config, batch, kv,
                           max_new_tokens=n, stop_ids=[], prefill_chunk=256)
        # a static batch runs to its longest request; each request keeps its own count
        produced += sum(min(len(t), k) for t, k in zip(out.tokens, new_tokens[i:i + clients],
                                                        strict=True))
        for name in parts:
            parts[name] += getattr(out.stats, name)
    wall = time.perf_counter() - t0
    return {"method": method, "wall_s": wall, "tokens": produced, "tok_per_s": produced / wall,
            **parts}


def static_bound(static: list[dict]) -> dict:
    """What the static batches say about rocketkv against full KV: the ratio of their
    throughputs, each method's share of its wall time spent in prefill, and the ratio's
    ceiling: full KV's wall time over rocketkv's without its decode steps (rocketkv
    decoding in no time; its prefill is the same work as full KV's)."""
    s = {r["method"]: r for r in static}
    rkv, full = s["rocketkv"], s["full"]
    return {"static_rocketkv_vs_full": rkv["tok_per_s"] / full["tok_per_s"],
            "prefill_share_rocketkv": rkv["prefill_s"] / rkv["wall_s"],
            "prefill_share_full": full["prefill_s"] / full["wall_s"],
            "static_ceiling_rocketkv_vs_full":
                full["wall_s"] / (rkv["wall_s"] - rkv["decode_s"])
                * rkv["tokens"] / full["tokens"]}


# ------------------------------------------------------------------ the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args):
        self.port = free_port()
        cmd = [sys.executable, "-m", "rocketkv_jax.cli", "serve", "--model", args.model,
               "--port", str(self.port), "--slots", str(args.slots),
               "--prefill-chunk", str(args.prefill_chunk), "--mixed-chunk",
               str(args.mixed_chunk), "--max-stall", str(args.max_stall), "--max-queue", "256",
               "--prefix-cache", str(args.prefix_cache), "--weight-layout", args.weight_layout,
               "--stage2", args.stage2]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise SystemExit("error: the server did not come up within 600 s")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(300)


async def stream_one(client, server, prompt, n, method, budget, record, times=None):
    body = {"model": server.model, "prompt": prompt, "max_tokens": n, "stream": True,
            "temperature": 0, "method": method, "token_budget": budget, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times = [] if times is None else times  # the caller may watch them arrive
    usage = None
    async with client.stream("POST", server.url + "/v1/completions", json=body,
                             timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
    record.append({"t0": t0, "times": times, "usage": usage, "n": n})


async def drive(server, prompts, new_tokens, clients, method, budget):
    todo = list(zip([p for p, _ in prompts], new_tokens, strict=True))
    done: list[dict] = []
    async with httpx.AsyncClient() as client:
        async def worker():
            while todo:
                prompt, n = todo.pop(0)
                await stream_one(client, server, prompt, n, method, budget, done)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(d["usage"]["completion_tokens"] for d in done)
    ttft = [d["times"][0] - d["t0"] for d in done if d["times"]]
    tpot = [(d["times"][-1] - d["times"][0]) / (len(d["times"]) - 1) for d in done
            if len(d["times"]) > 1]
    return {"method": method, "wall_s": wall, "tokens": tokens, "tok_per_s": tokens / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "tpot_p50": pct(tpot, 50), "tpot_p95": pct(tpot, 95)}


async def prefill_interference(server, stream_prompts, long_prompt, new_tokens):
    """The running streams' token gaps before a long prompt arrives and while it
    prefills (from its sending to its first token). The long prompt is sent once every
    stream has decoded 16 tokens since all of them started decoding; "before" counts
    only the gaps in that steady stretch (no other prompt prefilling)."""
    running: list[dict] = []
    long_rec: list[dict] = []
    live = [[] for _ in stream_prompts]
    async with httpx.AsyncClient() as client:
        streams = [asyncio.create_task(stream_one(client, server, p, new_tokens, "rocketkv",
                                                  256, running, live[i]))
                   for i, p in enumerate(stream_prompts)]
        async def until(ok):
            while not ok():
                if any(t.done() for t in streams):
                    raise SystemExit("error: a stream ended before the long prompt was sent;"
                                     " raise --stream-tokens")
                await asyncio.sleep(0.05)

        await until(lambda: min(map(len, live)) >= 2)  # every stream decodes
        steady = time.perf_counter()  # from here no stream's prompt is prefilling
        marks = [len(t) for t in live]
        await until(lambda: all(len(t) >= m + 16 for t, m in zip(live, marks, strict=True)))
        sent = time.perf_counter()
        await stream_one(client, server, long_prompt, 4, "rocketkv", 256, long_rec)
        await asyncio.gather(*streams)
    first = long_rec[0]["times"][0]
    before, during = [], []
    for ts in live:
        for a, b in zip(ts, ts[1:], strict=False):
            if steady <= a and b < sent:
                before.append(b - a)
            elif b <= first:
                during.append(b - a)
    if not during or max(ts[-1] for ts in live) < first:
        raise SystemExit("error: the streams ended before the long prompt's first token; "
                         "raise --stream-tokens")
    return {"long_prompt_tokens": long_rec[0]["usage"]["prompt_tokens"],
            "long_prompt_ttft_s": first - sent, "gaps_before": len(before),
            "gaps_during": len(during), "tpot_p50_before": pct(before, 50),
            "tpot_p95_before": pct(before, 95), "tpot_p50_during": pct(during, 50),
            "tpot_p95_during": pct(during, 95),
            "ratio_p95": pct(during, 95) / pct(before, 95)}


# ------------------------------------------------------------------ leaks
def leak_check(model, n_requests, slots):
    import logging

    from rocketkv_jax.engine.scheduler import Engine
    from rocketkv_jax.engine.serving_api import ServeRequest

    logging.getLogger("rocketkv_jax.engine.scheduler").setLevel(logging.CRITICAL)
    rng = np.random.default_rng(0)
    failing: set[str] = set()

    def hook(stage, rid):
        if rid in failing:
            raise RuntimeError("injected fault")

    engine = Engine(model.params, model.config, slots=slots, max_queue=n_requests,
                    prefill_chunk=64)
    tok = model.tokenizer
    base = tok.encode("The quick brown fox jumps over the lazy dog. " * 12)
    ended = threading.Semaphore(0)
    unexpected: list[str] = []

    def on_event(ev):
        if ev.kind == "error" and "injected fault" not in ev.error:
            unexpected.append(ev.error)
        if ev.kind != "token":
            ended.release()

    handles = []
    engine.fault_hook = hook
    for i in range(n_requests):
        ids = base[: 40 + int(rng.integers(0, len(base) - 40))]
        h = engine.submit(ServeRequest(tuple(ids), int(rng.integers(2, 12)),
                                       method=["rocketkv", "full"][i % 2],
                                       token_budget=[256, None][i % 2]), on_event)
        if i % 7 == 3:
            failing.add(h.id)
        handles.append(h)
        if i % 5 == 1:
            h.cancel()
    for _ in range(n_requests):
        ended.acquire()
    stats = engine.stats()
    engine.close()
    leaks = {k: stats[k] for k in ("queued", "prefilling", "running") if stats[k]}
    ended_all = stats["finished"] + stats["cancelled"] + stats["failed"] == n_requests
    ok = (not leaks and not unexpected and ended_all
          and stats["kv_bytes"] <= stats["kv_memory_bytes"])
    return {"requests": n_requests, "stats": stats, "leaks": leaks,
            "unexpected_errors": unexpected, "ok": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", default="1024-4096")
    ap.add_argument("--new-tokens", default="64-256")
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--mixed-chunk", type=int, default=16,
                    help="the server's --mixed-chunk (0: off)")
    ap.add_argument("--max-stall", type=float, default=1.75,
                    help="the server's --max-stall (0: always --mixed-chunk tokens)")
    ap.add_argument("--long-prompt", type=int, default=8000,
                    help="prefill phase: tokens of the prompt that arrives mid-stream")
    ap.add_argument("--stream-prompt", type=int, default=1000,
                    help="prefill phase: prompt tokens of each of the --clients - 1 streams")
    ap.add_argument("--stream-tokens", type=int, default=400,
                    help="prefill phase: tokens each stream generates (enough to outlast "
                    "the long prompt's prefill)")
    # off by default: the rocketkv and the full run send the same prompts, and the second
    # would reuse the first's prefixes, which static batching cannot
    ap.add_argument("--prefix-cache", type=float, default=0.0,
                    help="the server's --prefix-cache in GiB (default 0: off)")
    ap.add_argument("--weight-layout", default="auto", choices=("auto", *WEIGHT_LAYOUTS),
                    help="the weights' layout for the server and the static batches, as "
                    "generate and serve take it (default: auto)")
    ap.add_argument("--stage2", default="auto", choices=STAGE2_MODES,
                    help="stage 2 of rocketkv in the server and the static batches, as "
                    "generate and serve take it (default: auto)")
    ap.add_argument("--leak-requests", type=int, default=500)
    ap.add_argument("--phases", default="static,serve,prefill,leak")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    phases = args.phases.split(",")
    bad = set(phases) - {"static", "serve", "prefill", "leak"}
    if bad:
        ap.error(f"unknown phases {sorted(bad)} (static, serve, prefill, leak)")
    for name in ("clients", "requests", "slots", "prefill_chunk", "long_prompt",
                 "stream_prompt", "stream_tokens", "leak_requests"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mixed_chunk < 0:
        ap.error("--mixed-chunk must be >= 0")
    p_lo, p_hi = span(args.prompt_tokens, "--prompt-tokens")
    n_lo, n_hi = span(args.new_tokens, "--new-tokens")

    from rocketkv_jax.model_store import load_model

    with model_load_errors_exit():
        model = load_model(args.model, progress=False)
    params, _ = with_layout(model.params, args.weight_layout, jax.default_backend())
    model = dataclasses.replace(model, params=params)  # as generate and serve run it
    rng = np.random.default_rng(0)
    lengths = spread(p_lo, p_hi, args.requests)
    rng.shuffle(lengths)
    new_tokens = [int(x) for x in rng.permutation(spread(n_lo, n_hi, args.requests))]
    prompts = make_prompts(model, lengths)
    result = {"machine": machine_line(), "python": platform.python_version(),
              "args": vars(args), "prompt_tokens": [len(ids) for _, ids in prompts],
              "new_tokens": new_tokens}
    if "static" in phases:
        result["static"] = [run_static(model, prompts, new_tokens, args.clients, m, b,
                                       args.stage2)
                            for m, b in (("rocketkv", 256), ("full", None))]
        print(json.dumps(result["static"], indent=1), flush=True)
        result["static_bound"] = static_bound(result["static"])
        print(json.dumps(result["static_bound"], indent=1), flush=True)
    if "serve" in phases or "prefill" in phases:
        server = Server(args)
        try:
            if "serve" in phases:
                result["serve"] = [asyncio.run(drive(server, prompts, new_tokens, args.clients,
                                                     m, b))
                                   for m, b in (("rocketkv", 256), ("full", None))]
                print(json.dumps(result["serve"], indent=1), flush=True)
            if "prefill" in phases:
                (long_text, _), *streams = make_prompts(
                    model, [args.long_prompt] + [args.stream_prompt] * (args.clients - 1))
                result["prefill"] = asyncio.run(prefill_interference(
                    server, [text for text, _ in streams], long_text, args.stream_tokens))
                print(json.dumps(result["prefill"], indent=1), flush=True)
            result["server_stats"] = httpx.get(server.url + "/v1/stats").json()
        finally:
            server.stop()
    if "leak" in phases:
        result["leak"] = leak_check(model, args.leak_requests, args.slots)
        print(json.dumps(result["leak"], indent=1), flush=True)
    if "static" in result and "serve" in result:
        s = {r["method"]: r for r in result["static"]}
        v = {r["method"]: r for r in result["serve"]}
        result["ratios"] = {
            "serve_vs_static_rocketkv": v["rocketkv"]["tok_per_s"] / s["rocketkv"]["tok_per_s"],
            "serve_vs_static_full": v["full"]["tok_per_s"] / s["full"]["tok_per_s"],
            "serve_rocketkv_vs_full": v["rocketkv"]["tok_per_s"] / v["full"]["tok_per_s"]}
        print(json.dumps(result["ratios"], indent=1))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result.get("leak", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
