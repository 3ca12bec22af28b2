"""The results files of `rocketkv eval`: a header naming what produced them, then records.

Every results file (results.jsonl, fidelity.jsonl, multiturn.jsonl) is JSON lines:

- line 1, the header: ``{"record": "header", "run": ID, "identity": {...}, "info": {...}}``.
  `identity` holds everything that decides what a record means (model weights, config
  and tokenizer digests, dtype, device, kernels, every method setting, seed, suite,
  templates, answer allowances, turns, ...); `ID` is a digest of it. `info` holds what is
  recorded but not compared (software versions, paths, the time the file was started).
- every other line: one record, carrying ``"run": ID``.

Resuming into a file is allowed only with an equal identity; any difference is refused
with one message naming each differing field, its recorded and its current value, and
the fix (a new output directory, or `--force` to start over). What a run's *grid* holds
(methods, budgets, contexts, tasks, samples) is not part of the identity: each record
names its own cell, so a resumed run may add cells, and skips the cells already there.

Writes are appends of whole lines, flushed and fsynced per call. A run killed mid-write
leaves a truncated last line: reading drops it (with a warning), and opening for append
cuts it off first. Any other unreadable line is damage, not a kill: it is an error naming
its line, and the file is left as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HEADER = "header"  # the "record" field of a header line
# Identity fields (dotted paths, longest prefix wins) -> the flag that sets them, so that
# a refusal says what to change.
FLAGS = {
    "model": "--model",
    "seed": "--seed",
    "kernels": "--kernels",
    "skip_layers": "--skip-layers",
    "suite": "--suite",
    "prompt_template": "--ruler-template",
    "max_new_tokens": "--max-new-tokens",
    "fidelity_tokens": "--fidelity-tokens",
    "turns": "--multi-turn",
}
SUFFIX_FLAGS = {"stage2": "--stage2"}  # methods.<name>.stage2
SHOWN_DIFFERENCES = 6  # a refusal lists this many differences, then counts the rest


class ResultsFileError(ValueError):
    """A results file is damaged, or was written by a run of another configuration."""


# ---------------------------------------------------------------------------- lines


def _lines(path: Path, *, repair: bool) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of every complete line; see `read_jsonl`."""
    if not path.exists():
        return []
    if not path.is_file():
        raise ResultsFileError(f"{path} is not a file; use a new output directory")
    data = path.read_bytes()
    lines = data.split(b"\n")
    out: list[tuple[int, dict[str, Any]]] = []
    good_end = 0  # byte offset just past the last complete line
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            out.append((number, _parse(line, path, number)))
        good_end += len(line) + 1
    tail = lines[-1]
    if tail.strip():
        try:
            record = json.loads(tail)
            complete = isinstance(record, dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        if complete:
            out.append((len(lines), record))
            if repair:
                with path.open("ab") as handle:
                    handle.write(b"\n")
        else:
            logger.warning(
                "%s: dropping a truncated last line (%d bytes) left by an interrupted run",
                path,
                len(tail),
            )
            if repair:
                with path.open("r+b") as handle:
                    handle.truncate(good_end)
    return out


def _parse(line: bytes, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise ResultsFileError(
            f"{path}:{number}: damaged line ({reason}); a killed run leaves at most an "
            "unterminated last line, which is dropped by itself, so this is not one. Fix or "
            "delete that line, or use a new output directory; the file was left as it is"
        ) from None
    if not isinstance(record, dict):
        raise ResultsFileError(
            f"{path}:{number}: expected a JSON object; fix or delete that line, or use a new "
            "output directory"
        )
    return record


def read_jsonl(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """Every JSON object of a JSON-lines file (a header line too); [] if it does not exist.

    A last line without a trailing newline that does not parse is the remains of a killed
    write: it is dropped with a warning, and with ``repair=True`` the file is truncated
    to the end of the last complete line so that appends start on a clean line. A last
    line that parses but lacks its newline gets the newline added (repair only). A
    damaged line anywhere else raises ResultsFileError naming it, and nothing is changed.
    """
    return [record for _, record in _lines(Path(path), repair=repair)]


def append_jsonl(handle, records: Iterable[Mapping[str, Any]]) -> None:
    """Append records to an open binary file as one write, then flush and fsync."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    handle.write(payload.encode("utf-8"))
    handle.flush()
    os.fsync(handle.fileno())


# ---------------------------------------------------------------------------- identity


def run_id(identity: Mapping[str, Any]) -> str:
    """A short digest of an identity (canonical JSON), carried by every record."""
    text = json.dumps(identity, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed version of each distribution ("not installed" for a missing one)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def software_info() -> dict[str, str]:
    """Versions recorded in a header's info, not compared on resume (docs/eval-files.md)."""
    return {"python": sys.version.split()[0],
            **package_versions(("rocketkv-jax", "jax", "jaxlib", "numpy"))}


_MISSING = object()


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def identity_differences(
    recorded: Mapping[str, Any], current: Mapping[str, Any], ignore: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
    """(dotted field, recorded value, current value) for every field that differs; a field
    one side lacks counts as different. Fields under a name in `ignore` are skipped."""
    old, new = _flat(recorded), _flat(current)
    skip = lambda name: any(name == i or name.startswith(i + ".") for i in ignore)  # noqa: E731
    return [
        (name, old.get(name, _MISSING), new.get(name, _MISSING))
        for name in sorted(old.keys() | new.keys())
        if not skip(name) and _canonical(old.get(name, _MISSING)) != _canonical(
            new.get(name, _MISSING))
    ]


def _canonical(value: Any) -> Any:
    # tuples and lists are one JSON type: compare what the file would hold
    return value if value is _MISSING else json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(not recorded)"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 24 else text[:12] + "..."


def _flag(name: str) -> str:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        flag = FLAGS.get(".".join(parts[:n]))
        if flag is not None:
            return f"{name} ({flag})"
    flag = SUFFIX_FLAGS.get(parts[-1])
    return f"{name} ({flag})" if flag else name


def describe_differences(differences: Sequence[tuple[str, Any, Any]]) -> str:
    """'seed (--seed): 0 in the file, 1 now; ...': one entry per top-level field (a field
    with several differing parts shows its first and counts the others), the first few
    fields, then a count of the rest."""
    groups: dict[str, list[tuple[str, Any, Any]]] = {}
    for difference in differences:
        groups.setdefault(difference[0].split(".")[0], []).append(difference)
    shown = []
    for group in list(groups.values())[:SHOWN_DIFFERENCES]:
        name, old, new = group[0]
        more = f" (and {len(group) - 1} more {name.split('.')[0]} fields)" if len(group) > 1 else ""
        shown.append(f"{_flag(name)}: {_show(old)} in the file, {_show(new)} now{more}")
    rest = len(groups) - len(shown)
    return "; ".join(shown) + (f"; and {rest} more fields" if rest > 0 else "")


# ---------------------------------------------------------------------------- store


@dataclass(frozen=True)
class Contents:
    """A results file as read: its header (None for a new or empty file) and records."""

    path: Path
    header: dict[str, Any] | None
    records: list[dict[str, Any]]


def read_results(path: str | os.PathLike, *, repair: bool = False) -> Contents:
    """The header and records of a results file, checked for shape: a header only on line
    1, and every record carrying the header's run id. A file of records without a header
    (from a version that wrote none) is read as records only. Raises ResultsFileError."""
    path = Path(path)
    lines = _lines(path, repair=repair)
    header = None
    if lines and lines[0][1].get("record") == HEADER:
        header = lines[0][1]
        if not isinstance(header.get("identity"), dict) or "run" not in header:
            raise ResultsFileError(
                f"{path}:1: a header without its identity; use a new output directory")
        lines = lines[1:]
    for number, record in lines:
        if record.get("record") == HEADER:
            raise ResultsFileError(
                f"{path}:{number}: a second header: two runs were written into one file "
                "(concatenated?); split them, or use a new output directory")
        if header is not None and record.get("run") != header["run"]:
            raise ResultsFileError(
                f"{path}:{number}: a record of run {record.get('run')!r}, but the file's "
                f"header is run {header['run']!r}: it was not written by this run; delete "
                "that line, or use a new output directory")
    return Contents(path, header, [record for _, record in lines])


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a results file, without its header ([] if it does not exist)."""
    return read_results(path).records


class ResultsStore:
    """One results file of a run of known identity: check it, then append to it.

    `check()` only reads: call it for every file of a run before creating anything.
    `open()` creates the directory and the file (header first), or repairs a torn last
    line, and yields `append(records)`. With `force`, `check` ignores what is there and
    `open` replaces the file with a new one holding only the header, and removes the
    files in `replaces` (other files of the run that is started over).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        identity: Mapping[str, Any],
        *,
        info: Mapping[str, Any] | None = None,
        force: bool = False,
        replaces: Sequence[str | os.PathLike] = (),
    ):
        self.path = Path(path)
        self.identity = json.loads(json.dumps(dict(identity), default=str))
        self.run = run_id(self.identity)
        self.info = dict(info or {})
        self.force = force
        self.replaces = [Path(p) for p in replaces]

    def check(self, ignore: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The records already there for this identity (none with `force`); raise
        ResultsFileError if the file is damaged or was written by another configuration
        (fields under a name in `ignore` aside). Changes nothing."""
        if self.force:
            return []
        contents = read_results(self.path)
        if contents.header is None:
            if contents.records:
                raise ResultsFileError(
                    f"{self.path} holds results without a header naming the configuration "
                    "that produced them (an older rocketkv wrote it), so a resume cannot be "
                    f"checked; use a new --out, or --force to start over in {self.path.parent}"
                )
            return []
        differences = identity_differences(contents.header["identity"], self.identity, ignore)
        if differences:
            model = contents.header.get("info", {}).get("model")
            written = (f" (it was written with --model {model})"
                       if model and any(d[0].startswith("model.") for d in differences) else "")
            raise ResultsFileError(
                f"{self.path} holds results of another configuration: "
                f"{describe_differences(differences)}{written}. Its records would not mean "
                "what this run asks for: use a new --out, or --force to start over in "
                f"{self.path.parent}"
            )
        return contents.records

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[Iterable[Mapping[str, Any]]], None]]:
        """Yield append(records): each call adds "run" to the records and writes them as
        one fsynced append. Call `check()` first (this repairs, it does not check)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = self.force or not self.path.exists()
        if not fresh:
            lines = read_jsonl(self.path, repair=True)
            fresh = not lines
        if self.force:
            for path in self.replaces:
                if path.is_file():
                    path.unlink()
        if fresh:
            self._write_header()
        with self.path.open("ab") as handle:

            def append(records: Iterable[Mapping[str, Any]]) -> None:
                append_jsonl(handle, [{"run": self.run, **r} for r in records])

            yield append

    def _write_header(self) -> None:
        """A new file holding only the header, in place atomically (a kill leaves either
        the old file or the new one)."""
        header = {
            "record": HEADER,
            "run": self.run,
            "identity": self.identity,
            "info": {**software_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     **self.info},
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                append_jsonl(handle, [header])
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it; mkstemp: 0600
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
