"""The command line: `rocketkv` (demo, generate, chat, eval, bench, models, serve) and
`rocketkv-convert`.

One module per command (`demo.py`, `generate.py`, `chat.py`, `eval.py`, `bench.py`,
`models.py`, `serve.py`, `convert.py`), each with its parser (`add_parser`) and its `cmd_*`;
`common.py` holds the flags they share and `streaming.py` what they print while working.
argparse lives here only: the commands turn flags into plain arguments of the library,
which never imports this package.

Errors in what the user asked for (a missing checkpoint, an over-long prompt, an unknown
method) end with one `error:` line and exit code 2, never a traceback from inside JAX.
Nothing here imports JAX until a command runs: `--help` stays fast.
"""

from __future__ import annotations

import sys

EXAMPLES = """examples:
  rocketkv demo
  rocketkv generate --chat --prompt "What is the capital of France?"
  rocketkv generate --method rocketkv --token-budget 256 --prompt-file essay.txt
  rocketkv chat --document paper.txt --method rocketkv-mt
  rocketkv eval --smoke --out runs/smoke
  rocketkv bench --quick
  rocketkv serve --port 8000
"""


def build_parser():
    """The `rocketkv` command tree: each command module adds its own subcommand."""
    import argparse

    from . import bench, chat, demo, generate, models, serve
    from . import eval as eval_command
    from .common import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="rocketkv", description="RocketKV KV-cache compression for Llama/Mistral in JAX.",
        epilog=EXAMPLES, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (demo, generate, eval_command, bench, models, chat, serve):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error argparse has printed (2)
        return e.code if isinstance(e.code, int) else 2
    from ..engine.requests import GenerateError
    from ..model_store import ModelNotFoundError
    from ..models.config import ConfigError
    from ..tokenizer import TokenizerError
    from .common import UserError

    try:
        return args.func(args)
    except (UserError, GenerateError, ModelNotFoundError, ConfigError, TokenizerError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or missing path: name it, no traceback
        from ..paths import describe_os_error

        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
