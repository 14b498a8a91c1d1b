"""The policy sampler as a Ray Data callable class.

`PolicySampler` owns one sampling engine (`rayalign.sampling.make_engine`: vLLM on a GPU
where installed, else Hugging Face ``generate``) and holds no math of its own; the Serve
deployment over the same engine is services/sampler_replica.py (Serve loads only there, not
in every Ray Data sampler worker).

Ray Data: ``ds.map_batches(PolicySampler, fn_constructor_kwargs=..., compute=...)`` on a batch
with a ``prompt`` column (any other columns pass through) adds a ``sample`` column.
With ``n > 1`` every input row is *exploded* into ``n`` output rows (same prompt and
passthrough columns, one sample each), so downstream stages always see one sample per row.
If the batch has a ``row`` column (the example's index in its dataset), prompt ``i`` is
sampled with seed ``derive_seed(sampling.seed, row_i)``: its samples then depend on the seed
and the row only, not on how Ray Data cut the dataset into batches or spread them over actors.
"""

from __future__ import annotations

import numpy as np

from rayalign.config import SamplingConfig
from rayalign.sampling import derive_seed, make_engine


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
