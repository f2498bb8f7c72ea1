"""The on-disk layout of a prepared dataset: the contract between Spark and the trainer.

A dataset directory holds

    manifest.json                      what is here (counts, schema, checksums, config)
    train/shard-00000.tar ...          WebDataset tars of training interactions
    embeddings/user.npy, item.npy      frozen LLM embeddings, row i = contiguous id i
    graph/indptr.npy, indices.npy, weights.npy
                                       propagation rows P_v in CSR over node ids
                                       (users 0..U-1, then items U..U+I-1)
    interactions/{train,val,test}_{indptr,items}.npy
                                       per-user item lists (CSR), items sorted
    ids/user.parquet, item.parquet     contiguous id <-> raw id, both columns
    profiles/user.parquet, item.parquet  the text each embedding came from

All arrays are plain `.npy` so that every reader can open them with
`np.load(mmap_mode="r")` and touch only the rows it needs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# 2: the manifest's "arrays" holds the sha256 of every .npy array (version 1 checked only the tars).
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"

TRAIN_DIR = "train"
SHARD_PATTERN = "shard-{:05d}.tar"

# A WebDataset sample is a block of interactions stored as two int64 arrays, so
# that a tar holds a few thousand entries rather than one per interaction.
SAMPLE_USER_KEY = "user.npy"
SAMPLE_ITEM_KEY = "item.npy"

EMBEDDING_FILES = {"user": "embeddings/user.npy", "item": "embeddings/item.npy"}

GRAPH_INDPTR = "graph/indptr.npy"
GRAPH_INDICES = "graph/indices.npy"
GRAPH_WEIGHTS = "graph/weights.npy"

SPLITS = ("train", "val", "test")


def split_indptr(split: str) -> str:
    return f"interactions/{split}_indptr.npy"


def split_items(split: str) -> str:
    return f"interactions/{split}_items.npy"


def array_files() -> list[str]:
    """Every .npy array the trainer reads; each is checksummed in the manifest."""
    splits = [f(split) for split in SPLITS for f in (split_indptr, split_items)]
    return [GRAPH_INDPTR, GRAPH_INDICES, GRAPH_WEIGHTS, *EMBEDDING_FILES.values(), *splits]


def id_map(kind: str) -> str:
    return f"ids/{kind}.parquet"


def profile_file(kind: str) -> str:
    return f"profiles/{kind}.parquet"


def sha256_of(path: Path | str) -> str:
    """The checksum the manifest records for a tar or an array: sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
