"""A synthetic dataset of industrial shape, generated in Spark (no data passes through the driver).

Every user gets a fixed number of interactions, a power law over a pseudo-random
ranking of the users (heavy users and a long tail, at least `min_user_interactions`
each), so the dataset holds what was asked for and every user is active. Each of a
user's interactions comes with probability `community_affinity` from the user's
community (items with the same id modulo the community count), else from the whole
catalogue, by a Zipf law over a pseudo-random ranking of that pool (power-law
popularity). A user's items within a pool are distinct by construction: the sorted
Zipf draws r_0 <= r_1 <= ... become r_j + j, still Zipf-shaped and strictly
increasing. Every item also gets one interaction from a user of its community, so the
whole catalogue is active. Every node's LLM-side vector is its community's centroid
plus Gaussian noise, so the LLM side carries signal about preferences, as real text
embeddings do. All randomness is drawn before any shuffle and seeded: a rerun gives
the same data.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

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


def degree_scale(cfg: SyntheticConfig, total: int, most: int) -> float:
    """c such that sum over activity ranks r of clip(round(c (r+1)^-a), min, most) is about `total`."""
    ranks = np.arange(1, cfg.users + 1, dtype=np.float64) ** -cfg.user_exponent
    low, high = 0.0, float(most) * cfg.users
    for _ in range(100):
        c = (low + high) / 2
        if np.clip(np.floor(c * ranks + 0.5), cfg.min_user_interactions, most).sum() < total:
            low = c
        else:
            high = c
    return (low + high) / 2


def synthetic_interactions(spark: SparkSession, cfg: SyntheticConfig, seed: int) -> DataFrame:
    c = cfg.communities
    # Distinct items per pool need a user's count to fit in the smallest community's catalogue (SyntheticConfig
    # refuses a min_user_interactions beyond it).
    most = min(cfg.max_user_interactions, cfg.items // c)
    scale = degree_scale(cfg, cfg.interactions - cfg.items, most)
    users = spark.range(0, cfg.users, numPartitions=cfg.partitions)
    # The activity rank is a permutation of the id, so heavy users spread over the partitions.
    rank = permute(F.col("id"), cfg.users, F.lit(seed % cfg.users))
    degree = F.least(F.greatest(F.floor(F.lit(scale) * F.pow(rank + 1, F.lit(-cfg.user_exponent)) + 0.5), F.lit(cfg.min_user_interactions)), F.lit(most))
    draws = users.select(F.col("id").alias("user"), degree.cast("long").alias("degree")).select(
        "user", "degree", F.explode(F.sequence(F.lit(0), F.col("degree") - 1)).alias("j")
    )
    # Random columns are drawn here, before the shuffle below, so that they do not depend on row order.
    draws = draws.select(
        "user", "degree", "j",
        (F.rand(seed + 1) < cfg.community_affinity).alias("in_community"),
        F.rand(seed + 2).alias("_u_item"),
        F.rand(seed + 3).alias("_u_time"),
    )
    community = F.pmod(F.col("user"), F.lit(c))
    # Items of community k are k, k + C, k + 2C, ...: n_k of them.
    n_k = F.floor((F.lit(cfg.items) - community - 1) / c).cast("long") + 1
    pool = F.when(F.col("in_community"), n_k).otherwise(F.lit(cfg.items))
    # Drawn from the pool's first n - degree + 1 ranks, so that r + (position among the sorted draws) < n.
    draws = draws.withColumn("r", zipf_rank(F.col("_u_item"), pool - F.col("degree") + 1, cfg.item_exponent))
    order = Window.partitionBy("user", "in_community").orderBy("r", "j")
    distinct_rank = F.col("r") + F.row_number().over(order) - 1
    in_community = community + F.lit(c) * permute(distinct_rank, n_k, community)
    anywhere = permute(distinct_rank, cfg.items, F.lit((seed * 7) % cfg.items))
    user_items = draws.select("user", F.when(F.col("in_community"), in_community).otherwise(anywhere).alias("item"), "_u_time")

    # One interaction per item with a pseudo-random user of its community: the whole catalogue is active.
    items = spark.range(0, cfg.items, numPartitions=cfg.partitions)
    item_community = F.pmod(F.col("id"), F.lit(c))
    community_users = F.floor((F.lit(cfg.users) - item_community - 1) / c).cast("long") + 1
    cover_user = item_community + F.lit(c) * permute(F.floor(F.col("id") / c).cast("long"), community_users, F.lit(seed % 1009))
    covering = items.select(cover_user.alias("user"), F.col("id").alias("item"), F.rand(seed + 4).alias("_u_time"))

    return user_items.unionByName(covering).select(
        F.col("user").cast("string").alias("user"),
        F.col("item").cast("string").alias("item"),
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
