"""kvpress side of `kvpress_ruler.py`: greedy answers of transformers' GGUF model to our
RULER prompts, with full KV and with kvpress' `SnapKVPress` at given compression ratios.

A standalone script (torch, transformers and kvpress only; never rocketkv_jax), run by
`kvpress_ruler.py` with the interpreter of a venv that has kvpress (kvpress 0.5.5 pins
transformers<5.3, see kvpress_venv.sh):

    python benchmarks/kvpress_ruler_worker.py --gguf MODEL.gguf --prompts prompts.json

prompts.json (written by kvpress_ruler.py): {"stop_ids", "window", "kernel_size",
"prompts": [{"key", "ids", "max_new_tokens", "runs": [{"method", "budget", "ratio"}]}]}.
Prints one JSON line per (prompt, run) as soon as its group is done: {"key", "method",
"budget", "ratio", "kept", "tokens", "prefill_s", "decode_s", ...}, then {"done": true}.

Per prompt, as kvpress' pipeline does with a context and no question, except that the
whole prompt is the compressed context and the first answer token comes from the
prefill's own logits:

- one prefill of the whole prompt (transformers, float32, sdpa). kvpress compresses in a
  forward hook on every attention layer *after* the layer's output is computed, so the
  prefill itself never sees the compression; the cache a press leaves depends only on
  that layer's inputs and full keys/values. So one prefill serves full KV and every
  ratio: our hook calls each press's own `compress(module, hidden_states, keys, values,
  attentions, kwargs)` on exactly the arguments kvpress' `forward_hook` passes it, and
  keeps the results instead of writing them back. `--check-hooks` (on by default for the
  first prompt) also runs the prefill under each press's own context manager and
  asserts that the caches and logits are identical;
- greedy decoding from that cache with explicit positions T, T + 1, ... (kvpress'
  `generate_answer`: the compressed cache is shorter than the positions), stopping after
  a stop id (checked from the first token on) or at max_new_tokens.

Decoding is weight-bound on a CPU (a 0.5B model reads its 2 GB of f32 weights per step),
so `--batch B` prefills B prompts one by one and then decodes each run of the B at
once: a run's compressed caches all hold the same number of tokens and are stacked as
they are; full-KV caches of different lengths are left-padded and masked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def load_gguf_f32(gguf: Path):
    """transformers' float32 load of a GGUF (gguf-py dequantizes; accelerate, which kvpress
    requires, loads). transformers reads a GGUF from a folder: a temporary one holding a
    link to the file."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(tempfile.mkdtemp(prefix="kvpress-ruler-"))
    os.symlink(gguf.resolve(), folder / gguf.name)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name,
                                                dtype=torch.float32).eval()


def make_press(ratio: float, window: int, kernel_size: int):
    from kvpress import SnapKVPress

    return SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=kernel_size)


