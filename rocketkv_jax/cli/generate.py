"""`rocketkv generate`: text from one prompt (streamed) or a batch file (JSON lines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import checks
from ..names import DEFAULT_PREFILL_CHUNK
from ..user_text import check_prompt, check_utf8, decode_utf8, read_text_file
from .common import (
    PREFILL_CHUNK_FLAG,
    UserError,
    add_command,
    add_method_args,
    add_sampling_args,
    add_weight_layout_arg,
    flag,
    load_model_on,
    mesh_from_flag,
    method_from_flags,
)
from .streaming import PrefillBar, Streamer

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


def add_parser(sub):
    g = add_command(sub, "generate", help="generate text", description=GENERATE_HELP,
                    epilog=EXAMPLES)
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
    add_method_args(g)
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
    add_weight_layout_arg(g)
    g.set_defaults(func=cmd_generate)
    return g


def read_prompts(args) -> tuple[list[str], list[str], bool]:
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
        text, where = read_stdin(), "standard input"
    else:
        raise UserError("no prompt: give --prompt, --prompt-file, --batch-file or pipe stdin")
    return [check_prompt(text, where, UserError)], [where], False


def read_stdin() -> str:
    """All of standard input as UTF-8 text (bytes decoded here, so a bad byte is reported
    with its line)."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # a text stream without bytes underneath (tests' StringIO)
        return check_utf8(sys.stdin.read(), "standard input", UserError)
    return decode_utf8(buffer.read(), "standard input", UserError)


METHOD_FLAGS = {"stage2": "--stage2", "skip_layers": "--skip-layers"}


def check_generate_flags(args) -> None:
    """Warn about generate flags that do nothing together (each flag's own range is
    checked as it is parsed: `checks`)."""
    if args.temperature == 0 and (args.top_k or args.top_p < 1.0):
        flags = " and ".join(f for f, on in (("--top-k", args.top_k), ("--top-p",
                                                                         args.top_p < 1.0)) if on)
        print(f"warning: {flags} have no effect with --temperature 0 (greedy decoding); set "
              f"--temperature > 0 to sample", file=sys.stderr)


def cmd_generate(args) -> int:
    from ..engine.compile import enable_compilation_cache
    from ..engine.generate import GenerateError, check_request, generate_ids
    from ..sampling import Sampling

    check_generate_flags(args)
    method = method_from_flags(args)
    prompts, where, batch_mode = read_prompts(args)
    enable_compilation_cache(single_device=args.mesh is None)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    mesh = mesh_from_flag(args.mesh)
    model = load_model_on(args.model, mesh, layout=args.weight_layout,
                          check_weights=args.check_weights, reconvert=args.reconvert)
    tok = model.tokenizer
    ids = [tok.encode_chat(p) if args.chat else tok.encode(p) for p in prompts]
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
    stop = tok.stop_ids(model.config.eos_token_ids, chat=args.chat)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                  stop_ids=stop, mesh=mesh, prefill_chunk=args.prefill_chunk,
                  kernels=args.kernels)
    if not batch_mode:
        streamer = None if args.no_stream else Streamer(tok, stop)
        with PrefillBar() as bar:
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
        rows = ids[start : start + args.batch_size]
        out = generate_ids(model.params, model.config, rows, method, **common)
        for i, toks in enumerate(out.tokens):
            text = tok.decode([t for t in toks if t not in stop])
            print(json.dumps({"index": start + i, "prompt": prompts[start + i],
                              "output": text}), flush=True)
        # through the bar, so the line is not glued to it
        bar.write(out.stats.summary().replace("[stats] ", f"[stats] batch {k}/{n_batches} | ",
                                              1), file=sys.stderr)
    return 0


