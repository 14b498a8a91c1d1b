"""The policy sampler as a Ray Serve deployment with dynamic batching.

`SamplerReplica` owns one sampling engine (`rayalign.sampling.make_engine`, as the Ray Data
`actors.sampler.PolicySampler` does) and holds no math of its own; `sampler_deployment`
binds it with the configured replicas, resources and request limits. The OpenAI-compatible
ingress (services/sampler.py) calls its `generate` through a handle.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

from ray import serve

from rayalign.config import ResourcesConfig, SamplingConfig
from rayalign.sampling import VLLM_ACTOR_ENV, Completion, make_engine


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
