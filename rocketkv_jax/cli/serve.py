"""`rocketkv serve`: an OpenAI-compatible HTTP server over the serving engine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import checks
from ..names import METHOD_NAMES
from .common import (
    UserError,
    add_command,
    add_kernels_arg,
    add_stage2_arg,
    add_weight_layout_arg,
    flag,
    load_model_on,
    mesh_from_flag,
)

SERVE_HELP = """Serve a model over HTTP with OpenAI's API: POST /v1/chat/completions and
/v1/completions (streaming or not), GET /v1/models and GET /health. Requests from many
clients share a fixed set of decode slots; each request may name its own KV method and
token budget in the body ("method", "token_budget"), else --method and --token-budget apply.

The server listens on 127.0.0.1 only unless --host says otherwise. With --api-key (or
$ROCKETKV_JAX_API_KEY, which keeps the key out of the process list) every /v1 request
must send 'Authorization: Bearer KEY'.

SIGTERM or Ctrl-C stops admitting (new requests and /health answer 503), lets the running
requests finish, then exits 0; a second signal stops at once. docs/serving.md describes
the endpoints, the fields and the errors."""

SERVE_EXAMPLES = """examples:
  rocketkv serve
  rocketkv serve --model qwen2.5-coder-0.5b --port 8080 --slots 16
  ROCKETKV_JAX_API_KEY=secret rocketkv serve --host 0.0.0.0

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
"""

API_KEY_ENV = "ROCKETKV_JAX_API_KEY"


def _gib(value, name, error=ValueError, zero: bool = False) -> float:
    if zero:
        return checks.real(value, name, error, ok=lambda x: x >= 0,
                           rule="a finite number >= 0 (0 = off)")
    return checks.positive_number(value, name, error)


def _stall(value, name, error=ValueError) -> float:
    return checks.real(value, name, error, ok=lambda x: x == 0 or x > 1,
                       rule="a finite number > 1, or 0 (always --mixed-chunk tokens)")


def add_parser(sub):
    s = add_command(sub, "serve", help="serve a model over HTTP (OpenAI's API)",
                    description=SERVE_HELP, epilog=SERVE_EXAMPLES)
    s.add_argument("--model", default=None, metavar="MODEL",
                   help="checkpoint dir or a named model: smollm2, qwen2.5-coder-0.5b "
                   "(default: smollm2); clients send this name as 'model'")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 listens on every interface")
    s.add_argument("--port", type=flag(checks.integer, low=1, high=65536), default=8000,
                   help="TCP port")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 request "
                   f"(default: ${API_KEY_ENV} if set, else no key)")
    s.add_argument("--method", default="rocketkv", metavar="NAME",
                   help=f"KV-cache method of requests that name none, one of: "
                   f"{', '.join(METHOD_NAMES)}")
    s.add_argument("--token-budget", type=flag(checks.token_budget), default=256,
                   metavar="M", help="token budget of requests that name none")
    s.add_argument("--slots", type=flag(checks.count), default=8, metavar="N",
                   help="requests decoded together (the engine's decode slots)")
    s.add_argument("--max-queue", type=flag(checks.count, low=0), default=64, metavar="N",
                   help="requests that may wait for a slot; more are answered 429 with "
                   "Retry-After")
    s.add_argument("--prefill-chunk", type=flag(checks.prefill_chunk), default=256,
                   metavar="TOKENS",
                   help="prompt tokens per prefill chunk while no request decodes")
    s.add_argument("--mixed-chunk", type=flag(checks.count, low=0), default=16,
                   metavar="TOKENS",
                   help="prompt tokens prefilled per decode step while requests decode, "
                   "in the same program as their step (weights read once): smaller keeps "
                   "their tokens flowing while a long prompt prefills, larger prefills it "
                   "sooner; must divide --prefill-chunk; 0 = off (one --prefill-chunk "
                   "between two decode steps); off under --mesh")
    s.add_argument("--max-stall", type=flag(_stall, float), default=1.75, metavar="X",
                   help="while a prompt prefills beside running requests, its chunk adapts "
                   "(from --mixed-chunk up to --prefill-chunk) so that a decode step takes "
                   "at most X times as long as without it; 0 = always --mixed-chunk tokens")
    s.add_argument("--kv-memory", type=flag(_gib, float), default=4.0, metavar="GiB",
                   help="device memory for the running requests' KV caches and the prefill "
                   "in flight; a request waits until its cache fits")
    s.add_argument("--prefix-cache", type=flag(_gib, float, zero=True), default=1.0,
                   metavar="GiB",
                   help="device memory for full-KV prompt prefixes that later requests "
                   "extend (a chat that grows turn by turn prefills only its new tokens); "
                   "0 = off")
    s.add_argument("--max-body-mb", type=flag(checks.count), default=8, metavar="N",
                   help="largest request body in MiB; larger ones are answered 413")
    s.add_argument("--drain-timeout", type=flag(checks.positive_number, float), default=600,
                   metavar="S", help="seconds a stop waits for running requests to finish")
    s.add_argument("--mesh", default=None, metavar="SPEC",
                   help="serve on several devices, e.g. data=2,model=2: the running requests' "
                   "rows over 'data', attention heads / KV heads and the MLP over 'model' "
                   "(default: one device); --slots is rounded up to a multiple of 'data'")
    s.add_argument("--distributed", default=None, metavar="SPEC",
                   help="serve on several hosts: run this same command on every host, with "
                   "--mesh over all their devices. SPEC is ADDRESS:PORT,PROCESSES,ID (the "
                   "coordinator, here process 0, the number of processes, this one's id) "
                   "or auto (SLURM, Open MPI, Cloud TPU). Process 0 serves HTTP; the others "
                   "run the same turns and exit when it stops (docs/serving.md)")
    add_kernels_arg(s)
    add_stage2_arg(s)
    add_weight_layout_arg(s)
    s.set_defaults(func=cmd_serve)
    return s


def served_name(model: str | None) -> str:
    """The name clients send as `model`: a named model's name, a checkpoint's folder name."""
    from ..model_store import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    return Path(model).name or str(model)


def check_method(method: str, budget: int) -> None:
    from ..methods import make_method
    from ..methods.base import MethodConfigError

    try:
        make_method(method, budget)
    except MethodConfigError as e:
        raise UserError(f"--method {method}: {e}") from None


def cmd_serve(args) -> int:
    from ..engine.compile import enable_compilation_cache
    from ..server import create_app
    from ..server.run import serve
    from .common import kernels_from_flag

    check_method(args.method, args.token_budget)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api-key (or ${API_KEY_ENV}) is empty; give a key or leave it out")
    if args.mixed_chunk and args.prefill_chunk % args.mixed_chunk:
        raise UserError(f"--mixed-chunk {args.mixed_chunk} must divide --prefill-chunk "
                        f"{args.prefill_chunk} (chunks start at multiples of it)")
    from ..engine.scheduler import Engine  # the serving engine (issue 30)

    link = start_distributed(args.distributed, args.mesh)  # before any other JAX call
    kernels = kernels_from_flag(args.kernels)
    enable_compilation_cache(single_device=args.mesh is None)
    mesh = mesh_from_flag(args.mesh)
    model = load_model_on(args.model, mesh, layout=args.weight_layout)
    gib = 2**30
    engine = Engine(model.params, model.config, slots=args.slots, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk, mixed_chunk=args.mixed_chunk,
                    max_stall=args.max_stall or None,
                    kernels=kernels, stage2=args.stage2, mesh=mesh, link=link,
                    kv_memory_bytes=int(args.kv_memory * gib),
                    prefix_cache_bytes=int(args.prefix_cache * gib))
    if link is not None and not link.leader:
        print(f"rocketkv serve: process {link.process} of {link.processes} follows process "
              f"0's turns", file=sys.stderr, flush=True)
        engine.wait()
        return 0
    name = served_name(args.model)
    app = create_app(engine, model.tokenizer, name, api_key=api_key,
                     max_body_bytes=args.max_body_mb * 2**20, default_method=args.method,
                     default_budget=None if args.method == "full" else args.token_budget)
    print(f"rocketkv serve: {name} ({model.config.max_position_embeddings} tokens of context) "
          f"on http://{args.host}:{args.port}, method {args.method} (budget "
          f"{args.token_budget}), {args.slots} slots{', API key required' if api_key else ''}",
          file=sys.stderr, flush=True)
    try:
        serve(app, args.host, args.port, drain_timeout=args.drain_timeout)
    finally:
        engine.close()
    return 0



def parse_distributed(spec: str) -> dict:
    """--distributed -> jax.distributed.initialize's arguments ({} for auto)."""
    if spec.strip() == "auto":
        return {}
    parts = [x.strip() for x in spec.split(",")]
    if len(parts) != 3 or ":" not in parts[0]:
        raise UserError(f"--distributed {spec!r}: give ADDRESS:PORT,PROCESSES,ID (e.g. "
                        f"10.0.0.1:7777,2,0) or auto")
    try:
        processes, process = int(parts[1]), int(parts[2])
    except ValueError:
        raise UserError(f"--distributed {spec!r}: PROCESSES and ID are whole numbers") from None
    if processes < 2 or not 0 <= process < processes:
        raise UserError(f"--distributed {spec!r}: needs 2 or more processes and an ID from 0 "
                        f"to PROCESSES - 1")
    return {"coordinator_address": parts[0], "num_processes": processes,
            "process_id": process}


def start_distributed(spec: str | None, mesh: str | None):
    """Join the `jax.distributed` run --distributed names (before any other JAX call) and
    return this process's TurnLink; None without --distributed."""
    if spec is None:
        return None
    kwargs = parse_distributed(spec)
    if mesh is None:
        raise UserError("--distributed needs --mesh over the devices of every process")
    import jax

    from ..engine.turns import TurnLink

    # CPU processes exchange their collectives over gloo (GPUs use NCCL either way)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"--distributed {spec}: {e}") from None
    return TurnLink.from_runtime()
