"""Task generation: determinism, needle placement, sizing, errors (fake tokenizers)."""

import re
from collections import Counter

import pytest

from rocketkv_jax.eval import tasks
from rocketkv_jax.eval.tasks import TASK_NAMES, TaskError, make_sample


class WhitespaceTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text):
        return [len(w) for w in text.split()]

    def decode(self, ids):
        return " ".join("x" * i for i in ids)


class CharTokenizer:
    """One token per character."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


WS, CHARS = WhitespaceTokenizer(), CharTokenizer()


def _context(sample):
    """The haystack between the instruction and the trailing question."""
    return sample.prompt.split("\n\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_deterministic_per_seed_and_different_across_seeds(task):
    a = make_sample(task, WS, context_length=1024, index=2, seed=7)
    b = make_sample(task, WS, context_length=1024, index=2, seed=7)
    c = make_sample(task, WS, context_length=1024, index=2, seed=8)
    d = make_sample(task, WS, context_length=1024, index=3, seed=7)
    assert a == b and a.prompt == b.prompt and a.metadata == b.metadata
    assert c.prompt != a.prompt and c.answers != a.answers
    assert d.prompt != a.prompt


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize(("tokenizer", "target"), [(WS, 2048), (CHARS, 8192)])
def test_prompt_plus_answer_fits_target_within_tolerance(task, tokenizer, target):
    sample = make_sample(task, tokenizer, context_length=target, index=1, seed=0)
    used = sample.prompt_tokens + sample.max_new_tokens
    assert sample.prompt_tokens == len(tokenizer.encode(sample.prompt))
    assert used <= target
    assert used >= 0.9 * target, f"{task}: {used} of {target} tokens"


@pytest.mark.parametrize("depth", [0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 100.0])
def test_single_needle_once_at_requested_depth(depth):
    sample = make_sample("niah_single", WS, context_length=4096, index=0, seed=3, depth=depth)
    (needle,) = sample.metadata["needles"]
    (value,) = sample.answers
    assert re.fullmatch(r"\d{7}", value)
    assert sample.prompt.count(needle) == 1
    assert sample.prompt.count(value) == 1
    context = _context(sample)
    start = context.index(needle)
    relative = 100 * start / (len(context) - len(needle))
    assert relative == pytest.approx(depth, abs=3.0)
    # Inserted at a sentence boundary: preceded by the end of a sentence (or nothing).
    assert start == 0 or context[start - 2] in ".!?\"')"
    assert sample.depth == depth
    assert sample.metadata["actual_depth"] == pytest.approx(depth, abs=1.0)


def test_question_repeated_after_context_and_answer_prefix():
    sample = make_sample("niah_single", WS, context_length=1024, index=0, seed=0)
    key = sample.metadata["key"]
    head, tail = sample.prompt.split(_context(sample))
    assert key in head and key in tail
    assert sample.prompt.endswith(
        f"Answer: The special magic number for {key} mentioned in the provided text is"
    )


def test_default_depths_are_a_stable_spread():
    assert [tasks.sample_depth(i) for i in range(9)] == [
        0.0, 100.0, 50.0, 25.0, 75.0, 12.5, 62.5, 37.5, 87.5
    ]  # fmt: skip
    samples = tasks.generate_samples("niah_single", WS, context_length=1024, num_samples=3, seed=0)
    assert [s.depth for s in samples] == [0.0, 100.0, 50.0]
    assert [s.index for s in samples] == [0, 1, 2]


def test_multikey_has_distractors_with_other_keys():
    sample = make_sample("niah_multikey", WS, context_length=2048, index=2, seed=1)
    needles = sample.metadata["needles"]
    keys = [re.search(r"for (\S+) is", n).group(1) for n in needles]
    assert len(set(keys)) == len(keys) == 4
    assert sample.metadata["key"] == keys[0]
    for needle in needles:
        assert sample.prompt.count(needle) == 1
    assert sample.answers == (re.search(r"(\d{7})\.$", needles[0]).group(1),)
    assert not set(sample.answers) & set(sample.metadata["distractor_values"])


def test_multivalue_has_all_values_for_one_key():
    sample = make_sample("niah_multivalue", WS, context_length=2048, index=0, seed=2)
    assert len(sample.answers) == len(set(sample.answers)) == 4
    key = sample.metadata["key"]
    for value in sample.answers:
        assert sample.prompt.count(f"One of the special magic numbers for {key} is: {value}.") == 1


def test_variable_tracking_chain_in_order():
    sample = make_sample("variable_tracking", WS, context_length=2048, index=0, seed=4)
    chain = sample.metadata["needles"]
    value = sample.metadata["value"]
    assert chain[0] == f"VAR {sample.answers[0]} = {value}."
    for prev, name, line in zip(sample.answers, sample.answers[1:], chain[1:], strict=False):
        assert line == f"VAR {name} = VAR {prev}."
    positions = [sample.prompt.index(line) for line in chain]
    assert positions == sorted(positions)
    assert all(sample.prompt.count(line) == 1 for line in chain)
    assert sample.depth is None


def test_common_words_answers_are_the_most_frequent():
    sample = make_sample("common_words", WS, context_length=2048, index=0, seed=5)
    listing = sample.prompt.split("\n")[1]
    words = re.findall(r"\d+\. (\w+)", listing)
    counts = Counter(words)
    assert len(sample.answers) == 10
    assert {w for w, _ in counts.most_common(10)} == set(sample.answers)
    freq_common = sample.metadata["freq_common"]
    assert all(counts[w] == freq_common for w in sample.answers)
    assert all(c == 3 for w, c in counts.items() if w not in sample.answers)
    assert freq_common >= 6


def test_qa_fact_inserted_and_answer_matches_fact():
    sample = make_sample("qa", WS, context_length=2048, index=2, seed=6)
    facts = sample.metadata["facts"]
    target = facts[sample.metadata["target_fact"]]
    assert sample.prompt.count(" ".join(facts)) == 1
    (answer,) = sample.answers
    assert answer in target
    person = re.match(r"(\w+ \w+) was born", target).group(1)
    assert sample.prompt.rstrip().endswith(
        (f"{person} was born in the city of", f"{person} was born in the year")
    )


def test_too_short_context_raises():
    with pytest.raises(TaskError, match="template alone"):
        make_sample("niah_single", WS, context_length=64, index=0, seed=0)
    with pytest.raises(TaskError, match="no room"):
        make_sample("qa", WS, context_length=10, index=0, seed=0)


def test_essays_too_short_raises(tmp_path):
    (tmp_path / "a.txt").write_text("One short essay. It has three sentences. That is all.")
    with pytest.raises(TaskError, match="not enough essay sentences"):
        make_sample(
            "niah_single", WS, context_length=4096, index=0, seed=0, essays_dir=str(tmp_path)
        )
    with pytest.raises(TaskError, match="no essay files"):
        tasks.load_sentences(str(tmp_path / "missing"))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("nope", WS, context_length=1024, index=0, seed=0)
    with pytest.raises(ValueError, match="depth"):
        make_sample("niah_single", WS, context_length=1024, index=0, seed=0, depth=150)
    with pytest.raises(ValueError, match="num_samples"):
        tasks.generate_samples("qa", WS, context_length=1024, num_samples=0, seed=0)


def test_split_sentences_keeps_abbreviations_together():
    text = tasks.normalize_essay("See Finley, M. I. (ed.), Slavery. Next one.Glued [3]here.")
    assert tasks.split_sentences(text) == [
        "See Finley, M. I. (ed.), Slavery.", "Next one.", "Glued here."
    ]  # fmt: skip


def test_insert_at_depths_positions():
    text, actual = tasks.insert_at_depths(["a.", "b.", "c.", "d."], [(50, "X."), (0, "Y.")])
    assert text == "Y. a. b. X. c. d."
    assert actual == [50.0, 0.0]


def test_fit_units_finds_largest_fit():
    render = lambda n: "w " * (n + 3)
    count = lambda text: len(text.split())
    assert tasks.fit_units(render, count, limit=100, max_units=1000, what="words") == 97
    with pytest.raises(TaskError, match="all 50 of them fit"):
        tasks.fit_units(render, count, limit=100, max_units=50, what="words")


def test_essay_corpus_loads():
    sentences = tasks.load_sentences()
    assert len(sentences) > 5000
    assert not any("[1]" in s for s in sentences[:500])
