"""The cost model's measured constants: one JSON file per device, written by
`rocketkv bench --calibrate` and read at plan time by `cost.constants_for`, and the
constants themselves (`CostConstants`).

Where the file is:
  - $ROCKETKV_JAX_COST_FILE, when set: that file (it must exist), or "off" for the
    built-in constants;
  - otherwise `<user cache>/cost/<device>.json` ($ROCKETKV_JAX_CACHE, default
    ~/.cache/rocketkv_jax), if the calibration has written one for this device;
  - otherwise none: the built-in constants (`cost.py`).
A file that cannot be read as constants, or that was measured on another device, is
refused (`CostFileError`, a ValueError: one `error:` line in the CLI) rather than replaced
by the built-ins: a plan would otherwise silently use constants nobody asked for.

The file:
    {"format": "rocketkv-jax cost constants", "version": 1,
     "device": {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"},
     "backends": {"reference": {<CostConstants fields>}, "triton": {...}},
     "jax": "0.11.2", "created": "...", "measurements": {...}}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
from pathlib import Path

from ..paths import cache_root

COST_FILE_ENV = "ROCKETKV_JAX_COST_FILE"
FORMAT = "rocketkv-jax cost constants"
VERSION = 1
OFF = ("off", "builtin", "none", "0")


@dataclasses.dataclass(frozen=True)
class CostConstants:
    """What a kernel backend's sparse path costs, in bytes at the dense path's rate.

    score_bytes: per slot per query head, the f32 approximate-score pipeline.
    rank_bytes: per slot, `lax.top_k` over the group-mean score and the shared passes.
    gather_factor: a gathered K/V row costs this many streamed ones.
    metadata_factor: a page-bound element (channel-major, R of D channels) costs this many
      of its bytes.
    key_channel_factor: the same for R channels read from row-major key rows (stage 2 at
      page 1, SparQ).
    """

    score_bytes: float
    rank_bytes: float
    gather_factor: float
    metadata_factor: float
    key_channel_factor: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"cost constant {f.name} must be a positive finite number, "
                                 f"got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


class CostFileError(ValueError):
    """A calibration file that is missing, damaged or from another device."""


def host_cpu() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_identity() -> dict[str, str]:
    """What a calibration is valid for: JAX's default device platform and kind, and on a
    CPU (whose device_kind is just "cpu") the host CPU's model name."""
    import jax

    dev = jax.devices()[0]
    ident = {"platform": dev.platform, "device_kind": dev.device_kind}
    if dev.platform == "cpu":
        ident["host_cpu"] = host_cpu()
    return ident


def describe_device(ident: dict) -> str:
    kind = ident.get("host_cpu") or ident.get("device_kind", "?")
    return f"{kind} ({ident.get('platform', '?')})"


def default_path(ident: dict[str, str] | None = None) -> Path:
    """`<user cache>/cost/<platform>-<device>.json` for this (or the given) device."""
    ident = ident or device_identity()
    name = f"{ident['platform']}-{ident.get('host_cpu') or ident['device_kind']}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower()
    return cache_root() / "cost" / f"{slug}.json"


def chosen_path() -> Path | None:
    """The calibration file plans use (see the module doc), or None for the built-ins."""
    env = os.environ.get(COST_FILE_ENV, "").strip()
    if env.lower() in OFF:
        return None
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise CostFileError(
                f"{COST_FILE_ENV}={env}: no such file; run `rocketkv bench --calibrate "
                f"--calibrate-file {env}` to write it, or unset {COST_FILE_ENV} (off: the "
                "built-in constants)")
        return path
    path = default_path()
    return path if path.is_file() else None


def calibrated_constants():
    """(path, {backend: CostConstants}) of the chosen file, or None (built-ins)."""
    path = chosen_path()
    if path is None:
        return None
    stat = path.stat()
    return path, _read_checked(str(path.absolute()), stat.st_mtime_ns, stat.st_size,
                               _identity_key(device_identity()))


def _identity_key(ident: dict) -> tuple:
    return tuple(sorted(ident.items()))


@functools.lru_cache(maxsize=8)  # plans are made per request: read a file once
def _read_checked(path: str, mtime_ns: int, size: int, ident_key: tuple) -> dict:
    found, backends = read(Path(path))
    here = dict(ident_key)
    if any(found.get(k) != v for k, v in here.items()):
        raise CostFileError(
            f"{path} holds cost constants measured on {describe_device(found)}, but this "
            f"process runs on {describe_device(here)}; run `rocketkv bench --calibrate` "
            f"here, or set {COST_FILE_ENV}=off for the built-in constants")
    return backends


def read(path: Path):
    """(device identity, {backend: CostConstants}) of a calibration file; CostFileError
    naming the file and what is wrong with it."""

    def bad(why: str) -> CostFileError:
        return CostFileError(f"{path} is not a usable cost-constants file: {why}; run "
                             "`rocketkv bench --calibrate` to write it again")

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise bad(f"not JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise bad("not text") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"its 'format' is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise bad(f"version {data.get('version')!r}, this rocketkv-jax reads {VERSION}")
    ident, backends = data.get("device"), data.get("backends")
    if not isinstance(ident, dict) or not {"platform", "device_kind"} <= set(ident):
        raise bad("no 'device' with 'platform' and 'device_kind'")
    if not isinstance(backends, dict) or not backends:
        raise bad("no 'backends'")
    out = {}
    for name, values in backends.items():
        if name not in ("reference", "triton"):
            raise bad(f"unknown backend {name!r} (expected reference, triton)")
        try:
            out[name] = CostConstants(**values)
        except TypeError:
            raise bad(f"backend {name!r} must have exactly the fields "
                      f"{', '.join(CostConstants.__dataclass_fields__)}") from None
        except ValueError as e:
            raise bad(f"backend {name!r}: {e}") from None
    return ident, out


def write(path: Path, backends: dict, ident: dict, **extra) -> Path:
    """Write a calibration file atomically (a reader never sees half a file). backends:
    {name: CostConstants}; extra: more top-level fields (jax, created, measurements)."""
    data = {"format": FORMAT, "version": VERSION, "device": ident,
            "backends": {name: c.as_dict() for name, c in backends.items()}, **extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _read_checked.cache_clear()
    return path
