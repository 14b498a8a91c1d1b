"""Latent-distance scoring service: Ray Serve deployment behind a FastAPI ingress.

Endpoints (relative to the app's route prefix, `/scoring` by default):

- ``POST /v1/distances``: ``{"prompt", "reference", "candidates": [...]}`` or a list of such
  items -> ``{"distances", "latent_dim", "guide_version"}``; ``distances`` mirrors the input
  (a list of floats for one item, a list of lists for a list), s = ||phi(x, ref) - phi(x, cand)||_2.
- ``POST /v1/embeddings``: ``{"prompt", "response"}`` or a list -> ``{"embeddings", ...}``.
- ``GET /healthz``; ``GET /docs`` and ``/openapi.json`` (FastAPI's OpenAPI document).

Encoder calls go through `@serve.batch` (one unit = one (prompt, response) pair), so the pairs
of concurrent requests share forward passes; `batching: false` in the config turns it off
(each request runs its own forward) for comparison. Requests limits, auth and load shedding
are services/http.py's (config section `http`): POST endpoints need ``Authorization: Bearer
<token>`` (401 otherwise; with no token configured only loopback clients are answered), a
body over ``http.max_body_bytes`` is 413 before it is read, past ``http.max_ongoing_requests``
+ ``http.max_queued_requests`` Serve answers 503. Bad input never reaches the model: wrong
types, missing/unknown fields, empty or blank strings, lone surrogates -> 422; more items,
candidates or characters than the configured limits -> 413.

Start it (RAY_ADDRESS joins that cluster, else a fresh local Ray starts; an unreachable
address fails within `actors.runtime.CONNECT_TIMEOUT_S`, naming it)::

    RAYALIGN_SCORING_TOKEN=... python -m services.scoring --config configs/scoring.yaml \
        [--set guide_path=runs/x/guide]

On a cluster: `ray job submit --working-dir . -- python -m services.scoring --config ...`, or
`serve deploy` a Serve config naming `services.scoring:app_builder` with ``key.path=value``
arguments. The token is read from the env var named by `http.auth_token_env` where the app
is built.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes.
import asyncio
import threading
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, HTTPException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from ray import serve

from actors.runtime import init_ray
from rayalign.cli import parse_job_config
from rayalign.config import load_config
from rayalign.config_services import ScoringConfig
from rayalign.guide import SPEC_FILE, GuideModel, pair_distances, resolve_device, unique_pairs
from services.http import (
    DetailError, Guard, Text, constrain, deployment_options, detail_body, error_responses, install,
    properties, resolve_token,
)


SPACE = " \t\n\r\f\v"  # blank = only these (a pattern every JSON-schema tool reads alike)


def _not_blank(value: str) -> str:
    if not value.strip(SPACE):
        raise ValueError("must not be empty or only whitespace")
    return value


NonBlank = Annotated[Text, AfterValidator(_not_blank)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DistanceItem(_Body):
    prompt: NonBlank
    reference: NonBlank = Field(description="The gold response y.")
    candidates: list[NonBlank] = Field(min_length=1, description="Responses y' to compare with y.")


class PairItem(_Body):
    prompt: NonBlank
    response: NonBlank


class DistancesResponse(BaseModel):
    distances: list[float] | list[list[float]]
    latent_dim: int
    guide_version: str


class EmbeddingsResponse(BaseModel):
    embeddings: list[float] | list[list[float]]
    latent_dim: int
    guide_version: str


Items = Annotated[list[DistanceItem], Field(min_length=1)]
Pairs = Annotated[list[PairItem], Field(min_length=1)]


class Health(BaseModel):
    status: str
    latent_dim: int
    guide_version: str


api = FastAPI(title="rayalign latent-distance scoring",
              description="LD-Align guide encoder: latent distances and embeddings.")
install(api, "detail")
ERRORS = error_responses(DetailError, 400, 401, 413, 422, 503)


def _document_limits(schema: dict, cfg: ScoringConfig) -> None:
    """State the configured limits in the OpenAPI document (what `_check_sizes` enforces)."""
    text = {"maxLength": cfg.max_text_chars, "pattern": r"[^ \t\n\r\f\v]"}  # `_not_blank`
    for component in ("DistanceItem", "PairItem"):
        for name, node in properties(schema, component).items():
            constrain(node, "string", **text)
            constrain(node, "array", maxItems=cfg.max_candidates)
            if node.get("type") == "array":
                constrain(node["items"], "string", **text)
    for path in ("/v1/distances", "/v1/embeddings"):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        constrain(body["schema"], "array", maxItems=cfg.max_items)


def _check_sizes(items: list[BaseModel], cfg: ScoringConfig) -> None:
    """413 naming the first field over a configured limit."""
    if len(items) > cfg.max_items:
        raise HTTPException(413, f"{len(items)} items exceed the limit of {cfg.max_items}")
    for i, item in enumerate(items):
        candidates = getattr(item, "candidates", [])
        if len(candidates) > cfg.max_candidates:
            raise HTTPException(413, f"items[{i}].candidates: {len(candidates)} exceed the limit "
                                     f"of {cfg.max_candidates}")
        texts = [(name, getattr(item, name)) for name in ("prompt", "reference", "response")
                 if hasattr(item, name)]
        texts += [(f"candidates[{j}]", c) for j, c in enumerate(candidates)]
        for name, text in texts:
            if len(text) > cfg.max_text_chars:
                raise HTTPException(413, f"items[{i}].{name}: {len(text)} characters exceed the "
                                         f"limit of {cfg.max_text_chars}")


@serve.deployment
@serve.ingress(api)
class ScoringService:
    def __init__(self, cfg: ScoringConfig, token: str | None):
        self.cfg = cfg
        self.guide = GuideModel.load(cfg.guide_path, resolve_device(cfg.device), decoder=False)
        self._forward_lock = threading.Lock()
        self._embed_pooled.set_max_batch_size(cfg.max_batch_size)
        self._embed_pooled.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        api.state.guard = Guard(cfg.http, token, detail_body, "scoring")
        api.state.document_limits = lambda schema: _document_limits(schema, cfg)

    def _encode(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """One forward at a time per replica (it owns its CPUs/GPU); batching decides how
        many requests share each forward."""
        with self._forward_lock:
            return self.guide.embed([p for p, _ in pairs], [r for _, r in pairs],
                                    self.cfg.max_batch_size)

    @serve.batch
    async def _embed_pooled(self, pairs: list[tuple[str, str]]) -> list[torch.Tensor]:
        """One encoder call for the pairs of all requests waiting now."""
        return list(await asyncio.to_thread(self._encode, pairs))

    async def _embed(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """phi for `pairs`; the forward runs in a worker thread so the replica's event loop
        keeps taking requests (and, with batching, gathering the next batch) meanwhile."""
        if not self.cfg.batching:
            return await asyncio.to_thread(self._encode, pairs)
        return torch.stack(await asyncio.gather(*(self._embed_pooled(p) for p in pairs)))

    def _meta(self) -> dict:
        return {"latent_dim": self.guide.spec.latent_dim,
                "guide_version": self.guide.spec.version}

    @api.get("/healthz")
    async def healthz(self) -> Health:
        return Health(status="ok", **self._meta())

    @api.post("/v1/distances", responses=ERRORS)
    async def distances(self, body: DistanceItem | Items) -> DistancesResponse:
        items = body if isinstance(body, list) else [body]
        _check_sizes(items, self.cfg)
        rows = [(it.prompt, it.reference, c) for it in items for c in it.candidates]
        unique, ref, cand = unique_pairs(*zip(*rows))
        flat = pair_distances(await self._embed(unique), ref, cand).tolist()
        out, start = [], 0
        for it in items:
            out.append(flat[start:start + len(it.candidates)])
            start += len(it.candidates)
        return DistancesResponse(distances=out if isinstance(body, list) else out[0], **self._meta())

    @api.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(self, body: PairItem | Pairs) -> EmbeddingsResponse:
        items = body if isinstance(body, list) else [body]
        _check_sizes(items, self.cfg)
        h = (await self._embed([(it.prompt, it.response) for it in items])).tolist()
        return EmbeddingsResponse(embeddings=h if isinstance(body, list) else h[0], **self._meta())


def build_app(cfg: ScoringConfig) -> serve.Application:
    """The Serve application for `cfg` (replicas and their resources from `cfg.replicas`,
    load shedding from `cfg.http`)."""
    if not (Path(cfg.guide_path) / SPEC_FILE).is_file():
        raise FileNotFoundError(f"guide_path {cfg.guide_path!r} is not a guide checkpoint "
                                f"(no {SPEC_FILE}); train one with jobs/train_guide.py")
    return ScoringService.options(
        num_replicas=cfg.replicas.num_actors, **deployment_options(cfg.http),
        ray_actor_options={"num_cpus": cfg.replicas.num_cpus, "num_gpus": cfg.replicas.num_gpus},
    ).bind(cfg, resolve_token(cfg.http))


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run services.scoring:app_builder key.path=value ...` (ScoringConfig keys;
    `config=path.yaml` loads a file first, the other arguments override it)."""
    args = dict(args)
    path = args.pop("config", None)
    return build_app(load_config(ScoringConfig, path, [f"{k}={v}" for k, v in args.items()]))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_config(ScoringConfig, __doc__.splitlines()[0], argv)
    app = build_app(cfg)
    init_ray()  # RAY_ADDRESS or a fresh local Ray, bounded by a timeout naming the address
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=True)


if __name__ == "__main__":
    main()
