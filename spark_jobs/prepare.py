"""Prepare a dataset: raw data -> cleaned, split, graph rows, LLM embeddings, WebDataset shards, manifest.

    python -m spark_jobs.prepare configs/data/ml-100k.yaml [key=value ...]
    spark-submit spark_jobs/prepare.py configs/data/ml-100k.yaml [key=value ...]

Everything is written under a temporary sibling of `output` and renamed into
place only when complete, so a failed run leaves no dataset behind.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from contextlib import suppress
from pathlib import Path

if __package__ in (None, ""):  # run as a file by spark-submit: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from darec_dist.config import ConfigError, load_config, to_dict
from darec_dist.data import layout
from darec_dist.files import DirectoryInUse, exclusive_lock, fsync_tree, replace_dir
from spark_jobs.clean import clean
from spark_jobs.config import EmbeddingConfig, PrepareConfig
from spark_jobs.embed import embed_profiles
from spark_jobs.errors import PrepareError
from spark_jobs.graph import normalised_adjacency, node_degrees, propagation_rows, sample_neighbors, train_edges
from spark_jobs.ids import apply_id_maps, build_id_map
from spark_jobs.profiles import fail_on_missing_text, item_profiles, user_profiles
from spark_jobs.readers.formats import check_source_paths, read_source
from spark_jobs.session import CTRL_C_PRESSED, StageLog, effective_master, local_uri, start_session, wait_for_jvm_exit
from spark_jobs.split import split_interactions
from spark_jobs.write import write_csr, write_shards, write_table, write_vectors

# Where each format finds its item text, for the error that finds none.
ITEM_TEXT_SOURCES = {
    "csv": "a text table given as source.item_text",
    "recbole": "a .item file beside the .inter file",
    "rlmrec": "itm_prf.csv in source.path",
}

# In a staging directory: "host pid" of the job writing it, so that a later job can tell a killed job's
# leftovers from a running one's. The job touches it every HEARTBEAT_S: a job on another host, whose process cannot
# be looked up, is taken for killed once its file is ABANDONED_AFTER_S older than a new one's (both stamped by the
# filesystem that holds them, so the hosts' clocks need not agree).
OWNER = "OWNER"
HEARTBEAT_S = 60.0
ABANDONED_AFTER_S = 600.0
# Lineage checkpoints of a job on a cluster, inside its staging directory.
CHECKPOINTS = "_checkpoints"


# Training and evaluation jobs hold a reading lock on their dataset (darec_dist/train/run_dataset.py: dataset_in_use).
_IN_USE = ("output: {output} is being read by a training or evaluation job (it re-reads the dataset every epoch, so "
           "replacing it would switch the job to other data); wait for the job to end, or write to another output")


def prepare(cfg: PrepareConfig, spark: SparkSession | None = None, log: StageLog | None = None) -> Path:
    """Run the whole job; returns the finished dataset directory. A session passed in is left running, with its
    cache cleared (the job's cached tables and any of the caller's)."""
    log = log or StageLog()
    output = Path(cfg.output).expanduser().resolve()
    if output.exists() and not output.is_dir():
        raise PrepareError(f"output: {output} is a file; give a directory path for the dataset")
    if (output / layout.MANIFEST).exists() and not cfg.overwrite:
        raise PrepareError(f"output: {output} already holds a dataset; pass overwrite=true to replace it")
    if (output / layout.MANIFEST).exists():
        with exclusive_lock(output) as unread:
            if not unread:
                raise PrepareError(_IN_USE.format(output=output))
    if output.exists() and not (output / layout.MANIFEST).exists() and any(output.iterdir()):
        raise PrepareError(f"output: {output} exists and is not a dataset directory; choose another path")
    check_source_paths(cfg)
    if cfg.embedding.encoder != "id-hash" and cfg.embedding.dim != EmbeddingConfig.dim:  # the manifest records the real width
        log.log(f"warning: embedding.dim={cfg.embedding.dim} applies to the id-hash encoder only; embedding.encoder="
                f"{cfg.embedding.encoder} gives vectors of its own width")
    staging = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir(parents=True)
    except OSError as err:  # a file where a parent directory should be, or no permission
        raise PrepareError(f"output: cannot write beside {output} ({err.strerror}: {err.filename})") from None
    (staging / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
    # Checked with our own staging in place: of two jobs started together, one at least sees the other.
    running = _remove_abandoned_staging(output, staging, log)
    if running:
        shutil.rmtree(staging, ignore_errors=True)
        owner, other = running[0]
        # The later rename would win, and overwrite=false was checked before either had written anything.
        raise PrepareError(f"output: another prepare job ({owner}) is writing {output} in {other}; wait for it to "
                           "finish, or delete that directory if the job is gone")
    own_session = spark is None
    started = time.perf_counter()
    heartbeat = _start_heartbeat(staging / OWNER)
    try:
        spark = spark or start_session(cfg.spark)
        if own_session and not spark.sparkContext.master.startswith("local"):
            # On the storage every node mounts anyway (the executors write the shards there), removed before the rename.
            spark.sparkContext.setCheckpointDir(local_uri(staging / CHECKPOINTS))
            log.log(f"checkpoints under {staging / CHECKPOINTS} (on a cluster, a local one is lost with its executor)")
        manifest = _build(spark, cfg, staging, log)
        shutil.rmtree(staging / CHECKPOINTS, ignore_errors=True)
        manifest["timings_s"] = dict(log.seconds, total=round(time.perf_counter() - started, 3))
        (staging / layout.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (staging / OWNER).unlink()
        fsync_tree(staging)  # on disk before it is renamed into place: a power loss leaves no finished-looking husk
        try:  # a job that started reading it since the check above
            replace_dir(staging, output, reader_wait=10.0, refuse_in_use=True)
        except DirectoryInUse:
            # Finished, so kept (the job may have run for hours), under a name no later prepare takes for its leftovers.
            kept = output.parent / f"{output.name}.prepared-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(staging, kept)
            raise PrepareError(_IN_USE.format(output=output) + f". The new dataset is complete at {kept}: train on it "
                               "there (data.path), or move it into place once the job has ended") from None
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        master = effective_master(cfg.spark) if "stopped SparkContext" in str(err) else None
        if master and master.startswith("spark://"):
            # Spark gives up on a master it cannot reach after a minute of retries, and the next call reports only that
            # the context stopped; the cause is far above in its log.
            raise PrepareError(f"spark.master={master}: the Spark context stopped, most likely because the master "
                               "cannot be reached (Spark's log above says 'All masters are unresponsive'); check the URL "
                               "and that the master runs") from None
        raise
    finally:
        heartbeat.set()
        if own_session and spark is not None:
            spark.stop()
        elif spark is not None:
            # The job's cached tables would outlive it in the caller's session, and a later job reading a file
            # edited since (a malformed row fixed) would be given the cached rows: Spark matches cached reads by plan.
            spark.catalog.clearCache()
    _print_summary(manifest, output, log)
    return output


def _start_heartbeat(marker: Path) -> threading.Event:
    """Touch `marker` every HEARTBEAT_S until the returned event is set."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with suppress(OSError):  # removed once the dataset is written
                os.utime(marker)

    threading.Thread(target=beat, name="prepare-heartbeat", daemon=True).start()
    return stop


