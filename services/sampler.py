"""An OpenAI-compatible subset over the policy sampler, as a Ray Serve application.

Endpoints (the official ``openai`` client works against ``base_url=<host>:8000<prefix>/v1``):

- ``GET  /v1/models``            the one served model;
- ``POST /v1/completions``       prompt (string or list) -> n choices per prompt;
- ``POST /v1/chat/completions``  messages rendered with the checkpoint's chat template.

Supported request fields: model, prompt / messages, max_tokens (max_completion_tokens for
chat), temperature, top_p, n, seed, stop. Anything else (streaming, logprobs, tools, ...) is
refused with 422 naming the field, rather than silently ignored; a wrong model name is 404,
limits (max_tokens above `sampling.max_new_tokens`, more than `max_completions` prompts x n,
more than `max_stop` stop strings or one longer than `max_stop_chars`) are 400; strings with
lone surrogates are 422. Errors have OpenAI's shape ``{"error": {"message", "type", "param",
"code"}}``, so the official client shows them. Request limits, auth and load shedding are
services/http.py's (config section `http`): every route needs ``Authorization: Bearer
<token>`` (the client's ``api_key``; with no token configured only loopback clients are
answered), a body over ``http.max_body_bytes`` is 413 unread, and past
``http.max_ongoing_requests`` + ``http.max_queued_requests`` requests get 503 at once.
Without ``seed`` a request gets a fresh random seed, as with OpenAI; with one, the same
request gives the same choices.

Two deployments, like Ray Serve LLM's router + server: the FastAPI ingress (`OpenAIIngress`,
tokenizer only: chat template, token counts) and the `SamplerReplica`s holding the model
(services/sampler_replica.py), scaled and given GPUs independently from
`SamplerServiceConfig`; the replicas pool the prompts of concurrent requests into one engine
call (dynamic batching), which leaves every result unchanged (per-prompt seeded streams).

Run: ``RAYALIGN_SAMPLER_TOKEN=... python -m services.sampler --config
configs/sampler_service.yaml --set model_path=/path/to/ckpt`` (RAY_ADDRESS joins that cluster,
else a fresh local Ray starts; an unreachable address fails within a timeout, naming it).
``serve deploy`` / ``serve run`` can build it with ``services.sampler:app_builder`` and
``config=FILE key.path=value`` arguments (``serve run`` finds its cluster by itself: give it
``--address``).
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes
# (string annotations on Serve ingress methods are not resolved, and the body would be
# mistaken for a query parameter).
import secrets
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from actors.runtime import init_ray
from services.sampler_replica import sampler_deployment
from rayalign.cli import parse_job_config
from rayalign.config import SamplingConfig, load_config
from rayalign.config_services import SamplerServiceConfig
from rayalign.models import load_tokenizer
from rayalign.sampling import Completion, derive_seed, prompt_token_ids
from services.http import (
    APIError, Bool, Guard, Integral, OpenAIError, Text, constrain, deployment_options,
    error_responses, install, openai_body, properties, resolve_token,
)

SEED_MAX = 2**53 - 1  # |seed| <= 2^53 - 1: exact in JSON numbers (doubles) and Python ints


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "1" for 1, no 0 for false

    model: Text
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: Annotated[int, Field(ge=1), Integral] = 1
    seed: Annotated[int, Field(ge=-SEED_MAX, le=SEED_MAX), Integral] | None = None
    stop: Text | list[Text] | None = None
    stream: Annotated[Literal[False], Bool] = False


class CompletionRequest(_Request):
    prompt: Text | list[Text]
    max_tokens: Annotated[int, Field(ge=1), Integral] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), Integral] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rayalign"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


app = FastAPI(title="rayalign sampler (OpenAI-compatible subset)")
install(app, "openai")
ERRORS = error_responses(OpenAIError, 400, 401, 404, 413, 422, 503)


@serve.deployment
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, sampler: DeploymentHandle, cfg: SamplerServiceConfig, token: str | None):
        self.sampler, self.cfg = sampler, cfg
        self.tokenizer = load_tokenizer(cfg.model_path)
        self.model_name = cfg.served_model_name or Path(cfg.model_path).name
        self.created = int(time.time())
        app.state.guard = Guard(cfg.http, token, openai_body, "sampler")
        app.state.document_limits = self._document_limits

    def _document_limits(self, schema: dict) -> None:
        """State the configured limits in the OpenAPI document: the served model's name,
        max_tokens, n, prompts and stop strings (prompts x n is checked per request, 400)."""
        cfg = self.cfg
        for component in ("CompletionRequest", "ChatCompletionRequest"):
            fields = properties(schema, component)
            fields["model"]["enum"] = [self.model_name]
            for name in ("max_tokens", "max_completion_tokens"):
                if name in fields:
                    constrain(fields[name], "integer", maximum=cfg.sampling.max_new_tokens)
            constrain(fields["n"], "integer", maximum=cfg.max_completions)
            constrain(fields["stop"], "string", maxLength=cfg.max_stop_chars)
            constrain(fields["stop"], "array", maxItems=cfg.max_stop)
            for branch in fields["stop"]["anyOf"]:
                if branch.get("type") == "array":
                    branch["items"]["maxLength"] = cfg.max_stop_chars
        prompt = properties(schema, "CompletionRequest")["prompt"]
        constrain(prompt, "string", minLength=1)
        constrain(prompt, "array", minItems=1, maxItems=cfg.max_completions)
        for branch in prompt["anyOf"]:
            if branch.get("type") == "array":
                branch["items"]["minLength"] = 1

    @app.get("/v1/models", responses=error_responses(OpenAIError, 401))
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(self, request: CompletionRequest) -> CompletionResponse:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        results, usage = await self._generate(request, prompts, request.max_tokens)
        choices = [CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)
                   for i, c in enumerate(c for cs in results for c in cs)]
        return CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                  model=self.model_name, choices=choices, usage=usage)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.model_name!r} has no chat template", "model")
        prompt = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], tokenize=False, add_generation_prompt=True
        )
        self._check_max_tokens(request.max_tokens, "max_tokens")  # deprecated, still checked
        self._check_max_tokens(request.max_completion_tokens, "max_completion_tokens")
        max_tokens = request.max_completion_tokens or request.max_tokens
        results, usage = await self._generate(request, [prompt], max_tokens)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=c.text),
                              finish_reason=c.finish_reason) for i, c in enumerate(results[0])]
        return ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                                      model=self.model_name, choices=choices, usage=usage)

    def _check_max_tokens(self, value: int | None, field: str) -> None:
        limit = self.cfg.sampling.max_new_tokens
        if value is not None and value > limit:
            raise APIError(400, f"{field} {value} exceeds this server's limit {limit}", field)

    def _params(self, request: _Request, max_tokens: int | None) -> SamplingConfig:
        base, cfg = self.cfg.sampling, self.cfg
        self._check_max_tokens(max_tokens, "max_tokens")
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        if stop is not None and (len(stop) > cfg.max_stop
                                 or any(len(s) > cfg.max_stop_chars for s in stop)):
            raise APIError(400, f"at most {cfg.max_stop} stop strings of at most "
                                f"{cfg.max_stop_chars} characters each", "stop")
        update = {"max_new_tokens": max_tokens, "temperature": request.temperature,
                  "top_p": request.top_p, "n": request.n,
                  "stop": tuple(stop) if stop is not None else None}
        return base.model_validate(
            {**base.model_dump(), **{k: v for k, v in update.items() if v is not None}}
        )

    async def _generate(
        self, request: _Request, prompts: list[str], max_tokens: int | None
    ) -> tuple[list[list[Completion]], Usage]:
        if request.model != self.model_name:
            raise APIError(404, f"model {request.model[:100]!r} not found; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of them", "prompt")
        if len(prompts) * request.n > self.cfg.max_completions:
            raise APIError(400, f"{len(prompts)} prompts x n={request.n} exceeds the "
                                f"limit of {self.cfg.max_completions} completions", "n")
        params = self._params(request, max_tokens)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        seeds = [derive_seed(seed, i) for i in range(len(prompts))]
        try:
            results = await self.sampler.generate.remote(prompts, seeds, params)
        except BackPressureError:
            raise APIError(503, "the sampler is at capacity; retry later", None,
                           "overloaded", {"Retry-After": "1"}) from None
        prompt_tokens = sum(len(prompt_token_ids(self.tokenizer, p, self.cfg.max_prompt_length))
                            for p in prompts)
        completion_tokens = sum(len(c.token_ids) for cs in results for c in cs)
        return results, Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              total_tokens=prompt_tokens + completion_tokens)


def build_app(cfg: SamplerServiceConfig):
    """The Serve application: ingress + sampler replicas (run with `serve.run`), both
    shedding load past `cfg.http`'s limits."""
    sampler = sampler_deployment(cfg.model_path, cfg.sampling, cfg.replicas,
                                 cfg.max_prompt_length, cfg.batch_wait_timeout_s,
                                 deployment_options(cfg.http))
    return OpenAIIngress.options(**deployment_options(cfg.http)).bind(
        sampler, cfg, resolve_token(cfg.http))


def app_builder(args: dict[str, str]):
    """For ``serve run services.sampler:app_builder config=FILE key.path=value ...``."""
    overrides = [f"{k}={v}" for k, v in args.items() if k != "config"]
    return build_app(load_config(SamplerServiceConfig, args.get("config"), overrides))


def main(argv: list[str] | None = None) -> None:
    """``python -m services.sampler --config FILE --set key.path=value``: join Ray the way
    the jobs do (actors.runtime.init_ray) and serve on ``http.host:http.port`` until killed."""
    cfg = parse_job_config(SamplerServiceConfig, __doc__.splitlines()[0], argv)
    app = build_app(cfg)
    init_ray()
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=True)


if __name__ == "__main__":
    main()
