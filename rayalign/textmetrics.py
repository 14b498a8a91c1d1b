"""Surface statistics of generated answers for open-ended data (DESIGN.md, "Evaluation").

Exact match is 0 for every policy on open-ended chat, and a collapsed policy (one stock phrase
for many prompts) can still look fine under a guide's mean distance; these statistics show
such failures directly. All functions are pure functions of lists of strings.

Words are whitespace-separated tokens (``str.split``), the unit of distinct-n in Li et al.
2016 ("A Diversity-Promoting Objective Function ..."); punctuation attached to a word stays
part of it. ROUGE-L uses rouge-score's own tokenizer (lower-cased, runs of ``[a-z0-9]`` only,
so text without Latin letters or digits scores 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from rouge_score import rouge_scorer


def words(text: str) -> list[str]:
    """The whitespace-separated tokens of `text`."""
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The contiguous n-grams of `tokens`, in order."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams over all n-grams of all texts
    (pooled, not averaged per text). 0.0 when the texts contain no n-gram at all."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def has_loop(text: str, max_period: int = 8, min_repeats: int = 3, min_span: int = 6) -> bool:
    """True when `text` contains a repetition loop, defined as: a block u of p words,
    1 <= p <= `max_period`, written at least `min_repeats` times back to back (u u u ...),
    where the periodic stretch (whole copies plus a partial last one, as in a loop cut by a
    length limit) covers at least `min_span` words.

    Examples (defaults): "ha ha ha ha ha ha" loops (p=1, 6 words); "very very very good" does
    not (3 words < min_span); "I am fine. I am fine. I am fine." loops (p=3, 9 words);
    "a b a b a b" loops (p=2, 3 copies, 6 words).
    """
    w = words(text)
    for p in range(1, max_period + 1):
        run = 0  # positions i with w[i] == w[i + p] in a row: a p-periodic stretch of run + p words
        for i in range(len(w) - p):
            run = run + 1 if w[i] == w[i + p] else 0
            span = run + p
            if span >= p * min_repeats and span >= min_span:
                return True
    return False


def loop_share(texts: Sequence[str], **loop_kwargs) -> float:
    """Share of `texts` for which `has_loop` holds (its keyword arguments pass through)."""
    _nonempty(texts)
    return sum(has_loop(t, **loop_kwargs) for t in texts) / len(texts)


def _normalized(text: str) -> str:
    return " ".join(text.split())


def duplicate_share(texts: Sequence[str], prompts: Sequence[str] | None = None) -> float:
    """Share of answers equal (up to whitespace) to the answer given to some *other* prompt.

    With `prompts`, answers to equal prompts do not count as duplicates of each other (a
    repeated prompt may well get the same answer); without, every position is its own prompt.
    Example: answers ["ok", "ok", "ok", "no"] to four prompts -> 3/4.
    """
    _nonempty(texts)
    prompts = list(range(len(texts))) if prompts is None else list(prompts)
    if len(prompts) != len(texts):
        raise ValueError(f"need one prompt per answer, got {len(prompts)} and {len(texts)}")
    by_answer: dict[str, set] = {}
    for text, prompt in zip(texts, prompts):
        by_answer.setdefault(_normalized(text), set()).add(prompt)
    return sum(len(by_answer[_normalized(t)]) > 1 for t in texts) / len(texts)


def length_stats(lengths: Sequence[int], truncated: Sequence[bool]) -> dict[str, float]:
    """Mean response length (in whatever unit `lengths` is, here generated tokens) and the
    share of responses cut by the generation limit (finish reason "length")."""
    _nonempty(lengths)
    if len(lengths) != len(truncated):
        raise ValueError(f"need one truncation flag per length, got {len(truncated)} and "
                         f"{len(lengths)}")
    return {"mean_length": sum(lengths) / len(lengths),
            "truncated_share": sum(bool(t) for t in truncated) / len(truncated)}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-pair ROUGE-L F-measure (rouge-score, no stemming): with LCS the longest common
    word subsequence, P = LCS / |prediction|, R = LCS / |reference|, F = 2PR / (P + R);
    0 when either side has no tokens."""
    check_paired(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def _nonempty(values: Sequence) -> None:
    if len(values) == 0:
        raise ValueError("need at least one answer")


def check_paired(predictions: Sequence, references: Sequence) -> None:
    """Raise ValueError unless both sequences have the same length."""
    if len(predictions) != len(references):
        raise ValueError(f"need equally many predictions and references, got {len(predictions)} "
                         f"and {len(references)}")
