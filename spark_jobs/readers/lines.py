"""Delimited text read in Spark with exact file and line numbers, and the malformed-row policy.

Line numbers are computed without collecting data: Spark's hidden `_metadata`
column gives each row's file and split (block) start; a row's line is its rank
inside the block plus the line count of the file's earlier blocks.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from spark_jobs.config import MalformedConfig
from spark_jobs.errors import PrepareError
from spark_jobs.session import StageLog, local_uri


def numbered_lines(spark: SparkSession, paths: list[str]) -> DataFrame:
    """Columns: file (path as given to Spark), line (1-based), value (the raw line)."""
    raw = spark.read.text([local_uri(path) for path in paths]).select(
        F.col("value"),
        F.col("_metadata.file_path").alias("file"),
        F.col("_metadata.file_block_start").alias("block"),
        F.monotonically_increasing_id().alias("row_order"),
    )
    in_block = raw.withColumn("in_block", F.row_number().over(Window.partitionBy("file", "block").orderBy("row_order")))
    earlier_blocks = Window.partitionBy("file").orderBy("block").rowsBetween(Window.unboundedPreceding, -1)
    offsets = (
        raw.groupBy("file", "block")
        .count()
        .withColumn("offset", F.coalesce(F.sum("count").over(earlier_blocks), F.lit(0)))
        .drop("count")
    )
    return (
        in_block.join(F.broadcast(offsets), ["file", "block"])
        .select(F.regexp_replace("file", "^file:", "").alias("file"), (F.col("offset") + F.col("in_block")).alias("line"), "value")
    )


def split_fields(lines: DataFrame, delimiter: str, regex: bool = False, quoted: bool = False) -> DataFrame:
    """Adds `fields`: the line split on the delimiter, each field trimmed and unquoted.

    quoted: CSV quoting (RFC 4180, within one line): a delimiter inside double quotes is text and `""` inside
    quotes is a quote; spaces at either end inside the quotes are dropped. Formats that do not quote (RecBole's
    atomic files) keep a lone `"` as text.
    """
    pattern = delimiter if regex else _escape(delimiter)
    value = F.trim(F.col("value"))
    fields = F.split(value, pattern, -1)
    if quoted:
        # A delimiter is outside quotes when an even number of quote characters follows it on the line.
        outside = F.split(value, pattern + r'(?=(?:[^"]*"[^"]*")*[^"]*$)', -1)
        fields = F.when(value.contains('"'), outside).otherwise(fields)

    def unquote(field):
        field = F.trim(field)
        unquoted = F.regexp_replace(field, r'^"(.*)"$', "$1")
        # Trimmed inside the quotes too: the text tables' ids are (Spark's CSV reader unquotes them first, so
        # read_text_csv cannot tell `" x "` from ` x `), and an id must name the same node in both files.
        return F.when(field.rlike(r'^".*"$'), F.trim(F.regexp_replace(unquoted, '""', '"'))).otherwise(field) if quoted else unquoted

    return lines.withColumn("fields", F.transform(fields, unquote))


def unbalanced_quotes(column: F.Column) -> F.Column:
    """True when a line holds an odd number of double quotes (an unclosed quoted field)."""
    return (F.length(column) - F.length(F.regexp_replace(column, '"', ""))) % 2 == 1


def _escape(delimiter: str) -> str:
    return "".join("\\" + c if not c.isalnum() else c for c in delimiter)


INTEGER = r"^-?[0-9]+$"  # written as an integer, any size
CANONICAL_INTEGER = r"^(0|-?[1-9][0-9]*)$"


def is_integer(column, canonical: bool = False) -> F.Column:
    """An integer that fits int64. canonical: also written in one way only (no leading zeros, no "-0")."""
    return column.rlike(CANONICAL_INTEGER if canonical else INTEGER) & column.try_cast("long").isNotNull()


def is_number(column) -> F.Column:
    return column.try_cast("double").isNotNull() & ~F.lower(column).isin("nan", "inf", "-inf", "infinity", "-infinity")


def drop_malformed(rows: DataFrame, cfg: MalformedConfig, what: str, log: StageLog) -> tuple[DataFrame, dict[str, int]]:
    """`rows` has file, line, value and `problem` (null when the row is fine).

    Fails with the first examples by file and line when the malformed fraction
    exceeds `malformed.max_fraction`; otherwise drops them and reports the counts (the manifest's malformed_rows
    entry of the file: {"rows": n, "malformed": m}).
    """
    rows = rows.cache()
    counts = rows.agg(F.count(F.lit(1)).alias("total"), F.count("problem").alias("bad")).first()
    total, bad = int(counts["total"]), int(counts["bad"])
    if total == 0:
        raise PrepareError(f"{what}: no rows found")
    if bad:
        examples = (
            rows.where(F.col("problem").isNotNull())
            .orderBy("file", "line")
            .limit(cfg.examples)
            .collect()
        )
        listing = "\n".join(f"  {r['file']}:{r['line']}: {r['problem']}: {r['value'][:120]!r}" for r in examples)
        fraction = bad / total
        if fraction > cfg.max_fraction:
            raise PrepareError(
                f"{what}: {bad} of {total} rows are malformed ({fraction:.2%}, allowed "
                f"malformed.max_fraction={cfg.max_fraction}); first examples:\n{listing}"
            )
        log.log(f"{what}: dropped {bad} malformed rows of {total} ({fraction:.2%}); first examples:\n{listing}")
    return rows.where(F.col("problem").isNull()), {"rows": total, "malformed": bad}


def first_problem(*checks: tuple[F.Column, str | F.Column]) -> F.Column:
    """The first failing check's message, or null: checks are (condition that is TRUE when bad, message)."""
    expr = F.lit(None).cast("string")
    for bad, message in reversed(checks):
        message_col = message if isinstance(message, F.Column) else F.lit(message)
        expr = F.when(bad, message_col).otherwise(expr)
    return expr
