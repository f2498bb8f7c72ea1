"""A synthetic dataset of industrial shape, generated in Spark (no data passes through the driver).

Each interaction draws its user from a Zipf law over a pseudo-random ranking of the
users (power-law activity); with probability `community_affinity` its item comes
from the user's community (items with the same id modulo the community count),
else from the whole catalogue, each by a Zipf law over a pseudo-random ranking
(power-law popularity). Every node's LLM-side vector is its community's centroid
plus Gaussian noise, so the LLM side carries signal about preferences, as real
text embeddings do. All randomness is seeded: a rerun gives the same data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_jobs.config import PrepareConfig, SyntheticConfig
from spark_jobs.embed import hashed_normal
from spark_jobs.readers.source import RawSource

# Ranks are mapped to ids by r -> (r * PRIME + offset) mod n, a bijection when PRIME does not divide n.
PRIMES = (1_000_003, 998_244_353, 2_147_483_647)


def _prime_for(n: int) -> int:
    return next(p for p in PRIMES if n % p != 0)


def zipf_rank(uniform: F.Column, n, exponent: float) -> F.Column:
    """Inverse CDF of a continuous power law x^-a on [1, n+1), floored to a rank in [0, n)."""
    n = F.lit(n) if isinstance(n, int) else n
    if abs(exponent - 1.0) < 1e-9:
        x = F.exp(uniform * F.log(n + 1))
    else:
        one_minus = 1.0 - exponent
        x = F.pow(F.lit(1.0) + uniform * (F.pow(n + 1, F.lit(one_minus)) - 1.0), F.lit(1.0 / one_minus))
    return F.least(F.floor(x).cast("long") - 1, n - 1)


def permute(rank: F.Column, n, offset) -> F.Column:
    n_col = F.lit(n) if isinstance(n, int) else n
    prime = _prime_for(n) if isinstance(n, int) else PRIMES[-1]  # per-community sizes: 2^31-1 divides none of them
    return F.pmod(rank * F.lit(prime) + offset, n_col)


def synthetic_interactions(spark: SparkSession, cfg: SyntheticConfig, seed: int) -> DataFrame:
    c = cfg.communities
    draws = spark.range(0, cfg.interactions, numPartitions=cfg.partitions)
    user = permute(zipf_rank(F.rand(seed), cfg.users, cfg.user_exponent), cfg.users, F.lit(seed % cfg.users))
    df = draws.select(user.alias("user"), F.rand(seed + 1).alias("_in_community"), F.rand(seed + 2).alias("_u_item"), F.rand(seed + 3).alias("_u_time"))
    community = F.pmod(F.col("user"), F.lit(c))
    # Items of community k are k, k + C, k + 2C, ...: n_k of them.
    n_k = F.floor((F.lit(cfg.items) - community - 1) / c).cast("long") + 1
    local_rank = zipf_rank(F.col("_u_item"), n_k, cfg.item_exponent)
    in_community = community + F.lit(c) * permute(local_rank, n_k, community)
    anywhere = permute(zipf_rank(F.col("_u_item"), cfg.items, cfg.item_exponent), cfg.items, F.lit((seed * 7) % cfg.items))
    item = F.when(F.col("_in_community") < cfg.community_affinity, in_community).otherwise(anywhere)
    return df.select(
        F.col("user").cast("string").alias("user"),
        item.cast("string").alias("item"),
        F.lit(None).cast("double").alias("rating"),
        (F.col("_u_time") * 1e9).cast("long").alias("timestamp"),
        F.lit(None).cast("string").alias("split"),
    )


def community_vectors(spark: SparkSession, cfg: SyntheticConfig, kind: str, count: int, seed: int) -> DataFrame:
    """raw (string id), vector: centroid of the node's community + noise, unit length."""
    rng = np.random.default_rng([seed, cfg.communities, cfg.embedding_dim])
    centroids = rng.standard_normal((cfg.communities, cfg.embedding_dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    noise, dim, key = cfg.embedding_noise / np.sqrt(cfg.embedding_dim), cfg.embedding_dim, f"{seed}:{kind}"

    @F.pandas_udf(T.ArrayType(T.FloatType()))
    def vectors(ids: pd.Series) -> pd.Series:
        ids = ids.to_numpy()
        out = centroids[ids % len(centroids)] + noise * hashed_normal(ids, dim, key)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return pd.Series(list(out.astype(np.float32)))

    nodes = spark.range(0, count, numPartitions=cfg.partitions)
    return nodes.select(F.col("id").cast("string").alias("raw"), vectors("id").alias("vector"))


def read_synthetic(spark: SparkSession, cfg: PrepareConfig) -> RawSource:
    syn = cfg.source.synthetic
    return RawSource(
        name="synthetic",
        interactions=synthetic_interactions(spark, syn, cfg.seed),
        numeric_ids=True,
        has_split=False,
        files=[],
        vectors={
            "user": community_vectors(spark, syn, "user", syn.users, cfg.seed),
            "item": community_vectors(spark, syn, "item", syn.items, cfg.seed),
        },
    )
