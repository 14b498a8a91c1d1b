"""The embedded default task: sort a short list of digits.

Chosen because a tiny model's attempts are *graded*: after a little SFT it emits sorted-looking
lists that are often near misses (one digit swapped, dropped or repeated) and sometimes clear
failures (wrong length, unsorted), so latent distances to the gold answer carry signal and an
exact-match metric can move within a few CPU minutes.
"""

from __future__ import annotations

import random
from pathlib import Path

from .io import atomic_file

PROMPT_PREFIX = "sort:"


def make_example(rng: random.Random, min_len: int = 3, max_len: int = 6) -> dict[str, str]:
    digits = [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]
    return {
        "prompt": f"{PROMPT_PREFIX} {' '.join(map(str, digits))} =>",
        "completion": " " + " ".join(map(str, sorted(digits))),
    }


def make_rows(n: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [make_example(rng, min_len, max_len) for _ in range(n)]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    import json

    with atomic_file(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def corpus(n: int = 2000, seed: int = 12345) -> list[str]:
    """Text to train the tiny tokenizer on, so digits and the prompt format tokenize cleanly."""
    return [r["prompt"] + r["completion"] for r in make_rows(n, seed)]


def perturb(answer: str, rng: random.Random) -> str:
    """A near miss of a sorted answer: two neighbours swapped, one digit dropped, repeated or
    replaced. Always differs from ``answer`` (as a token sequence)."""
    digits = answer.split()
    while True:
        out = list(digits)
        i = rng.randrange(len(out))
        edit = rng.choice(("swap", "drop", "repeat", "replace"))
        if edit == "swap" and len(out) > 1:
            j = i + 1 if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif edit == "drop" and len(out) > 1:
            del out[i]
        elif edit == "repeat":
            out.insert(i, out[i])
        else:
            out[i] = str((int(out[i]) + rng.randrange(1, 10)) % 10)
        if out != digits:
            return " " + " ".join(out)


def make_preference_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Preference rows (prompt, chosen = gold, rejected = a `perturb`-ed near miss)."""
    rng = random.Random(seed)
    rows = []
    for row in make_rows(n, seed):
        rows.append({"prompt": row["prompt"], "chosen": row["completion"],
                     "rejected": perturb(row["completion"], rng)})
    return rows
