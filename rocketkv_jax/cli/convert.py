"""`rocketkv-convert SRC OUT`: HF safetensors directory or Llama GGUF -> orbax checkpoint."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

from .. import interrupts
from ..names import CHECKPOINT_DTYPES

# JAX, orbax and the converters are imported inside main(), after the Ctrl-C handler is
# installed: an interrupt in the first seconds is then honoured, not lost in a gc callback.

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
examples:
  rocketkv-convert ./Llama-3.2-1B-Instruct ./ckpt/llama32-1b
      HF directory (config.json + model.safetensors or a sharded
      model.safetensors.index.json) -> bfloat16 checkpoint; tokenizer files are copied
  rocketkv-convert ./SmolLM2-135M-Instruct.Q4_1.gguf ./ckpt/smollm2 --dtype float32
      Llama GGUF: dequantized to float32, tokenizer rebuilt from the GGUF metadata
  rocketkv-convert ./Mistral-7B-v0.1 ./ckpt/mistral --force
      replace an existing checkpoint

OUT gets params/ (orbax), config.json and the tokenizer files. It is written to a
temporary sibling and renamed at the end, so a failed run leaves nothing behind.
exit status: 0 ok, 2 bad input (message on stderr), 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rocketkv-convert",
        description="Convert a Llama/Mistral model (Hugging Face safetensors directory or\n"
        "llama.cpp .gguf file) into a rocketkv-jax orbax checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="HF model directory or .gguf file")
    parser.add_argument("out", metavar="OUT", help="checkpoint directory to create")
    parser.add_argument(
        "--dtype", choices=CHECKPOINT_DTYPES, default="bfloat16",
        help="dtype of the stored params (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    previous = signal.getsignal(signal.SIGINT)
    installed = interrupts.install()
    try:
        return _main(argv)
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous)
            interrupts.reset()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)

    start = time.perf_counter()
    out_existed = os.path.exists(args.out)
    try:
        from ..convert.checkpoint import convert_any
        from ..convert.hf import ConversionError
        from ..models.config import ConfigError
        from ..paths import PathError, describe_os_error
    except KeyboardInterrupt:  # a second Ctrl-C while importing
        print("rocketkv-convert: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        interrupts.check()
        config = convert_any(args.src, args.out, args.dtype, progress=not args.quiet,
                             force=args.force)
    except KeyboardInterrupt:
        done = not out_existed and os.path.exists(args.out)  # Ctrl-C after the final rename
        what = f"{args.out} was already complete" if done else "nothing was written"
        print(f"rocketkv-convert: interrupted; {what}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConversionError, ConfigError, PathError) as e:
        print(f"rocketkv-convert: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # the filesystem, not our bug: one line naming the path
        print(f"rocketkv-convert: error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a bug, or a corrupt file a library chokes on in a new way
        if os.environ.get("ROCKETKV_DEBUG"):
            traceback.print_exc()
        print(f"rocketkv-convert: error: unexpected {type(e).__name__}: {e} "
              f"(set ROCKETKV_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    if not args.quiet:
        n = sum(_numel(s) for s in config.param_shapes().values())
        print(f"converted {args.src} -> {args.out}: {config.model_type}, {config.num_layers} "
              f"layers, {n / 1e6:.1f}M params, {args.dtype}, "
              f"{time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
