"""What a command shows while it works: the reply streamed to stdout as tokens arrive, and
a progress bar over prefill chunks on stderr."""

from __future__ import annotations

import sys


class Streamer:
    """Prints the growing decoded text of row 0 as tokens arrive (an `on_step` callback)."""

    def __init__(self, tokenizer, stop):
        self.tok, self.stop, self.ids, self.printed = tokenizer, stop, [], ""
        self.finished = False

    def __call__(self, step, tokens, done):
        if self.finished:
            return
        t = int(tokens[0])
        self.finished = bool(done[0])
        if t in self.stop:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if "\ufffd" in text[len(self.printed):]:  # wait for the rest of a multi-byte char
            return
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text

    def finish(self, text: str) -> None:
        sys.stdout.write(text[len(self.printed):] + "\n")
        sys.stdout.flush()


class PrefillBar:
    """A tqdm bar over prefill chunks on stderr, shown only when there are several (an
    `on_prefill_chunk` callback)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if total < 2:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="prefill", unit="chunk", file=sys.stderr,
                            leave=False)
        self.bar.update(done - self.bar.n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
