"""What the commands share: the error a user caused, the help layout, the flags of a KV
method, of sampling and of the kernel backend, and --mesh.

Imports nothing heavy (`rocketkv --help` does not import JAX): the library is imported
inside the functions that need it.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable

from .. import checks
from ..names import DEFAULT_KERNELS, KERNEL_BACKENDS, KERNELS_HELP, METHOD_NAMES, STAGE2_MODES


def flag(check: Callable, parse: type = int, **kwargs) -> Callable[[str], object]:
    """An argparse `type=` for a flag checked by `check`: the text is parsed as `parse`
    (int or float), then checked; either complaint becomes argparse's error for the flag,
    "argument --top-p: must be in (0, 1] (1 = off), got 1.5", exit code 2."""

    def parse_flag(text: str):
        try:
            value = parse(text)
        except ValueError:
            kind = "a number" if parse is float else "an integer"
            raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None
        try:
            return check(value, None, **kwargs)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse_flag.__name__ = getattr(check, "__name__", "value")
    parse_flag.check = check  # the tests find every numeric flag by it
    return parse_flag


def chunk_flag(text: str) -> int | None:
    """--prefill-chunk's text as `prefill_chunk` takes it: 0 is off (None)."""
    n = int(text)
    return None if n == 0 else n


class UserError(Exception):
    """Bad command-line input; printed as one `error:` line, exit code 2."""


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


