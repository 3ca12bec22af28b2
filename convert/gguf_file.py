"""Reading a GGUF file safely: every size bounded before gguf-py reads it, and typed access
to the metadata, so a malformed file is one ConversionError that names the file and key.

gguf-py's `GGUFReader` trusts the file: an array that claims 10**18 items makes it loop
appending empty views past the end of the file until memory runs out, and a string or
tensor that runs past the end is silently cut short. `check_gguf_layout` walks the same
header first (the GGUF v2/v3 layout: magic, version, tensor and key/value counts, the
key/values, the tensor infos, then aligned tensor data) and refuses any count or length
that does not fit in the bytes that are left, naming the key or tensor and its byte
offset. After it, everything gguf-py builds is bounded by the file's size. One pass over
the metadata, no copies beyond each string checked for UTF-8: a Python step per
vocabulary string and merge, a few percent of the time gguf-py takes to read them.

`GGUFFile` then reads values by the type the caller needs (`integer`, `number`,
`string`, `strings`, ...): a value of another GGUF type, or out of its range, is refused
by name instead of surfacing later as an IndexError or ZeroDivisionError.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .hf import ConversionError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # what gguf-py's reader handles
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
STRING, ARRAY = 8, 9
# GGUF value type -> (struct code, size)
SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
           6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


class _Reader:
    """A bounded cursor over the file's bytes: every read says what it reads, and one
    past the end is a ConversionError naming it."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.path, self.pos, self.order = buf, path, 0, "<"

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def fail(self, what: str, problem: str, at: int | None = None) -> ConversionError:
        at = self.pos if at is None else at
        return ConversionError(
            f"{self.path} is not a readable GGUF file: {what} at byte {at} {problem} "
            f"(the file is truncated or corrupt)"
        )

    def take(self, n: int, what: str) -> int:
        """Skip `n` bytes; returns where they start."""
        if n > self.left:
            raise self.fail(what, f"needs {n} bytes but the file has {self.left} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def number(self, code: str, size: int, what: str) -> int | float:
        start = self.take(size, what)
        return struct.unpack_from(self.order + code, self.buf, start)[0]

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items that each take at least `min_item_bytes`."""
        at = self.pos
        n = self.number("Q", 8, what)
        if n * min_item_bytes > self.left:
            raise self.fail(what, f"claims {n} items, more than the {self.left} bytes left "
                            f"can hold", at)
        return n

    def string(self, what: str) -> str:
        at = self.pos
        n = self.number("Q", 8, f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(what, f"is not UTF-8 ({e.reason} at byte {start + e.start})",
                            at) from None


def check_gguf_layout(path: str | Path) -> None:
    """Raise ConversionError unless every count, length and tensor extent in the GGUF file
    at `path` fits in the file (see the module doc)."""
    path = Path(path)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 4 + 4 + 8 + 8:
            raise ConversionError(f"{path} is not a GGUF file: {size} bytes, shorter than "
                                  f"the GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check(_Reader(buf, path))


def _check(r: _Reader) -> None:
    if r.buf[:4] != MAGIC:
        raise ConversionError(f"{r.path} is not a GGUF file (it does not start with 'GGUF')")
    r.take(4, "the magic")
    version = r.number("I", 4, "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        r.order = ">"
        version = struct.unpack_from(">I", r.buf, 4)[0]
    if version not in VERSIONS:
        raise ConversionError(f"{r.path} is not a readable GGUF file: its version {version} "
                              f"is not supported (versions {' and '.join(map(str, VERSIONS))} "
                              f"are)")
    n_tensors = r.count("the tensor count", MIN_TENSOR_INFO_BYTES)
    n_kv = r.count("the key/value count", MIN_KV_BYTES)
    keys: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        at = r.pos
        key = r.string(f"the name of metadata key #{i}")
        if key in keys:
            raise r.fail(f"metadata key {key!r}", "appears a second time", at)
        keys.add(key)
        kind = r.number("I", 4, f"the type of {key!r}")
        value = _value(r, kind, f"metadata {key!r}")
        if key == "general.alignment":
            if kind != 4 or value == 0 or value & (value - 1):
                raise r.fail(f"{key!r}", f"is {value!r}, not a power of two (uint32)", at)
            alignment = value
    infos = [_tensor_info(r, i) for i in range(n_tensors)]
    data_start = -(-r.pos // alignment) * alignment
    names: set[str] = set()
    for name, at, offset, nbytes in infos:
        what = f"the info of tensor {name!r}"
        if name in names:
            raise r.fail(what, "repeats a tensor name", at)
        names.add(name)
        if offset % alignment:
            raise r.fail(what, f"has data offset {offset}, not a multiple of the alignment "
                         f"{alignment}", at)
        end = data_start + offset + nbytes
        if end > len(r.buf):
            raise r.fail(what, f"has {nbytes} bytes of data at byte {data_start + offset}, "
                         f"ending past the end of the file ({len(r.buf)} bytes)", at)


def _value(r: _Reader, kind: int, what: str, in_array: bool = False) -> object:
    """Skip one metadata value of GGUF type `kind`; returns scalars (for the alignment)."""
    if kind in SCALARS:
        code, size = SCALARS[kind]
        return r.number(code, size, what)
    if kind == STRING:
        r.string(what)
        return None
    if kind == ARRAY and not in_array:
        at = r.pos
        item = r.number("I", 4, f"the item type of {what}")
        if item == ARRAY:
            raise r.fail(what, "is an array of arrays, which GGUF readers do not support", at)
        if item not in SCALARS and item != STRING:
            raise r.fail(what, f"has unknown item type {item}", at)
        n = r.count(f"the item count of {what}", 8 if item == STRING else SCALARS[item][1])
        if item == STRING:
            for j in range(n):
                r.string(f"item {j} of {what}")
        else:
            r.take(n * SCALARS[item][1], what)
        return None
    raise r.fail(what, f"has unknown value type {kind}")


def _tensor_info(r: _Reader, i: int) -> tuple[str, int, int, int]:
    """(name, info offset, data offset, data bytes) of tensor info #i, its sizes checked."""
    at = r.pos
    name = r.string(f"the name of tensor #{i}")
    what = f"the info of tensor {name!r}"
    n_dims = r.number("I", 4, f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise r.fail(what, f"has {n_dims} dimensions (1 to {MAX_DIMS} are possible)", at)
    dims = [r.number("Q", 8, f"dimension {d} of {what}") for d in range(n_dims)]
    raw_type = r.number("I", 4, f"the type of {what}")
    offset = r.number("Q", 8, f"the data offset of {what}")
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
    except (ValueError, KeyError):
        raise r.fail(what, f"has unknown tensor type {raw_type}", at) from None
    n = 1
    for d in dims:
        n *= d
    if n > len(r.buf) * block:  # more elements than any encoding of the file can hold
        raise r.fail(what, f"claims shape {dims} ({n} elements), more than the file holds", at)
    if dims[0] % block:
        raise r.fail(what, f"has a first dimension {dims[0]} that is not a multiple of its "
                     f"type's block size {block}", at)
    return name, at, offset, n // block * type_size


# ------------------------------------------------------------------ typed metadata
_INTEGER_TYPES = {GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16,
                  GGUFValueType.INT16, GGUFValueType.UINT32, GGUFValueType.INT32,
                  GGUFValueType.UINT64, GGUFValueType.INT64}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_MISSING = object()


class GGUFFile:
    """A GGUF file whose layout was checked (`check_gguf_layout`), read by gguf-py, with
    typed metadata getters: each takes a default (returned when the key is absent; without
    one the key is required) and raises ConversionError naming the file and key."""

    REQUIRED = _MISSING  # the default that makes a key required

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_gguf_layout(self.path)
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # gguf-py raises ValueError, KeyError, ...; a safety net
            raise ConversionError(
                f"{self.path} is not a readable GGUF file: {type(e).__name__}: {e}"
            ) from None

    @property
    def tensors(self) -> list[Any]:
        return self.reader.tensors

    def has(self, key: str) -> bool:
        return self.reader.get_field(key) is not None

    def error(self, key: str, problem: str) -> ConversionError:
        return ConversionError(f"{self.path}: GGUF metadata {key} {problem}")

    def _get(self, key: str, want: str, ok) -> Any:
        """The value of `key` (_MISSING when absent), refused unless `ok(its types)`."""
        field = self.reader.get_field(key)
        if field is None:
            return _MISSING
        types = list(field.types)
        if not ok(types):
            got = " of ".join(t.name.lower() for t in types) or "no value"
            raise self.error(key, f"must be {want}, got {got}")
        try:
            return field.contents()
        except UnicodeDecodeError as e:
            raise self.error(key, f"is not UTF-8 text: {e}") from None

    def _absent(self, key: str, default: Any) -> Any:
        if default is _MISSING:
            raise self.error(key, "is missing")
        return default

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
                below: int | None = None) -> Any:
        """An integer in [minimum, below) (bounds optional)."""
        value = self._get(key, "an integer",
                          lambda t: len(t) == 1 and t[0] in _INTEGER_TYPES)
        if value is _MISSING:
            return self._absent(key, default)
        value = int(value)
        if (minimum is not None and value < minimum) or (below is not None and value >= below):
            bounds = [f">= {minimum}"] * (minimum is not None) + [f"< {below}"] * (
                below is not None)
            raise self.error(key, f"is {value}, but must be {' and '.join(bounds)}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> Any:
        """A finite float (an integer value too); `positive`: > 0."""
        value = self._get(key, "a number", lambda t: len(t) == 1 and (
            t[0] in _FLOAT_TYPES or t[0] in _INTEGER_TYPES))
        if value is _MISSING:
            return self._absent(key, default)
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise self.error(key, f"is {value}, but must be a finite"
                             f"{' positive' if positive else ''} number")
        return value

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, "true or false", lambda t: t == [GGUFValueType.BOOL])
        return self._absent(key, default) if value is _MISSING else bool(value)

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, "a string", lambda t: t == [GGUFValueType.STRING])
        return self._absent(key, default) if value is _MISSING else value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """An array of strings (an empty array too)."""
        value = self._get(key, "an array of strings", lambda t: t[:1] == [
            GGUFValueType.ARRAY] and t[1:] in ([], [GGUFValueType.STRING]))
        return self._absent(key, default) if value is _MISSING else value

    def integers(self, key: str, default: Any = _MISSING) -> Any:
        """An array of integers (an empty array too)."""
        value = self._get(key, "an array of integers", lambda t: t[:1] == [
            GGUFValueType.ARRAY] and (len(t) == 1 or (len(t) == 2 and t[1] in _INTEGER_TYPES)))
        return self._absent(key, default) if value is _MISSING else [int(v) for v in value]
