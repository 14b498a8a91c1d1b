"""Latent-distance scoring service: Ray Serve deployment behind a FastAPI ingress.

Endpoints (relative to the app's route prefix, `/scoring` by default):

- ``POST /v1/distances``: ``{"prompt", "reference", "candidates": [...]}`` or a list of such
  items -> ``{"distances", "latent_dim", "guide_version"}``; ``distances`` mirrors the input
  (a list of floats for one item, a list of lists for a list), s = ||phi(x, ref) - phi(x, cand)||_2.
- ``POST /v1/embeddings``: ``{"prompt", "response"}`` or a list -> ``{"embeddings", ...}``.
- ``GET /healthz``; ``GET /docs`` and ``/openapi.json`` (FastAPI's OpenAPI document).

Encoder calls go through `@serve.batch` (one unit = one (prompt, response) pair), so the pairs
of concurrent requests share forward passes; `batching: false` in the config turns it off
(each request runs its own forward) for comparison. POST endpoints need
``Authorization: Bearer <token>`` when a token is configured (401 otherwise). Bad input never
reaches the model: wrong types, missing/unknown fields, empty or blank strings -> 422;
more items, candidates, characters or body bytes than the configured limits -> 413.

Start it (a local Ray is started, or RAY_ADDRESS / `ray start` joins a cluster)::

    python -m services.scoring --config configs/scoring.yaml [--set guide_path=runs/x/guide]
    serve run --name scoring --route-prefix /scoring \
        services.scoring:app_builder config=configs/scoring.yaml guide_path=runs/x/guide

On a cluster: `ray job submit --working-dir . -- python -m services.scoring --config ...`, or
`serve deploy` a Serve config naming `services.scoring:app_builder` with these arguments.
The token is read from the env var named by `auth_token_env` where the app is built.
"""

# No `from __future__ import annotations`: FastAPI must see the request models as classes.
import asyncio
import hmac
import os
import threading
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr
from ray import serve

from rayalign.cli import parse_job_config
from rayalign.config import ScoringConfig, load_config
from rayalign.guide import SPEC_FILE, GuideModel, pair_distances, resolve_device, unique_pairs


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


Text = Annotated[StrictStr, AfterValidator(_not_blank)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistanceItem(_Body):
    prompt: Text
    reference: Text = Field(description="The gold response y.")
    candidates: list[Text] = Field(min_length=1, description="Responses y' to compare with y.")


class PairItem(_Body):
    prompt: Text
    response: Text


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


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    """422 with where and why, without echoing the input (it may be huge, or not encodable)."""
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in err.errors()]
    return JSONResponse({"detail": detail}, status_code=422)


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer token and body size, checked before the body is parsed."""
    guard = request.app.state.guard
    if request.method == "POST":
        if guard.token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(),
                                                                     guard.token.encode()):
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        size = int(length) if length and length.isdigit() else len(await request.body())
        if size > guard.limits.max_body_bytes:
            return JSONResponse({"detail": f"body of {size} bytes exceeds the limit of "
                                           f"{guard.limits.max_body_bytes}"}, status_code=413)
    return await call_next(request)


class _Guard:
    def __init__(self, token: str | None, limits: ScoringConfig):
        self.token, self.limits = token, limits


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
        api.state.guard = _Guard(token, cfg)

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

    @api.post("/v1/distances")
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

    @api.post("/v1/embeddings")
    async def embeddings(self, body: PairItem | Pairs) -> EmbeddingsResponse:
        items = body if isinstance(body, list) else [body]
        _check_sizes(items, self.cfg)
        h = (await self._embed([(it.prompt, it.response) for it in items])).tolist()
        return EmbeddingsResponse(embeddings=h if isinstance(body, list) else h[0], **self._meta())


def resolve_token(cfg: ScoringConfig) -> str | None:
    """The bearer token: `auth_token`, else the env var `auth_token_env` (None = no auth)."""
    if cfg.auth_token:
        return cfg.auth_token
    if cfg.auth_token_env:
        return os.environ.get(cfg.auth_token_env) or None
    return None


def build_app(cfg: ScoringConfig) -> serve.Application:
    """The Serve application for `cfg` (replicas and their resources from `cfg.replicas`)."""
    if not (Path(cfg.guide_path) / SPEC_FILE).is_file():
        raise FileNotFoundError(f"guide_path {cfg.guide_path!r} is not a guide checkpoint "
                                f"(no {SPEC_FILE}); train one with jobs/train_guide.py")
    return ScoringService.options(
        num_replicas=cfg.replicas.num_actors,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.replicas.num_cpus, "num_gpus": cfg.replicas.num_gpus},
    ).bind(cfg, resolve_token(cfg))


def app_builder(args: dict[str, str]) -> serve.Application:
    """`serve run services.scoring:app_builder key.path=value ...` (ScoringConfig keys;
    `config=path.yaml` loads a file first, the other arguments override it)."""
    args = dict(args)
    path = args.pop("config", None)
    return build_app(load_config(ScoringConfig, path, [f"{k}={v}" for k, v in args.items()]))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_job_config(ScoringConfig, __doc__.splitlines()[0], argv)
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=True)


if __name__ == "__main__":
    main()
