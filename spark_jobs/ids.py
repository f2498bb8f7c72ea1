"""Contiguous id maps: raw ids in their natural order (numeric when all ids are integers) -> 0..n-1."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from spark_jobs.ranking import with_global_rank


def build_id_map(interactions: DataFrame, column: str, numeric: bool, partitions: int) -> DataFrame:
    """Columns: id (0-based contiguous), raw (the source's id). One table serves both directions."""
    distinct = interactions.select(F.col(column).alias("raw")).distinct()
    key = F.col("raw").try_cast("long") if numeric else F.col("raw")
    distinct = distinct.withColumn("_key", key)
    return with_global_rank(distinct, ["_key"], partitions, name="id").select("id", "raw")


def apply_id_maps(interactions: DataFrame, users: DataFrame, items: DataFrame) -> DataFrame:
    return (
        interactions.join(users.select(F.col("raw").alias("user"), F.col("id").alias("user_id")), "user")
        .join(items.select(F.col("raw").alias("item"), F.col("id").alias("item_id")), "item")
        .select(F.col("user_id").alias("user"), F.col("item_id").alias("item"), "rating", "timestamp", "split")
    )
