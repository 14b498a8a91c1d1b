"""`HeldOutScorer`: the metric models of the held-out evaluation as one Ray Data callable
class, so one actor pool (one model load per actor) serves them all. On a batch of
(prompt, gold, sample) rows it adds

- ``distance``: the guide's latent distance of sample to gold (`actors.scorer.GuideScorer`),
  when a guide is given;
- ``gold_nll`` / ``gold_tokens``: -log p(gold + EOS | prompt) under the policy (teacher-forced);
- ``rouge_l``: ROUGE-L F of sample vs gold;
- ``cosine``: cosine of sample and gold under the sentence encoder, when one is given;
- ``reward``: the reward model's score of (prompt, sample), when one is given.

The arithmetic is in `rayalign.evaluate`, `rayalign.textmetrics`, `rayalign.sentsim` and
`rayalign.rewardmodel`; this class imports nothing from Ray, so any process can hold one.
"""

from __future__ import annotations

import numpy as np
import torch

from actors.scorer import GuideScorer
from rayalign.evaluate import gold_nll
from rayalign.models import load_model, load_tokenizer
from rayalign.rewardmodel import RewardModel
from rayalign.sentsim import SentenceEncoder
from rayalign.textmetrics import rouge_l


class HeldOutScorer:
    def __init__(self, policy_path: str, max_prompt_length: int, max_length: int,
                 batch_size: int, guide: str | None = None, sentence_encoder: str | None = None,
                 reward_model: str | None = None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.guide = GuideScorer(guide, batch_size) if guide else None
        self.policy, self.tokenizer = load_model(policy_path, device), load_tokenizer(policy_path)
        self.limits, self.batch_size = (max_prompt_length, max_length), batch_size
        self.encoder = SentenceEncoder(sentence_encoder, device) if sentence_encoder else None
        self.reward = RewardModel(reward_model, device) if reward_model else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts, golds, samples = ([str(v) for v in batch[c]] for c in ("prompt", "gold", "sample"))
        nll, tokens = gold_nll(self.policy, self.tokenizer, prompts, golds, *self.limits,
                               self.batch_size)
        out = {**batch, "gold_nll": np.array(nll), "gold_tokens": np.array(tokens, dtype=np.int64),
               "rouge_l": np.array(rouge_l(samples, golds))}
        if self.guide is not None:
            out["distance"] = self.guide(batch)["distance"]
        if self.encoder is not None:
            out["cosine"] = np.array(self.encoder.cosine(samples, golds, self.batch_size))
        if self.reward is not None:
            out["reward"] = np.array(self.reward.score(prompts, samples, self.batch_size))
        return out
