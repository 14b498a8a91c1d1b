"""What every pipeline stage shares: dataset settings, actor pools from config, and output
as ONE Parquet file written atomically.

Ray Data's ``write_parquet`` writes a directory of shard files from the workers; the run
directory's contract (DESIGN.md) is single files (``samples.parquet``, ``pairs.parquet``) that
`rayalign.data.read_rows` reads and that appear complete or not at all. Here the driver is
the single writer: blocks stream to it as they finish (memory bounded by a few blocks, never
the dataset) and are appended as row groups to a temporary file that is renamed into place
(`rayalign.io.atomic_file`). The cost is that every byte passes through the driver once;
for text datasets (a million rows is a few hundred MB) that is seconds. A dataset too big
for that would keep Ray Data's sharded directory instead and be read with
``ray.data.read_parquet``; nothing upstream would change.
"""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayalign.config import ResourcesConfig
from rayalign.io import atomic_file


def configure(ds, progress_bars: bool):
    """Keep input order (outputs follow the input file) and set progress bars; the settings
    live in `ds.context`, shared by every dataset derived from `ds`, not in the global one."""
    ds.context.enable_progress_bars = progress_bars
    ds.context.execution_options.preserve_order = True
    return ds


def actor_pool(resources: ResourcesConfig) -> dict:
    """``map_batches`` arguments for a fixed pool of `resources.num_actors` actors."""
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=resources.num_actors),
            "num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
            **({"resources": dict(resources.resources)} if resources.resources else {})}


def _write(ds, sink, schema: pa.Schema) -> int:
    rows = 0
    with pq.ParquetWriter(sink, schema) as writer:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            table = batch.select(schema.names).cast(schema)
            writer.write_table(table)
            rows += table.num_rows
    return rows


def write_single_parquet(ds, path: str | os.PathLike, schema: pa.Schema) -> int:
    """Execute `ds` and write its `schema` columns (cast to `schema`) to `path`; returns rows.

    `path` is a local path or a URI pyarrow understands (s3://, gs://, file://). A URI is
    written to a temporary sibling key and then moved: on object stores the final key appears
    at once, complete, as an atomic rename does on a POSIX filesystem.
    """
    path = str(path)
    if "://" not in path:
        with atomic_file(path) as tmp:
            return _write(ds, str(tmp), schema)
    filesystem, inner = pafs.FileSystem.from_uri(path)
    parent, _, name = inner.rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
    filesystem.create_dir(parent, recursive=True)
    try:
        with filesystem.open_output_stream(tmp) as sink:
            rows = _write(ds, sink, schema)
        filesystem.move(tmp, inner)
    finally:
        if filesystem.get_file_info(tmp).type != pafs.FileType.NotFound:
            filesystem.delete_file(tmp)
    return rows
