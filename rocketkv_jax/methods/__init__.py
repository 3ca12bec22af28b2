"""KV-cache methods: frozen dataclasses of hyperparameters whose `plan(config,
prompt_len, max_new_tokens)` resolves a static plan with pure `compress`, `append`
and `attend` functions (see DESIGN.md)."""

from .full import Full, FullPlan

__all__ = ["Full", "FullPlan"]
