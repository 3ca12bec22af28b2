"""Binds the evaluation harness to the JAX engine: the three callables it needs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..generate import generate_ids
from ..methods import make_method, method_hparams
from ..model_store import Model
from .shared_prefill import SharedPrefill, forced_decode_logprobs


def engine_functions(
    model: Model, *, kernels: str = "reference", batch_size: int = 8, skip_layers: int = 0
) -> tuple[Callable, Callable, Callable]:
    """(generate_fn, forced_logprobs_fn, greedy_tokens_fn) over `model`, greedy decoding.
    skip_layers: leading layers kept dense by the methods that have the setting.

    Prompts are raw text (no chat template); generation stops at the model's EOS ids.
    The dense prefill of the last batch is kept (`SharedPrefill`), because the runner sends
    the same batch for every (method, budget) in turn: one prefill serves the whole grid.
    """
    tok, config = model.tokenizer, model.config
    stop = set(config.eos_token_ids)
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)

    def method_for(name: str, budget: int | None):
        if name == "full":
            return make_method("full")
        kw = {} if kernels == "reference" else {"kernels": kernels}
        if skip_layers and "skip_layers" in method_hparams(name):
            kw["skip_layers"] = skip_layers
        return make_method(name, budget, **kw)

    last: dict[tuple, SharedPrefill] = {}

    def prefilled(ids: list[list[int]], max_new: int) -> SharedPrefill:
        key = (tuple(map(tuple, ids)), max_new)
        if key not in last:
            last.clear()  # free the previous batch's k, v, q first
            last[key] = SharedPrefill(model.params, config, ids, max_new_tokens=max_new)
        return last[key]

    def generate_fn(prompts: list[str], method: str, budget: int, max_new: int) -> list[str]:
        m = method_for(method, budget)
        ids = [tok.encode(p) for p in prompts]
        texts: list[str] = []
        for start in range(0, len(ids), batch_size):
            out = prefilled(ids[start : start + batch_size], max_new).generate(
                m, stop_ids=sorted(stop))
            texts += [tok.decode([t for t in row if t not in stop]) for row in out.tokens]
        return texts

    def greedy_tokens_fn(prompt: str, method: str, budget: int, n: int) -> list[int]:
        out = generate_ids(model.params, config, [tok.encode(prompt)], method_for(method, budget),
                           max_new_tokens=n, stop_ids=sorted(stop))
        return out.tokens[0]

    def forced_logprobs_fn(prompt: str, forced: list[int], method: str, budget: int) -> np.ndarray:
        return forced_decode_logprobs(model.params, config, tok.encode(prompt), forced,
                                      method_for(method, budget))

    return generate_fn, forced_logprobs_fn, greedy_tokens_fn