def _remove_abandoned_staging(output: Path, own: Path, log: StageLog) -> list[tuple[str, Path]]:
    """Delete the staging directories of earlier jobs for this output that were killed (no cleanup ran): those
    whose owner process, on this host, is gone, or whose owner on another host stopped touching its OWNER file.
    Returns the others: jobs still writing this output, here or on another host (a shared filesystem), as
    ("host H, process P", directory)."""
    host, running = socket.gethostname(), []
    now = (own / OWNER).stat().st_mtime
    for staging in sorted(output.parent.glob(f".{glob.escape(output.name)}.tmp-*")):
        if staging == own:
            continue
        try:
            owner_host, pid = (staging / OWNER).read_text().split()
            silent_s = now - (staging / OWNER).stat().st_mtime
        except (OSError, ValueError):
            continue  # not ours to judge
        if owner_host == host and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            log.log(f"removed {staging.name}, left by a killed job")
        elif owner_host != host and silent_s > ABANDONED_AFTER_S:
            shutil.rmtree(staging, ignore_errors=True)
            log.log(f"removed {staging.name}, left by a job on host {owner_host} not heard from for {silent_s / 60:.0f} minutes")
        else:
            running.append((f"host {owner_host}, process {pid}", staging))
    return running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _build(spark: SparkSession, cfg: PrepareConfig, root: Path, log: StageLog) -> dict:
    parts = cfg.spark.shuffle_partitions
    scratch = root / "_scratch"

    with log.stage("read"):
        raw = read_source(spark, cfg, log)
        _check_embedding_source(raw, cfg)

    with log.stage("clean"):
        cleaned = clean(raw.interactions, cfg.clean, log, raw.has_split)

    with log.stage("ids"):
        users = build_id_map(cleaned, "user", raw.numeric_ids, parts).persist(StorageLevel.MEMORY_AND_DISK)
        items = build_id_map(cleaned, "item", raw.numeric_ids, parts).persist(StorageLevel.MEMORY_AND_DISK)
        num_users, num_items = users.count(), items.count()
        mapped = apply_id_maps(cleaned, users, items)
        write_table(users, ["id"], root / layout.id_map("user"), scratch, parts)
        write_table(items, ["id"], root / layout.id_map("item"), scratch, parts)
        log.log(f"{num_users} users, {num_items} items")
        encodes_text = cfg.embedding.encoder not in ("source", "id-hash")
        item_text = item_profiles(raw.item_text, items, cfg.profiles)
        if encodes_text and item_text is not None:
            # Which items need text is known now: a missing one fails before the split and the graph, not after.
            item_text = item_text.persist(StorageLevel.MEMORY_AND_DISK)
            fail_on_missing_text(item_text, items, "item", _text_source(cfg, "item"))

    with log.stage("split"):
        split = split_interactions(mapped, cfg.split, raw.has_split, cfg.seed, repeated_pairs=not cfg.clean.dedupe).persist(StorageLevel.MEMORY_AND_DISK)
        counts = {r["split"]: r["count"] for r in split.groupBy("split").count().collect()}
        splits = {name: int(counts.get(name, 0)) for name in layout.SPLITS}
        if splits["train"] == 0:
            raise PrepareError("the split left no training interactions")
        if splits["test"] == 0:
            log.log("warning: the split left no test interactions (users with few interactions get none); the trainer "
                    "refuses such a dataset: raise split.ratios' test share")
        if splits["val"] == 0:
            # The trainer stops early on validation; say so here rather than at its start.
            log.log("warning: the split left no validation interactions (users with few interactions get none); "
                    "train with eval.validate=false, or raise split.ratios' validation share or split.val_from_train")
        train = split.where(F.col("split") == "train")
        log.log(f"splits {splits}")
        # A built user profile lists train items: known now, so a missing one fails before the graph, not after.
        user_text = user_profiles(raw.user_text, raw.user_text_is_profile, users, train, item_text, cfg.profiles)
        if encodes_text and user_text is not None:
            user_text = user_text.persist(StorageLevel.MEMORY_AND_DISK)
            fail_on_missing_text(user_text, users, "user", _text_source(cfg, "user"))

    with log.stage("interactions"):
        per_user = {}
        for name in layout.SPLITS:
            part = split.where(F.col("split") == name).select("user", "item")
            if not cfg.clean.dedupe:  # a held-out item counts once in Recall's denominator, a train item masks once
                part = part.distinct()
            write_csr(part, "user", "item", None, num_users, root, layout.split_indptr(name), layout.split_items(name), None, scratch, parts)
            per_user[name] = np.diff(np.load(root / layout.split_indptr(name), mmap_mode="r"))
        evaluated_users = {name: int(np.count_nonzero(counts)) for name, counts in per_user.items()}
        untrained = int(np.count_nonzero((per_user["train"] == 0) & (per_user["val"] + per_user["test"] > 0)))
        if untrained:
            log.log(f"warning: {untrained} user(s) have held-out interactions but none in train; they are evaluated "
                    "with untrained vectors (a source split can do this; the ratio split keeps train first)")

    with log.stage("graph"):
        num_nodes = num_users + num_items
        edges = train_edges(train).persist(StorageLevel.MEMORY_AND_DISK)  # read by the degrees and the adjacency
        degrees = node_degrees(edges, num_users, num_nodes, spark, cfg.graph.self_loops)
        adjacency = normalised_adjacency(edges, degrees, num_users, cfg.graph.self_loops)
        if cfg.graph.max_neighbors is not None:
            adjacency = sample_neighbors(adjacency, degrees, cfg.graph.max_neighbors, cfg.seed)
        rows = propagation_rows(spark, adjacency, num_nodes, cfg.graph, parts)
        num_rows = num_nodes * cfg.graph.blocks()
        nnz = write_csr(rows, "src", "dst", "w", num_rows, root, layout.GRAPH_INDPTR, layout.GRAPH_INDICES, layout.GRAPH_WEIGHTS, scratch, parts)
        log.log(f"propagation rows: {num_rows} rows, {nnz} entries ({nnz / num_rows:.1f} per row)")

    with log.stage("embeddings"):
        if item_text is not None:
            item_text = item_text.select("id", "text")  # the title was for the user profiles
        dims = {}
        for kind, ids, profiles, count in (("user", users, user_text, num_users), ("item", items, item_text, num_items)):
            vectors = _node_vectors(raw, cfg, kind, ids, profiles, root, scratch, parts)
            dims[kind] = write_vectors(vectors, count, cfg.embedding.dtype, root, layout.EMBEDDING_FILES[kind], scratch, parts, f"{kind} embeddings")
        if dims["user"] != dims["item"]:
            raise PrepareError(f"user and item embeddings differ in dimension: {dims['user']} vs {dims['item']}")

    with log.stage("shards"):
        shards = write_shards(train.select("user", "item"), root, cfg.shards, cfg.seed, parts)

    total = sum(splits.values())
    return {
        "schema_version": layout.SCHEMA_VERSION,
        "source": raw.name,
        "inputs": raw.files,
        "malformed_rows": raw.malformed,
        "num_users": num_users,
        "num_items": num_items,
        "splits": splits,
        "users_with_interactions": evaluated_users,
        "density": total / float(num_users * num_items),
        "embedding": {
            "encoder": cfg.embedding.encoder,
            "model": cfg.embedding.model if cfg.embedding.encoder in ("sentence-transformers", "hf-decoder") else f"{cfg.embedding.encoder} ({raw.name})",
            "dim": dims["user"],
            "dtype": cfg.embedding.dtype,
            "pooling": cfg.embedding.pooling if cfg.embedding.encoder == "hf-decoder" else None,
        },
        "graph": {
            "layers": cfg.graph.layers,
            "layer_weights": cfg.graph.resolved_layer_weights(),
            "top_k": cfg.graph.top_k,
            "max_neighbors": cfg.graph.max_neighbors,
            "self_loops": cfg.graph.self_loops,
            "per_layer": cfg.graph.per_layer,
            "rows": num_rows,
            "nnz": nnz,
            "node_order": "users 0..num_users-1, then items num_users..num_users+num_items-1",
        },
        "shards": shards,
        "arrays": {rel: layout.sha256_of(root / rel) for rel in layout.array_files()},
        "shard_block_size": cfg.shards.block_size,
        "config": to_dict(cfg),
        "spark_version": spark.version,
    }


