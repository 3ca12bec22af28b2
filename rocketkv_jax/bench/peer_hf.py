"""Peer runner for `rocketkv bench`: Hugging Face transformers `generate` (and kvpress) timing.

A standalone script (it imports only torch, transformers and, for --runs with snapkv,
kvpress; never rocketkv_jax), so `rocketkv bench` can start it with another interpreter,
e.g. a throwaway venv where kvpress brings the transformers version it pins:

    python rocketkv_jax/bench/peer_hf.py --gguf SmolLM2.gguf --ids ids.json --new-tokens 64 \
        --runs full,snapkv:256

Loads SmolLM2 from the GGUF in float32 (transformers' own dequantization, without
`accelerate` if it is missing), then for each run: a short warm-up generate, then one greedy
`generate` of exactly --new-tokens tokens (min_new_tokens = max_new_tokens, full dynamic
cache) on the prompt ids, timed per token with a streamer. Prints one JSON object:
{"versions": {...}, "runs": [{"run", "prefill_s", "decode_tok_s", "total_s", "kept", ...}]}.
A run "snapkv:M" wraps generate in kvpress' SnapKVPress with compression_ratio 1 - (M + 0.5) / T,
window 32 and average-pooling kernel 7 (rocketkv's snapkv defaults), so the prefill keeps
M prompt tokens per KV head.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def load_smollm2(gguf: Path):
    """transformers' float32 load of a GGUF (the same route as tests/conftest.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="rocketkv-peer-"))
    link = tmp / gguf.name
    os.symlink(gguf.resolve(), link)
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf.name, dtype=torch.float32
        ).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(tmp, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(link), return_tensors=True, model_to_load=model)
    model.load_state_dict(parsed["tensors"], strict=False)
    model.tie_weights()
    return model.eval()


class TimingStreamer:
    """A `generate` streamer that timestamps every put: the prompt, then each new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def press_for(run: str, prompt_len: int):
    """None for "full"; kvpress' SnapKVPress keeping M prompt tokens for "snapkv:M"."""
    if run == "full":
        return None
    name, _, budget = run.partition(":")
    if name != "snapkv" or not budget.isdigit():
        raise SystemExit(f"unknown run {run!r}: expected full or snapkv:M")
    from kvpress import SnapKVPress

    # kvpress keeps int(T * (1 - ratio)) tokens: the half token makes that exactly M (with
    # 1 - M / T, float rounding leaves M - 1 where T * (M / T) lands just under M)
    ratio = max(0.0, 1.0 - (int(budget) + 0.5) / prompt_len)
    return SnapKVPress(compression_ratio=ratio, window_size=32, kernel_size=7)


def kept_tokens(model, ids, press) -> int:
    """Cache length after the prefill (what the press kept), from one forward pass."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        model(ids, past_key_values=cache, use_cache=True)
    return int(cache.get_seq_length())


def generate_timed(model, ids, new_tokens: int, press) -> dict:
    import torch

    streamer = TimingStreamer()
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        t0 = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
            pad_token_id=model.config.eos_token_id,
        )
        t_end = time.perf_counter()
    n = int(out.shape[1] - ids.shape[1])
    first = streamer.times[1]  # times[0] is the prompt, times[1] the first new token
    decode_s = streamer.times[-1] - first
    return {
        "new_tokens": n,
        "prefill_s": first - t0,
        "decode_s": decode_s,
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else 0.0,
        "total_s": t_end - t0,
        "tokens": out[0, ids.shape[1]:].tolist(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True, help="SmolLM2 GGUF file")
    p.add_argument("--ids", type=Path, required=True, help="JSON list of prompt token ids")
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--runs", default="full", help="comma list of full, snapkv:M")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = p.parse_args(argv)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads()}
    if importlib.util.find_spec("kvpress") is not None:
        from importlib.metadata import version

        versions["kvpress"] = version("kvpress")
    t0 = time.perf_counter()
    model = load_smollm2(args.gguf)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([json.loads(args.ids.read_text())], dtype=torch.long)
    runs = []
    for run in args.runs.split(","):
        press = press_for(run, ids.shape[1])
        generate_timed(model, ids[:, -256:], 4, press_for(run, 256))  # warm-up
        result = generate_timed(model, ids, args.new_tokens, press)
        result.update(run=run, kept=kept_tokens(model, ids, press), prompt_len=ids.shape[1])
        runs.append(result)
    json.dump({"versions": versions, "load_s": load_s, "runs": runs}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
