"""The Ray Data pairs pipeline on the session's local Ray with the tiny GPT-2 policy.

Each output is checked against an independent computation on the driver: reference log-probs
against `sequence_logprobs` of one sequence at a time, samples against a second run with
other batching and actor counts, weights against numpy's s / mean(s) of the written file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import ray.data
import torch

from pipelines.pairs import PAIRS_SCHEMA, build_pairs, pairs_stage, sample_stage
from pipelines.refs import ref_logps_stage
from rayalign import toytask
from rayalign.config import DataConfig, ResourcesConfig, SamplingConfig
from rayalign.config_ldalign import GuideConfig, PairsConfig
from rayalign.data import DataError, collate, encode, load_examples, read_rows
from rayalign.guide import GuideModel
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model, load_tokenizer

DATA = {"max_prompt_length": 24, "max_length": 48}
SAMPLING = SamplingConfig(max_new_tokens=10, batch_size=4, seed=11)
PIPE = PairsConfig(progress_bars=False, refs_batch_size=4)


def _rows(path) -> list[dict]:
    return [row for _, row in read_rows(path)]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    return str(toytask.write_jsonl(tmp_path_factory.mktemp("sft") / "sft.jsonl",
                                   toytask.make_rows(10, seed=4)))


@pytest.fixture(scope="module")
def uniform_run(ray_cluster, tiny_gpt2, sft_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    stats = build_pairs(DataConfig(path=sft_file, **DATA), tiny_gpt2, None, out, SAMPLING, PIPE)
    return out, stats


def _direct_logps(model, tok, prompt: str, response: str) -> float:
    """log p(response + EOS | prompt) for ONE unpadded sequence."""
    seq = collate([encode(tok, prompt, response, DATA["max_prompt_length"], DATA["max_length"])],
                  tok.pad_token_id)
    with torch.no_grad():
        return float(sequence_logprobs(model, seq)[0][0])


@pytest.mark.slow
def test_uniform_pairs_are_gold_vs_own_sample_with_weight_one(uniform_run, sft_file):
    out, stats = uniform_run
    sft, samples, pairs = _rows(sft_file), _rows(out / "samples.parquet"), _rows(out / "pairs.parquet")
    assert stats["sample"]["samples"] == stats["pairs"]["pairs"] == len(sft) == 10
    assert [s["row"] for s in samples] == list(range(10))  # the SFT file's order
    assert [(s["prompt"], s["gold"]) for s in samples] == [(r["prompt"], r["completion"]) for r in sft]
    assert list(pairs[0]) == PAIRS_SCHEMA.names
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == \
        [(s["prompt"], s["gold"], s["sample"]) for s in samples]
    assert all(p["weight"] == 1.0 and p["distance"] is None for p in pairs)
    # the trainer reads the file as a preference dataset with its weights and ref log-probs
    examples = load_examples(out / "pairs.parquet", "preference")
    assert [(e.chosen, e.weight, e.ref_chosen_logps, e.ref_rejected_logps) for e in examples] == \
        [(p["chosen"], 1.0, p["ref_chosen_logps"], p["ref_rejected_logps"]) for p in pairs]
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temp leftovers


@pytest.mark.slow
def test_reference_logps_are_the_sampling_policys_own(uniform_run, tiny_gpt2):
    out, _ = uniform_run
    model, tok = load_model(tiny_gpt2), load_tokenizer(tiny_gpt2)
    for p in _rows(out / "pairs.parquet"):
        assert p["ref_chosen_logps"] == pytest.approx(_direct_logps(model, tok, p["prompt"], p["chosen"]), abs=1e-4)
        assert p["ref_rejected_logps"] == pytest.approx(_direct_logps(model, tok, p["prompt"], p["rejected"]), abs=1e-4)


@pytest.mark.slow
def test_latent_weights_are_distances_over_the_whole_datasets_mean(uniform_run, tiny_gpt2,
                                                                  tmp_path):
    """An (untrained) guide scores the same samples; scorer batches of 3 rows never see the
    whole dataset, yet the weights are s_i / mean(s) over all rows of the written file."""
    out, _ = uniform_run
    guide = GuideModel.create(GuideConfig(latent_dim=8), tiny_gpt2, **DATA).save(tmp_path / "guide")
    pipe = PIPE.model_copy(update={"scorer_batch_size": 3})
    stats = pairs_stage(out / "samples.parquet", tiny_gpt2, str(guide), tmp_path / "pairs.parquet",
                        DataConfig(path="unused.jsonl", **DATA), pipe)
    pairs = _rows(tmp_path / "pairs.parquet")
    s = np.array([p["distance"] for p in pairs])
    w = np.array([p["weight"] for p in pairs])
    assert abs(w.mean() - 1.0) < 1e-6
    np.testing.assert_allclose(w, s / s.mean(), rtol=1e-12)
    assert s.std() > 0 and stats["distance_mean"] == pytest.approx(s.mean())
    # the distances are the guide's, computed here on the driver in one call
    direct = GuideModel.load(guide, decoder=False).distances(
        [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
    # float32 latents of differently composed batches (scorer batches of 3 vs one call): the
    # distance moves by at most ||e - e'|| ~ 1e-6 (see test_guide's distance test), so abs 1e-5
    np.testing.assert_allclose(s, direct.numpy(), rtol=0, atol=1e-5)
    # same pairs and reference log-probs as the uniform run: only weight and distance differ
    keep = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")
    assert [{k: p[k] for k in keep} for p in pairs] == \
        [{k: p[k] for k in keep} for p in _rows(out / "pairs.parquet")]
    # the §5.2 check over the written pairs, recomputed here from the file
    from rayalign.sanity import distance_sanity

    expected = distance_sanity(s, [p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
    assert stats["sanity_rows"] == len(pairs)
    assert stats["spearman_rouge"] == pytest.approx(expected["spearman_rouge"], abs=1e-9)


def test_policy_dtype_reaches_the_sampler_and_the_reference_model(tiny_gpt2):
    """policy.dtype is handed to every stage (orchestration/controller.py); these are the two
    stage actors that load the policy here (training: rayalign.train.Trainer's dtype)."""
    from actors.sampler import PolicySampler
    from pipelines.refs import ReferenceLogps

    sampler = PolicySampler(tiny_gpt2, SAMPLING, 24, device="cpu", dtype="bfloat16")
    assert next(sampler.engine.model.parameters()).dtype == torch.bfloat16
    refs = ReferenceLogps(tiny_gpt2, 24, 48, device="cpu", dtype="bfloat16")
    assert next(refs.model.parameters()).dtype == torch.bfloat16
    row = {"prompt": np.array(["sort: 3 1 2 =>"]), "chosen": np.array([" 1 2 3"]),
           "rejected": np.array([" 3 2 1"])}
    got = refs(row)["ref_chosen_logps"][0]
    model = load_model(tiny_gpt2).to(torch.bfloat16)
    tok = load_tokenizer(tiny_gpt2)
    assert got == pytest.approx(_direct_logps(model, tok, "sort: 3 1 2 =>", " 1 2 3"), abs=1e-6)
    assert next(PolicySampler(tiny_gpt2, SAMPLING, 24, device="cpu").engine.model.parameters()
                ).dtype == torch.float32  # auto on the CPU


@pytest.mark.slow
def test_same_seed_same_samples_whatever_the_batching(uniform_run, tiny_gpt2, sft_file, tmp_path):
    """Seeds follow the SFT row, so 3-row batches over 2 sampler actors give the same
    samples as 4-row batches over 1 actor (that other seeds give other samples is checked
    on the engine in test_sampling.py). Input and output given as file:// URIs."""
    out, _ = uniform_run
    first = _rows(out / "samples.parquet")
    pipe = PIPE.model_copy(update={"sampler": ResourcesConfig(num_actors=2)})
    data = DataConfig(path=f"file://{sft_file}", **DATA)  # and URIs in and out
    sample_stage(data, tiny_gpt2, f"file://{tmp_path}/again/samples.parquet",
                 SAMPLING.model_copy(update={"batch_size": 3}), pipe)
    assert _rows(tmp_path / "again" / "samples.parquet") == first
    assert [f.name for f in (tmp_path / "again").iterdir()] == ["samples.parquet"]


def test_bad_sft_row_stops_before_any_sampling(tiny_gpt2, tmp_path, monkeypatch):
    rows = toytask.make_rows(5, seed=1)
    rows[2] = {"prompt": "sort: 3 1 =>", "completion": 7}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def no_dataset(*args, **kwargs):
        raise AssertionError("a Ray dataset was built before the SFT file was validated")

    monkeypatch.setattr(ray.data, "from_items", no_dataset)
    with pytest.raises(DataError) as err:
        build_pairs(DataConfig(path=str(path), **DATA), tiny_gpt2, None, tmp_path / "out",
                    SAMPLING, PIPE)
    assert (err.value.source, err.value.row, err.value.field) == (str(path), 3, "completion")
    assert "bad.jsonl, row 3, field 'completion'" in str(err.value)
    assert not (tmp_path / "out" / "samples.parquet").exists()


def test_ref_logps_stage_for_unpaired_data(ray_cluster, tiny_gpt2, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["completion"], "label": i % 2 == 0}
            for i, r in enumerate(toytask.make_rows(5, seed=2))]
    src = toytask.write_jsonl(tmp_path / "unpaired.jsonl", rows)
    data = DataConfig(path=str(src), kind="unpaired", **DATA)
    stats = ref_logps_stage(data, tiny_gpt2, tmp_path / "refs.parquet", ResourcesConfig(), 2,
                            progress_bars=False)
    out = _rows(tmp_path / "refs.parquet")
    assert stats["rows"] == 5 and [r["label"] for r in out] == [r["label"] for r in rows]
    model, tok = load_model(tiny_gpt2), load_tokenizer(tiny_gpt2)
    direct = [_direct_logps(model, tok, r["prompt"], r["completion"]) for r in rows]
    np.testing.assert_allclose([r["ref_logps"] for r in out], direct, atol=1e-4)


