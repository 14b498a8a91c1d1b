"""Surface metrics of answers, against values worked out by hand in each docstring."""

import pytest

from rayalign.textmetrics import (distinct_n, duplicate_share, has_loop, length_stats,
                                  loop_share, ngrams, rouge_l)


def test_ngrams():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []


def test_distinct_n_pools_over_texts():
    """Texts "a b a b" and "a b c": unigrams a b a b a b c -> 3 unique / 7;
    bigrams ab ba ab | ab bc -> {ab, ba, bc} = 3 unique / 5."""
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n(["x", ""], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(texts, 0)


@pytest.mark.parametrize("text, loops", [
    ("ha ha ha ha ha ha", True),            # p=1, 6 words
    ("ha ha ha ha ha", False),              # p=1, 5 words < min_span 6
    ("very very very good", False),
    ("a b a b a b", True),                  # p=2, 3 copies, 6 words
    ("a b a b c d", False),                 # 2 copies only
    ("I am fine. I am fine. I am fine.", True),     # p=3, 9 words
    ("I am fine. I am fine. I am", False),  # 2 full copies + 2 words = 8 words < 3 * 3
    ("x y z I am fine. I am fine. I am fine. ok", True),  # loop in the middle
    ("1 2 3 4 5 6 7 8 9 1 2 3 4 5 6 7 8 9 1 2 3 4 5 6 7 8 9", False),  # period 9 > max_period 8
    ("", False),
])
def test_has_loop(text, loops):
    assert has_loop(text) is loops


def test_has_loop_period_limit_and_share():
    long = " ".join(["1 2 3 4 5 6 7 8 9"] * 3)
    assert has_loop(long, max_period=9)
    assert loop_share(["ha " * 6, "fine", long, "no"], max_period=9) == 0.5


def test_duplicate_share():
    """["ok", "ok ", "ok", "no"]: three answers equal another prompt's answer -> 3/4.
    With prompts [p, p, q, r]: answers 0 and 1 share prompt p, but both equal answer 2 (prompt
    q) -> still 3/4; with prompts [p, p, r, s] and answers ["ok", "ok", "x", "y"] the two
    "ok"s answer the same prompt -> 0."""
    assert duplicate_share(["ok", "ok ", "ok", "no"]) == 0.75
    assert duplicate_share(["ok", "ok ", "ok", "no"], ["p", "p", "q", "r"]) == 0.75
    assert duplicate_share(["ok", "ok", "x", "y"], ["p", "p", "r", "s"]) == 0.0
    assert duplicate_share(["a", "b"]) == 0.0
    with pytest.raises(ValueError, match="one prompt per answer"):
        duplicate_share(["a"], ["p", "q"])


def test_length_stats():
    """Lengths 4, 8, 8 -> mean 20/3; one of three cut at the limit."""
    assert length_stats([4, 8, 8], [False, True, False]) == pytest.approx(
        {"mean_length": 20 / 3, "truncated_share": 1 / 3})
    with pytest.raises(ValueError, match="at least one"):
        length_stats([], [])


def test_rouge_l():
    """"the cat sat on the mat" vs gold "the cat is on the mat": LCS "the cat on the mat" = 5
    words of 6 on both sides -> P = R = F = 5/6. "a b c" vs gold "c b a x": LCS 1, P = 1/3,
    R = 1/4, F = 2PR/(P+R) = 2/7. Case and punctuation are ignored by rouge-score's tokenizer;
    an empty side scores 0."""
    scores = rouge_l(["the cat sat on the mat", "a b c", "Hello, World!", ""],
                     ["the cat is on the mat", "c b a x", "hello world", "x"])
    assert scores == pytest.approx([5 / 6, 2 / 7, 1.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="equally many"):
        rouge_l(["a"], [])
