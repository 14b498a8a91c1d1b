"""Guide model T = (phi, psi): persistence, distances, pooling, decoder scoring, the default
recipe's latent informativeness, and the Ray Train driver."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayalign import toytask
from rayalign.config import DataConfig, GuideConfig, ResourcesConfig
from rayalign.data import DataError
from rayalign.guide import (
    GuideModel, derangement, guide_pairs, informativeness, load_samples, split_pairs,
    train_guide_model,
)

MAX_PROMPT, MAX_LEN = 32, 64
PROMPTS = ["sort: 3 1 2 =>", "sort: 9 8 7 6 5 4 =>", "sort: 5 5 =>"]
RESPONSES = [" 1 2 3", " 4 5 6 7 8 9", " 5 5"]
GAP_MARGIN = 0.25  # nats per response token; the default recipe reaches 0.93 on this data


def perturb(rng: random.Random, gold: str) -> str:
    """A near-miss of a sorted list, like a weak policy's sample: a swap, drop, insert or edit."""
    digits = gold.split()
    op = rng.randrange(4)
    if op == 0 and len(digits) > 1:
        i, j = rng.sample(range(len(digits)), 2)
        digits[i], digits[j] = digits[j], digits[i]
    elif op == 1 and len(digits) > 1:
        digits.pop(rng.randrange(len(digits)))
    elif op == 2:
        digits.insert(rng.randrange(len(digits) + 1), str(rng.randrange(10)))
    else:
        digits[rng.randrange(len(digits))] = str(rng.randrange(10))
    return " " + " ".join(digits)


def write_toy_data(tmp_path, n: int, seed: int = 1) -> tuple[str, str]:
    """An SFT file of n sorting examples and a samples file of one perturbed answer each."""
    rows = toytask.make_rows(n, seed)
    rng = random.Random(seed)
    samples = [{"prompt": r["prompt"], "gold": r["completion"],
                "sample": perturb(rng, r["completion"])} for r in rows]
    sft = toytask.write_jsonl(tmp_path / "sft.jsonl", rows)
    return str(sft), str(toytask.write_jsonl(tmp_path / "samples.jsonl", samples))


@pytest.fixture(scope="module")
def guide(tiny_gpt2) -> GuideModel:
    return GuideModel.create(GuideConfig(), tiny_gpt2, MAX_PROMPT, MAX_LEN).eval()


def test_save_load_round_trip_gives_identical_embeddings(guide, tmp_path):
    before = guide.embed(PROMPTS, RESPONSES)
    path = guide.save(tmp_path / "guide")
    assert sorted(p.name for p in path.iterdir()) == [
        "decoder", "encoder", "guide.json", "projections.safetensors"]
    loaded = GuideModel.load(path)
    assert loaded.spec == guide.spec and len(loaded.spec.version) == 12
    assert torch.equal(loaded.embed(PROMPTS, RESPONSES), before)
    assert torch.equal(GuideModel.load(path, decoder=False).embed(PROMPTS, RESPONSES), before)
    # the decoder comes back too: same reconstruction log-probs
    batch = guide.tokenize(PROMPTS, RESPONSES)
    h = guide.encode_batch(batch)
    with torch.no_grad():
        assert torch.equal(loaded.response_logprobs(h, batch)[0], guide.response_logprobs(h, batch)[0])
    # the version is a content hash of phi: same weights, same version
    assert GuideModel.load(loaded.save(tmp_path / "again"), decoder=False).spec.version == \
        loaded.spec.version


def test_load_rejects_a_directory_that_is_not_a_guide(tmp_path, tiny_gpt2):
    with pytest.raises(FileNotFoundError, match="not a guide checkpoint"):
        GuideModel.load(tiny_gpt2)


def test_distances_are_l2_norms_of_embedding_differences_and_zero_for_identical(guide):
    candidates = [RESPONSES[0], " 1 3 2", " 9 9 9 9 9 9"]
    prompts = [PROMPTS[0]] * 3
    s = guide.distances(prompts, [RESPONSES[0]] * 3, candidates)
    assert s.dtype == torch.float64 and s.shape == (3,)
    assert s[0].item() == 0.0
    # the reference embeds the same pairs in a differently composed batch (6 rows, not the 4
    # distinct pairs distances() embeds), so float32 kernels may round differently: embedding
    # components agree to ~1e-7 (test_batched_and_single_item_embeddings_agree allows 1e-5),
    # hence |s - s'| <= ||e - e'|| ~ 1e-6 for these ~1-norm latents; abs 1e-5 leaves 10x margin
    # and is still ~1e-3 of the distances here, so a wrong formula (squared, L1, unnormalized
    # mean) fails. Seen on one AMD EPYC: 1.2e-7 (3e-6 relative on s = 0.0385).
    h = guide.embed(prompts + prompts, [RESPONSES[0]] * 3 + candidates).double().numpy()
    expected = ((h[:3] - h[3:]) ** 2).sum(-1) ** 0.5
    assert s.numpy() == pytest.approx(expected, rel=0, abs=1e-5)
    assert (s[1:] > 1e-3).all()
    # symmetric up to the same float32 rounding (the distinct pairs are embedded in another order)
    swapped = guide.distances(prompts, candidates, [RESPONSES[0]] * 3)
    torch.testing.assert_close(swapped, s, rtol=0, atol=1e-5)


