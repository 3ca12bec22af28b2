"""The token ids of each new turn of a chat whose history is already in the KV cache.

A conversation (`engine.conversation.Conversation`) prefills only what a turn adds to the
history; with a chat template, what a turn adds is the template's rendering of the
messages so far minus its rendering of the ones before (`TurnEncoder`). Message content
(turns, --system, --document) is encoded as plain text, as `Tokenizer.encode_messages` does.
"""

from __future__ import annotations


class TurnEncoder:
    """Token ids of each new user turn, given what the history already holds.

    With a chat template, turn n is the text the template adds for it: the rendering of
    every message so far minus the rendering before it (the previous reply and what the
    template puts after it), starting right after the reply's end-of-turn token (or with
    it, when the reply was cut by --max-new-tokens). Without a template (a bare tokenizer),
    a turn is its text.
    """

    def __init__(self, tokenizer, system: str | None = None):
        self.tok = tokenizer
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.eot = tokenizer.end_of_turn_token

    @property
    def templated(self) -> bool:
        return bool(self.tok.chat_template)

    def user(self, text: str, reply_stopped: bool = True) -> list[int]:
        """The new turn's token ids; the message joins the history only if they can be
        made (a template that refuses it leaves the history as it was)."""
        ids = self._encode_user(text, reply_stopped)
        self.messages.append({"role": "user", "content": text})
        return ids

    def _encode_user(self, text: str, reply_stopped: bool) -> list[int]:
        messages = [*self.messages, {"role": "user", "content": text}]
        if not self.templated:
            return self.tok.encode(text if len(messages) == 1 else " " + text)
        answered = any(m["role"] == "assistant" for m in self.messages)
        if not answered:
            return self.tok.encode_messages(messages, add_generation_prompt=True)
        before = self.tok.apply_chat_template(self.messages, add_generation_prompt=False)
        pieces = self.tok.chat_segments(messages, add_generation_prompt=True)
        if not "".join(text for text, _ in pieces).startswith(before):
            # a template that rewrites earlier turns
            raise ValueError("this model's chat template renders earlier turns differently "
                             "once a new one is added; its conversations cannot keep a cache")
        tail = ""
        if self.eot and self.eot in before:
            tail = before[before.rfind(self.eot) + len(self.eot):]
        prefix = tail if reply_stopped or not self.eot else self.eot + tail
        # the template's text and the message's content, each encoded as
        # `Tokenizer.encode_segments` does (content as plain text)
        return self.tok.encode_segments([(prefix, False), *drop_chars(pieces, len(before))])

    def assistant(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]


def drop_chars(pieces: list[tuple[str, bool]], n: int) -> list[tuple[str, bool]]:
    """`pieces` (text, is_content) without their first `n` characters."""
    out = []
    for text, content in pieces:
        cut = min(n, len(text))
        n -= cut
        if text[cut:]:
            out.append((text[cut:], content))
    return out
