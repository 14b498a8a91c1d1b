"""The policy sampler as a Ray Data callable class and as a Ray Serve deployment.

`PolicySampler` (Ray Data) and `SamplerReplica` (Serve) each own one sampling engine
(`rayalign.sampling.make_engine`: vLLM on a GPU where installed, else Hugging Face
``generate``) and hold no math of their own.

Ray Data: ``ds.map_batches(PolicySampler, fn_constructor_kwargs=..., compute=...)`` on a batch
with a ``prompt`` column (any other columns pass through) adds a ``sample`` column.
With ``n > 1`` every input row is *exploded* into ``n`` output rows (same prompt and
passthrough columns, one sample each), so downstream stages always see one sample per row.
If the batch has a ``row`` column (the example's index in its dataset), prompt ``i`` is
sampled with seed ``derive_seed(sampling.seed, row_i)``: its samples then depend on the seed
and the row only, not on how Ray Data cut the dataset into batches or spread them over actors.

Serve: `SamplerReplica` holds the same engine as a deployment with dynamic batching
(`sampler_deployment` binds it); the OpenAI-compatible ingress (services/sampler.py) calls
its `generate` through a handle.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import numpy as np
from ray import serve

from rayalign.config import ResourcesConfig, SamplingConfig
from rayalign.sampling import VLLM_ACTOR_ENV, Completion, derive_seed, make_engine


class PolicySampler:
    """One sampling engine on this actor's device."""

    def __init__(self, model_path: str, sampling: SamplingConfig,
                 max_prompt_length: int | None = None, device: str = "auto", dtype: str = "auto"):
        self.sampling = sampling
        self.engine = make_engine(model_path, sampling, max_prompt_length, device, dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        seeds = ([derive_seed(self.sampling.seed, int(r)) for r in batch["row"]]
                 if "row" in batch else None)
        completions = self.engine.generate(prompts, seeds)
        counts = [len(c) for c in completions]
        out = {key: np.repeat(np.asarray(value), counts, axis=0) for key, value in batch.items()}
        flat = [c for cs in completions for c in cs]
        eos = self.engine.tokenizer.eos_token_id
        out["sample"] = np.array([c.text for c in flat], dtype=object)
        out["sample_tokens"] = np.array([c.num_tokens(eos) for c in flat], dtype=np.int64)
        out["truncated"] = np.array([c.finish_reason == "length" for c in flat], dtype=bool)
        return out


class SamplerReplica:
    """A Serve replica of the policy sampler with dynamic batching.

    Each (prompt, seed) of every request is one unit of ``@serve.batch``: the units of the
    requests waiting now (up to `sampling.batch_size`, or `batch_wait_timeout_s`) are grouped
    by their sampling parameters and each group is one engine call. Because every prompt
    samples from its own seeded stream, pooling never changes a request's result.
    """

    def __init__(self, model_path: str, sampling: SamplingConfig, max_prompt_length: int | None,
                 batch_wait_timeout_s: float, device: str = "auto"):
        self.engine = make_engine(model_path, sampling, max_prompt_length, device)
        self._engine_lock = threading.Lock()
        self._sample.set_max_batch_size(sampling.batch_size)
        self._sample.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _generate(self, prompts: list[str], seeds: list[int],
                  params: SamplingConfig) -> list[list[Completion]]:
        """One engine call at a time per replica (it owns its CPUs / GPU)."""
        with self._engine_lock:
            return self.engine.generate(prompts, seeds, params)

    @serve.batch
    async def _sample(self, units: list[tuple[str, int, SamplingConfig]]) -> list[list[Completion]]:
        groups: dict[SamplingConfig, list[int]] = defaultdict(list)
        for i, (_, _, params) in enumerate(units):
            groups[params].append(i)
        results: list[list[Completion]] = [[] for _ in units]
        for params, index in groups.items():
            # in a worker thread: the replica's event loop keeps taking (and pooling) requests
            out = await asyncio.to_thread(self._generate, [units[i][0] for i in index],
                                          [units[i][1] for i in index], params)
            for i, completions in zip(index, out):
                results[i] = completions
        return results

    async def generate(self, prompts: list[str], seeds: list[int],
                       params: SamplingConfig) -> list[list[Completion]]:
        """``params.n`` completions per prompt, prompt i sampled with seed ``seeds[i]``."""
        return list(await asyncio.gather(*(self._sample((p, s, params))
                                           for p, s in zip(prompts, seeds))))


def sampler_deployment(model_path: str, sampling: SamplingConfig, replicas: ResourcesConfig,
                       max_prompt_length: int | None, batch_wait_timeout_s: float,
                       limits: dict | None = None):
    """`SamplerReplica` as a bound Serve deployment with the configured replicas, resources
    and request limits (``limits``: Serve's max_ongoing_requests / max_queued_requests)."""
    return serve.deployment(
        SamplerReplica, num_replicas=replicas.num_actors, **(limits or {}),
        ray_actor_options={"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus,
                           "resources": dict(replicas.resources),
                           "runtime_env": {"env_vars": VLLM_ACTOR_ENV}},
    ).bind(model_path, sampling, max_prompt_length, batch_wait_timeout_s)