def _text_source(cfg: PrepareConfig, kind: str) -> str:
    """What an error names as the origin of a kind's text: its table, or the source format."""
    return getattr(cfg.source, f"{kind}_text") or f"{cfg.source.format} {kind} text"


def _check_embedding_source(raw, cfg: PrepareConfig) -> None:
    encoder = cfg.embedding.encoder
    if encoder == "source" and raw.vectors is None:
        raise PrepareError(f"embedding.encoder=source: source.format={cfg.source.format} brings no vectors of its own")
    if encoder in ("sentence-transformers", "hf-decoder") and raw.item_text is None:
        where = ITEM_TEXT_SOURCES.get(cfg.source.format, "this format carries no text")
        raise PrepareError(
            f"source.format={cfg.source.format}: this source has no item text to embed ({where}); "
            "give it, or set embedding.encoder=id-hash (a random stand-in, say so in results)"
        )


def _node_vectors(raw, cfg: PrepareConfig, kind: str, ids, profiles, root: Path, scratch: Path, parts: int):
    """id, vector for every node of `kind`, from the configured encoder."""
    encoder = cfg.embedding.encoder
    if encoder == "source":
        return ids.join(raw.vectors[kind], "raw").select("id", "vector")
    if encoder == "id-hash":
        return embed_profiles(ids.select("id"), cfg.embedding, kind, cfg.seed, parts)
    # A text encoder has profiles: _check_embedding_source refused a source without item text, and user profiles
    # are built from the items' titles where no user text is given.
    write_table(profiles, ["id"], root / layout.profile_file(kind), scratch, parts)
    return embed_profiles(profiles, cfg.embedding, kind, cfg.seed, parts)