def add_command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand parser laid out by `HelpFormatter`."""
    return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)


# ------------------------------------------------------------------ the kernel backend
def add_kernels_arg(p) -> None:
    """`--kernels`, the one backend option of generate, chat, eval and bench."""
    p.add_argument("--kernels", default=DEFAULT_KERNELS, choices=KERNEL_BACKENDS,
                   help=KERNELS_HELP)


def add_weight_layout_arg(p) -> None:
    """`--weight-layout` of generate, serve and eval (`weight_layout`)."""
    from ..names import WEIGHT_LAYOUTS

    p.add_argument(
        "--weight-layout", default="auto", choices=("auto", *WEIGHT_LAYOUTS),
        help="stacked: each weight one array over all layers; per-layer: one array per "
        "layer, so on CPU each matmul reads its layer's weights in place instead of a "
        "copied slice (faster decode, a little longer to compile; one device only; numbers "
        "in docs/benchmarks.md); auto: per-layer on a CPU where a layer's weights take "
        "24 MiB or more (Qwen2.5-0.5B and larger; not SmolLM2), else stacked (default: auto)")


def kernels_from_flag(kernels: str) -> str:
    """--kernels, refused (UserError naming what this machine has) where it cannot run."""
    from ..kernels.backend import KernelsUnavailableError, check_available

    try:
        check_available(kernels)
    except KernelsUnavailableError as e:
        raise UserError(f"--kernels {kernels}: {e}") from None
    return kernels


def check_cost_file() -> None:
    """Refuse a damaged calibration file, or one from another device, before any model is
    loaded (plans read it later; `methods/cost_file.py`)."""
    from ..methods.cost_file import calibrated_constants

    calibrated_constants()


# ------------------------------------------------------------------ the KV method
def add_method_args(p, *, default: str = "rocketkv",
                    names: tuple[str, ...] = METHOD_NAMES) -> None:
    """--method (one of `names`), --token-budget, --skip-layers, --kernels, --stage2."""
    p.add_argument("--method", default=default, metavar="NAME",
                   help=f"KV-cache method, one of: {', '.join(names)}")
    p.add_argument(
        "--token-budget", type=flag(checks.token_budget), default=256, metavar="M",
        help="KV tokens read per decode step per KV head (the paper's token budget); "
        "ignored by --method full")
    p.add_argument(
        "--skip-layers", type=flag(checks.skip_layers), default=0, metavar="N",
        help="keep the first N layers dense and unevicted (quest, snapkv, snapkv++, hybrid, "
        "rocketkv; Quest's code and some official RocketKV configs use 2)")
    add_kernels_arg(p)
    add_stage2_arg(p)


def add_stage2_arg(p) -> None:
    """`--stage2` of generate, chat and serve."""
    p.add_argument(
        "--stage2", default="auto", choices=STAGE2_MODES,
        help="sparse selection of hybrid, rocketkv, quest and sparq: auto runs it only where "
        "a cost model says it reads less than dense attention over the method's cache, on / "
        "off force it")


METHOD_FLAGS = {"stage2": "--stage2", "skip_layers": "--skip-layers"}


def method_from_flags(args, names: tuple[str, ...] = METHOD_NAMES):
    """The method of --method, --token-budget, --kernels, --stage2 and --skip-layers
    (`make_method`, the one rule); `names`: the methods the command runs."""
    from ..methods import make_method
    from ..methods.registry import UnknownSettingError

    if args.method not in names:
        raise UserError(f"--method {args.method!r} is not a KV method; choose one of: "
                        f"{', '.join(names)}")
    kernels = kernels_from_flag(args.kernels)
    check_cost_file()
    given = {"stage2": None if args.stage2 == "auto" else args.stage2,
             "skip_layers": args.skip_layers or None}
    try:
        return make_method(args.method, args.token_budget, kernels=kernels, **given)
    except UnknownSettingError as e:
        setting = e.settings[0]
        raise UserError(f"{METHOD_FLAGS[setting]} {given[setting]}: method {args.method!r} "
                        f"has no {setting} ({', '.join(e.holders[setting])} have it); drop "
                        f"{METHOD_FLAGS[setting]}") from None


# ------------------------------------------------------------------ sampling, chunks
def add_sampling_args(p, top_k: bool) -> None:
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


PREFILL_CHUNK_FLAG = flag(checks.prefill_chunk, chunk_flag, off="0")


# ------------------------------------------------------------------ devices
def weight_layout(flag: str, mesh) -> str:
    """--weight-layout, checked against the mesh before anything loads ("auto" is decided
    on the loaded weights: `models.params.auto_layout`, stacked under a mesh, whose
    sharding rules are for stacked weights)."""
    if flag == "auto" and mesh is not None:
        return "stacked"
    if flag == "per-layer" and mesh is not None:
        raise UserError("--weight-layout per-layer runs on one device; drop --mesh or use "
                        "--weight-layout stacked (the sharding rules are for stacked weights)")
    return flag


def load_model_on(model: str | None, mesh, *, layout: str = "auto", **kwargs):
    """`load_model(model)`, restored straight into `mesh`'s parameter shardings when a
    mesh is given (orbax restores each shard where it belongs), its weights in `layout`
    (a --weight-layout value)."""
    import dataclasses

    import jax

    from ..model_store import load_model
    from ..models.params import with_layout

    layout = weight_layout(layout, mesh)
    shardings = None
    if mesh is not None:
        from .. import sharding
        from ..convert.checkpoint import read_checkpoint_config
        from ..model_store import resolve_model

        config = read_checkpoint_config(resolve_model(model))
        shardings = sharding.param_shardings(config, mesh)
    m = load_model(model, shardings=shardings, **kwargs)
    params, _ = with_layout(m.params, layout, jax.default_backend())
    return dataclasses.replace(m, params=params)


def mesh_from_flag(spec: str | None):
    """--mesh -> a mesh (None for one device), with device-count errors in command-line
    words."""
    if spec is None or not spec.strip():
        return None
    import jax

    from .. import sharding

    data, model = sharding.parse_mesh(spec)
    n, have = data * model, jax.device_count()
    if n != have:
        raise UserError(
            f"--mesh {spec} uses {n} devices (data * model) but {have} "
            f"{'are' if have > 1 else 'is'} available ({jax.default_backend()}); give axes "
            f"whose product is {have}, restrict CUDA_VISIBLE_DEVICES to {n} GPUs, or on CPU "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    return sharding.mesh_from_flag(spec)