def test_batched_and_single_item_embeddings_agree(guide):
    together = guide.embed(PROMPTS, RESPONSES, batch_size=8)
    for i in range(len(PROMPTS)):
        alone = guide.embed([PROMPTS[i]], [RESPONSES[i]])
        assert torch.allclose(together[i], alone[0], atol=1e-5), i
    assert torch.allclose(guide.embed(PROMPTS, RESPONSES, batch_size=2), together, atol=1e-5)


def test_batched_tokenization_follows_data_encode_truncation(guide):
    """guide.tokenize tokenizes all strings in one call; the sequences must be exactly those of
    rayalign.data.encode, including both truncation rules."""
    from rayalign.data import collate, encode

    long_prompt = "sort: " + " ".join(["7"] * 3 * MAX_PROMPT) + " =>"
    long_response = " " + " ".join(["1"] * 2 * MAX_LEN)
    prompts, responses = PROMPTS + [long_prompt, PROMPTS[0]], RESPONSES + [" 1", long_response]
    expected = collate([encode(guide.tokenizer, p, r, MAX_PROMPT, MAX_LEN)
                        for p, r in zip(prompts, responses)], guide.tokenizer.pad_token_id)
    got = guide.tokenize(prompts, responses)
    for field in ("input_ids", "attention_mask", "response_mask"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    assert got.attention_mask.sum(-1).max() == MAX_LEN


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_reads_the_documented_hidden_states(tiny_gpt2, pooling):
    """Independent: run the backbone on the unpadded sequence and pool by hand."""
    g = GuideModel.create(GuideConfig(pooling=pooling), tiny_gpt2, MAX_PROMPT, MAX_LEN).eval()
    for prompt, response in zip(PROMPTS, RESPONSES):
        p_ids = g.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = g.tokenizer(response, add_special_tokens=False)["input_ids"] + [g.tokenizer.eos_token_id]
        with torch.no_grad():
            hidden = g.encoder(torch.tensor([p_ids + r_ids]), output_hidden_states=True
                               ).hidden_states[-1][0]
            pooled = hidden[-1] if pooling == "last" else hidden[len(p_ids):].mean(0)
            expected = g.to_latent(pooled)
        assert torch.allclose(g.embed([prompt], [response])[0], expected, atol=1e-5)


def test_decoder_scores_response_tokens_only_given_the_latent_prefix(guide):
    """Independent: full log-softmax over prefix + [x; y] and sum the response positions."""
    batch = guide.tokenize(PROMPTS, RESPONSES)
    with torch.no_grad():
        h = guide.encode_batch(batch)
        logps, counts = guide.response_logprobs(h, batch)
        k = guide.spec.prefix_tokens
        for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
            p_ids = guide.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r_ids = guide.tokenizer(response, add_special_tokens=False)["input_ids"] + [
                guide.tokenizer.eos_token_id]
            ids = torch.tensor([p_ids + r_ids])
            prefix = guide.to_prefix(h[i]).view(1, k, -1)
            embeds = torch.cat([prefix, guide.decoder.get_input_embeddings()(ids)], dim=1)
            logp = guide.decoder(inputs_embeds=embeds).logits.log_softmax(-1)[0]
            # the token at sequence position t is predicted by the logits at position k + t - 1
            expected = sum(logp[k + t - 1, ids[0, t]] for t in range(len(p_ids), ids.shape[1]))
            assert counts[i].item() == len(r_ids)
            assert logps[i].item() == pytest.approx(expected.item(), abs=1e-4)
        # changing h changes the score: the latent reaches the decoder
        assert not torch.allclose(guide.response_logprobs(h.flip(0), batch)[0], logps)


def test_word_dropout_changes_only_training_inputs_not_labels(guide):
    batch = guide.tokenize(PROMPTS, RESPONSES)
    with torch.no_grad():
        h = guide.encode_batch(batch)
        clean, counts = guide.response_logprobs(h, batch)
        rng = torch.Generator().manual_seed(0)
        dropped, counts_dropped = guide.response_logprobs(h, batch, 0.9, rng)
    assert torch.equal(counts, counts_dropped)
    assert not torch.allclose(clean, dropped)


def test_derangement_has_no_fixed_points():
    for n in (2, 3, 10, 101):
        perm = derangement(n, torch.Generator().manual_seed(n))
        assert sorted(perm.tolist()) == list(range(n))
        assert (perm != torch.arange(n)).all()


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread; two spin-wait when the CPUs are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_default_recipe_makes_the_latent_informative(tiny_gpt2, tmp_path, one_torch_thread):
    """After the default GuideConfig on 160 sorting examples + one perturbed sample each,
    reconstructing with the true h beats reconstructing with another row's h by > GAP_MARGIN
    nats per response token on held-out pairs (measured: 0.93); before training the gap is ~0."""
    sft, samples = write_toy_data(tmp_path, 160)
    cfg = GuideConfig()
    pairs = guide_pairs(DataConfig(path=sft, max_prompt_length=MAX_PROMPT, max_length=MAX_LEN),
                        samples)
    assert len(pairs) == 320
    train, held_out = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    g = GuideModel.create(cfg, tiny_gpt2, MAX_PROMPT, MAX_LEN)
    before = informativeness(g, held_out)
    history = train_guide_model(g, train, cfg)
    after = informativeness(g, held_out)
    assert abs(before["gap"]) < 0.05
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["nll_true"] < before["nll_true"]
    assert after["gap"] > GAP_MARGIN, after


def test_load_samples_names_file_row_and_field(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"prompt": "p", "gold": "g", "sample": ""}, {"prompt": "p", "gold": 3, "sample": "s"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"samples.jsonl, row 2, field 'gold': expected a string"):
        load_samples(path)
    path.write_text(json.dumps({"prompt": "p", "gold": "g"}) + "\n")
    with pytest.raises(DataError, match=r"row 1, field 'sample': missing"):
        load_samples(path)
    path.write_text(json.dumps(rows[0]) + "\n")
    assert load_samples(path) == [("p", "g", "")]  # a policy may return an empty sample


@pytest.mark.slow
def test_ray_train_driver_writes_checkpoint_and_metrics(ray_cluster, tiny_gpt2, tmp_path):
    from actors.guide_trainer import train_guide

    sft, samples = write_toy_data(tmp_path, 64)
    out = train_guide(
        DataConfig(path=sft, max_prompt_length=MAX_PROMPT, max_length=MAX_LEN), samples,
        tiny_gpt2, tmp_path / "run" / "guide", GuideConfig(epochs=2),
        ResourcesConfig(num_actors=2, num_cpus=1),
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["workers"] == 2
    assert metrics["train_rows"] + metrics["eval_rows"] == 128
    per_worker = metrics["train_rows"] // 2  # each worker: its half of the shuffled rows
    assert [e["steps"] for e in metrics["epochs"]] == [-(-per_worker // 16)] * 2
    assert set(metrics["informativeness"]) >= {"nll_true", "nll_shuffled", "gap"}
    loaded = GuideModel.load(out, decoder=False)
    assert metrics["guide_version"] == loaded.spec.version
    assert loaded.embed(PROMPTS, RESPONSES).isfinite().all()
    assert not (tmp_path / "run" / ".guide.train").exists()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["guide"]


def test_train_guide_job_refuses_a_bad_config_before_starting_ray():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "jobs/train_guide.py", "--config", "configs/guide.yaml",
         "--set", "guide.latent_dim=0"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "guide.latent_dim" in done.stderr and "greater than 0" in done.stderr


def test_any_causal_lm_works_as_phi_and_psi(tiny_llama):
    """A Llama backbone (RoPE, another `base_model` attribute) trains and embeds like GPT-2."""
    cfg = GuideConfig(epochs=1, batch_size=4)
    g = GuideModel.create(cfg, tiny_llama, MAX_PROMPT, MAX_LEN)
    history = train_guide_model(g, list(zip(PROMPTS * 3, RESPONSES * 3)), cfg)
    assert len(history) == 1 and history[0]["steps"] == 3
    together = g.embed(PROMPTS, RESPONSES)
    assert torch.allclose(together[1], g.embed(PROMPTS[1:2], RESPONSES[1:2])[0], atol=1e-5)
    assert g.distances(PROMPTS, RESPONSES, RESPONSES).eq(0).all()
