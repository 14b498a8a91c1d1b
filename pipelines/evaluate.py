"""Held-out evaluation of one policy: greedy samples -> latent distances -> metrics.

Samples come from the same `sample_stage` the training data uses (with the evaluation's
sampling settings, greedy by default), so evaluation and training see one sampler; distances
come from the guide's encoder actors; the arithmetic is `rayalign.evaluate.summarize`.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.datasets import actor_pool, configure, write_single_parquet
from pipelines.pairs import sample_stage
from rayalign.config import DataConfig, PairsConfig, SamplingConfig
from rayalign.evaluate import summarize

SCORED_SCHEMA = pa.schema([("row", pa.int64()), ("prompt", pa.string()), ("gold", pa.string()),
                           ("sample", pa.string()), ("distance", pa.float64())])


def evaluate_stage(data: DataConfig, policy_path: str, guide_path: str | None,
                   out_path: str | Path, sampling: SamplingConfig, cfg: PairsConfig,
                   dtype: str = "auto") -> dict:
    """Sample `data`'s prompts with `policy_path`, score against gold, write `out_path`
    (row, prompt, gold, sample, distance) and return exact match and mean distance."""
    import ray.data

    out_path = Path(out_path)
    samples = out_path.with_name(out_path.stem + ".samples.parquet")
    sample_stage(data, policy_path, samples, sampling, cfg, dtype)
    ds = configure(ray.data.read_parquet(str(samples)), cfg.progress_bars)
    if guide_path is None:
        ds = ds.map_batches(lambda b: b.append_column("distance", pa.nulls(b.num_rows, pa.float64())),
                            batch_format="pyarrow", batch_size=None)
    else:
        from actors.scorer import GuideScorer

        ds = ds.map_batches(
            GuideScorer, batch_size=cfg.scorer_batch_size, **actor_pool(cfg.scorer),
            fn_constructor_kwargs={"guide_path": guide_path, "batch_size": cfg.scorer_batch_size},
        )
    write_single_parquet(ds, out_path, SCORED_SCHEMA)
    samples.unlink()
    table = pq.read_table(out_path)
    distances = table.column("distance").to_pylist() if guide_path is not None else None
    return summarize(table.column("sample").to_pylist(), table.column("gold").to_pylist(),
                     distances)
