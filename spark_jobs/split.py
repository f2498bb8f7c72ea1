"""Train / validation / test split per user: the source's own, random ratio, leave-one-out or temporal.

Every random choice is a hash of (seed, user, item), so the split is the same on
every run and every cluster, whatever the partitioning.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from spark_jobs.config import SplitConfig
from spark_jobs.errors import PrepareError


def _seeded_order(seed: int) -> F.Column:
    return F.xxhash64(F.lit(seed), F.col("user"), F.col("item"))


def split_interactions(df: DataFrame, cfg: SplitConfig, has_source_split: bool, seed: int, repeated_pairs: bool = False) -> DataFrame:
    """Returns user, item, rating, timestamp, split with split in {train, val, test}.

    repeated_pairs: the rows may repeat a (user, item) pair (clean.dedupe=false); every copy then goes to the
    split of its first copy (train before validation before test), so that no held-out item is a train item.
    """
    split = _split(df, cfg, has_source_split, seed)
    return _one_split_per_pair(split) if repeated_pairs else split


def _one_split_per_pair(df: DataFrame) -> DataFrame:
    names = F.array(F.lit("train"), F.lit("val"), F.lit("test"))
    rank = F.array_position(names, F.col("split"))  # 1-based
    first = F.min(rank).over(Window.partitionBy("user", "item"))
    return df.withColumn("split", F.element_at(names, first.cast("int")))


def _split(df: DataFrame, cfg: SplitConfig, has_source_split: bool, seed: int) -> DataFrame:
    method = cfg.method
    if method == "auto":
        method = "source" if has_source_split else "ratio"
    if method == "source":
        if not has_source_split:
            raise PrepareError("split.method=source: this source has no split of its own; use ratio, leave-one-out or temporal")
        if df.where(F.col("split") == "val").limit(1).count() == 0:
            return _validation_from_train(df, cfg.val_from_train, seed)
        return df
    if method == "ratio":
        return _by_position(df, _seeded_order(seed), cfg.ratios)
    if df.where(F.col("timestamp").isNull()).limit(1).count() > 0:
        raise PrepareError(f"split.method={method} needs a timestamp on every interaction; the source has none (or some are missing)")
    chronological = [F.col("timestamp"), _seeded_order(seed)]
    if method == "temporal":
        return _by_position(df, chronological, cfg.ratios)
    if method == "leave-one-out":
        return _leave_one_out(df, chronological)
    raise PrepareError(f"split.method: unknown method {method!r}")


def _by_position(df: DataFrame, order, ratios: list[float]) -> DataFrame:
    """Per user, in `order`: the first part is train, then validation, then test."""
    total = float(sum(ratios))
    order = order if isinstance(order, list) else [order]
    per_user = Window.partitionBy("user")
    ranked = df.withColumn("_pos", F.row_number().over(Window.partitionBy("user").orderBy(*order)) - 1).withColumn(
        "_n", F.count(F.lit(1)).over(per_user)
    )
    # (The tolerance: 180 * 0.35 / 1.0 is 62.99999999999999 in floating point, and test got 62 of a user's 180 rows.)
    n_test = F.floor(F.col("_n") * ratios[2] / total + 1e-9)
    n_val = F.floor(F.col("_n") * ratios[1] / total + 1e-9)
    n_train = F.col("_n") - n_test - n_val
    split = F.when(F.col("_pos") < n_train, "train").when(F.col("_pos") < n_train + n_val, "val").otherwise("test")
    return ranked.withColumn("split", split).drop("_pos", "_n")


def _leave_one_out(df: DataFrame, order: list) -> DataFrame:
    """The newest interaction is test, the one before it validation; users with fewer than 3 keep all in train."""
    latest_first = Window.partitionBy("user").orderBy(*[c.desc() for c in order])
    ranked = df.withColumn("_back", F.row_number().over(latest_first)).withColumn("_n", F.count(F.lit(1)).over(Window.partitionBy("user")))
    split = F.when(F.col("_n") < 3, "train").when(F.col("_back") == 1, "test").when(F.col("_back") == 2, "val").otherwise("train")
    return ranked.withColumn("split", split).drop("_back", "_n")


def _validation_from_train(df: DataFrame, fraction: float, seed: int) -> DataFrame:
    train = df.where(F.col("split") == "train")
    rest = df.where(F.col("split") != "train")
    resplit = _by_position(train.drop("split"), _seeded_order(seed), [1.0 - fraction, fraction, 0.0])
    return resplit.unionByName(rest)
