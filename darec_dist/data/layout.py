"""The on-disk layout of a prepared dataset: the contract between Spark and the trainer.

A dataset directory holds

    manifest.json                      what is here (counts, schema, checksums, config)
    train/shard-00000.tar ...          WebDataset tars of training interactions
    embeddings/user.npy, item.npy      frozen LLM embeddings, row i = contiguous id i
    graph/indptr.npy, indices.npy, weights.npy
                                       propagation rows P_v in CSR over node ids
                                       (users 0..U-1, then items U..U+I-1)
    graph/degree.npy                   train degree per node
    interactions/{train,val,test}_{indptr,items}.npy
                                       per-user item lists (CSR), items sorted
    ids/user.parquet, item.parquet     contiguous id <-> raw id, both columns
    profiles/user.parquet, item.parquet  the text each embedding came from

All arrays are plain `.npy` so that every reader can open them with
`np.load(mmap_mode="r")` and touch only the rows it needs.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
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
GRAPH_DEGREE = "graph/degree.npy"

SPLITS = ("train", "val", "test")


def split_indptr(split: str) -> str:
    return f"interactions/{split}_indptr.npy"


def split_items(split: str) -> str:
    return f"interactions/{split}_items.npy"


def id_map(kind: str) -> str:
    return f"ids/{kind}.parquet"


def profile_file(kind: str) -> str:
    return f"profiles/{kind}.parquet"
