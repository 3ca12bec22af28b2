"""Text users give (prompts, chat turns, documents), read and checked in one place.

Text must be UTF-8. Bytes that are not arrive in three ways: from a file or a pipe (read
here as bytes and decoded), from the command line or a terminal (Python decodes those with
`surrogateescape`, so each bad byte becomes a lone surrogate U+DC80..U+DCFF), or from a
JSON "\\udcff" escape. Each is refused with an error that names where the text came from,
the line and the byte. A prompt must also hold some text: one made of whitespace only is
refused wherever it comes from.
"""

from __future__ import annotations

from pathlib import Path


class TextError(ValueError):
    """Text that cannot be used: not UTF-8, empty, or a file that cannot be read."""


def _line_and_column(text, index: int) -> tuple[int, int]:
    newline = b"\n" if isinstance(text, bytes) else "\n"
    line = text.count(newline, 0, index) + 1
    column = index - (text.rfind(newline, 0, index) + 1) + 1
    return line, column


def decode_utf8(data: bytes, where: str, error: type[Exception] = TextError) -> str:
    """`data` decoded as UTF-8, or `error` naming `where` (a file, "standard input"), the
    line and the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = _line_and_column(data, e.start)
        raise error(f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte "
                    f"{column} of the line); convert it to UTF-8") from None


def check_utf8(text: str, where: str, error: type[Exception] = TextError) -> str:
    """`text` unchanged if it is valid Unicode (encodable as UTF-8); else `error` naming
    `where` (a flag, "path:line" of a file), and the line and character of the first
    undecodable byte."""
    if not isinstance(text, str):
        raise error(f"{where}: expected text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        line, column = _line_and_column(text, e.start)
        code = ord(text[e.start])
        what = (f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF
                else f"lone surrogate U+{code:04X}")
        at = f"line {line}, character {column}" if "\n" in text else f"character {column}"
        raise error(f"{where}: not UTF-8 text ({what} at {at})") from None
    return text


def check_prompt(text: str, where: str, error: type[Exception] = TextError) -> str:
    """A prompt: valid UTF-8 text holding more than whitespace."""
    check_utf8(text, where, error)
    if not text.strip():
        raise error(f"{where}: the prompt is empty" + (" (only whitespace)" if text else ""))
    return text


def read_text_file(path: Path, what: str, error: type[Exception] = TextError) -> str:
    """The text of `path` (a `what`: "prompt file", "document"), decoded as UTF-8."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        from .paths import describe_os_error

        raise error(f"cannot read {what}: {describe_os_error(e)}") from None
    return decode_utf8(data, str(path), error)
