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
from rayalign.config import DataConfig, ResourcesConfig
from rayalign.config_ldalign import GuideConfig
from rayalign.config_train import LoraConfig
from rayalign.data import DataError
from rayalign.guide import HEADS, GuideModel
from rayalign.guide_train import (
    derangement, guide_data, informativeness, load_samples, split_by_prompt, train_guide_model,
    within_prompt_informativeness,
)

MAX_PROMPT, MAX_LEN = 32, 64
PROMPTS = ["sort: 3 1 2 =>", "sort: 9 8 7 6 5 4 =>", "sort: 5 5 =>"]
RESPONSES = [" 1 2 3", " 4 5 6 7 8 9", " 5 5"]
GAP_MARGIN = 0.25  # nats per response token, across prompts; the default recipe reaches 0.31
WITHIN_MARGIN = 0.03  # within a prompt (gold vs a near-miss sample); measured 0.043


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
    # the scorer's artifact: phi alone, same embeddings, and a clear error asking for psi
    slim = guide.save(tmp_path / "slim", decoder=False)
    assert sorted(p.name for p in slim.iterdir()) == ["encoder", "guide.json",
                                                      "projections.safetensors"]
    assert torch.equal(GuideModel.load(slim, decoder=False).embed(PROMPTS, RESPONSES), before)
    with pytest.raises(FileNotFoundError, match="guide.save_decoder"):
        GuideModel.load(slim)


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
            pooled = pooled / pooled.pow(2).mean().sqrt()  # RMS-normalized
            expected = g.to_latent(pooled)
        assert torch.allclose(g.embed([prompt], [response])[0], expected, atol=1e-5)


def test_decoder_scores_response_tokens_only_given_the_latent_at_every_position(guide):
    """Independent: full log-softmax over prefix + [x; y] (each input embedding + W_e h) and
    sum the response positions."""
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
            tokens = guide.decoder.get_input_embeddings()(ids) + guide.to_embedding(h[i])
            embeds = torch.cat([prefix, tokens], dim=1)
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
    on held-out prompts: reconstructing with the true h beats another row's h by > GAP_MARGIN
    nats per response token, and beats the h of the other answer to the same prompt by
    > WITHIN_MARGIN; before training both gaps are ~0."""
    sft, samples = write_toy_data(tmp_path, 160)
    cfg = GuideConfig()
    pairs, triples = guide_data(
        DataConfig(path=sft, max_prompt_length=MAX_PROMPT, max_length=MAX_LEN), samples)
    assert len(pairs) == 320 and len(triples) == 160
    train, held_out, held_triples = split_by_prompt(pairs, triples, cfg.eval_fraction, cfg.seed)
    assert len(held_out) == 32 and len(held_triples) == 16
    assert not {p for p, _ in train} & {p for p, _ in held_out}  # split by prompt
    g = GuideModel.create(cfg, tiny_gpt2, MAX_PROMPT, MAX_LEN)
    before = informativeness(g, held_out)
    before_within = within_prompt_informativeness(g, held_triples)
    history = train_guide_model(g, train, cfg)
    after = informativeness(g, held_out)
    after_within = within_prompt_informativeness(g, held_triples)
    assert abs(before["gap"]) < 0.05 and abs(before_within["gap"]) < 0.02
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["nll_true"] < before["nll_true"]
    assert after["gap"] > GAP_MARGIN, after
    assert after_within["gap"] > WITHIN_MARGIN, after_within


def test_within_prompt_informativeness_swaps_the_latents_of_a_prompts_two_answers(guide):
    """Independent: each response scored alone, with its own h and with the other answer's."""
    triples = [(PROMPTS[0], RESPONSES[0], " 1 3 2"), (PROMPTS[1], RESPONSES[1], " 4 5"),
               (PROMPTS[2], RESPONSES[2], RESPONSES[2])]  # sample == gold: left out
    got = within_prompt_informativeness(guide, triples, batch_size=2)
    own = swapped = tokens = 0.0
    gold_own = gold_swapped = gold_tokens = 0.0
    with torch.no_grad():
        for prompt, gold, sample in triples[:2]:
            h = {r: guide.embed([prompt], [r]) for r in (gold, sample)}
            for response, other in ((gold, sample), (sample, gold)):
                batch = guide.tokenize([prompt], [response])
                lp_own, n = guide.response_logprobs(h[response], batch)
                lp_other, _ = guide.response_logprobs(h[other], batch)
                own, swapped, tokens = own - lp_own.item(), swapped - lp_other.item(), tokens + n.item()
                if response == gold:
                    gold_own -= lp_own.item()
                    gold_swapped -= lp_other.item()
                    gold_tokens += n.item()
    assert got["rows"] == 2
    # float32 sums over ~10 tokens of NLL ~4 nats, batched vs alone: ~1e-5 abs
    assert got["nll_true"] == pytest.approx(own / tokens, abs=1e-4)
    assert got["nll_swapped"] == pytest.approx(swapped / tokens, abs=1e-4)
    assert got["gap"] == pytest.approx((swapped - own) / tokens, abs=1e-4)
    assert got["gold_gap"] == pytest.approx((gold_swapped - gold_own) / gold_tokens, abs=1e-4)
    nothing = within_prompt_informativeness(guide, triples[2:])
    assert nothing["rows"] == 0 and nothing["gap"] != nothing["gap"]  # NaN: nothing to compare


