"""GuideScorer (plain and under Ray Data) and the scoring Serve app over real HTTP."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from actors.scorer import GuideScorer
from rayalign.config import ResourcesConfig
from rayalign.config_ldalign import GuideConfig
from rayalign.config_services import HTTPServiceConfig, ScoringConfig
from rayalign.guide import GuideModel
from services.http import resolve_token
from services.scoring import build_app

TOKEN = "test-token-123"
ROUTE = "/scoring-test"
BASE = f"http://127.0.0.1:8000{ROUTE}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_items": 4, "max_candidates": 8, "max_text_chars": 200}
ITEM = {"prompt": "sort: 3 1 2 =>", "reference": " 1 2 3",
        "candidates": [" 1 2 3", " 1 3 2", " 3 2 1", " 1 2"]}
ITEM2 = {"prompt": "sort: 7 5 =>", "reference": " 5 7", "candidates": [" 7 5", " 5 7 7"]}


@pytest.fixture(scope="module")
def guide_path(tiny_gpt2, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("scoring") / "guide"
    return str(GuideModel.create(GuideConfig(), tiny_gpt2, 32, 64).save(path))


@pytest.fixture(scope="module")
def guide(guide_path) -> GuideModel:
    return GuideModel.load(guide_path, decoder=False)


@pytest.fixture(scope="module")
def service(ray_cluster, guide_path):
    from ray import serve

    cfg = ScoringConfig(guide_path=guide_path, app_name="scoring-test", route_prefix=ROUTE,
                        # the proxy's queue holds the 10-request burst below: Serve's router
                        # queues a burst while it assigns it to the replica and sheds past
                        # max_queued_requests (8 by default; test_service_limits tests that)
                        http=HTTPServiceConfig(auth_token=TOKEN, max_body_bytes=4096,
                                               max_queued_requests=16),
                        replicas=ResourcesConfig(num_cpus=1), **LIMITS)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    yield BASE
    serve.delete(cfg.app_name)


def test_scorer_adds_a_float64_distance_column_equal_to_the_guide(guide_path, guide):
    batch = {"prompt": np.array([ITEM["prompt"]] * 2 + [ITEM2["prompt"]], dtype=object),
             "gold": np.array([ITEM["reference"]] * 2 + [ITEM2["reference"]], dtype=object),
             "sample": np.array([" 1 2 3", " 1 3 2", ""], dtype=object),
             "id": np.arange(3)}
    out = GuideScorer(guide_path, batch_size=2, device="cpu")(batch)
    assert out["distance"].dtype == np.float64 and out["distance"][0] == 0.0
    assert np.array_equal(out["id"], batch["id"])
    expected = guide.distances(list(batch["prompt"]), list(batch["gold"]), list(batch["sample"]))
    np.testing.assert_allclose(out["distance"], expected.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="lacks column"):
        GuideScorer(guide_path)({"prompt": batch["prompt"], "gold": batch["gold"]})


def test_scorer_as_a_ray_data_callable_class(ray_cluster, guide_path, guide):
    import ray

    rows = [{"prompt": ITEM["prompt"], "gold": ITEM["reference"], "sample": c}
            for c in ITEM["candidates"]]
    out = ray.data.from_items(rows).map_batches(
        GuideScorer, fn_constructor_kwargs={"guide_path": guide_path}, batch_size=2,
        batch_format="numpy", concurrency=1, num_cpus=1,
    ).take_all()
    by_sample = {r["sample"]: r["distance"] for r in out}
    expected = guide.distances([ITEM["prompt"]] * 4, [ITEM["reference"]] * 4, ITEM["candidates"])
    assert [by_sample[c] for c in ITEM["candidates"]] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)


def test_distances_over_http_equal_the_guide(service, guide):
    one = httpx.post(f"{service}/v1/distances", json=ITEM, headers=AUTH, timeout=30)
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["latent_dim"] == guide.spec.latent_dim
    assert body["guide_version"] == guide.spec.version
    n = len(ITEM["candidates"])
    expected = guide.distances([ITEM["prompt"]] * n, [ITEM["reference"]] * n, ITEM["candidates"])
    assert body["distances"] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)
    assert body["distances"][0] == 0.0

    both = httpx.post(f"{service}/v1/distances", json=[ITEM, ITEM2], headers=AUTH, timeout=30)
    assert both.status_code == 200, both.text
    nested = both.json()["distances"]
    assert [len(d) for d in nested] == [n, 2]
    expected2 = guide.distances([ITEM2["prompt"]] * 2, [ITEM2["reference"]] * 2, ITEM2["candidates"])
    assert nested[0] == pytest.approx(body["distances"], rel=1e-5, abs=1e-5)
    assert nested[1] == pytest.approx(expected2.tolist(), rel=1e-5, abs=1e-5)


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(service, guide):
    items = [{"prompt": f"sort: {i} {9 - i} =>", "reference": f" {min(i, 9 - i)} {max(i, 9 - i)}",
              "candidates": [f" {i}", f" {9 - i} {i}"]} for i in range(10)]

    async def fire():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post(f"{service}/v1/distances", json=it)
                                          for it in items))

    for item, response in zip(items, asyncio.run(fire())):
        assert response.status_code == 200, response.text
        expected = guide.distances([item["prompt"]] * 2, [item["reference"]] * 2, item["candidates"])
        assert response.json()["distances"] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-5)


def test_embeddings_over_http_equal_the_guide(service, guide):
    pairs = [{"prompt": ITEM["prompt"], "response": c} for c in ITEM["candidates"][:3]]
    response = httpx.post(f"{service}/v1/embeddings", json=pairs, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    expected = guide.embed([p["prompt"] for p in pairs], [p["response"] for p in pairs])
    np.testing.assert_allclose(np.array(response.json()["embeddings"]), expected.numpy(),
                               rtol=1e-5, atol=1e-6)
    single = httpx.post(f"{service}/v1/embeddings", json=pairs[0], headers=AUTH, timeout=30)
    np.testing.assert_allclose(single.json()["embeddings"], expected[0].numpy(), rtol=1e-5,
                               atol=1e-6)


def test_healthz_and_openapi_need_no_token(service, guide):
    health = httpx.get(f"{service}/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "latent_dim": guide.spec.latent_dim,
                             "guide_version": guide.spec.version}
    paths = httpx.get(f"{service}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/distances", "/v1/embeddings", "/healthz"} <= set(paths)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}])
def test_posts_without_the_right_bearer_token_get_401(service, headers):
    for path in ("/v1/distances", "/v1/embeddings"):
        # even a malformed body is refused for the missing token first
        response = httpx.post(f"{service}{path}", content=b"{not json", headers=headers, timeout=30)
        assert response.status_code == 401, response.text
        assert "token" in response.json()["detail"]


BAD_INPUTS = {
    "empty prompt": (422, {**ITEM, "prompt": ""}, "empty"),
    "blank candidate": (422, {**ITEM, "candidates": [" 1", "   "]}, "empty"),
    "no candidates": (422, {**ITEM, "candidates": []}, "at least 1"),
    "candidates not a list": (422, {**ITEM, "candidates": " 1 2 3"}, "list"),
    "prompt not a string": (422, {**ITEM, "prompt": 5}, "string"),
    "missing reference": (422, {"prompt": "p", "candidates": ["c"]}, "reference"),
    "unknown field": (422, {**ITEM, "temperature": 1.0}, "temperature"),
    "empty list": (422, [], "at least 1"),
    "not JSON": (422, b"{prompt: oops", "JSON"),
    "lone surrogate": (422, b'{"prompt": "a\\ud800", "reference": "r", "candidates": ["c"]}',
                       "surrogate"),
    "too many items": (413, [ITEM2] * 5, "5 items exceed the limit of 4"),
    "too many candidates": (413, {**ITEM, "candidates": ["c"] * 9}, "candidates: 9 exceed"),
    "text too long": (413, {**ITEM, "reference": "x" * 201}, "reference: 201 characters"),
    "body too large": (413, {**ITEM, "pad": "x" * 5000}, "bytes exceeds the limit"),
}


@pytest.mark.parametrize("status,body,fragment", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_gets_4xx_with_a_message_never_5xx(service, status, body, fragment):
    kwargs = {"json": body}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {**AUTH, "Content-Type": "application/json"}}
    response = httpx.post(f"{service}/v1/distances", **{"headers": AUTH, "timeout": 30, **kwargs})
    assert response.status_code == status, response.text
    assert fragment in response.text


def test_bad_embeddings_input_gets_422(service):
    response = httpx.post(f"{service}/v1/embeddings", json={"prompt": "p", "response": 3},
                          headers=AUTH, timeout=30)
    assert response.status_code == 422 and "string" in response.text


def test_token_comes_from_config_or_the_named_env_var(monkeypatch):
    monkeypatch.setenv("MY_SCORING_TOKEN", "from-env")
    assert resolve_token(HTTPServiceConfig(auth_token_env="MY_SCORING_TOKEN")) == "from-env"
    assert resolve_token(HTTPServiceConfig(auth_token_env="MY_SCORING_TOKEN",
                                           auth_token="cfg")) == "cfg"
    monkeypatch.delenv("MY_SCORING_TOKEN")
    assert resolve_token(HTTPServiceConfig(auth_token_env="MY_SCORING_TOKEN")) is None
    assert ScoringConfig(guide_path="g").http.auth_token_env == "RAYALIGN_SCORING_TOKEN"
