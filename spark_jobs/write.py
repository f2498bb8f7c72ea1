"""Writers of the dataset directory: WebDataset shards, lazily readable arrays, id maps.

Spark sorts and writes Parquet parts in order; the driver then streams those
parts batch by batch into `.npy` files opened as memory maps, so no table is
ever held whole in the driver's memory.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from darec_dist.data import layout
from darec_dist.files import atomic_path, interrupted_writes
from spark_jobs.config import ShardsConfig
from spark_jobs.errors import PrepareError
from spark_jobs.ranking import with_global_rank
from spark_jobs.session import local_uri

STREAM_BATCH_ROWS = 1 << 20
# And at most about this many bytes (uncompressed, as the Parquet footer counts them): 2^20 rows of 4,096-wide vectors
# are 16 GiB, more than a driver's default memory; a batch is copied a few times on its way into a memory map.
STREAM_BATCH_BYTES = 128 << 20


def _sorted_parts(df: DataFrame, order: list[str], scratch: Path, partitions: int) -> tuple[list[Path], int]:
    """Write `df` sorted by `order` as Parquet parts whose file order is the sort order; returns them and the row count."""
    if scratch.exists():
        shutil.rmtree(scratch)
    # Computed once for the count, the range partitioning's sampling job and its shuffle: run for each, the encoder
    # embedded every profile twice (ML-100K's embedding stage took 76 s instead of 43) and the graph's rows were
    # aggregated three times.
    df = df.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        rows = df.count()
        df.repartitionByRange(partitions, *order).sortWithinPartitions(*order).write.parquet(local_uri(scratch))
    finally:
        df.unpersist()
    return sorted(scratch.glob("part-*.parquet")), rows


def _rows_per_batch(metadata: pq.FileMetaData) -> int:
    """Rows per streamed batch of a Parquet file: STREAM_BATCH_ROWS, fewer where its widest row group's rows are wide."""
    groups = (metadata.row_group(g) for g in range(metadata.num_row_groups))
    row_bytes = max((group.total_byte_size / group.num_rows for group in groups if group.num_rows), default=1.0)
    return int(min(STREAM_BATCH_ROWS, max(1, STREAM_BATCH_BYTES // max(row_bytes, 1.0))))


def _batches(parts: list[Path], columns: list[str]):
    for part in parts:
        file = pq.ParquetFile(part)
        yield from file.iter_batches(batch_size=_rows_per_batch(file.metadata), columns=columns)


def write_csr(
    df: DataFrame,
    row: str,
    col: str,
    value: str | None,
    num_rows: int,
    root: Path,
    indptr_path: str,
    indices_path: str,
    values_path: str | None,
    scratch: Path,
    partitions: int,
) -> int:
    """Rows `row` -> sorted `col` (and float32 `value`) as CSR .npy files; returns the number of entries."""
    parts, nnz = _sorted_parts(df.select(*[c for c in (row, col, value) if c]), [row, col], scratch, partitions)
    for rel in (indptr_path, indices_path, values_path):
        if rel:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
    indices = np.lib.format.open_memmap(root / indices_path, mode="w+", dtype=np.int64, shape=(nnz,))
    values = np.lib.format.open_memmap(root / values_path, mode="w+", dtype=np.float32, shape=(nnz,)) if values_path else None
    counts = np.zeros(num_rows, dtype=np.int64)
    offset, last_row = 0, -1
    for batch in _batches(parts, [c for c in (row, col, value) if c]):
        rows = batch.column(row).to_numpy()
        if len(rows) == 0:
            continue
        if rows[0] < last_row or np.any(np.diff(rows) < 0):
            raise PrepareError(f"internal: {indices_path} rows arrived out of order from Spark")
        if rows[-1] >= num_rows or rows[0] < 0:
            raise PrepareError(f"internal: {indices_path} has row id {rows.max()} outside [0, {num_rows})")
        last_row = rows[-1]
        end = offset + len(rows)
        indices[offset:end] = batch.column(col).to_numpy()
        if values is not None:
            values[offset:end] = batch.column(value).to_numpy().astype(np.float32)
        # Rows arrive sorted: count over this batch's span only (a full-length bincount per batch is
        # O(rows x batches), quadratic at industrial sizes).
        counts[rows[0]:rows[-1] + 1] += np.bincount(rows - rows[0])
        offset = end
    if offset != nnz:
        raise PrepareError(f"internal: streamed {offset} entries for {indices_path}, expected {nnz}")
    indices.flush()
    if values is not None:
        values.flush()
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    np.save(root / indptr_path, indptr)
    shutil.rmtree(scratch)
    return nnz


def write_vectors(df: DataFrame, num_rows: int, dtype: str, root: Path, rel_path: str, scratch: Path, partitions: int, what: str) -> int:
    """id, vector rows -> an (num_rows, dim) .npy; ids must be exactly 0..num_rows-1, vectors finite and equally long."""
    parts, _ = _sorted_parts(df.select("id", "vector"), ["id"], scratch, partitions)
    target, expected, dim = None, 0, None
    for batch in _batches(parts, ["id", "vector"]):
        ids = batch.column("id").to_numpy()
        if len(ids) == 0:
            continue
        vectors = batch.column("vector")
        lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
        if dim is None:
            dim = int(lengths[0])
            (root / rel_path).parent.mkdir(parents=True, exist_ok=True)
            target = np.lib.format.open_memmap(root / rel_path, mode="w+", dtype=np.dtype(dtype), shape=(num_rows, dim))
        if np.any(lengths != dim):
            bad = ids[lengths != dim][:5]
            raise PrepareError(f"{what}: embedding dimension disagrees: ids {bad.tolist()} have {lengths[lengths != dim][:5].tolist()}, expected {dim}")
        wanted = np.arange(expected, expected + len(ids))
        if not np.array_equal(ids, wanted):
            first = int(np.flatnonzero(ids != wanted)[0])
            raise PrepareError(f"{what}: embedding count disagrees with the ids: expected id {int(wanted[first])}, found {int(ids[first])}")
        if expected + len(ids) > num_rows:
            raise PrepareError(f"{what}: {expected + len(ids)} or more embeddings for {num_rows} ids")
        matrix = pc.list_flatten(vectors).to_numpy(zero_copy_only=False).reshape(len(ids), dim)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            raise PrepareError(f"{what}: NaN or inf in the embeddings of ids {ids[~finite][:5].tolist()}")
        cast = matrix.astype(dtype)
        if not np.isfinite(cast).all():
            raise PrepareError(f"{what}: embeddings overflow {dtype} (ids {ids[~np.isfinite(cast).all(axis=1)][:5].tolist()})")
        target[expected : expected + len(ids)] = cast
        expected += len(ids)
    if expected != num_rows:
        raise PrepareError(f"{what}: embedding count disagrees with the ids: {expected} embeddings for {num_rows} ids")
    target.flush()
    shutil.rmtree(scratch)
    return dim


def write_table(df: DataFrame, order: list[str], path: Path, scratch: Path, partitions: int) -> None:
    """A sorted DataFrame as one Parquet file (streamed part by part)."""
    parts, _ = _sorted_parts(df, order, scratch, partitions)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = None
    for batch in _batches(parts, df.columns):
        if writer is None:
            writer = pq.ParquetWriter(path, batch.schema)
        writer.write_batch(batch)
    if writer is None:
        pq.write_table(pa.Table.from_pandas(df.limit(0).toPandas(), preserve_index=False), path)
    else:
        writer.close()
    shutil.rmtree(scratch)


# --- WebDataset shards ----------------------------------------------------------------------------


def shard_count(num_interactions: int, cfg: ShardsConfig) -> int:
    if num_interactions < cfg.factor:
        raise PrepareError(f"only {num_interactions} training interactions: fewer than shards.factor={cfg.factor} shards can hold")
    # A multiple of `factor` shards, none fuller than interactions_per_shard, and none empty.
    groups = min(math.ceil(num_interactions / (cfg.factor * cfg.interactions_per_shard)), num_interactions // cfg.factor)
    return cfg.factor * groups


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_shard_file(path: str, shard: int, users: np.ndarray, items: np.ndarray, blocks: int) -> str:
    """One tar: `blocks` samples, interactions spread as evenly as possible; returns its sha256."""
    bounds = [len(users) * b // blocks for b in range(blocks + 1)]
    # Under a name of this task attempt's own (atomic_path): a speculative or lost attempt of the same task, still
    # writing, would otherwise truncate the file whose sha256 the manifest takes.
    with atomic_path(Path(path)) as staging:
        with open(staging, "wb") as stream:
            # Fixed mtime, owner and order: the same inputs give the same bytes.
            writer = wds.TarWriter(stream, mtime=0.0)
            for block in range(blocks):
                lo, hi = bounds[block], bounds[block + 1]
                writer.write({
                    "__key__": f"s{shard:05d}b{block:06d}",
                    layout.SAMPLE_USER_KEY: _npy_bytes(users[lo:hi].astype(np.int64)),
                    layout.SAMPLE_ITEM_KEY: _npy_bytes(items[lo:hi].astype(np.int64)),
                })
            writer.close()
        digest = layout.sha256_of(staging)
    return digest


def write_shards(train: DataFrame, root: Path, cfg: ShardsConfig, seed: int, partitions: int) -> list[dict]:
    """Training interactions in a seeded global order, dealt round-robin into equal shards.

    Position i of the order goes to shard i % S; every shard gets the same number
    of samples (blocks) and interaction counts that differ by at most one.
    """
    total = train.count()
    shards = shard_count(total, cfg)
    blocks = math.ceil(math.ceil(total / shards) / cfg.block_size)
    keyed = train.select("user", "item", F.xxhash64(F.lit(seed), "user", "item").alias("_key"))
    ranked = with_global_rank(keyed, ["_key", "user", "item"], partitions, name="_rank")
    dealt = ranked.select("user", "item", (F.col("_rank") % shards).alias("shard"), (F.col("_rank") / shards).cast("long").alias("pos"))
    out_dir = root / layout.TRAIN_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    out_dir_str = str(out_dir)

    def write_group(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.sort_values("pos", kind="stable")
        shard = int(frame["shard"].iloc[0])
        name = layout.SHARD_PATTERN.format(shard)
        digest = write_shard_file(f"{out_dir_str}/{name}", shard, frame["user"].to_numpy(), frame["item"].to_numpy(), blocks)
        return pd.DataFrame({"shard": [shard], "path": [f"{layout.TRAIN_DIR}/{name}"], "sha256": [digest], "samples": [blocks], "interactions": [len(frame)]})

    schema = "shard long, path string, sha256 string, samples long, interactions long"
    rows = dealt.groupBy("shard").applyInPandas(write_group, schema).orderBy("shard").collect()
    if len(rows) != shards:
        raise PrepareError(f"internal: wrote {len(rows)} shards, expected {shards}")
    for stray in interrupted_writes(out_dir):  # left by task attempts killed while writing
        stray.unlink(missing_ok=True)
    return [{"path": r["path"], "sha256": r["sha256"], "samples": r["samples"], "interactions": r["interactions"]} for r in rows]
