"""LD-Align's data pipeline: SFT rows -> policy samples -> latent distances -> weighted pairs.

Two stages, so the controller can checkpoint each output and resume at the first missing one:

1. `sample_stage` -> ``samples.parquet`` (row, prompt, gold, sample, sample_tokens,
   truncated). The SFT file is read and validated on the driver *first*
   (`rayalign.data.load_dataset`): a bad row raises `DataError` naming file, row and field
   before any actor starts. The validated rows become
   a Ray Data dataset, and an actor pool of `PolicySampler`s (actors/sampler.py) samples
   them. ``row`` is the example's index in the SFT file; it seeds the row's sample
   (batch-independent, see rayalign/sampling.py) and with ``sampling.n > 1`` it repeats, one
   output row per sample.
2. `pairs_stage` -> ``pairs.parquet`` (prompt, chosen, rejected, distance, weight,
   ref_chosen_logps, ref_rejected_logps): chosen = gold, rejected = sample;
   ``distance`` from an actor pool of `GuideScorer`s (actors/scorer.py); the reference
   log-probs of both sides under the *sampling* policy (the reference model of this
   iteration, DESIGN.md) from an actor pool of `ReferenceLogps` (pipelines/refs.py). The
   scored dataset is materialized before the reference pool starts (Ray's object store,
   spilling to disk when large; only with a guide: uniform weights stream straight through),
   so the two GPU pools never need a GPU each at the same time; the
   distance column alone (8 bytes a row) comes to the driver for the dataset-wide mean and its
   checks (`rayalign.weights.distance_mean`), and each batch is then weighted with that one
   mean (`ld_align_weights`), so the weights have mean 1 over the whole file. The stats
   include the paper's §5.2 check over the first `sanity_rows` pairs (their texts come to
   the driver): Spearman(s, 1 - ROUGE-L) and, with `sentence_encoder`, Spearman(s, 1 - cosine)
   of sample vs gold (rayalign/sanity.py).
   Without a guide (``guide_path=None``: SPIN, uniform weights) no scorer runs, ``weight`` is
   1 and ``distance`` is null (not measured; 0 would claim "sample equals gold").

Both outputs are single Parquet files written atomically (pipelines/datasets.py). Rows keep the
SFT file's order. Inputs and outputs may be local paths or URIs (s3://, gs://, file://); the
policy and guide checkpoints are directories every actor must see (local, NFS). Actor pools and batch sizes come from `PairsConfig`; progress bars are on
unless `PairsConfig.progress_bars` is false.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from actors.sampler import PolicySampler
from pipelines.datasets import actor_pool, configure, write_single_parquet
from pipelines.refs import add_ref_logps
from rayalign.config import DataConfig, SamplingConfig
from rayalign.config_ldalign import PairsConfig
from rayalign.data import load_dataset
from rayalign.models import load_tokenizer
from rayalign.sampling import VLLM_ACTOR_ENV
from rayalign.sanity import distance_sanity
from rayalign.weights import distance_mean, ld_align_weights

SAMPLES_SCHEMA = pa.schema([("row", pa.int64()), ("prompt", pa.string()),
                            ("gold", pa.string()), ("sample", pa.string()),
                            ("sample_tokens", pa.int64()), ("truncated", pa.bool_())])
PAIRS_SCHEMA = pa.schema([
    ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("distance", pa.float64()), ("weight", pa.float64()),
    ("ref_chosen_logps", pa.float64()), ("ref_rejected_logps", pa.float64()),
])


def sample_stage(data: DataConfig, policy_path: str, out_path: str | Path,
                 sampling: SamplingConfig, cfg: PairsConfig, dtype: str = "auto") -> dict:
    """Validate the SFT file, sample from `policy_path` (weights in `dtype`, a ModelConfig
    dtype name), write ``samples.parquet``; stats."""
    import ray.data

    if data.kind != "sft":
        raise ValueError(f"LD-Align samples against SFT data, got data.kind={data.kind!r}")
    start = time.time()
    examples = load_dataset(data, load_tokenizer(policy_path))
    rows = [{"row": i, "prompt": e.prompt, "gold": e.response} for i, e in enumerate(examples)]
    ds = configure(ray.data.from_items(rows), cfg.progress_bars).map_batches(
        PolicySampler, batch_size=sampling.batch_size, **actor_pool(cfg.sampler),
        runtime_env={"env_vars": VLLM_ACTOR_ENV},
        fn_constructor_kwargs={"model_path": policy_path, "sampling": sampling,
                               "max_prompt_length": data.max_prompt_length, "dtype": dtype},
    )
    written = write_single_parquet(ds, out_path, SAMPLES_SCHEMA)
    return {"sft_rows": len(examples), "samples": written, "policy_dtype": dtype,
            "seconds": round(time.time() - start, 3)}


def _as_pairs(batch: pa.Table) -> pa.Table:
    return batch.rename_columns(["chosen" if c == "gold" else "rejected" if c == "sample" else c
                                 for c in batch.column_names])


def _weigh(batch: pa.Table, mean: float | None) -> pa.Table:
    """``weight`` = distance / dataset mean; without a guide (mean None) weight 1 and a null
    distance."""
    if mean is None:
        batch = batch.append_column("distance", pa.nulls(batch.num_rows, pa.float64()))
        weights = np.ones(batch.num_rows)
    else:
        weights = ld_align_weights(batch.column("distance").to_numpy(), mean)
    return batch.append_column("weight", pa.array(weights, pa.float64()))


def _sanity(ds, cfg: PairsConfig) -> dict:
    """The §5.2 check (rayalign.sanity) over the first `cfg.sanity_rows` pairs, on the driver."""
    rows = ds.select_columns(["distance", "gold", "sample"]).take(cfg.sanity_rows)
    golds, samples = [r["gold"] for r in rows], [r["sample"] for r in rows]
    cosines = None
    if cfg.sentence_encoder is not None:
        from rayalign.sentsim import SentenceEncoder

        cosines = SentenceEncoder(cfg.sentence_encoder).cosine(samples, golds)
    return {**distance_sanity([r["distance"] for r in rows], golds, samples, cosines),
            "sanity_rows": len(rows)}


def pairs_stage(samples_path: str | Path, policy_path: str, guide_path: str | None,
                out_path: str | Path, data: DataConfig, cfg: PairsConfig,
                dtype: str = "auto") -> dict:
    """``samples.parquet`` -> scored, weighted ``pairs.parquet`` with reference log-probs
    under `policy_path` (the policy that sampled, in `dtype`); `guide_path` None = uniform
    weights."""
    import ray.data

    start = time.time()
    ds = configure(ray.data.read_parquet(str(samples_path)), cfg.progress_bars)
    stats: dict = {"policy_dtype": dtype}
    mean = None
    if guide_path is not None:
        from actors.scorer import GuideScorer

        # Materialized before the reference pool starts: one streaming pass holding both GPU
        # pools needs a GPU for each, and on a 1-GPU node the second pool never starts.
        ds = ds.map_batches(
            GuideScorer, batch_size=cfg.scorer_batch_size, **actor_pool(cfg.scorer),
            fn_constructor_kwargs={"guide_path": guide_path, "batch_size": cfg.scorer_batch_size},
        ).materialize()
        distances = np.concatenate([b["distance"] for b in ds.select_columns(["distance"])
                                    .iter_batches(batch_format="numpy", batch_size=None)])
        mean = distance_mean(distances)
        stats.update(distance_mean=mean, distance_min=float(distances.min()),
                     distance_max=float(distances.max()))
        stats.update(_sanity(ds, cfg))
    ds = ds.map_batches(_as_pairs, batch_format="pyarrow", batch_size=None)
    ds = add_ref_logps(ds, policy_path, data, cfg.refs, cfg.refs_batch_size, dtype)
    ds = ds.map_batches(_weigh, fn_kwargs={"mean": mean}, batch_format="pyarrow", batch_size=None)
    stats["pairs"] = write_single_parquet(ds, out_path, PAIRS_SCHEMA)
    stats["seconds"] = round(time.time() - start, 3)
    return stats


def build_pairs(data: DataConfig, policy_path: str, guide_path: str | None, out_dir: str | Path,
                sampling: SamplingConfig, cfg: PairsConfig, dtype: str = "auto") -> dict:
    """Both stages: ``out_dir/samples.parquet`` then ``out_dir/pairs.parquet``; their stats."""
    out_dir = str(out_dir).rstrip("/")  # a local path or a URI (Path would mangle s3://)
    samples = f"{out_dir}/samples.parquet"
    return {
        "sample": sample_stage(data, policy_path, samples, sampling, cfg, dtype),
        "pairs": pairs_stage(samples, policy_path, guide_path, f"{out_dir}/pairs.parquet",
                             data, cfg, dtype),
    }
