"""Reference log-probs as a Ray Data stage (STYLE.md: "reference log-probs are a dataset column").

`ReferenceLogps` is a callable class for ``map_batches``: on a preference batch (columns
``prompt``, ``chosen``, ``rejected``) it adds ``ref_chosen_logps`` / ``ref_rejected_logps``,
on an unpaired batch (``prompt``, ``completion``) it adds ``ref_logps``: float64 sums of the
response-token log-probs under the reference model, computed by
`rayalign.logprobs.sequence_logprobs` on sequences built by `rayalign.data` with the
truncation limits of the `DataConfig` (so they match what the trainer computes for the
policy, token for token). Pairs go through one concatenated forward (`collate_pairs`).

`ref_logps_stage` precomputes them for any preference or unpaired file (the DPO/AOT jobs);
`add_ref_logps` appends the stage to an existing dataset (the LD-Align pairs pipeline).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import torch

from rayalign.config import DataConfig, ModelConfig, ResourcesConfig
from rayalign.data import collate, collate_pairs, encode, load_dataset
from rayalign.logprobs import sequence_logprobs
from rayalign.models import load_model, load_tokenizer

from pipelines.datasets import actor_pool, configure, write_single_parquet


class ReferenceLogps:
    """The reference model on this actor's device ("auto" = cuda when the actor has a GPU)."""

    def __init__(self, model_path: str, max_prompt_length: int, max_length: int,
                 device: str = "auto", dtype: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device, self.max_prompt_length, self.max_length = device, max_prompt_length, max_length
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(ModelConfig(path=str(model_path), dtype=dtype), device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        if "chosen" in batch:
            seqs = collate_pairs(self.tokenizer, prompts, [str(c) for c in batch["chosen"]],
                                 [str(r) for r in batch["rejected"]],
                                 self.max_prompt_length, self.max_length)
            logps = self._logps(seqs)
            n = len(prompts)
            return {**batch, "ref_chosen_logps": logps[:n], "ref_rejected_logps": logps[n:]}
        if "completion" in batch:
            seqs = collate([encode(self.tokenizer, p, str(c), self.max_prompt_length,
                                   self.max_length) for p, c in zip(prompts, batch["completion"])],
                           self.tokenizer.pad_token_id)
            return {**batch, "ref_logps": self._logps(seqs)}
        raise ValueError(f"reference log-probs need columns prompt + chosen/rejected or prompt + "
                         f"completion; got {sorted(batch)}")

    def _logps(self, seqs) -> np.ndarray:
        logps, _ = sequence_logprobs(self.model, seqs.to(self.device))
        return logps.double().cpu().numpy()


def add_ref_logps(ds, model_path: str, data: DataConfig, resources: ResourcesConfig,
                  batch_size: int, dtype: str = "auto"):
    """`ds` with the reference log-prob column(s) appended, by an actor pool from `resources`
    (the model's weights in `dtype`, a ModelConfig dtype name)."""
    return ds.map_batches(
        ReferenceLogps, batch_size=batch_size, **actor_pool(resources),
        fn_constructor_kwargs={"model_path": model_path, "max_prompt_length": data.max_prompt_length,
                               "max_length": data.max_length, "dtype": dtype},
    )


_SCHEMAS = {
    "preference": pa.schema([("prompt", pa.string()), ("chosen", pa.string()),
                             ("rejected", pa.string()), ("weight", pa.float64()),
                             ("ref_chosen_logps", pa.float64()), ("ref_rejected_logps", pa.float64())]),
    "unpaired": pa.schema([("prompt", pa.string()), ("completion", pa.string()),
                           ("label", pa.bool_()), ("ref_logps", pa.float64())]),
}


def ref_logps_stage(data: DataConfig, model_path: str, out_path: str, resources: ResourcesConfig,
                    batch_size: int, progress_bars: bool = True) -> dict:
    """Validate `data` (preference or unpaired) on the driver, add reference log-probs under
    `model_path` and write one Parquet file `out_path` atomically; returns stage stats.

    Message-list rows are rendered on the driver with the model's chat template, so the
    output holds plain strings; existing ref columns of the input are recomputed.
    """
    import ray.data

    if data.kind not in _SCHEMAS:
        raise ValueError(f"reference log-probs need a preference or unpaired dataset, "
                         f"not {data.kind!r}")
    start = time.time()
    examples = load_dataset(data, load_tokenizer(model_path))
    rows = [{k: v for k, v in asdict(e).items() if not k.startswith("ref_")} for e in examples]
    ds = configure(ray.data.from_items(rows), progress_bars)
    ds = add_ref_logps(ds, model_path, data, resources, batch_size)
    written = write_single_parquet(ds, out_path, _SCHEMAS[data.kind])
    return {"rows": written, "seconds": round(time.time() - start, 3)}
