"""Propagation rows P = sum_k a_k A^k of the symmetric-normalised train graph, computed by joins.

Nodes are users 0..U-1 followed by items U..U+I-1. A is the bipartite adjacency
normalised as 1/sqrt(d_u d_i) (with self loops, GCCF's graph: A + I normalised by
degrees + 1). Per-layer rows keep each A^k apart as rows k * nodes + v instead of
summing them. The k-hop frontier is multiplied by A with a join
and an aggregation; when `top_k` is set, each row of the frontier keeps its K
largest entries after every hop, so power-law hubs cannot blow up the next join,
and the summed rows keep their K largest entries at the end.
"""

from __future__ import annotations

from functools import reduce

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from spark_jobs.config import GraphConfig
from spark_jobs.session import cut_lineage


def train_edges(train: DataFrame) -> DataFrame:
    """user, item: the graph's edges, each train pair once (clean.dedupe=false repeats pairs in train)."""
    return train.select("user", "item").distinct()


def node_degrees(edges: DataFrame, num_users: int, num_nodes: int, spark: SparkSession, self_loops: bool = False) -> DataFrame:
    """node, degree for every node of the `train_edges` (0 without edges; one more each with self loops)."""
    ends = edges.select(F.col("user").alias("node")).unionAll(edges.select((F.col("item") + num_users).alias("node")))
    counted = ends.groupBy("node").agg(F.count(F.lit(1)).alias("degree"))
    nodes = spark.range(num_nodes).withColumnRenamed("id", "node")
    loops = 1 if self_loops else 0
    return nodes.join(counted, "node", "left").select("node", (F.coalesce("degree", F.lit(0)) + loops).cast("long").alias("degree"))


def normalised_adjacency(edges: DataFrame, degrees: DataFrame, num_users: int, self_loops: bool = False) -> DataFrame:
    """src, dst, a: both directions of every edge of `train_edges`, a = 1/sqrt(deg(src) deg(dst)); with self
    loops also (v, v) for every node (`degrees` must then count them: node_degrees(self_loops=True))."""
    pairs = edges.select(F.col("user").alias("u"), (F.col("item") + num_users).alias("i"))
    both = pairs.select(F.col("u").alias("src"), F.col("i").alias("dst")).unionAll(pairs.select(F.col("i").alias("src"), F.col("u").alias("dst")))
    if self_loops:
        both = both.unionAll(degrees.select(F.col("node").alias("src"), F.col("node").alias("dst")))
    deg_src = degrees.select(F.col("node").alias("src"), F.col("degree").alias("d_src"))
    deg_dst = degrees.select(F.col("node").alias("dst"), F.col("degree").alias("d_dst"))
    return (
        both.join(deg_src, "src")
        .join(deg_dst, "dst")
        .select("src", "dst", (F.lit(1.0) / F.sqrt(F.col("d_src") * F.col("d_dst"))).alias("a"))
    )


def keep_top_k(rows: DataFrame, k: int) -> DataFrame:
    """The k largest entries of each row; ties go to the smaller node id, so the result is deterministic."""
    order = Window.partitionBy("src").orderBy(F.col("w").desc(), F.col("dst").asc())
    return rows.withColumn("_r", F.row_number().over(order)).where(F.col("_r") <= k).drop("_r")


def sample_neighbors(adjacency: DataFrame, degrees: DataFrame, limit: int, seed: int) -> DataFrame:
    """At most `limit` neighbours per source node, drawn by a seeded hash, weights scaled by degree / limit.

    Expanding a hub through a uniform sample of its neighbours, scaled up by the sampling rate,
    keeps each hop an unbiased estimate while the join output stays at most frontier x limit.
    """
    order = Window.partitionBy("src").orderBy(F.xxhash64(F.lit(seed), "src", "dst"))
    scale = F.greatest(F.col("degree") / F.lit(float(limit)), F.lit(1.0))
    return (
        adjacency.withColumn("_r", F.row_number().over(order))
        .where(F.col("_r") <= limit)
        .join(degrees.select(F.col("node").alias("src"), "degree"), "src")
        .select("src", "dst", (F.col("a") * scale).alias("a"))
    )


def propagation_rows(
    spark: SparkSession, adjacency: DataFrame, num_nodes: int, cfg: GraphConfig, partitions: int
) -> DataFrame:
    """src, dst, w: the entries of P, every node's row (a node without edges keeps its a_0 self entry);
    with per-layer rows, the entries of A^k in rows k * num_nodes + v.

    `adjacency` is what each hop expands through (the full normalised adjacency, or its
    neighbour sample for hub-bounded joins).
    """
    weights = cfg.resolved_layer_weights()
    adjacency = adjacency.repartition(partitions, "src").persist(StorageLevel.MEMORY_AND_DISK)
    frontier = spark.range(num_nodes).select(F.col("id").alias("src"), F.col("id").alias("dst"), F.lit(1.0).alias("w"))
    terms = [frontier.select("src", "dst", (F.col("w") * weights[0]).alias("w"))]
    for hop in range(1, cfg.layers + 1):
        step = (
            frontier.join(adjacency.withColumnRenamed("src", "mid").withColumnRenamed("dst", "to"), frontier["dst"] == F.col("mid"))
            .groupBy("src", F.col("to").alias("dst"))
            .agg(F.sum(F.col("w") * F.col("a")).alias("w"))
        )
        if cfg.top_k is not None:
            step = keep_top_k(step, cfg.top_k)
        # Materialise each hop: the next join reads it twice and the lineage would grow with the hops.
        frontier = cut_lineage(step)
        if cfg.per_layer:
            terms.append(frontier.select((F.col("src") + hop * num_nodes).alias("src"), "dst", "w"))
        elif weights[hop] != 0.0:
            terms.append(frontier.select("src", "dst", (F.col("w") * weights[hop]).alias("w")))
    if cfg.per_layer:  # every hop was already pruned to its top K
        return reduce(DataFrame.unionAll, terms)
    rows = reduce(DataFrame.unionAll, terms).groupBy("src", "dst").agg(F.sum("w").alias("w"))
    if cfg.top_k is not None:
        rows = keep_top_k(rows, cfg.top_k)
    return rows
