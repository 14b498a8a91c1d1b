"""The policy sampler as a Ray Data callable class and as a Ray Serve deployment.

`PolicySampler` owns one sampling engine (`rayalign.sampling.make_engine`: vLLM on a GPU where
installed, else Hugging Face ``generate``) and holds no math of its own.

Ray Data: ``ds.map_batches(PolicySampler, fn_constructor_kwargs=..., concurrency=...)`` on a
batch with a ``prompt`` column (any other columns pass through) adds a ``sample`` column.
With ``n > 1`` every input row is *exploded* into ``n`` output rows (same prompt and
passthrough columns, one sample each), so downstream stages always see one sample per row.
If the batch has a ``row`` column (the example's index in its dataset), prompt ``i`` is
sampled with seed ``derive_seed(sampling.seed, row_i)``: its samples then depend on the seed
and the row only, not on how Ray Data cut the dataset into batches or spread them over actors.

Serve: `sampler_deployment` binds the same class as a deployment whose `generate` method the
OpenAI-compatible ingress (services/sampler.py) calls through a handle.
"""

from __future__ import annotations

import numpy as np

from rayalign.config import ResourcesConfig, SamplingConfig
from rayalign.sampling import Completion, derive_seed, make_engine


class PolicySampler:
    """One sampling engine on this actor's device."""

    def __init__(self, model_path: str, sampling: SamplingConfig,
                 max_prompt_length: int | None = None, device: str = "auto"):
        self.sampling = sampling
        self.engine = make_engine(model_path, sampling, max_prompt_length, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        seeds = ([derive_seed(self.sampling.seed, int(r)) for r in batch["row"]]
                 if "row" in batch else None)
        completions = self.engine.generate(prompts, seeds)
        counts = [len(c) for c in completions]
        out = {key: np.repeat(np.asarray(value), counts, axis=0) for key, value in batch.items()}
        out["sample"] = np.array([c.text for cs in completions for c in cs], dtype=object)
        return out

    def generate(self, prompts: list[str], seeds: list[int] | None = None,
                 params: SamplingConfig | None = None) -> list[list[Completion]]:
        """The engine's `generate` (the Serve entry point)."""
        return self.engine.generate(prompts, seeds, params)


def sampler_deployment(model_path: str, sampling: SamplingConfig, replicas: ResourcesConfig,
                       max_prompt_length: int | None = None):
    """`PolicySampler` as a bound Serve deployment with the configured replicas and resources."""
    from ray import serve

    return serve.deployment(
        PolicySampler, name="PolicySampler", num_replicas=replicas.num_actors,
        ray_actor_options={"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
    ).bind(model_path, sampling, max_prompt_length)
