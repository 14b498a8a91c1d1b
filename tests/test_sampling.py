"""Sampling engines, engine selection, the sampler's batch contract and LD-Align weights (no Ray)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from actors.sampler import PolicySampler
from rayalign import toytask
from rayalign.config import SamplingConfig
from rayalign.models import load_model, load_tokenizer
from rayalign.sampling import (Completion, HFEngine, VLLMEngine, derive_seed, prompt_token_ids,
                               select_engine)
from rayalign.weights import WeightError, distance_mean, ld_align_weights

PROMPTS = [r["prompt"] for r in toytask.make_rows(6, seed=3)]


@pytest.fixture(scope="module")
def engine(tiny_gpt2) -> HFEngine:
    return HFEngine(tiny_gpt2, SamplingConfig(max_new_tokens=8, batch_size=4), max_prompt_length=32)


# ---- engine selection -------------------------------------------------------------------

@pytest.mark.parametrize("vllm,gpu,expected", [
    (True, True, "vllm"), (True, False, "hf"), (False, True, "hf"), (False, False, "hf"),
])
def test_auto_picks_vllm_only_with_vllm_and_a_gpu(vllm, gpu, expected):
    assert select_engine(SamplingConfig(engine="auto"), vllm, gpu) == expected


def test_explicit_engines_are_honoured_or_refused_with_the_reason():
    assert select_engine(SamplingConfig(engine="hf"), True, True) == "hf"
    assert select_engine(SamplingConfig(engine="vllm"), True, True) == "vllm"
    with pytest.raises(RuntimeError, match="vllm is not installed"):
        select_engine(SamplingConfig(engine="vllm"), False, True)
    with pytest.raises(RuntimeError, match="no GPU"):
        select_engine(SamplingConfig(engine="vllm"), True, False)


def test_derived_seeds_depend_on_every_key_and_nothing_else():
    assert derive_seed(0, 5) == derive_seed(0, 5)
    assert len({derive_seed(0, 5), derive_seed(1, 5), derive_seed(0, 6), derive_seed(0, 5, 0)}) == 4
    assert 0 <= derive_seed(123, 4) < 2**63


# ---- HF engine --------------------------------------------------------------------------

def test_same_seeds_same_samples_and_other_seeds_other_samples(engine):
    a = engine.generate(PROMPTS, seeds=list(range(6)))
    assert engine.generate(PROMPTS, seeds=list(range(6))) == a
    b = engine.generate(PROMPTS, seeds=list(range(100, 106)))
    assert sum(x[0].token_ids != y[0].token_ids for x, y in zip(a, b)) >= 5


def test_a_prompts_sample_does_not_depend_on_its_batch(engine):
    """Per-row generators: reversing the batch, or sampling each prompt alone, changes nothing."""
    seeds = [derive_seed(7, i) for i in range(len(PROMPTS))]
    together = engine.generate(PROMPTS, seeds)
    reversed_ = engine.generate(PROMPTS[::-1], seeds[::-1])[::-1]
    alone = [engine.generate([p], [s])[0] for p, s in zip(PROMPTS[:3], seeds[:3])]
    assert together == reversed_
    assert together[:3] == alone


def test_greedy_equals_an_independent_argmax_decode(engine, tiny_gpt2):
    """temperature 0: the engine's tokens are the argmax of a plain forward loop."""
    params = engine.cfg.model_copy(update={"temperature": 0.0})
    got = engine.generate(PROMPTS[:2], params=params)
    model, tok = load_model(tiny_gpt2), load_tokenizer(tiny_gpt2)
    for prompt, (completion,) in zip(PROMPTS[:2], got):
        ids = prompt_token_ids(tok, prompt, 32)
        for _ in range(params.max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        expected = ids[-params.max_new_tokens:]
        assert list(completion.token_ids) == expected[:len(completion.token_ids)]
        assert completion.text == tok.decode(completion.token_ids, skip_special_tokens=True)


def _first_token_distribution(tiny_gpt2, prompt: str, temperature: float) -> torch.Tensor:
    model, tok = load_model(tiny_gpt2), load_tokenizer(tiny_gpt2)
    logits = model(torch.tensor([prompt_token_ids(tok, prompt, 32)])).logits[0, -1]
    return torch.softmax(logits.double() / temperature, -1)


def _total_variation(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def test_samples_follow_the_tempered_softmax(tiny_gpt2):
    """Gumbel-max with per-row streams is an exact sampler: the total variation between 4000
    first tokens and softmax(logits / T) is within the range of 200 numpy multinomial draws
    from that softmax, and clearly outside it for the softmax at another temperature."""
    n, temperature = 4000, 0.1
    cfg = SamplingConfig(max_new_tokens=1, temperature=temperature, n=n, batch_size=n, seed=1)
    (draws,) = HFEngine(tiny_gpt2, cfg, 32).generate(PROMPTS[:1])
    p = _first_token_distribution(tiny_gpt2, PROMPTS[0], temperature).numpy()
    counts = np.bincount([c.token_ids[0] for c in draws], minlength=len(p))
    rng = np.random.default_rng(0)
    noise = max(_total_variation(rng.multinomial(n, p), p) for _ in range(200))
    assert _total_variation(counts, p) <= noise
    other = _first_token_distribution(tiny_gpt2, PROMPTS[0], 2 * temperature).numpy()
    assert _total_variation(counts, other) > 2 * noise


def test_top_p_samples_only_from_the_nucleus(tiny_gpt2):
    cfg = SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.3, n=300, batch_size=300)
    (draws,) = HFEngine(tiny_gpt2, cfg, 32).generate(PROMPTS[:1])
    p = _first_token_distribution(tiny_gpt2, PROMPTS[0], 1.0)
    order = torch.argsort(p, descending=True)
    cum = torch.cumsum(p[order], 0)
    nucleus = set(order[: int((cum < 0.3).sum()) + 1].tolist())
    drawn = {c.token_ids[0] for c in draws}
    assert drawn <= nucleus and len(nucleus) < len(p) // 2


def test_finish_reasons_and_stop_strings(engine):
    params = engine.cfg.model_copy(update={"temperature": 0.0})
    (full,), = engine.generate(PROMPTS[:1], params=params)
    assert full.finish_reason == "length" and len(full.token_ids) == params.max_new_tokens
    stop = full.text[len(full.text) // 2:][:2]  # a string the greedy text contains
    cut = full.text.find(stop)
    assert stop.strip() and cut > 0
    (stopped,), = engine.generate(PROMPTS[:1], params=params.model_copy(update={"stop": (stop,)}))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]


# ---- the sampler's Ray Data batch contract ------------------------------------------------

def test_policy_sampler_explodes_n_samples_into_rows_and_passes_columns_through(tiny_gpt2):
    sampling = SamplingConfig(n=2, max_new_tokens=4, seed=5)
    sampler = PolicySampler(tiny_gpt2, sampling, max_prompt_length=32, device="cpu")
    batch = {"prompt": np.array(PROMPTS[:3], dtype=object), "row": np.array([10, 11, 12]),
             "gold": np.array(["a", "b", "c"], dtype=object)}
    out = sampler(batch)
    assert list(out["row"]) == [10, 10, 11, 11, 12, 12]
    assert list(out["gold"]) == ["a", "a", "b", "b", "c", "c"]
    # row r is sampled with seed derive_seed(sampling.seed, r), whatever its batch
    expected = sampler.engine.generate(PROMPTS[1:2], [derive_seed(5, 11)])[0]
    assert list(out["sample"][2:4]) == [c.text for c in expected]


# ---- LD-Align weights ---------------------------------------------------------------------

def test_weights_are_distances_over_their_mean():
    s = np.array([0.5, 1.0, 2.5, 4.0])  # mean 2.0
    np.testing.assert_allclose(ld_align_weights(s), [0.25, 0.5, 1.25, 2.0], rtol=0, atol=1e-15)
    assert abs(ld_align_weights(np.random.default_rng(0).random(1000)).mean() - 1) < 1e-12


def test_a_batch_is_weighted_with_the_dataset_mean_not_its_own():
    s = np.array([1.0, 1.0, 4.0, 6.0])
    mean = distance_mean(s)  # 3.0
    batch = ld_align_weights(s[:2], mean)
    np.testing.assert_allclose(batch, [1 / 3, 1 / 3])
    assert not np.allclose(batch, ld_align_weights(s[:2]))  # the batch-local mean would give 1


@pytest.mark.parametrize("distances,match", [
    ([1.0, float("nan"), 2.0], "non-finite.*index 1"),
    ([1.0, 2.0, float("inf")], "non-finite.*index 2"),
    ([1.0, -0.5], "index 1 is negative"),
    ([0.0, 0.0, 0.0], "all 3 distances are 0"),
    ([], "empty"),
])
def test_bad_distances_fail_with_the_reason(distances, match):
    with pytest.raises(WeightError, match=match):
        ld_align_weights(distances)


@pytest.mark.parametrize("mean", [0.0, -1.0, float("nan")])
def test_a_bad_dataset_mean_is_refused(mean):
    with pytest.raises(WeightError, match="finite and > 0"):
        ld_align_weights([1.0], mean)


# ---- vLLM engine: the adapter against a stand-in for vLLM's documented API ----------------

class _FakeVLLM:
    """`vllm.LLM` / `SamplingParams` / outputs as vLLM documents them, recording the calls."""

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.calls = kwargs, []

        def generate(self, prompts, sampling_params, use_tqdm=True):
            from types import SimpleNamespace as NS

            self.calls.append((prompts, sampling_params, use_tqdm))
            return [NS(outputs=[NS(text=f"s{i}.{j}", token_ids=[i, j], finish_reason="length")
                                for j in range(p.kwargs["n"])])
                    for i, p in enumerate(sampling_params)]


def test_vllm_engine_passes_token_prompts_and_per_prompt_seeds(tiny_gpt2, monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = _FakeVLLM.LLM, _FakeVLLM.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", fake)
    cfg = SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_new_tokens=5, stop=("\n",),
                         tensor_parallel_size=2, gpu_memory_utilization=0.5, seed=3)
    engine = VLLMEngine(tiny_gpt2, cfg, max_prompt_length=4)
    assert engine.llm.kwargs == {"model": tiny_gpt2, "tensor_parallel_size": 2,
                                 "gpu_memory_utilization": 0.5, "seed": 3, "dtype": "auto",
                                 "max_model_len": 9}  # 4 prompt + 5 new tokens
    out = engine.generate(PROMPTS[:2], seeds=[11, 12])
    assert out[1] == [Completion("s1.0", (1, 0), "length"), Completion("s1.1", (1, 1), "length")]
    prompts, params, use_tqdm = engine.llm.calls[0]
    tok = load_tokenizer(tiny_gpt2)
    assert prompts == [{"prompt_token_ids": prompt_token_ids(tok, p, 4)} for p in PROMPTS[:2]]
    assert [p.kwargs for p in params] == [
        {"n": 2, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": s, "stop": ["\n"]}
        for s in (11, 12)]
    assert use_tqdm is False