class _Killed(Exception):
    pass


def test_a_killed_guide_training_resumes_after_its_last_epoch(tiny_llama, tmp_path, one_torch_thread):
    """Killed after epoch 1 of 3, rerun with the same checkpoint_dir: epochs 0-1 are not redone
    and the weights equal those of an uninterrupted run (same order, dropout, schedule)."""
    cfg = GuideConfig(epochs=3, batch_size=4)
    pairs = list(zip(PROMPTS * 4, RESPONSES * 4))

    def kill_after_second(epoch: dict) -> None:
        if epoch["epoch"] == 1:
            raise _Killed

    first = GuideModel.create(cfg, tiny_llama, MAX_PROMPT, MAX_LEN)
    with pytest.raises(_Killed):
        train_guide_model(first, pairs, cfg, on_epoch=kill_after_second, checkpoint_dir=tmp_path)
    resumed = GuideModel.create(cfg, tiny_llama, MAX_PROMPT, MAX_LEN)
    ran = []
    history = train_guide_model(resumed, pairs, cfg, on_epoch=ran.append, checkpoint_dir=tmp_path)
    assert [e["epoch"] for e in ran] == [2] and [e["epoch"] for e in history] == [0, 1, 2]
    straight = GuideModel.create(cfg, tiny_llama, MAX_PROMPT, MAX_LEN)
    expected = train_guide_model(straight, pairs, cfg)
    assert [e["loss"] for e in history] == pytest.approx([e["loss"] for e in expected], abs=1e-6)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name  # same float ops in the same order
    with pytest.raises(ValueError, match="another guide config"):
        train_guide_model(GuideModel.create(cfg, tiny_llama, MAX_PROMPT, MAX_LEN), pairs[:6],
                          cfg, checkpoint_dir=tmp_path)


def test_a_lora_guide_trains_adapters_only_and_saves_plain_merged_checkpoints(
        tiny_llama, tmp_path, one_torch_thread):
    """guide.lora with train_encoder: only adapters (of phi's trunk and psi's blocks) and the
    projections train, every base weight stays as loaded, the loss falls; the saved guide is
    plain Hugging Face checkpoints that embed as the adapted guide did and unlike the base."""
    cfg = GuideConfig(epochs=3, batch_size=4, lr=1e-2, train_encoder=True,
                      lora=LoraConfig(r=4, alpha=8.0))
    g = GuideModel.create(cfg, tiny_llama, MAX_PROMPT, MAX_LEN)
    trainable = {n for n, p in g.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith(HEADS) for n in trainable), trainable
    assert {n.split(".")[0] for n in trainable if "lora_" in n} == {"encoder", "decoder"}
    frozen = {n: p.detach().clone() for n, p in g.named_parameters() if not p.requires_grad}
    history = train_guide_model(g, list(zip(PROMPTS * 4, RESPONSES * 4)), cfg)
    assert history[-1]["loss"] < history[0]["loss"]
    for n, p in g.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    adapted = g.embed(PROMPTS, RESPONSES)
    g.save(tmp_path / "guide", decoder=True)
    loaded = GuideModel.load(tmp_path / "guide")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    # W + (alpha / r) B A rounded once into float32 weights: ~1e-7 relative per weight, a few
    # 1e-6 through two blocks and the RMS-normalized pooling
    torch.testing.assert_close(loaded.embed(PROMPTS, RESPONSES), adapted, atol=1e-5, rtol=0)
    base = GuideModel.create(GuideConfig(), tiny_llama, MAX_PROMPT, MAX_LEN)
    moved = (loaded.pooled(PROMPTS, RESPONSES, project=False)
             - base.pooled(PROMPTS, RESPONSES, project=False)).abs().max()
    assert moved > 1e-3  # the merged trunk is not the base trunk
    with pytest.raises(ValueError, match="lora.export"):
        GuideConfig(lora=LoraConfig(export="adapter"))


