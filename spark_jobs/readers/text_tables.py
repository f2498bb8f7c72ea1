"""Per-node text tables: given profiles, or descriptions built from metadata fields."""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from spark_jobs.config import MalformedConfig
from spark_jobs.errors import PrepareError
from spark_jobs.readers.lines import INTEGER, drop_malformed, first_problem, is_integer, is_number, numbered_lines, split_fields
from spark_jobs.readers.table import header_names
from spark_jobs.session import StageLog, local_uri

TITLE_FIELDS = ("movie_title", "title", "name", "item_name", "book_title")
YEAR_FIELDS = ("release_year", "year")
TITLE_CHARS = 120


def fail_on_duplicate_ids(table: DataFrame, id_col: str, path: str, file_column: str | None = None) -> None:
    """file_column: the ids' column as the file names it, where the table renamed it."""
    dupes = table.groupBy(id_col).count().where(F.col("count") > 1).orderBy(id_col).limit(5).collect()
    if dupes:
        listing = ", ".join(f"{r[id_col]!r} ({r['count']} rows)" for r in dupes)
        raise PrepareError(f"{path}: duplicate ids in column {file_column or id_col!r}: {listing}; expected one row per id")


def read_text_csv(spark: SparkSession, path: str, id_col: str, text_col: str, numeric_ids: bool, out_id: str) -> DataFrame:
    """A CSV with a header, one row per node: returns (out_id, text). Quoted multi-line text is allowed."""
    # Reads the header only; its names trimmed as the interactions' fields are ("item, text" names "text").
    columns = [c.strip() for c in spark.read.csv(local_uri(path), header=True, multiLine=True, escape='"').columns]
    if not columns:
        raise PrepareError(f"{path}: file is empty; expected a header line naming columns {id_col} and {text_col}")
    missing = [c for c in (id_col, text_col) if c not in columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; found {columns}")
    # Spark's permissive reader would cut a row with an unquoted comma at the header's width, dropping the rest
    # of its text, and pad a short row with nulls; with a corrupt-record column it keeps such rows apart instead.
    corrupt = "_corrupt_record"
    schema = StructType([StructField(c, StringType()) for c in columns] + [StructField(corrupt, StringType())])
    table = spark.read.csv(local_uri(path), header=True, multiLine=True, escape='"', schema=schema, columnNameOfCorruptRecord=corrupt)
    # (Spark refuses a query of the corrupt-record column alone.)
    bad = [r[corrupt] for r in table.where(F.col(corrupt).isNotNull()).select(id_col, corrupt).limit(3).collect()]
    if bad:
        lines = _starting_lines(path, bad)
        listing = ", ".join(f"line {lines[row]}: {row!r}" if row in lines else repr(row) for row in bad)
        raise PrepareError(
            f"{path}: row(s) without exactly {len(columns)} fields ({', '.join(columns)}): {listing}; "
            + (_MIXED_LINE_ENDS if any("\n" in row for row in bad) and _mixes_line_ends(path) else "quote text that holds commas")
        )
    # An id never spans lines (the interactions are read line by line): one that does took the rows after its row,
    # from a double quote opened in its id field and closed only in a later row.
    swallowing = table.where(F.col(id_col).contains("\n")).select(id_col).first()
    if swallowing is not None:
        row = swallowing[id_col]
        lines = _starting_lines(path, [row, f'"{row}'])  # Spark may have taken the opening quote off
        line = next((f"line {lines[r]}: " for r in (row, f'"{row}') if r in lines), "")
        raise PrepareError(f"{path}: {line}the {id_col} field holds line breaks ({row[:120]!r}): a double quote opened in it "
                           "may be unclosed, so the rows after it were read as its id; close the quote")
    if numeric_ids:
        # A row whose id is no integer names no node of the interactions, like any extra row, and is left out; but
        # one written as a non-integer number (1000.0 for 1000) is a mistyped id: refused, rather than reported
        # later as a node without text.
        raw_id = F.trim(F.col(id_col))
        bad = [r[id_col] for r in table.where(~raw_id.rlike(INTEGER) & is_number(raw_id)).select(id_col).limit(3).collect()]
        if bad:
            raise PrepareError(f"{path}: id(s) {bad} in column {id_col!r} are not integers, while the interactions' ids "
                               "are; write them as the interactions do")
        table = table.where(is_integer(raw_id))
        ids = raw_id.try_cast("long").cast("string")
    else:
        ids = F.trim(F.col(id_col))  # inside quotes too, as split_fields does the interactions' ids
    result = table.select(ids.alias(out_id), F.coalesce(F.col(text_col), F.lit("")).alias("text"))
    fail_on_duplicate_ids(result, out_id, path, id_col)
    return result


_MIXED_LINE_ENDS = ("the file mixes CRLF and LF line ends, and Spark's multi-line reader splits rows at the first "
                    "line's kind only (rows appended by another tool?): write every line with one kind")


def _mixes_line_ends(path: str) -> bool:
    """Whether a local file holds both CRLF and bare LF line ends (read only on the error path)."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError:
        return False
    crlf = data.count(b"\r\n")
    return 0 < crlf < data.count(b"\n")


def _starting_lines(path: str, rows: list[str]) -> dict[str, int]:
    """The line on which each row's first line first appears whole in the file: Spark's multi-line reader keeps no
    line numbers. Read only on this error path; rows of a file that is not local get none."""
    wanted = {row.split("\n")[0].rstrip("\r"): row for row in rows}
    found: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for number, line in enumerate(stream, 1):
                row = wanted.get(line.rstrip("\r\n"))
                if row is not None and row not in found:
                    found[row] = number
                    if len(found) == len(wanted):
                        break
    except OSError:
        pass
    return found


def with_title(text_table: DataFrame) -> DataFrame:
    """Adds the title a user profile lists for an item: the start of its text (a source without title fields)."""
    return text_table.withColumn("title", F.substring("text", 1, TITLE_CHARS))


def atomic_header_name(field: str) -> str:
    """A RecBole atomic-file header field `name:type` -> name."""
    return field.split(":")[0]


def humanise(field_name: str) -> str:
    return field_name.replace("_", " ")


def read_metadata_table(
    spark: SparkSession, path: str, id_field: str, out_id: str, malformed: MalformedConfig, log: StageLog
) -> tuple[DataFrame, dict[str, int]]:
    """A RecBole-style `.item` / `.user` atomic file -> (out_id, title, text), and its malformed-row counts.

    The text lists every field as `name: value`, so any metadata a dataset has
    (title, year, genres, tags, description; age, gender, occupation) reaches the encoder.
    """
    lines = split_fields(numbered_lines(spark, [path]), "\t")
    names = [atomic_header_name(h) for h in header_names(lines, path)]
    if id_field not in names:
        raise PrepareError(f"{path}: missing column {id_field!r} in header {names}")
    body = lines.where(F.col("line") > 1)
    count = F.size("fields")
    body = body.withColumn(
        "problem",
        first_problem(
            (F.trim(F.col("value")) == "", "empty line"),
            (count != len(names), F.format_string(f"expected {len(names)} columns, got %d", count)),
        ),
    )
    body, report = drop_malformed(body, malformed, path, log)
    values = {name: F.get(F.col("fields"), i) for i, name in enumerate(names)}
    descriptive = [n for n in names if n != id_field]
    text = F.concat_ws("; ", *[F.when(values[n] != "", F.concat(F.lit(humanise(n) + ": "), values[n])) for n in descriptive])
    title_field = next((n for n in TITLE_FIELDS if n in names), None)
    year_field = next((n for n in YEAR_FIELDS if n in names), None)
    if title_field is None:
        title = text
    elif year_field is None:
        title = values[title_field]
    else:
        title = F.concat(values[title_field], F.when(values[year_field] != "", F.concat(F.lit(" ("), values[year_field], F.lit(")"))).otherwise(F.lit("")))
    table = body.select(values[id_field].alias(out_id), title.alias("title"), text.alias("text"))
    fail_on_duplicate_ids(table, out_id, path)
    return table, report
