"""Held-out evaluation of one policy: greedy samples -> metric columns -> metrics.

Samples come from the same `sample_stage` the training data uses (with the evaluation's
sampling settings, greedy by default), so evaluation and training see one sampler. Then one
actor pool of `HeldOutScorer`s (actors/evaluators.py) holds every metric model: the policy
(teacher-forced gold NLL), ROUGE-L and, where given, the guide's encoder (latent distance),
the sentence encoder (cosine to gold) and the reward model. The
scored rows go to one Parquet file (`SCORED_SCHEMA`); the arithmetic of the metrics is
`rayalign.evaluate.summarize`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from actors.evaluators import HeldOutScorer
from pipelines.datasets import actor_pool, configure, write_single_parquet
from pipelines.pairs import SAMPLES_SCHEMA, sample_stage
from rayalign.config import DataConfig, SamplingConfig
from rayalign.config_ldalign import EvalConfig, PairsConfig
from rayalign.evaluate import summarize

SCORED_SCHEMA = pa.schema([
    *SAMPLES_SCHEMA, ("distance", pa.float64()), ("gold_nll", pa.float64()),
    ("gold_tokens", pa.int64()), ("rouge_l", pa.float64()), ("cosine", pa.float64()),
    ("reward", pa.float64()),
])


def _unmeasured_as_null(batch: pa.Table) -> pa.Table:
    """Null columns for the metrics not measured (no guide / encoder / reward model). Added
    last: a numpy-format stage after it would turn the nulls into NaN."""
    for field in SCORED_SCHEMA:
        if field.name not in batch.column_names:
            batch = batch.append_column(field.name, pa.nulls(batch.num_rows, field.type))
    return batch


def evaluate_stage(data: DataConfig, policy_path: str, guide_path: str | None,
                   out_path: str | Path, sampling: SamplingConfig, cfg: PairsConfig,
                   ev: EvalConfig, baseline: str | Path | None = None,
                   dtype: str = "auto") -> dict:
    """Sample `data`'s prompts with `policy_path` (weights in `dtype`), score them (see module
    docstring), write `out_path` and return the policy's metrics; `baseline` = theta_0's
    scored file, for the reward win rate."""
    import ray.data

    out_path = Path(out_path)
    samples = out_path.with_name(out_path.stem + ".samples.parquet")
    sample_stage(data, policy_path, samples, sampling, cfg, dtype)
    ds = configure(ray.data.read_parquet(str(samples)), cfg.progress_bars)
    ds = ds.map_batches(HeldOutScorer, batch_size=ev.batch_size, **actor_pool(ev.workers),
                        fn_constructor_kwargs={
                            "policy_path": policy_path, "max_prompt_length": data.max_prompt_length,
                            "max_length": data.max_length, "batch_size": ev.batch_size,
                            "guide": guide_path, "sentence_encoder": ev.sentence_encoder,
                            "reward_model": ev.reward_model})
    ds = ds.map_batches(_unmeasured_as_null, batch_format="pyarrow", batch_size=None)
    write_single_parquet(ds, out_path, SCORED_SCHEMA)
    samples.unlink()
    base = pq.read_table(baseline).to_pydict() if baseline is not None else None
    return summarize(pq.read_table(out_path).to_pydict(), base)