def test_a_template_less_guide_tokenizer_trains_on_messages_data(tiny_gpt2, tiny_llama, tmp_path):
    """messages rows are rendered by the policy's chat template (the one that rendered the
    samples); the guide's tokenizer only tokenizes, so a guide without a template works, and
    a renderer without one is a clear error naming the row and what to set."""
    from transformers import AutoTokenizer

    plain = tmp_path / "plain"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.chat_template = None
    tok.save_pretrained(plain)
    for f in Path(tiny_gpt2).iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (plain / f.name).write_bytes(f.read_bytes())
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    policy = AutoTokenizer.from_pretrained(tiny_llama)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in zip(PROMPTS, RESPONSES)]
    sft = toytask.write_jsonl(tmp_path / "sft.jsonl", rows)
    rendered = [policy.apply_chat_template(r["messages"][:1], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
    samples = toytask.write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt": p, "gold": r, "sample": " 7"} for p, r in zip(rendered, RESPONSES)])
    data = DataConfig(path=str(sft), max_prompt_length=MAX_PROMPT, max_length=MAX_LEN)
    pairs, triples = guide_data(data, samples, policy)
    assert [p for p, _ in pairs] == rendered * 2  # gold and samples: one rendering per prompt
    g = GuideModel.create(GuideConfig(model=str(plain), epochs=1), tiny_llama, MAX_PROMPT, MAX_LEN)
    assert g.tokenizer.chat_template is None
    train_guide_model(g, pairs, GuideConfig(epochs=1))
    assert within_prompt_informativeness(g, triples)["rows"] == 3
    with pytest.raises(DataError, match=r"sft.jsonl, row 1, field 'messages': .*chat template.*"
                                        r"policy.path"):
        guide_data(data, samples, AutoTokenizer.from_pretrained(plain))


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
        ResourcesConfig(num_actors=2, num_cpus=1), log_dir=tmp_path / "logs",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "logs" / "steps.jsonl").open()]
    assert [(r["step"], r["steps"]) for r in logged] == [(1, 2), (2, 2)]  # rank 0 only, per epoch
    assert [r["loss"] for r in logged] == pytest.approx([e["loss"] for e in metrics["epochs"]])
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert metrics["workers"] == 2
    assert metrics["train_rows"] + metrics["eval_rows"] == 128
    per_worker = metrics["train_rows"] // 2  # each worker: its half of the shuffled rows
    assert [e["steps"] for e in metrics["epochs"]] == [-(-per_worker // 8)] * 2
    assert set(metrics["informativeness"]) >= {"nll_true", "nll_shuffled", "gap"}
    assert set(metrics["within_prompt"]) >= {"nll_true", "nll_swapped", "gap"}
    assert 0 < metrics["peak_rss_gb"] < 4
    loaded = GuideModel.load(out, decoder=False)
    assert metrics["guide_version"] == loaded.spec.version
    assert loaded.embed(PROMPTS, RESPONSES).isfinite().all()
    assert not (tmp_path / "run" / ".guide.train").exists()
    assert not (tmp_path / "run" / ".guide.ckpt").exists()  # epoch checkpoints: gone when done
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
    history = train_guide_model(g, list(zip(PROMPTS * 4, RESPONSES * 4)), cfg)
    assert len(history) == 1 and history[0]["steps"] == 3
    together = g.embed(PROMPTS, RESPONSES)
    assert torch.allclose(together[1], g.embed(PROMPTS[1:2], RESPONSES[1:2])[0], atol=1e-5)
    assert g.distances(PROMPTS, RESPONSES, RESPONSES).eq(0).all()