@pytest.mark.slow
def test_guide_and_reference_pools_share_one_gpu(ray_cluster, tiny_gpt2, tmp_path):
    """The scorer and reference pools each ask for the session's single ``accel`` unit (a
    custom resource standing in for a 1-GPU node), over 4 input files (4 read blocks). The
    scored rows are materialized before the reference pool starts, so the pools run one after
    the other by construction. (On Ray 2.60 the one-pass version did not hang here either:
    Ray Data released the finished scorer pool first; the materialization does not rely on
    that.) A watchdog turns a hang into a failure."""
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 32
    rows = toytask.make_rows(n, seed=9)
    samples = tmp_path / "samples"
    samples.mkdir()
    table = pa.table({"row": list(range(n)), "prompt": [r["prompt"] for r in rows],
                      "gold": [r["completion"] for r in rows],
                      "sample": [rows[(i + 1) % n]["completion"] for i in range(n)]})
    for k in range(0, n, 8):
        pq.write_table(table.slice(k, 8), samples / f"{k:03d}.parquet")
    guide = GuideModel.create(GuideConfig(latent_dim=8), tiny_gpt2, **DATA).save(tmp_path / "g")
    one_gpu = ResourcesConfig(num_cpus=0.5, resources={"accel": 1.0})
    pipe = PIPE.model_copy(update={"scorer": one_gpu, "refs": one_gpu})
    done: dict = {}
    worker = threading.Thread(daemon=True, target=lambda: done.update(pairs_stage(
        samples, tiny_gpt2, str(guide), tmp_path / "pairs.parquet",
        DataConfig(path="unused.jsonl", **DATA), pipe)))
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "pairs_stage stalled: the second 1-accel pool never started"
    assert done["pairs"] == n
    assert all(p["ref_chosen_logps"] < 0 for p in _rows(tmp_path / "pairs.parquet"))
