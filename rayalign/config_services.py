"""Configuration of the Ray Serve apps: the OpenAI-compatible sampler
(`SamplerServiceConfig`, services/sampler.py), the latent-distance scoring service
(`ScoringConfig`, services/scoring.py) and their shared HTTP limits (`HTTPServiceConfig`)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from .config import (
    MODEL_INPUT,
    ResourcesConfig,
    SamplingConfig,
    Section,
    check_sampler_fits,
)

class HTTPServiceConfig(Section):
    """Request limits, auth and load shedding of a Serve app (services/http.py, both services).

    Without a token only loopback clients are answered (and the app warns when it starts).
    """

    auth_token_env: str | None = Field(
        None, description="Env var holding the bearer token (read where the app is built).")
    auth_token: SecretStr | None = Field(
        None, description="Bearer token; prefer auth_token_env (never printed).")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger bodies get 413, unread.")
    max_ongoing_requests: int = Field(
        64, gt=0, description="Requests a replica holds at once (in work or in its batch queue).")
    max_queued_requests: int = Field(
        8, gt=0, description="Requests waiting in the proxy for a replica; beyond, 503 at once "
        "(services/http.py: the latency bound). A burst of more than this many requests at "
        "once can be shed even by an idle replica while the proxy assigns it: clients retry "
        "after Retry-After.")
    host: str = Field("127.0.0.1", description="Where `python -m services.<app>` has Serve "
                      "listen (0.0.0.0 = every interface; give a token then).")
    port: int = Field(8000, gt=0, lt=65536, description="Serve's HTTP port (python -m only).")


class SamplerServiceConfig(Section):
    """services/sampler.py: an OpenAI-compatible subset over the policy sampler (Ray Serve).

    A request's fields (max_tokens, temperature, top_p, n, seed, stop) override `sampling`;
    `sampling.max_new_tokens` is also the largest max_tokens a request may ask for.
    """

    model_path: str = Field(description="Policy checkpoint directory.",
                            json_schema_extra=MODEL_INPUT)
    served_model_name: str | None = Field(
        None, description="The `model` name clients use; None = the checkpoint directory name."
    )
    sampling: SamplingConfig = SamplingConfig()
    max_prompt_length: int | None = Field(None, gt=0, description="Keep the last N prompt tokens.")
    max_completions: int = Field(64, gt=0, description="Largest prompts x n per request.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, description="Dynamic batching: how long a replica waits to pool prompts of "
        "concurrent requests (up to sampling.batch_size) into one engine call.",
    )
    app_name: str = "sampler"
    route_prefix: str = Field("/", description="Clients use base_url <host>:8000<prefix>/v1.")
    replicas: ResourcesConfig = Field(
        ResourcesConfig(), description="num_actors sampler replicas, num_cpus / num_gpus each."
    )

    @model_validator(mode="after")
    def _fits(self) -> "SamplerServiceConfig":
        check_sampler_fits(self.sampling, self.replicas, "replicas")
        return self
    http: HTTPServiceConfig = HTTPServiceConfig(auth_token_env="RAYALIGN_SAMPLER_TOKEN")
    max_stop: int = Field(4, ge=0, description="Stop strings per request (OpenAI allows 4).")
    max_stop_chars: int = Field(64, gt=0, description="Characters per stop string.")


class ScoringConfig(Section):
    """services/scoring.py: the latent-distance REST service (Ray Serve + FastAPI)."""

    guide_path: str = Field(description="Guide checkpoint directory (GuideModel.save).",
                            json_schema_extra={"input": "dir"})
    app_name: str = "scoring"
    route_prefix: str = Field("/scoring", description="Distinct from the sampler app's prefix.")
    replicas: ResourcesConfig = Field(
        ResourcesConfig(), description="num_actors replicas, num_cpus / num_gpus each."
    )
    device: str = Field("auto", description="auto = cuda when the replica has a GPU, else cpu.")
    batching: bool = Field(True, description="Dynamic batching of encoder calls (@serve.batch).")
    max_batch_size: int = Field(64, gt=0, description="(prompt, response) pairs per encoder call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    http: HTTPServiceConfig = HTTPServiceConfig(auth_token_env="RAYALIGN_SCORING_TOKEN",
                                                max_ongoing_requests=128, max_queued_requests=8)
    max_items: int = Field(64, gt=0, description="Items per request.")
    max_candidates: int = Field(64, gt=0, description="Candidates per item.")
    max_text_chars: int = Field(8192, gt=0, description="Characters per prompt/response string.")