class SharedPrefillHooks:
    """Forward hooks on every attention layer that apply each press's `compress` to the
    layer's full keys and values, as kvpress' `BasePress.forward_hook` would, and keep
    the results per press; the model's cache is left uncompressed (full KV)."""

    def __init__(self, model, presses: dict):
        self.model, self.presses = model, presses
        self.kept: dict = {name: {} for name in presses}

    def _hook(self, module, args, kwargs, output):
        from kvpress.presses.base_press import is_prefilling
        from kvpress.utils import extract_keys_and_values

        hidden_states = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden_states.shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for name, press in self.presses.items():
            self.kept[name][module.layer_idx] = press.compress(
                module, hidden_states, keys, values, output[1], kwargs)
        return output

    def __enter__(self):
        lm = self.model.model
        for press in self.presses.values():
            press.post_init_from_model(self.model)  # as BasePress.__call__
        self.handles = []
        for layer in lm.layers:
            layer.self_attn.rotary_emb = lm.rotary_emb  # as BasePress.__call__
            self.handles.append(
                layer.self_attn.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def full_layers(cache) -> dict:
    return {i: (layer.keys, layer.values) for i, layer in enumerate(cache.layers)}


def batched_cache(rows: list[dict]):
    """A DynamicCache of several prompts' {layer: (keys [1, K, L_i, D], values)}, each
    left-padded with zeros to the longest L; returns (cache, pads per row)."""
    import torch
    from transformers import DynamicCache

    lengths = [next(iter(r.values()))[0].shape[2] for r in rows]
    longest = max(lengths)
    pads = [longest - n for n in lengths]
    cache = DynamicCache()
    for idx in sorted(rows[0]):
        kv = []
        for part in (0, 1):
            kv.append(torch.cat([torch.nn.functional.pad(r[idx][part], (0, 0, pad, 0))
                                 for r, pad in zip(rows, pads, strict=True)]))
        cache.update(*kv, idx)
    return cache, pads


def greedy_batch(model, firsts: list[int], rows: list[dict], prompt_lens: list[int],
                 max_new: list[int], stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuations from each row's first token (chosen by its prefill). Positions
    continue from each prompt's length whatever its cache length (kvpress'
    generate_answer); a row stops after a stop id (from the first token on) or at its
    max_new. Rows of unequal cache length are left-padded and masked, so each row's
    attention is over its own cache exactly; rows of equal length get no mask, as in
    kvpress' own single-prompt decoding."""
    import torch

    cache, pads = batched_cache(rows)
    longest = cache.get_seq_length()
    tokens = [[f] for f in firsts]
    active = [f not in stop_ids and n > 1 for f, n in zip(firsts, max_new, strict=True)]
    step = 0
    while any(active):
        mask = None
        if any(pads):
            mask = torch.ones(len(rows), longest + step + 1, dtype=torch.long)
            for i, pad in enumerate(pads):
                mask[i, :pad] = 0
        out = model(input_ids=torch.tensor([[t[-1]] for t in tokens]), past_key_values=cache,
                    position_ids=torch.tensor([[n + step] for n in prompt_lens]),
                    attention_mask=mask)
        step += 1
        for i, row in enumerate(tokens):
            if active[i]:
                row.append(int(out.logits[i, -1].argmax()))
                active[i] = row[-1] not in stop_ids and len(row) < max_new[i]
    return tokens


def check_own_hooks(model, ids, presses: dict, shared: dict, logits) -> None:
    """Each press's own context manager on a fresh prefill must leave exactly the cache
    that the shared-prefill hooks computed for it, and the same logits."""
    import torch
    from transformers import DynamicCache

    for name, press in presses.items():
        cache = DynamicCache()
        with press(model):
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        if not torch.equal(out.logits, logits):
            raise SystemExit(f"hook check: logits under {name}'s own hooks differ")
        for i, layer in enumerate(cache.layers):
            k, v = shared[name][i]
            if not (torch.equal(layer.keys, k) and torch.equal(layer.values, v)):
                raise SystemExit(f"hook check: layer {i} cache of {name} differs from "
                                 "kvpress' own forward_hook")


def run_name(run: dict) -> str:
    return f"{run['method']}:{run['budget']}"


def prefill(model, prompt: dict, spec: dict, check: bool) -> dict:
    """One prefill of `prompt`: {"first", "T", "seconds", "layers": {run name: {layer:
    (keys, values)}}, "checked"} for every run of the prompt."""
    import torch
    from transformers import DynamicCache

    ids = torch.tensor([prompt["ids"]])
    presses = {run_name(r): make_press(r["ratio"], spec["window"], spec["kernel_size"])
               for r in prompt["runs"] if r["method"] != "full"}
    cache = DynamicCache()
    t0 = time.perf_counter()
    with SharedPrefillHooks(model, presses) as hooks:
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    seconds = time.perf_counter() - t0
    if check and presses:
        check_own_hooks(model, ids, presses, hooks.kept, out.logits)
    layers = {run_name(r): full_layers(cache) if r["method"] == "full"
              else hooks.kept[run_name(r)] for r in prompt["runs"]}
    return {"first": int(out.logits[0, -1].argmax()), "T": ids.shape[1], "seconds": seconds,
            "layers": layers, "checked": bool(check and presses)}


def run_group(model, prompts: list[dict], spec: dict, check: int):
    """Prefill each prompt, then decode each run for the whole group at once; yields one
    record per (prompt, run)."""
    import torch

    stop = set(spec["stop_ids"])
    with torch.inference_mode():
        done = [prefill(model, p, spec, n < check) for n, p in enumerate(prompts)]
        names = list(dict.fromkeys(run_name(r) for p in prompts for r in p["runs"]))
        for name in names:
            rows = [(p, d, next(r for r in p["runs"] if run_name(r) == name))
                    for p, d in zip(prompts, done, strict=True)
                    if name in d["layers"]]
            t0 = time.perf_counter()
            tokens = greedy_batch(model, [d["first"] for _, d, _ in rows],
                                  [d["layers"][name] for _, d, _ in rows],
                                  [d["T"] for _, d, _ in rows],
                                  [p["max_new_tokens"] for p, _, _ in rows], stop)
            seconds = time.perf_counter() - t0
            for (p, d, run), toks in zip(rows, tokens, strict=True):
                kept = {int(k.shape[2]) for k, _ in d["layers"][name].values()}
                yield {"key": p["key"], "method": run["method"], "budget": run["budget"],
                       "ratio": run["ratio"], "kept": sorted(kept), "prompt_tokens": d["T"],
                       "tokens": toks, "prefill_s": round(d["seconds"], 2),
                       "decode_s": round(seconds, 2), "decode_batch": len(rows),
                       "decode_steps": max(len(t) for t in tokens) - 1,
                       "hook_check": d["checked"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch", type=int, default=1,
                   help="prompts prefilled one by one, then decoded together (default 1)")
    p.add_argument("--check-hooks", type=int, default=1, metavar="N",
                   help="check the shared prefill against each press's own hooks on the "
                        "first N prompts (default 1)")
    args = p.parse_args(argv)

    from importlib.metadata import version

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    spec = json.loads(args.prompts.read_text())
    t0 = time.perf_counter()
    model = load_gguf_f32(args.gguf)
    print(json.dumps({"versions": {"kvpress": version("kvpress"), "torch": torch.__version__,
                                   "transformers": transformers.__version__,
                                   "threads": torch.get_num_threads()},
                      "load_s": round(time.perf_counter() - t0, 1),
                      "attn_implementation": model.config._attn_implementation}), flush=True)
    prompts = spec["prompts"]
    for start in range(0, len(prompts), args.batch):
        group = prompts[start: start + args.batch]
        for record in run_group(model, group, spec, check=args.check_hooks - start):
            print(json.dumps(record), flush=True)
    print(json.dumps({"done": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
