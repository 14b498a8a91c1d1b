"""services/http.py, the request-limits and auth layer both Serve apps share, over real HTTP
on the session's Ray: huge and chunked bodies, lone surrogates, bearer tokens, the OpenAI
error shape, the OpenAPI document and load shedding."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest
from ray import serve

from rayalign.config import ConfigError, ResourcesConfig, SamplingConfig, load_config
from rayalign.config_ldalign import GuideConfig
from rayalign.config_services import HTTPServiceConfig, SamplerServiceConfig, ScoringConfig
from rayalign.guide import GuideModel
from services import sampler, scoring
from services.http import Guard, detail_body

TOKEN = "limits-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTTP = HTTPServiceConfig(auth_token=TOKEN, max_body_bytes=1 << 20)
MODEL = "tiny"
SAMPLER, SCORING = "/limits-sampler", "/limits-scoring"
HOST, PORT = "127.0.0.1", 8000
MB = 1 << 20
GROWTH_BOUND = 48 * MB  # 1 MiB limit + allocator noise; a buffered body would be 100-300 MB


@pytest.fixture(scope="module")
def apps(ray_cluster, tiny_gpt2, tmp_path_factory):
    guide = GuideModel.create(GuideConfig(), tiny_gpt2, 32, 64).save(
        tmp_path_factory.mktemp("limits") / "guide")
    s_cfg = SamplerServiceConfig(model_path=tiny_gpt2, served_model_name=MODEL, http=HTTP,
                                 sampling=SamplingConfig(max_new_tokens=8), max_prompt_length=32,
                                 app_name="limits-sampler", route_prefix=SAMPLER)
    c_cfg = ScoringConfig(guide_path=str(guide), http=HTTP, app_name="limits-scoring",
                          route_prefix=SCORING, replicas=ResourcesConfig(num_cpus=1))
    serve.run(sampler.build_app(s_cfg), name=s_cfg.app_name, route_prefix=SAMPLER)
    serve.run(scoring.build_app(c_cfg), name=c_cfg.app_name, route_prefix=SCORING)
    yield
    serve.delete(s_cfg.app_name)
    serve.delete(c_cfg.app_name)


COMPLETION = {"model": MODEL, "prompt": "sort: 2 1 =>", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "2 1"}], "max_tokens": 4}
DISTANCE = {"prompt": "p", "reference": "r", "candidates": ["c"]}
EMBED = {"prompt": "p", "response": "r"}
ROUTES = {  # every protected route: (method, url, a valid body)
    "models": ("GET", f"{SAMPLER}/v1/models", None),
    "completions": ("POST", f"{SAMPLER}/v1/completions", COMPLETION),
    "chat": ("POST", f"{SAMPLER}/v1/chat/completions", CHAT),
    "distances": ("POST", f"{SCORING}/v1/distances", DISTANCE),
    "embeddings": ("POST", f"{SCORING}/v1/embeddings", EMBED),
}
POSTS = {k: v for k, v in ROUTES.items() if v[0] == "POST"}


def _url(path: str) -> str:
    return f"http://{HOST}:{PORT}{path}"


def _replica(app: str, deployment: str) -> psutil.Process:
    """The replica's process, by the title Ray gives an actor's process."""
    title = f"ServeReplica:{app}:{deployment}"
    (process,) = [p for p in psutil.process_iter(["cmdline"])
                  if any(title in part for part in p.info["cmdline"] or [])]
    return process


def _raw_post(path: str, chunks, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST with a raw socket: send `chunks` from a thread while reading the answer, so a
    server that answers before the body is in is seen (httpx would first send it all)."""
    sock = socket.create_connection((HOST, PORT), timeout=120)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": HOST, "Content-Type": "application/json",
                                                 **AUTH, **headers}.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())

    def send():
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: the rest is never read

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head_bytes.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    sock.close()
    return int(head_bytes.split(b" ")[1]), body


def _chunked(total: int, size: int = MB):
    piece = b"x" * size
    for _ in range(total // size):
        yield b"%x\r\n" % size + piece + b"\r\n"
    yield b"0\r\n\r\n"


@pytest.mark.parametrize("route", ["completions", "distances"])
def test_huge_and_chunked_bodies_get_413_without_the_replica_growing(apps, route):
    _, path, _ = ROUTES[route]
    process = (_replica("limits-sampler", "OpenAIIngress") if route == "completions"
               else _replica("limits-scoring", "ScoringService"))
    before = process.memory_info().rss
    body = b'{"prompt": "' + b"x" * (100 * MB) + b'"}'
    status, answer = _raw_post(path, (body[i:i + MB] for i in range(0, len(body), MB)),
                               {"Content-Length": str(len(body))})
    assert status == 413 and b"exceeds the limit of 1048576" in answer and len(answer) < 1000
    status, answer = _raw_post(path, _chunked(300 * MB), {"Transfer-Encoding": "chunked"})
    assert status == 413 and b"more than 1048576 bytes" in answer
    growth = process.memory_info().rss - before
    print(f"{route}: replica RSS growth {growth / MB:.1f} MB after a 100 MB and a 300 MB body")
    assert growth < GROWTH_BOUND


SURROGATE = b"\\ud800"
SURROGATE_BODIES = {
    "completions prompt": ("completions", b'{"model": "tiny", "prompt": "a%s"}'),
    "completions prompt list": ("completions", b'{"model": "tiny", "prompt": ["ok", "%s"]}'),
    "completions stop": ("completions", b'{"model": "tiny", "prompt": "a", "stop": "%s"}'),
    "completions model": ("completions", b'{"model": "%s", "prompt": "a"}'),
    "chat content": ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "%s"}]}'),
    "chat stop list": ("chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "a"}],'
                               b' "stop": ["%s"]}'),
    "unknown key": ("completions", b'{"model": "tiny", "prompt": "a", "%s": 1}'),
    "distances candidate": ("distances", b'{"prompt": "p", "reference": "r", "candidates": ["%s"]}'),
    "embeddings response": ("embeddings", b'{"prompt": "p", "response": "%s"}'),
}


