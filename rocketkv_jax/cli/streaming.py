"""What a command shows while it works: the reply streamed to stdout as tokens arrive, and
a progress bar over prefill chunks on stderr."""

from __future__ import annotations

import sys


class Streamer:
    """Prints the growing decoded text of row 0 as tokens arrive (an `on_step` callback),
    never half a character (`server.text.IncrementalDecoder`, as the server streams)."""

    def __init__(self, tokenizer, stop):
        from ..server.text import IncrementalDecoder

        self.decoder = IncrementalDecoder(tokenizer, skip_ids=stop)
        self.printed = ""
        self.finished = False

    def __call__(self, step, tokens, done):
        if self.finished:
            return
        self.finished = bool(done[0])
        piece = self.decoder.add(int(tokens[0]))
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
            self.printed += piece

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
