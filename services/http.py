"""The one request-limits and auth layer of both Serve apps (services/sampler.py, scoring.py).

- **Bearer token** (`HTTPServiceConfig.auth_token`, else the env var named by
  ``auth_token_env``, read where the app is built): every route but the public ones (health,
  OpenAPI document, docs) needs ``Authorization: Bearer <token>`` (compared in constant
  time), else 401. With no token configured only loopback clients are answered (401 for any
  other address) and the app logs a warning when it starts: auth is on by default beyond
  loopback, so a Serve proxy listening on 0.0.0.0 never serves strangers silently.
- **Body size**: a ``Content-Length`` over ``max_body_bytes`` is refused with 413 before a
  byte is read; a chunked (or lying) body is counted as it streams and refused at the first
  chunk past the limit, so a replica never holds more than ``max_body_bytes`` of it.
- **Errors** never echo the input (a 422 says where and why, not what) and always encode
  (lone surrogates in a key are escaped, not a 500); each app picks its shape: FastAPI's
  ``{"detail": ...}`` or OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
- **Load shedding**, in Serve's proxy: `deployment_options` gives each deployment Serve's
  ``max_ongoing_requests`` per replica (the requests it holds: in work or in its batch
  queue, served in arrival order) and ``max_queued_requests`` (waiting in the proxy's
  router for a replica); past both, Serve's router answers 503 at once, with
  ``Retry-After``, before the request reaches a replica; an ingress whose downstream
  deployment is full answers 503 too. Keep the proxy's queue short and let the replicas
  hold the backlog: a router whose replicas are all full polls them with a backoff of up
  to 0.5 s per try (no wake-up when a slot frees), so with 64 held and 256 waiting there
  the scoring app served 9 requests/s instead of 30 and latency passed any queue bound
  (bench/results/load.md). A served request then waits behind at most
  ``max_ongoing_requests * replicas + max_queued_requests`` others (one proxy), so

      latency <= (max_ongoing_requests * replicas + max_queued_requests) / X + t_call

  with ``X`` the app's served requests per second and ``t_call`` one engine / encoder call;
  bench/load.py checks it against the latency the proxy logs. Time before the proxy's
  handler runs (a client or a proxy short of CPU, the kernel's accept queue) is outside it.
- **OpenAPI** documents the bearer scheme on the protected operations and the
  400/401/404/413/422/503 responses with the app's error schema.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, StrictStr

from rayalign.config_services import HTTPServiceConfig

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 503: "server_error"}
_DESCRIPTIONS = {400: "Request over a server limit", 401: "Missing or wrong bearer token",
                 404: "Unknown model or route", 413: "Body, items or texts over a configured limit",
                 422: "Invalid request body (where and why, never the input)",
                 503: "Overloaded: the request was shed, retry later"}


def unicode_text(value: str) -> str:
    """A string that can be encoded: a lone surrogate (JSON ``"\\ud800"``) is refused."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"lone surrogate at character {err.start}: not valid Unicode "
                         f"text") from None
    return value


Text = Annotated[StrictStr, AfterValidator(unicode_text)]


def _integral(value: Any) -> Any:
    """JSON's integers: 6.0 is one (JSON Schema), "6" and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


# For models with strict=True: an integer as JSON Schema means it, a boolean only as true/false
# (in Annotated after any Field(...) constraints, so the schema keeps minimum / maximum)
Integral = BeforeValidator(_integral)
Bool = BeforeValidator(_boolean)


class APIError(HTTPException):
    """An error answer with an optional OpenAI ``param`` (the field) and ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(status, message, dict(headers) if headers else None)
        self.param, self.code = param, code


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error object, which its clients parse."""

    error: OpenAIErrorBody


class DetailError(BaseModel):
    """FastAPI's error shape (422 bodies list where and why)."""

    detail: str | list[dict[str, Any]]


