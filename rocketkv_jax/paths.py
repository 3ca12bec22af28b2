"""Filesystem faults as user errors: an unwritable or read-only directory, a file where a
directory should be, a full disk. Checked before long work starts, and any OSError met
while writing is said in one line that names the path."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

REASONS = {
    errno.ENOSPC: "no space left on the device (the disk is full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EEXIST: "it exists and is not a directory",
    errno.EISDIR: "it is a directory",
}


def cache_root() -> Path:
    """The user cache: converted named models, the cost-model calibration
    ($ROCKETKV_JAX_CACHE, default ~/.cache/rocketkv_jax)."""
    return Path(os.environ.get("ROCKETKV_JAX_CACHE", Path.home() / ".cache" / "rocketkv_jax"))


class PathError(ValueError):
    """A path the program cannot write (or read): printed as one `error:` line."""


def describe_os_error(e: OSError, doing: str | None = None) -> str:
    """"cannot write the checkpoint: /x/y: read-only file system" from any OSError."""
    where = f"{e.filename}: " if e.filename else ""
    reason = REASONS.get(e.errno, e.strerror or str(e))
    return f"{f'cannot {doing}: ' if doing else ''}{where}{reason}"


def check_can_create(path: Path, doing: str) -> None:
    """Raise PathError unless `path` can be created: its nearest existing ancestor is a
    directory a file can be written in. Creates nothing (a probe file is removed)."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PathError(f"cannot {doing}: {ancestor} is a file, not a directory")
    _probe(ancestor, doing)


def ensure_writable_dir(directory: Path, doing: str) -> None:
    """Create `directory` (with parents) and check a file can be written in it."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(describe_os_error(e, doing)) from None
    _probe(Path(directory), doing)


def _probe(directory: Path, doing: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        e.filename = e.filename or str(directory)
        raise PathError(describe_os_error(e, doing)) from None


# ---------------------------------------------------------------- temporary siblings
# A conversion writes into hidden siblings of its output: ".<out>.<kind>-<pid>@<host>-XXXX".
# The pid and host let a later run remove those of a process that died (SIGKILL, power
# loss) without touching a live one's.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|gguf)-(?P<pid>\d+)@(?P<host>.+)-"
                        r"[A-Za-z0-9_]+$")


def temp_prefix(name: str, kind: str) -> str:
    """mkdtemp prefix for a hidden temporary sibling of `name` owned by this process."""
    return f".{name}.{kind}-{os.getpid()}@{_host()}-"


def remove_stale_temp_dirs(parent: Path, name: str) -> list[Path]:
    """Remove `parent`'s temporary siblings of `name` left by dead processes of this host.
    Returns what was removed."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TEMP_NAME.match(p.name)
        if not m or m["name"] != name or m["host"] != _host() or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def not_a_file(path: Path) -> str | None:
    """None if `path` is a regular file (or a link to one), else what it is instead:
    "does not exist", "is a directory, not a file", ... A FIFO or device is refused too:
    reading one would block or never end."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist" if not path.is_symlink() else "is a broken symlink"
    except NotADirectoryError:
        return "does not exist (a component of the path is a file, not a directory)"
    except OSError as e:
        return f"cannot be read: {REASONS.get(e.errno, e.strerror or str(e))}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    return "is not a regular file (a pipe, socket or device)"


def as_path(value: object, name: str, error: type[Exception] = TypeError) -> Path:
    """`value` as a Path, or `error` (the entry point's own class) naming the argument,
    not a TypeError from deep inside pathlib for an int or None."""
    if isinstance(value, str | os.PathLike):
        return Path(value)
    raise error(f"{name} must be a path (str or os.PathLike), got "
                f"{type(value).__name__} {value!r}")
