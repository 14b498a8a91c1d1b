"""Reward model by path, on a tiny locally built one-output BERT classifier."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from rayalign.rewardmodel import RewardModel, win_rate


def test_scores_equal_single_forward(tiny_reward_model):
    """Batched, padded scores = the logit of each (prompt, response) text pair run alone
    (float32, different padding: ~1e-6)."""
    prompts = ["what time is it", "hello", "question"]
    responses = ["it is good", "hello world ok", "no"]
    got = RewardModel(tiny_reward_model).score(prompts, responses, batch_size=2)
    tok = AutoTokenizer.from_pretrained(tiny_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    with torch.no_grad():
        want = [model(**tok(p, r, return_tensors="pt")).logits[0, 0].item()
                for p, r in zip(prompts, responses)]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(x, 3) for x in got)) == 3  # a real, input-dependent score


def test_refuses_multi_output(tiny_reward_model, tmp_path):
    config = AutoConfig.from_pretrained(tiny_reward_model, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_reward_model).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModel(tmp_path)


def test_win_rate_ties_count_half():
    """Rewards [1, 2, 3, 5] vs baseline [1, 3, 2, 4]: tie, loss, win, win -> (0.5+0+1+1)/4.
    With the answers given, an identical answer is a tie whatever its rewards: answers 3 and
    its baseline are both "same" -> (0.5+0+1+0.5)/4."""
    assert win_rate([1, 2, 3, 5], [1, 3, 2, 4]) == 0.625
    assert win_rate([1, 2, 3, 5], [1, 3, 2, 4], ["a", "b", "c", "same"],
                    ["x", "y", "z", " same"]) == 0.5
    with pytest.raises(ValueError, match="equally many"):
        win_rate([1], [1, 2])
