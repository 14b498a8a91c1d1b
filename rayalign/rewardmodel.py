"""An optional reward model by path: mean reward and win rate of theta_t vs theta_0.

The model is any ``AutoModelForSequenceClassification`` checkpoint with one output (a scalar
reward), as the LD-Align paper's DeBERTa reward model (OpenAssistant
reward-model-deberta-v3-large-v2). It reads (prompt, response) as a tokenizer *text pair*,
the input format of that model; prompts are the evaluation's rendered prompt strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .textmetrics import check_paired


class RewardModel:
    """A scalar-output sequence classifier loaded once (per process or Ray actor)."""

    def __init__(self, path: str | Path, device: str = "cpu", max_length: int = 512):
        self.device, self.max_length = device, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(path)).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path}: expected one output (num_labels=1), got "
                             f"num_labels={self.model.config.num_labels}")
        if self.tokenizer.pad_token_id is None:  # GPT-style classifiers: pad with EOS
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str],
              batch_size: int = 16) -> list[float]:
        """The reward of each (prompt, response) pair, float32 logits as Python floats."""
        check_paired(prompts, responses)
        out: list[float] = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            enc = self.tokenizer(list(prompts[start:end]), list(responses[start:end]),
                                 padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out


def win_rate(rewards: Sequence[float], baseline: Sequence[float],
             answers: Sequence[str] | None = None,
             baseline_answers: Sequence[str] | None = None) -> float:
    """Share of prompts where the policy's reward beats the baseline's on the same prompt;
    a tie counts half. A tie is an equal reward or, when the answers are given, the same
    answer text (up to whitespace: padding in a different batch can move an identical
    answer's float reward by round-off, which must not decide a win)."""
    check_paired(rewards, baseline)
    if not rewards:
        raise ValueError("need at least one reward")
    same = ([" ".join(a.split()) == " ".join(b.split()) for a, b in zip(answers, baseline_answers)]
            if answers is not None and baseline_answers is not None else [False] * len(rewards))
    points = [0.5 if s or r == b else float(r > b) for r, b, s in zip(rewards, baseline, same)]
    return sum(points) / len(points)
