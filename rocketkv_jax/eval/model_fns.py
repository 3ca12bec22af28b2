"""The model functions the evaluation calls, bound to a loaded model: generate, greedy
tokens and forced-token log-probabilities (`engine_functions`), the methods eval builds
(`eval_method`), and the identity of what produces their outputs (`engine_identity`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..engine.generate import generate_ids
from ..engine.shared_prefill import SharedPrefill, forced_decode_logprobs
from ..methods import make_method, sweep_settings
from ..model_store import Model, model_identity
from ..names import DEFAULT_KERNELS, DEFAULT_PREFILL_CHUNK, EVAL_STAGE2

# Method fields that come from the run's flags (recorded once, at the identity's top).
RUN_SETTINGS = ("token_budget", "kernels", "skip_layers")


def eval_method(name: str, budget: int | None, *, kernels: str = DEFAULT_KERNELS,
                skip_layers: int = 0, stage2: str = EVAL_STAGE2):
    """The method eval runs for `name` at `budget` (`full` ignores it): `kernels` goes to
    every method, `skip_layers` and `stage2` to those that have them (`sweep_settings`)."""
    return make_method(name, budget, **sweep_settings(name, kernels=kernels,
                                                      skip_layers=skip_layers or None,
                                                      stage2=stage2))


def check_methods_fit(config, methods: Iterable[str], budgets: Iterable[int],
                      contexts: Iterable[int], max_new_tokens: int, *,
                      kernels: str = DEFAULT_KERNELS, skip_layers: int = 0,
                      stage2: str = EVAL_STAGE2) -> None:
    """Plan every (method, budget, context) of a grid on the model's config, so that a
    setting the model cannot take (e.g. skip_layers >= its layers) is refused before a
    run creates anything; raises the method's MethodConfigError (a ValueError)."""
    budgets, contexts = list(budgets), list(contexts)
    for name in methods:
        for budget in budgets:
            method = eval_method(name, budget, kernels=kernels, skip_layers=skip_layers,
                                 stage2=stage2)
            for context in contexts:
                method.plan(config, max(1, context - max_new_tokens), max_new_tokens)


def method_settings(method) -> dict[str, Any]:
    """A method's class and hyperparameters, less those set by the run (RUN_SETTINGS)."""
    fields = dataclasses.asdict(method) if dataclasses.is_dataclass(method) else {}
    return {"class": type(method).__name__,
            **{k: v for k, v in fields.items() if k not in RUN_SETTINGS}}


def engine_identity(model: Model, methods: Iterable[str], *, kernels: str = DEFAULT_KERNELS,
                    skip_layers: int = 0, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
                    stage2: str = EVAL_STAGE2) -> dict[str, Any]:
    """Everything of the engine that decides eval's outputs: the model (`model_identity`),
    the device platform, the kernel backend that runs (`auto` resolved), skip_layers, the
    prefill chunk, greedy decoding, and the settings of every method in `methods` (stage2
    among them; pass
    every method the command can run, not only this grid's, so that adding methods to a
    grid keeps the identity)."""
    import jax

    from ..kernels.backend import resolve_backend

    return {
        "model": model_identity(model),
        "device": jax.default_backend(),
        "kernels": resolve_backend(kernels),
        "skip_layers": skip_layers,
        "prefill_chunk": prefill_chunk,
        "decoding": "greedy",
        "methods": {name: method_settings(eval_method(name, 1024, kernels=kernels,
                                                      skip_layers=skip_layers, stage2=stage2))
                    for name in methods},
    }


def engine_functions(
    model: Model, *, kernels: str = DEFAULT_KERNELS, batch_size: int = 8, skip_layers: int = 0,
    stage2: str = EVAL_STAGE2,
) -> tuple[Callable, Callable, Callable]:
    """(generate_fn, forced_logprobs_fn, greedy_tokens_fn) over `model`, greedy decoding.
    kernels: the backend of the prefill attention and of every method's sparse attention
    ("auto": the Pallas kernels on a GPU, the jnp references elsewhere).
    skip_layers: leading layers kept dense by the methods that have the setting.
    stage2: the stage-2 mode of the methods that have one (EVAL_STAGE2: always sparse).

    Prompts are raw text (no chat template); generation stops at the model's EOS ids.
    The dense prefill of the last batch is kept (`SharedPrefill`), because the runner sends
    the same batch for every (method, budget) in turn: one prefill serves the whole grid.
    """
    tok, config = model.tokenizer, model.config
    stop = tok.stop_ids(config.eos_token_ids)

    def method_for(name: str, budget: int | None):
        return eval_method(name, budget, kernels=kernels, skip_layers=skip_layers,
                           stage2=stage2)

    last: dict[tuple, SharedPrefill] = {}

    def prefilled(ids: list[list[int]], max_new: int) -> SharedPrefill:
        key = (tuple(map(tuple, ids)), max_new)
        if key not in last:
            last.clear()  # free the previous batch's k, v, q first
            last[key] = SharedPrefill(model.params, config, ids, max_new_tokens=max_new,
                                      kernels=kernels)
        return last[key]

    def generate_fn(prompts: list[str], method: str, budget: int, max_new: int) -> list[str]:
        m = method_for(method, budget)
        ids = [tok.encode(p) for p in prompts]
        texts: list[str] = []
        for start in range(0, len(ids), batch_size):
            out = prefilled(ids[start : start + batch_size], max_new).generate(
                m, stop_ids=stop)
            texts += [tok.decode([t for t in row if t not in stop]) for row in out.tokens]
        return texts

    def greedy_tokens_fn(prompt: str, method: str, budget: int, n: int) -> list[int]:
        out = generate_ids(model.params, config, [tok.encode(prompt)], method_for(method, budget),
                           max_new_tokens=n, stop_ids=stop, kernels=kernels)
        return out.tokens[0]

    def forced_logprobs_fn(prompt: str, forced: list[int], method: str, budget: int) -> np.ndarray:
        return forced_decode_logprobs(model.params, config, tok.encode(prompt), forced,
                                      method_for(method, budget), kernels=kernels)

    return generate_fn, forced_logprobs_fn, greedy_tokens_fn