@pytest.mark.parametrize("route,body", SURROGATE_BODIES.values(), ids=SURROGATE_BODIES.keys())
def test_a_lone_surrogate_gets_4xx_from_every_route(apps, route, body):
    _, path, _ = ROUTES[route]
    response = httpx.post(_url(path), content=body % SURROGATE, timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    response.json()  # and the answer itself is valid JSON


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
def test_every_route_refuses_a_request_without_the_token(apps, route, headers):
    method, path, body = ROUTES[route]
    response = httpx.request(method, _url(path), json=body, headers=headers, timeout=60)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    ok = httpx.request(method, _url(path), json=body, headers=AUTH, timeout=60)
    assert ok.status_code == 200, ok.text


def test_health_and_the_openapi_document_are_public_and_document_the_scheme(apps):
    assert httpx.get(_url(f"{SCORING}/healthz"), timeout=30).status_code == 200
    for prefix, statuses in ((SAMPLER, {"400", "401", "404", "413", "422", "503"}),
                             (SCORING, {"401", "413", "422", "503"})):
        doc = httpx.get(_url(f"{prefix}/openapi.json"), timeout=30).json()
        assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                                  "scheme": "bearer"}
        for path, operations in doc["paths"].items():
            for operation in operations.values():
                if path == "/healthz":
                    assert "security" not in operation
                    continue
                assert operation["security"] == [{"bearer": []}]
                if "requestBody" in operation:
                    assert statuses <= set(operation["responses"]), path


def test_sampler_errors_have_openais_shape_and_the_client_shows_them(apps):
    client = openai.OpenAI(base_url=_url(f"{SAMPLER}/v1"), api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="other", prompt="x")
    assert err.value.body == {"message": "model 'other' not found; this server serves 'tiny'",
                              "type": "invalid_request_error", "param": "model",
                              "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError, match="at most 4 stop strings"):
        client.completions.create(model=MODEL, prompt="x", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(openai.BadRequestError, match="at most 4 stop strings"):
        client.completions.create(model=MODEL, prompt="x", stop=["s" * 65])
    with pytest.raises(openai.AuthenticationError, match="missing or wrong bearer token"):
        openai.OpenAI(base_url=_url(f"{SAMPLER}/v1"), api_key="nope",
                      max_retries=0).models.list()


def test_422_names_the_field_and_never_echoes_the_input(apps):
    for route in ("completions", "distances"):
        _, path, body = ROUTES[route]
        bad = {**body, "prompt": 7, "pad": "y" * 500_000}
        response = httpx.post(_url(path), json=bad, headers=AUTH, timeout=60)
        assert response.status_code == 422 and len(response.content) < 2000
        assert "prompt" in response.text and "yyyy" not in response.text


def test_no_token_serves_loopback_only_and_warns_at_start(caplog):
    with caplog.at_level(logging.WARNING, logger="services.http"):
        guard = Guard(HTTPServiceConfig(auth_token_env="SOME_TOKEN_VAR"), None, detail_body, "x")
    assert "no bearer token configured (set SOME_TOKEN_VAR" in caplog.text
    for host in ("127.0.0.1", "::1"):
        assert guard.refuse_auth({"client": (host, 5), "headers": []}) is None
    for host in ("10.1.2.3", "192.168.0.9", "2001:db8::1", "not-an-ip"):
        refused = guard.refuse_auth({"client": (host, 5), "headers": []})
        assert refused.status_code == 401 and b"loopback clients only" in refused.body


def test_a_token_given_on_the_command_line_is_never_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(SamplerServiceConfig, None, ["http.auth_token=s3cret-value", "max_stop=-1"])
    assert "max_stop" in str(err.value) and "s3cret" not in str(err.value)
    cfg = load_config(SamplerServiceConfig, None, ["http.auth_token=s3cret-value",
                                                   "model_path=m"])
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.model_dump())


def test_load_past_the_queue_is_shed_with_503(ray_cluster, tiny_gpt2):
    """One request held per replica and one queued in the proxy: of 24 sent at once, the
    others get 503 at once, with Retry-After, and every answer is 200 or 503."""
    http = HTTPServiceConfig(auth_token=TOKEN, max_ongoing_requests=1, max_queued_requests=1)
    cfg = SamplerServiceConfig(model_path=tiny_gpt2, served_model_name=MODEL, http=http,
                               sampling=SamplingConfig(max_new_tokens=12), app_name="limits-shed",
                               route_prefix="/limits-shed")
    serve.run(sampler.build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)

    async def burst():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(client.post(
                _url("/limits-shed/v1/completions"),
                json={**COMPLETION, "max_tokens": 12, "n": 8, "seed": i}) for i in range(24)))

    try:
        start = time.time()
        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        print(f"shedding: {statuses.count(200)} x 200, {statuses.count(503)} x 503 in "
              f"{time.time() - start:.1f} s")
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and 200 in statuses
        # shed at once with Retry-After: by Serve's router in the proxy (before any replica;
        # http.deployment_options) or by the ingress when its sampler deployment is full
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers.get("retry-after") == "1" for r in shed)
        assert all(r.json()["error"]["code"] == "overloaded" for r in shed
                   if r.headers["content-type"] == "application/json")
    finally:
        serve.delete(cfg.app_name)