def _print_summary(manifest: dict, output: Path, log: StageLog) -> None:
    s = manifest["splits"]
    log.log(f"dataset written to {output}")
    log.log(
        f"users {manifest['num_users']}, items {manifest['num_items']}, interactions train {s['train']} / val {s['val']} / "
        f"test {s['test']}, density {manifest['density']:.5f}"
    )
    log.log(f"graph rows {manifest['graph']['rows']}, nnz {manifest['graph']['nnz']}; shards {len(manifest['shards'])}")
    log.log("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in manifest["timings_s"].items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    # py4j logs the traceback of a JVM call that Ctrl-C interrupts, on the root logger; the interrupt is said below.
    # Once Ctrl-C is taken that error may also be the broken connection it left (ConnectionResetError, CI).
    logging.getLogger().addFilter(
        lambda record: not (record.exc_info and (record.exc_info[0] is KeyboardInterrupt or CTRL_C_PRESSED.is_set())))
    try:
        cfg = load_config(PrepareConfig, argv[0], argv[1:])
        prepare(cfg)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or CTRL_C_PRESSED.is_set():
            # prepare removed its staging directory on the way out: nothing half-written is left
            wait_for_jvm_exit()
            print("interrupted: no dataset was written; the same command starts it again", file=sys.stderr)
            return 130  # 128 + SIGINT, as the shell reports it
        if isinstance(err, (PrepareError, ConfigError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
