"""Text profiles per node: given profiles as they are, or built from metadata and TRAIN history.

A user profile built here lists only the user's training items, so nothing of
the validation or test split can leak into the LLM side.
"""

from __future__ import annotations

import re

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from spark_jobs.config import ProfileConfig
from spark_jobs.errors import PrepareError


def item_profiles(item_text: DataFrame | None, item_ids: DataFrame, cfg: ProfileConfig) -> DataFrame | None:
    """id, text for every item (ids from the id map), or None when the source has no item text."""
    if item_text is None:
        return None
    joined = item_ids.join(item_text.withColumnRenamed("item", "raw"), "raw", "left")
    return joined.select("id", F.substring(F.coalesce("text", F.lit("")), 1, cfg.max_chars).alias("text"), "title")


def user_profiles(
    user_text: DataFrame | None,
    user_text_is_profile: bool,
    user_ids: DataFrame,
    train: DataFrame,
    items: DataFrame | None,
    cfg: ProfileConfig,
) -> DataFrame | None:
    """id, text for every user: the given profile, or demographics plus the titles of train items."""
    given = None
    if user_text is not None:
        given = user_ids.join(user_text.withColumnRenamed("user", "raw"), "raw", "left").select("id", "text")
    if user_text_is_profile:
        return given.select("id", F.substring(F.coalesce("text", F.lit("")), 1, cfg.max_chars).alias("text"))
    if items is None:
        return None
    favourites = Window.partitionBy("user").orderBy(F.col("rating").desc_nulls_last(), F.col("timestamp").desc_nulls_last(), "item")
    listed = (
        train.withColumn("_r", F.row_number().over(favourites))
        .where(F.col("_r") <= cfg.max_user_items)
        .join(items.select(F.col("id").alias("item"), "title"), "item")
        .groupBy("user")
        .agg(F.sort_array(F.collect_list(F.struct("_r", "title"))).alias("_titles"))
        .select(F.col("user").alias("id"), F.concat_ws("; ", F.transform("_titles", lambda t: t["title"])).alias("history"))
    )
    base = user_ids.select("id")
    if given is not None:
        base = base.join(given, "id", "left")
    else:
        base = base.withColumn("text", F.lit(None).cast("string"))
    text = F.concat_ws(
        " ",
        F.when(F.col("text").isNotNull() & (F.col("text") != ""), F.concat(F.lit("User: "), F.col("text"), F.lit("."))),
        F.when(F.col("history").isNotNull(), F.concat(F.lit("Interacted with: "), F.col("history"), F.lit("."))),
    )
    return base.join(listed, "id", "left").select("id", F.substring(text, 1, cfg.max_chars).alias("text"))


def fail_on_missing_text(profiles: DataFrame, ids: DataFrame, kind: str, source: str) -> None:
    """Fails naming the nodes (by their ids in the source) that have no text; ids maps id -> raw."""
    missing = profiles.where(F.col("text").isNull() | (F.trim(F.col("text")) == "")).join(ids, "id")
    count = missing.count()
    if count:
        examples = [r["raw"] for r in missing.orderBy("id").limit(5).collect()]
        raise PrepareError(
            f"{source}: {count} {kind}(s) have no text to embed (ids {examples}{' ...' if count > 5 else ''}); "
            f"every {kind} in the interactions needs a row with non-empty text in the {kind} text table"
            + _swallowed_rows_hint(profiles, ids, examples, kind)
        )


def _swallowed_rows_hint(profiles: DataFrame, ids: DataFrame, missing: list, kind: str) -> str:
    """A CSV text field whose opening quote is never closed takes the rows after it for its text, and their nodes
    then have none: the error names the node whose text holds a line that starts as a missing node's row."""
    row_start = r"\n\s*\"?(" + "|".join(re.escape(str(raw)) for raw in missing) + r")\"?,"
    holder = profiles.where(F.col("text").rlike(row_start)).join(ids, "id").orderBy("id").select("raw").first()
    if holder is None:
        return ""
    return (f"; the text of {kind} {holder['raw']!r} holds lines that start like their rows: a double quote opened "
            "in its row may be unclosed, so the rows after it were read as its text")
