"""Interaction tables (user, item[, rating][, timestamp]) from delimited text, validated row by row."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from spark_jobs.errors import PrepareError
from spark_jobs.readers.lines import INTEGER, first_problem, is_integer, is_number, numbered_lines, split_fields, unbalanced_quotes


# The timestamp column of tables: every int64 exactly (nanosecond stamps keep their last digit) and 18 digits of
# fraction (fractional seconds keep their order). Only the order within a user is used, and nothing stores it.
TIMESTAMP = "decimal(38,18)"


@dataclass
class ColumnPositions:
    count: int
    user: int
    item: int
    rating: int | None = None
    timestamp: int | None = None


def header_names(lines: DataFrame, path: str) -> list[str]:
    first = lines.where(F.col("line") == 1).select("fields").first()
    if first is None:
        raise PrepareError(f"{path}: file is empty, expected a header line")
    return list(first["fields"])


def positions_from_header(
    header: list[str], path: str, user: str, item: str, rating: str | None, timestamp: str | None
) -> ColumnPositions:
    wanted = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    missing = [name for name in wanted.values() if name is not None and name not in header]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing} in header {header}; expected {[n for n in wanted.values() if n]}")
    repeated = sorted({name for name in wanted.values() if name is not None and header.count(name) > 1})
    if repeated:  # which of the two is meant? (a joined export repeats its key columns)
        raise PrepareError(f"{path}: column(s) {repeated} appear more than once in header {header}; rename all but one")
    index = {key: header.index(name) if name is not None else None for key, name in wanted.items()}
    return ColumnPositions(count=len(header), **index)


def parse_interactions(rows: DataFrame, pos: ColumnPositions, quoted: bool = False) -> DataFrame:
    """Rows with `fields` -> file, line, value, problem, user, item, rating, timestamp (ids as strings, as written;
    the source reader decides whether they are numbers)."""
    fields = F.col("fields")
    n = F.size(fields)

    def field(i):
        return F.get(fields, i)

    checks = [
        (F.trim(F.col("value")) == "", "empty line"),
        # Spark keeps a byte that is not UTF-8 and shows it as U+FFFD: ids unlike the same names written elsewhere.
        (~F.is_valid_utf8(F.col("value")), "not UTF-8 text (save the file as UTF-8)"),
        *([(unbalanced_quotes(F.col("value")), "unclosed double quote")] if quoted else []),
        (n != pos.count, F.format_string(f"expected {pos.count} columns, got %d", n)),
        ((field(pos.user) == "") | (field(pos.item) == ""), "empty user or item id"),
    ]
    if pos.rating is not None:
        checks.append((~is_number(field(pos.rating)), F.format_string("non-numeric rating '%s'", field(pos.rating))))
    timestamp = form = F.lit(None)
    if pos.timestamp is not None:
        stamp = field(pos.timestamp)
        # A number is kept as written (its unit is the file's); an ISO 8601 date or date-time (in the session's
        # time zone, UTC, where it names none) counts microseconds since the epoch. Only the order within a user
        # matters (temporal split, leave-one-out), which one file's timestamps keep if written one way
        # (refuse_mixed_timestamp_forms). The pattern first: Spark's cast alone would also date a bare time of
        # day (08:00:00) on the day the job runs.
        iso_date = stamp.rlike(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ]|$)")
        date_time = F.when(iso_date, F.try_to_timestamp(stamp))
        form = F.when(is_number(stamp), F.lit("number")).when(date_time.isNotNull(), F.lit("date-time"))
        # A number as written, its fraction included: cut to whole numbers, stamps 0.1 to 0.5 (seconds, float
        # exports) would all tie. A decimal, not a double: through a double, nanosecond stamps (about 1.7e18) would
        # lose their last digits and events a few hundred nanoseconds apart would tie. Forms only a double reads
        # (1.5d) go through one.
        number = F.coalesce(stamp.try_cast(TIMESTAMP), stamp.try_cast("double").try_cast(TIMESTAMP))
        timestamp = F.when(is_number(stamp), number).otherwise(F.unix_micros(date_time).cast(TIMESTAMP))
        checks.append((form.isNull(), F.format_string(
            "timestamp '%s' is neither a number nor a date-time (such as 2024-01-31 or 2024-01-31T08:00:00Z)", stamp)))
        # A number (1e30) that the column cannot hold would otherwise become a missing timestamp.
        checks.append((timestamp.isNull(), F.format_string(
            "timestamp '%s' beyond the timestamp range (at most 20 digits before the decimal point)", stamp)))

    def numeric(i):
        return field(i).try_cast("double") if i is not None else F.lit(None).cast("double")

    return rows.select(
        "file",
        "line",
        "value",
        first_problem(*checks).alias("problem"),
        field(pos.user).alias("user"),
        field(pos.item).alias("item"),
        numeric(pos.rating).alias("rating"),
        timestamp.cast(TIMESTAMP).alias("timestamp"),
        form.cast("string").alias("timestamp_form"),
    )


def refuse_mixed_timestamp_forms(rows: DataFrame, path: str) -> None:
    """Numbers and date-times in one file count different units, so their order would mean nothing."""
    firsts = (
        rows.where(F.col("timestamp_form").isNotNull())
        .groupBy("timestamp_form")
        .agg(F.min_by(F.struct("line", "value"), "line").alias("first"))
        .orderBy("timestamp_form")
        .collect()
    )
    if len(firsts) > 1:
        examples = "; ".join(f"{r['timestamp_form']}s from line {r['first']['line']} ({r['first']['value'][:80]!r})" for r in firsts)
        raise PrepareError(f"{path}: timestamps written both as numbers and as date-times: {examples}; write them one way")


def read_delimited_interactions(
    spark: SparkSession,
    path: str,
    delimiter: str,
    header: bool,
    columns: dict[str, str | None],
    header_parser=None,
    quoted: bool = False,
) -> DataFrame:
    """Read one delimited file into validated interaction rows (problem column set, nothing dropped yet).

    quoted: fields may be CSV-quoted (split_fields)."""
    lines = split_fields(numbered_lines(spark, [path]), delimiter, quoted=quoted)
    if header:
        names = header_names(lines, path)
        if header_parser is not None:
            names = [header_parser(n) for n in names]
        pos = positions_from_header(names, path, **columns)
        lines = lines.where(F.col("line") > 1)
    else:
        order = [k for k in ("user", "item", "rating", "timestamp") if columns.get(k)]
        pos = ColumnPositions(count=len(order), **{k: i for i, k in enumerate(order)})
        refuse_a_header_row(lines, pos, path, columns)
    return parse_interactions(lines, pos, quoted)


def refuse_a_header_row(lines: DataFrame, pos: ColumnPositions, path: str, columns: dict[str, str | None]) -> None:
    """With source.header=false, a first line of column names would become an interaction (a user "user") and,
    being no integer, turn every id of the file into a string. It is taken for a header when its ids are the
    configured column names, or the only ids of the file that are not integers."""
    first = lines.where(F.col("line") == 1).select("value", "fields").first()
    if first is None or len(first["fields"]) != pos.count:
        return  # an empty file or a short line is reported as such
    ids = [first["fields"][pos.user], first["fields"][pos.item]]
    names = [columns["user"], columns["item"]]
    looks_like_header = [i.lower() for i in ids] == [n.lower() for n in names]
    if not looks_like_header and not all(re.fullmatch(INTEGER, i) for i in ids):
        fields = F.col("fields")
        integer_ids = is_integer(F.get(fields, pos.user)) & is_integer(F.get(fields, pos.item))
        body = lines.where(F.col("line") > 1)
        looks_like_header = body.limit(1).count() > 0 and body.where(~integer_ids).limit(1).count() == 0
    if looks_like_header:
        raise PrepareError(f"{path}: line 1 ({first['value'][:120]!r}) looks like a header, but source.header is false; "
                           "set source.header=true, or remove the line")
