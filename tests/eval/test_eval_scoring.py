"""RULER string-match scoring against hand-written cases."""

import pytest

from rocketkv_jax.eval.scoring import (
    METRIC_BY_TASK,
    corpus_score,
    postprocess_prediction,
    score_output,
    string_match_all,
    string_match_part,
)


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        (" 1234567.", ["1234567"], 1.0),
        ("The numbers are 111 and 222.", ["111", "222", "333"], 2 / 3),
        ("nothing here", ["111", "222"], 0.0),
        ("VAR abcde and FGHIJ", ["ABCDE", "fghij"], 1.0),  # case-insensitive both ways
        ("12345678", ["1234567"], 1.0),  # plain substring test, as in RULER
        ("12\x0034567", ["1234567"], 0.0),  # control char -> newline breaks the match
        ("  \n apple, Banana\t", ["apple", "banana", "cherry", "date"], 0.5),
    ],
)
def test_string_match_all(prediction, references, expected):
    assert string_match_all(prediction, references) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Lisbon", ["Lisbon"], 1.0),
        ("She was born in LISBON in 1950", ["lisbon", "Porto"], 1.0),
        ("Porto", ["Lisbon", "Oslo"], 0.0),
        ("1950s", ["1950"], 1.0),
    ],
)
def test_string_match_part(prediction, references, expected):
    assert string_match_part(prediction, references) == expected


def test_postprocess_matches_ruler():
    assert postprocess_prediction("  a\x01b\x1fc \n") == "a\nb\nc"


def test_corpus_score_is_rulers_percent_rounded():
    preds = ["111 222", "111", "none", "x"]
    refs = [["111", "222"], ["111", "222"], ["333"], ["X"]]
    # per sample: 1, 0.5, 0, 1 -> mean 0.625 -> 62.5
    assert corpus_score(string_match_all, preds, refs) == 62.5
    # part: 1, 1, 0, 1 -> 75.0
    assert corpus_score(string_match_part, preds, refs) == 75.0
    # rounding to 2 decimals: 1/3 -> 33.33
    assert corpus_score(string_match_all, ["a", "b", "c"], [["a"], ["z"], ["z"]]) == 33.33


def test_score_output_uses_task_metric():
    assert METRIC_BY_TASK["qa"] is string_match_part
    assert score_output("qa", "Oslo or Lima", ["Lima", "Riga"]) == 1.0
    assert score_output("niah_multivalue", "1 and 2", ["1", "2", "3", "4"]) == 0.5
    assert score_output("common_words", "", ["a"]) == 0.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="at least one"):
        string_match_all("x", [])
    with pytest.raises(TypeError, match="not a single string"):
        string_match_part("x", "x")
    with pytest.raises(ValueError, match="unknown|no metric"):
        score_output("nope", "x", ["x"])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        corpus_score(string_match_all, ["a", "b"], [["a"]])
