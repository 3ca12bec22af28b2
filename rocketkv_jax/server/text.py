"""Token ids to the text a client sees, piece by piece: incremental detokenization that never
sends half a character, and stop strings that end a reply where they begin."""

from __future__ import annotations

from collections.abc import Iterable

# What a tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Text of a growing list of token ids, handed out in pieces (`add`).

    Decoding ids one by one is wrong for byte-level vocabularies (a character may span
    tokens, and a token's leading space may depend on its neighbours), and decoding all of
    them at every step costs O(n) per token. So a piece is the decoding of a short window
    (`prefix` ids already sent, then the new ones) minus the window's prefix text; it waits
    while it ends in an incomplete character (U+FFFD) and `finish` sends what is left.
    """

    def __init__(self, tokenizer, skip_ids: Iterable[int] = ()):
        self.tok = tokenizer
        self.skip = frozenset(skip_ids)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:sent] decode to text already sent
        self.sent = 0

    def _window(self, start: int, end: int | None = None) -> str:
        return self.tok.decode(self.ids[start:end])

    def add(self, token: int) -> str:
        """The new text `token` completes ('' while a character is incomplete)."""
        if token in self.skip:
            return ""
        self.ids.append(token)
        before = self._window(self.prefix, self.sent)
        text = self._window(self.prefix)
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.sent = self.sent, len(self.ids)
        return text[len(before):]

    def finish(self) -> str:
        """What is left (an incomplete character at the very end becomes U+FFFD)."""
        before = self._window(self.prefix, self.sent)
        text = self._window(self.prefix)
        self.prefix = self.sent = len(self.ids)
        return text[len(before):]


class StopMatcher:
    """Text pieces in, the text to send out: holds back any tail that could still become
    one of `stops`, and once one appears, ends the text just before it (`stopped`)."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        """The held tail, once no more text comes (it did not become a stop string)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
