"""The held-out evaluation stage on the session's local Ray: every metric column against the
same computation on the driver, and the metrics against `summarize` of the written file.
(The win rate against theta_0's file runs in the LD-Align job tests.)"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipelines.evaluate import SCORED_SCHEMA, evaluate_stage
from rayalign import toytask
from rayalign.config import DataConfig, SamplingConfig
from rayalign.config_ldalign import EvalConfig, GuideConfig, PairsConfig
from rayalign.evaluate import gold_nll, summarize
from rayalign.guide import GuideModel
from rayalign.models import load_model, load_tokenizer
from rayalign.rewardmodel import RewardModel
from rayalign.sentsim import sentence_cosine
from rayalign.textmetrics import rouge_l

SAMPLING = SamplingConfig(temperature=0.0, max_new_tokens=6, batch_size=4)
PIPE = PairsConfig(progress_bars=False)


def test_evaluate_stage_columns_and_metrics(ray_cluster, tiny_gpt2, tiny_bert_encoder,
                                            tiny_reward_model, tmp_path):
    data = DataConfig(path=str(toytask.write_jsonl(tmp_path / "eval.jsonl",
                                                   toytask.make_rows(6, seed=3))),
                      max_prompt_length=24, max_length=48)
    ev = EvalConfig(sentence_encoder=tiny_bert_encoder, reward_model=tiny_reward_model,
                    batch_size=4)
    guide = GuideModel.create(GuideConfig(latent_dim=8), tiny_gpt2, max_prompt_length=24,
                              max_length=48).save(tmp_path / "guide")
    metrics = evaluate_stage(data, tiny_gpt2, str(guide), tmp_path / "theta_0.parquet", SAMPLING,
                             PIPE, ev)
    table = pq.read_table(tmp_path / "theta_0.parquet")
    assert table.schema.names == SCORED_SCHEMA.names
    cols = table.to_pydict()
    assert cols["row"] == list(range(6))
    assert all(0 <= n <= 6 for n in cols["sample_tokens"])
    assert cols["truncated"] == [n == 6 for n in cols["sample_tokens"]]  # greedy: cut iff 6
    # each column = the pure function on the driver (other batch sizes: float32 round-off)
    nll, tokens = gold_nll(load_model(tiny_gpt2), load_tokenizer(tiny_gpt2), cols["prompt"],
                           cols["gold"], 24, 48, batch_size=6)
    np.testing.assert_allclose(cols["gold_nll"], nll, atol=1e-4)
    np.testing.assert_allclose(cols["distance"], GuideModel.load(guide, decoder=False).distances(
        cols["prompt"], cols["gold"], cols["sample"]).numpy(), atol=1e-5)
    assert cols["gold_tokens"] == tokens
    assert cols["rouge_l"] == rouge_l(cols["sample"], cols["gold"])
    np.testing.assert_allclose(cols["cosine"], sentence_cosine(cols["sample"], cols["gold"],
                                                               tiny_bert_encoder), atol=1e-5)
    np.testing.assert_allclose(cols["reward"], RewardModel(tiny_reward_model).score(
        cols["prompt"], cols["sample"]), atol=1e-5)
    assert metrics == summarize(cols)
    assert {"gold_nll", "mean_distance", "cosine", "reward", "rouge_l", "distinct_2"} <= set(metrics)
    assert not list(tmp_path.glob("*.samples.parquet"))
