"""The OpenAI-compatible sampler service on the session's Ray, over real HTTP, with the
official `openai` client (and httpx for the error cases the client would hide)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from rayalign.config import SamplingConfig, load_config
from rayalign.config_services import SamplerServiceConfig
from rayalign.models import load_tokenizer
from rayalign.sampling import HFEngine, derive_seed
from services.sampler import build_app

ROOT = Path(__file__).resolve().parent.parent
ROUTE = "/sampler-test"
MODEL = "tiny-policy"


@pytest.fixture(scope="module")
def service(ray_cluster, tiny_gpt2):
    cfg = SamplerServiceConfig(model_path=tiny_gpt2, served_model_name=MODEL,
                               sampling=SamplingConfig(max_new_tokens=12), max_prompt_length=32,
                               app_name="sampler-test", route_prefix=ROUTE, max_completions=8)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    base = f"http://127.0.0.1:8000{ROUTE}/v1"
    yield cfg, base, openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    serve.delete(cfg.app_name)


def test_models_lists_the_served_model(service):
    _, _, client = service
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completions_are_the_engines_samples_for_the_request_seed(service, tiny_gpt2):
    cfg, _, client = service
    prompts = ["sort: 3 1 2 =>", "sort: 9 8 =>"]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, seed=42,
                                    temperature=0.8)
    assert len(got.choices) == 4 and got.model == MODEL
    params = cfg.sampling.model_copy(update={"max_new_tokens": 6, "n": 2, "temperature": 0.8})
    local = HFEngine(tiny_gpt2, cfg.sampling, cfg.max_prompt_length).generate(
        prompts, [derive_seed(42, i) for i in range(2)], params)
    assert [c.text for c in got.choices] == [c.text for cs in local for c in cs]
    assert all(c.finish_reason in ("stop", "length") for c in got.choices)
    assert got.usage.completion_tokens == sum(len(c.token_ids) for cs in local for c in cs)
    again = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, seed=42,
                                      temperature=0.8)
    assert [c.text for c in again.choices] == [c.text for c in got.choices]


def test_chat_completions_apply_the_chat_template(service, tiny_gpt2):
    cfg, _, client = service
    messages = [{"role": "system", "content": "sort digits"}, {"role": "user", "content": "3 1 2"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, seed=7,
                                         temperature=0.0)
    (choice,) = got.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    prompt = load_tokenizer(tiny_gpt2).apply_chat_template(messages, tokenize=False,
                                                           add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>")
    greedy = cfg.sampling.model_copy(update={"max_new_tokens": 5, "temperature": 0.0})
    (expected,), = HFEngine(tiny_gpt2, cfg.sampling, cfg.max_prompt_length).generate([prompt], params=greedy)
    assert choice.message.content == expected.text


def test_concurrent_requests_pooled_by_the_replica_get_their_own_samples(service, tiny_gpt2):
    """Requests in flight together are pooled into engine calls (grouped by their sampling
    parameters); each still gets exactly what the engine gives it alone."""
    cfg, _, client = service
    requests = [{"prompt": f"sort: {i} 3 1 =>", "seed": i, "max_tokens": 4 + i % 2,
                 "temperature": 1.0} for i in range(8)]
    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(lambda r: client.completions.create(model=MODEL, **r), requests))
    engine = HFEngine(tiny_gpt2, cfg.sampling, cfg.max_prompt_length)
    for r, response in zip(requests, got):
        params = cfg.sampling.model_copy(update={"max_new_tokens": r["max_tokens"]})
        (expected,), = engine.generate([r["prompt"]], [derive_seed(r["seed"], 0)], params)
        assert response.choices[0].text == expected.text


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "other", "prompt": "x"}, 404, "not found"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 13}, 400, "exceeds"),
    ({"model": MODEL, "prompt": ["x"] * 5, "n": 2}, 400, "limit of 8"),
    ({"model": MODEL, "prompt": ""}, 400, "non-empty"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, 422, "logprobs"),
    ({"model": MODEL, "prompt": "x", "stream": True}, 422, "stream"),
])
def test_bad_requests_are_4xx_with_the_reason(service, body, status, needle):
    _, base, _ = service
    response = httpx.post(f"{base}/completions", json=body, timeout=30)
    assert response.status_code == status
    assert needle in response.text


def test_the_shipped_config_is_valid_and_overridable():
    cfg = load_config(SamplerServiceConfig, ROOT / "configs" / "sampler_service.yaml",
                      ["model_path=/ckpt", "sampling.temperature=0.5"])
    assert (cfg.model_path, cfg.sampling.temperature, cfg.route_prefix) == ("/ckpt", 0.5, "/")
