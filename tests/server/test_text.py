"""Streaming text: pieces of an incremental decode add up to the whole decode and never end
in half a character; stop strings cut where they begin, whichever tokens they span."""

from __future__ import annotations

import random

import pytest

from rocketkv_jax.server.text import IncrementalDecoder, StopMatcher

TEXTS = ["Paris is the capital of France.", "ÜÜ🙂 日本語の文章 ok  two  spaces\n\nnew",
         " leading space and trailing ", "emoji 👩‍👩‍👧 family, accents éèê, math ∑∫√"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_pieces_add_up_to_the_decode(smol_tokenizer, text):
    tok = smol_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    eot = tok.token_id("<|im_end|>")
    decoder = IncrementalDecoder(tok, skip_ids=(eot,))
    pieces = [decoder.add(i) for i in [*ids[:3], eot, *ids[3:]]]
    pieces.append(decoder.finish())
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 1  # it streams


def test_an_unfinished_character_is_sent_at_the_end(smol_tokenizer):
    tok = smol_tokenizer
    ids = tok.encode("ok 🙂", add_special_tokens=False)[:-1]  # half the emoji's bytes
    decoder = IncrementalDecoder(tok)
    streamed = "".join(decoder.add(i) for i in ids)
    assert "\ufffd" not in streamed
    assert streamed + decoder.finish() == tok.decode(ids)


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[:min(hits)], True) if hits else (text, False)


@pytest.mark.parametrize("seed", range(40))
def test_stop_strings_against_a_whole_text_search(seed):
    rng = random.Random(seed)
    alphabet = "ab ENDé🙂"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
             for _ in range(rng.randint(1, 4))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 12))))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopMatcher(stops)
    out, seen = "", ""
    for p in pieces:
        out += matcher.push(p)
        seen += p
        if not matcher.stopped:  # what is held back could still begin a stop string
            held = seen[len(out):]
            assert seen.startswith(out) and len(held) < max(map(len, stops))
            assert not held or any(s.startswith(held) for s in stops)
    out += matcher.finish()
    assert (out, matcher.stopped) == _reference_cut(text, stops)


def test_no_stop_strings_hold_nothing():
    matcher = StopMatcher([])
    assert matcher.push("abc") == "abc" and matcher.finish() == ""
