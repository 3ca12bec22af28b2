"""The settings of one `rocketkv bench` run (`BenchConfig`): the grid, the peers, the output,
resolved from flag values (None: the default, or the quick one under --quick), each list
parsed and checked before anything runs. JAX-free.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .. import checks
from ..names import DEFAULT_KERNELS
from ..names import METHOD_NAMES as ALL_METHODS

DEFAULTS = dict(
    models="smollm2,llama8b-shape", contexts="4k,8k,16k,32k", budgets="256,512,1024,2048,4096",
    methods=",".join(ALL_METHODS), new_tokens=256, warmup=3, iters=20, batch=1,
    llama_layers=2, llama_vocab=8192, prefill="auto", prefill_memory_gb=10.0,
    peers=True, peer_context="4k", peer_new_tokens=64, peer_budget=256, peer_rounds=3,
    peer_threads="1,2", roofline_context="32k",
)
QUICK = dict(models="tiny", contexts="1k", budgets="128", methods="full,rocketkv", new_tokens=32,
             warmup=1, iters=5, peers=False)

MODEL_KEYS = ("smollm2", "llama8b-shape", "tiny")  # see measure.load_bench_model


class BenchError(ValueError):
    """Bad benchmark settings."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A resolved `rocketkv bench` run (what `resolve_config` returns; its fields are the
    long flags' names)."""

    models: tuple[str, ...]
    contexts: tuple[int, ...]
    budgets: tuple[int, ...]
    methods: tuple[str, ...]  # full first: the reference of every ratio
    new_tokens: int
    warmup: int
    iters: int
    batch: int
    llama_layers: int
    llama_vocab: int
    prefill: str
    prefill_memory_gb: float
    roofline_context: int
    peers: bool
    peer_context: int
    peer_new_tokens: int
    peer_budget: int
    peer_rounds: int
    peer_threads: tuple[int, ...]
    model: Path | None = None
    memory: bool = True
    seed: int = 0
    stage2: str = "auto"
    kernels: str = DEFAULT_KERNELS
    kvpress_python: str | None = None
    json: Path | None = None
    progress: bool = True
    command_line: str = ""
    markdown: bool = False  # print the tables as GitHub markdown (`--report`)

    def as_json(self) -> dict[str, Any]:
        """The fields as JSON values (paths as strings), as `--json` records them."""
        return {k: str(v) if isinstance(v, Path) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, fields: dict[str, Any], **override) -> BenchConfig:
        """The config a results file recorded (fields it lacks keep their defaults, fields
        of other versions are ignored), with `override`."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in fields.items() if k in known}
        missing = [n for n, f in known.items() if n not in values
                   and f.default is dataclasses.MISSING]
        for name in missing:
            values[name] = _parse(name, DEFAULTS[name])
        return cls(**{**values, **override})


def token_counts(text: str, what: str) -> tuple[int, ...]:
    """'4k,8k' -> (4096, 8192): a comma list of token counts (`checks.token_count`)."""
    return checks.token_counts(text, f"--{what}", BenchError)


def parse_methods(text: str) -> list[str]:
    """--methods "a,b" -> ["full", a, b] (full first: the reference of every ratio);
    BenchError for a name that is not a KV method."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise BenchError(f"unknown method(s) {bad}; --methods takes {', '.join(ALL_METHODS)}")
    return ["full"] + [m for m in methods if m != "full"]


def _parse(name: str, value):
    if name in ("contexts", "budgets", "peer_threads"):
        return token_counts(str(value), name.replace("_", "-"))
    if name in ("peer_context", "roofline_context"):
        return checks.token_count(str(value), f"--{name.replace('_', '-')}", BenchError)
    if name == "methods":
        return tuple(parse_methods(value))
    if name == "models":
        models = tuple(m.strip() for m in value.split(",") if m.strip() not in ("", "none"))
        bad = [m for m in models if m not in MODEL_KEYS]
        if bad:
            raise BenchError(f"unknown model(s) {bad}; --models takes {', '.join(MODEL_KEYS)} "
                             "or none")
        return models
    return value


def resolve_config(*, quick: bool = False, **given) -> BenchConfig:
    """The BenchConfig of flag values by field name (None: the default, under `quick` the
    quick one): lists parsed, --json checked writable, warmup + iters within new_tokens,
    the kernel backend available here. BenchError for anything wrong."""
    base = {**DEFAULTS, **(QUICK if quick else {})}
    values = {k: v for k, v in given.items() if v is not None}
    for key, default in base.items():
        values.setdefault(key, default)
    values = {k: _parse(k, v) for k, v in values.items()}
    json_path = values.get("json")
    if json_path is not None:  # before the grid runs, not when it writes the results
        json_path = Path(json_path)
        if json_path.is_dir():
            raise BenchError(f"--json {json_path} is a directory; give the path of a file")
        from ..paths import PathError, check_can_create

        try:
            check_can_create(json_path, f"write --json {json_path}")
        except PathError as e:
            raise BenchError(str(e)) from None
    if values["warmup"] + values["iters"] > values["new_tokens"]:
        raise BenchError(
            f"--warmup + --iters ({values['warmup'] + values['iters']}) must be <= "
            f"--new-tokens ({values['new_tokens']}): the plans size the cache for N new tokens"
        )
    check_kernels(values.get("kernels", DEFAULT_KERNELS))
    return BenchConfig(**values)


def check_kernels(kernels: str) -> None:
    """BenchError for a --kernels backend this machine cannot run, naming the ones it can."""
    from ..kernels.backend import KernelsUnavailableError, check_available

    try:
        check_available(kernels)
    except KernelsUnavailableError as e:
        raise BenchError(f"--kernels {kernels}: {e}") from None


def model_contexts(config, contexts: list[int], N: int) -> list[tuple[int, str]]:
    """(T, label) per requested context that fits: T + N <= the model's context; a request
    of the full context (e.g. 8k for an 8k model) becomes T = max_position - N."""
    limit = config.max_position_embeddings
    out = []
    for c in contexts:
        if c + N <= limit:
            out.append((c, f"{c // 1024}k" if c % 1024 == 0 else str(c)))
        elif c <= limit and limit - N > 0:
            out.append((limit - N, f"{c // 1024}k*"))
    return out
