"""Cleaning: implicit-feedback threshold, de-duplication, iterative k-core."""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from spark_jobs.config import CleanConfig
from spark_jobs.errors import PrepareError
from spark_jobs.session import StageLog, cut_lineage


def _split_priority() -> F.Column:
    # When a pair occurs in several splits of a pre-split source, the train occurrence wins.
    return F.when(F.col("split") == "train", 0).when(F.col("split") == "val", 1).when(F.col("split") == "test", 2).otherwise(3)


def clean(interactions: DataFrame, cfg: CleanConfig, log: StageLog, has_split: bool = False) -> DataFrame:
    """has_split: the source's own split, whose dropped repeats are counted per split (its held-out pairs that are
    also train pairs)."""
    df = interactions
    if cfg.rating_threshold is not None:
        if df.where(F.col("rating").isNotNull()).limit(1).count() == 0:
            raise PrepareError("clean.rating_threshold is set but the source has no rating column")
        df = df.where(F.col("rating") >= cfg.rating_threshold)
    if cfg.dedupe:
        first = Window.partitionBy("user", "item").orderBy(_split_priority(), F.col("timestamp").asc_nulls_last(), F.col("rating").desc_nulls_last())
        # Checkpointed with the repeats still in, so that they are counted from it, not by another pass over the source.
        df = cut_lineage(df.withColumn("_n", F.row_number().over(first)))
        _report_repeats(_rows_by_split(df.where(F.col("_n") > 1)), has_split, log)
        df = df.where(F.col("_n") == 1).drop("_n")
    else:
        df = cut_lineage(df)
    if cfg.k_core > 0:
        df = k_core(df, cfg.k_core, cfg.k_core_max_rounds, log)
    if df.limit(1).count() == 0:
        raise PrepareError(
            f"no interactions left after cleaning (clean.rating_threshold={cfg.rating_threshold}, clean.k_core={cfg.k_core})"
        )
    return df


def _rows_by_split(df: DataFrame) -> dict[str, int]:
    return {r["split"]: r["count"] for r in df.groupBy("split").count().collect()}


def _report_repeats(dropped: dict[str, int], has_split: bool, log: StageLog) -> None:
    """Say how many repeated (user, item) rows were dropped: a pre-split source's by split (a validation or test pair
    that is also a train pair leaves its split), any other's in all (a CSV's 40 rows became 30 without a word)."""
    if not dropped:
        return
    if has_split:
        listing = ", ".join(f"{n} {split}" for split, n in sorted(dropped.items()))
        log.log(f"de-duplication dropped {sum(dropped.values())} repeated (user, item) interactions ({listing}); each pair "
                "is kept once, in train where a copy is there, else in validation, else in test")
    else:
        log.log(f"de-duplication dropped {sum(dropped.values())} repeated (user, item) interactions; each pair is kept "
                "once, its earliest copy (then its highest rating); clean.dedupe=false keeps them all")


def k_core(df: DataFrame, k: int, max_rounds: int, log: StageLog) -> DataFrame:
    """Drop users and items with fewer than k interactions, repeatedly, until none is left to drop."""
    size = df.count()
    for round_no in range(1, max_rounds + 1):
        users = df.groupBy("user").count().where(F.col("count") >= k).select("user")
        items = df.groupBy("item").count().where(F.col("count") >= k).select("item")
        df = cut_lineage(df.join(users, "user", "left_semi").join(items, "item", "left_semi"))
        new_size = df.count()
        log.log(f"k-core round {round_no}: {size} -> {new_size} interactions")
        if new_size == size:
            return df
        size = new_size
    raise PrepareError(f"clean.k_core={k}: not stable after clean.k_core_max_rounds={max_rounds} rounds")