def _safe(text: Any, limit: int = 200) -> str:
    """`text` as a short string that always encodes (surrogates escaped)."""
    text = str(text)
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def openai_body(status: int, message: str, param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def detail_body(status: int, message: str, param: str | None = None,
                code: str | None = None) -> dict:
    return {"detail": message}


ErrorBody = Callable[[int, str, "str | None", "str | None"], dict]


def _response(status: int, body: dict, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


class Guard:
    """What the middleware enforces, set on ``app.state.guard`` when a replica starts."""

    def __init__(self, cfg: HTTPServiceConfig, token: str | None, body: ErrorBody, name: str):
        self.limit, self.token, self.body = cfg.max_body_bytes, token, body
        self.env = cfg.auth_token_env
        if token is None:
            log.warning("%s: no bearer token configured (set %s or http.auth_token): only "
                        "loopback clients are answered", name, self.env or "http.auth_token")

    def refuse_auth(self, scope: dict) -> JSONResponse | None:
        if self.token is None:
            host = (scope.get("client") or ("", 0))[0]
            try:
                if ipaddress.ip_address(host).is_loopback:
                    return None
            except ValueError:
                pass
            message = "this server has no token configured and answers loopback clients only"
        else:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(value, self.token.encode()):
                return None
            message = "missing or wrong bearer token"
        return _response(401, self.body(401, message, None, "invalid_api_key"),
                         {"WWW-Authenticate": "Bearer"})

    def too_large(self, size: int, exact: bool) -> JSONResponse:
        what = f"body of {size} bytes" if exact else f"body of more than {self.limit} bytes"
        return _response(413, self.body(413, f"{what} exceeds the limit of {self.limit}", None,
                                        "body_too_large"))


class GuardMiddleware:
    """Pure ASGI middleware: auth, then the body read in full but never past the limit."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        guard: Guard | None = getattr(scope.get("app") and scope["app"].state, "guard", None)
        if scope["type"] != "http" or guard is None:
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if path not in PUBLIC_PATHS and (refused := guard.refuse_auth(scope)) is not None:
            return await refused(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > guard.limit:
            return await guard.too_large(int(length), True)(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > guard.limit:
                return await guard.too_large(size, False)(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def resolve_token(cfg: HTTPServiceConfig) -> str | None:
    """The bearer token: ``auth_token``, else the env var ``auth_token_env`` (None = none)."""
    if cfg.auth_token is not None and cfg.auth_token.get_secret_value():
        return cfg.auth_token.get_secret_value()
    if cfg.auth_token_env:
        return os.environ.get(cfg.auth_token_env) or None
    return None


def deployment_options(cfg: HTTPServiceConfig) -> dict:
    """Serve's load shedding (module docstring): hold at most ``max_ongoing_requests`` per
    replica, queue at most ``max_queued_requests`` in the proxy, answer 503 with
    ``Retry-After: 1`` beyond."""
    from ray.serve.config import BackpressureConfig  # Serve only where an app is built

    return {"max_ongoing_requests": cfg.max_ongoing_requests,
            "max_queued_requests": cfg.max_queued_requests,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1)}


def error_responses(model: type[BaseModel], *statuses: int) -> dict:
    """``responses=`` of a route: the documented error statuses with the app's error model."""
    return {s: {"model": model, "description": _DESCRIPTIONS[s]} for s in statuses}


def _validation_message(err: RequestValidationError) -> tuple[list[dict], str, str | None]:
    errors = [{"loc": [_safe(p, 64) if isinstance(p, str) else p for p in e["loc"]],
               "msg": _safe(e["msg"]), "type": e["type"]} for e in err.errors()[:20]]
    first = errors[0] if errors else {"loc": [], "msg": "invalid", "type": "invalid"}
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    text = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
    return errors, text, param


def constrain(node: dict, kind: str, **limits: Any) -> None:
    """Add JSON-schema `limits` to the branches of `node` (itself or its ``anyOf`` members)
    of JSON type `kind`, so the OpenAPI document states the limits a replica enforces."""
    for branch in node.get("anyOf", [node]):
        if branch.get("type") == kind:
            branch.update(limits)


def properties(schema: dict, component: str) -> dict:
    """The properties of a request model in an OpenAPI document."""
    return schema["components"]["schemas"][component]["properties"]


def install(app: FastAPI, shape: str) -> None:
    """Add the middleware, the error handlers (``shape``: "openai" or "detail") and the
    OpenAPI bearer scheme to `app`; a replica may set ``app.state.document_limits`` (called
    with the OpenAPI document once) to state its configured limits there."""
    body = openai_body if shape == "openai" else detail_body
    app.add_middleware(GuardMiddleware)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        errors, text, param = _validation_message(err)
        if shape == "openai":
            return _response(422, openai_body(422, text, param, errors[0]["type"] if errors
                                              else None))
        return _response(422, {"detail": errors})

    @app.exception_handler(StarletteHTTPException)  # FastAPI's, and its body-parsing 400
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = _safe(err.detail, 2000)
        return _response(err.status_code, body(err.status_code, message,
                                               getattr(err, "param", None),
                                               getattr(err, "code", None)), err.headers)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes,
                                 servers=app.servers)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path not in PUBLIC_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            if getattr(app.state, "document_limits", None) is not None:
                app.state.document_limits(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
