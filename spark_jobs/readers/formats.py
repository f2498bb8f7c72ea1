"""One reader per `source.format`; each returns the same `RawSource` shape."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from darec_dist.data import layout
from darec_dist.files import replace_dir
from spark_jobs.config import TIMED_SPLITS, PrepareConfig
from spark_jobs.errors import PrepareError
from spark_jobs.readers.lines import drop_malformed, first_problem, is_integer, numbered_lines, split_fields
from spark_jobs.readers.safe_pickle import load_matrix
from spark_jobs.readers.source import RawSource
from spark_jobs.readers.synthetic import read_synthetic
from spark_jobs.readers.table import TIMESTAMP, ColumnPositions, parse_interactions, read_delimited_interactions, refuse_mixed_timestamp_forms
from spark_jobs.readers.text_tables import atomic_header_name, read_metadata_table, read_text_csv, with_title
from spark_jobs.session import StageLog, local_uri


def read_source(spark: SparkSession, cfg: PrepareConfig, log: StageLog) -> RawSource:
    readers = {
        "movielens-100k": read_movielens_100k,
        "rlmrec": read_rlmrec,
        "recbole": read_recbole,
        "csv": read_csv_source,
        "lightgcn": read_lightgcn,
        "synthetic": lambda spark, cfg, log: read_synthetic(spark, cfg),
    }
    if cfg.source.format not in readers:
        raise PrepareError(f"source.format: unknown format {cfg.source.format!r}; expected one of {sorted(readers)}")
    return readers[cfg.source.format](spark, cfg, log)


ML100K_MEMBERS = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
# The files a source directory must hold (others are optional: rlmrec's val_mat.pkl and profiles, RecBole's .item/.user).
REQUIRED_FILES = {
    "rlmrec": ("trn_mat.pkl", "tst_mat.pkl"),
    "lightgcn": ("train.txt", "test.txt"),
    "movielens-100k": ML100K_MEMBERS,
}
FORMAT_HINTS = {
    "rlmrec": "; source.format=rlmrec reads RLMRec's trn_mat.pkl and tst_mat.pkl (val_mat.pkl, itm_prf.csv and usr_prf.csv optional)",
    "lightgcn": "; source.format=lightgcn reads train.txt and test.txt, one line 'user item item ...' per user",
    "movielens-100k": ("; source.format=movielens-100k reads RecBole's atomic files ml-100k.inter, .item and .user (leave "
                       "source.path unset to take them from the recbole wheel; for other RecBole datasets use source.format=recbole)"),
}


def check_source_paths(cfg: PrepareConfig) -> None:
    """The files and directories the config names, checked before Spark starts (tens of seconds): a mistyped path
    fails at once. The files inside a source directory are its reader's to check."""
    src = cfg.source
    if src.format == "csv":
        if not src.interactions:
            raise PrepareError("source.interactions: required for source.format=csv (a .csv or .parquet file)")
        if not Path(src.interactions).expanduser().exists():
            raise PrepareError(f"source.interactions: {Path(src.interactions).expanduser()} not found")
        _is_parquet(Path(src.interactions).expanduser())  # a folder of other files is refused here
        for key, path in (("source.item_text", src.item_text), ("source.user_text", src.user_text)):
            if path:
                _require_file(Path(path).expanduser(), key)
    elif src.format in ("rlmrec", "recbole", "lightgcn") or (src.format == "movielens-100k" and src.path):
        directory = _require_dir(src.path)
        if src.format == "recbole":
            _the_inter_file(directory)
        for name in REQUIRED_FILES.get(src.format, ()):
            _require_file(directory / name, "source.path", hint=FORMAT_HINTS[src.format])


def _require_dir(path: str | None, key: str = "source.path") -> Path:
    if not path:
        raise PrepareError(f"{key}: required for this source.format")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PrepareError(f"{key}: {directory} is not a directory")
    return directory


def _require_file(path: Path | str, key: str, hint: str = "") -> str:
    if not Path(path).is_file():
        raise PrepareError(f"{key}: file {path} not found{hint}")
    return str(Path(path).resolve())


# --- MovieLens-100K, obtained from the recbole wheel on PyPI -------------------------------------

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"


def fetch_movielens_100k(cache_dir: str) -> Path:
    """The ML-100K atomic files, extracted from the recbole==1.2.1 wheel into the cache (never the repo)."""
    cache = Path(cache_dir).expanduser()
    target = cache / "ml-100k"
    if all((target / m).is_file() for m in ML100K_MEMBERS):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / RECBOLE_WHEEL
    if not wheel.is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "recbole==1.2.1", "-d", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not (Path(tmp) / RECBOLE_WHEEL).is_file():
                raise PrepareError(f"could not download the recbole==1.2.1 wheel for MovieLens-100K:\n{done.stderr[-2000:]}")
            os.replace(Path(tmp) / RECBOLE_WHEEL, wheel)
    digest = layout.sha256_of(wheel)
    if digest != RECBOLE_WHEEL_SHA256:
        raise PrepareError(f"{wheel}: sha256 {digest} differs from the pinned {RECBOLE_WHEEL_SHA256}; delete it and retry")
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".ml-100k-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in ML100K_MEMBERS:
                with archive.open(f"recbole/dataset_example/ml-100k/{member}") as src, open(staging / member, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_movielens_100k(spark: SparkSession, cfg: PrepareConfig, log: StageLog) -> RawSource:
    directory = Path(cfg.source.path).expanduser() if cfg.source.path else fetch_movielens_100k(cfg.cache_dir)
    return _read_atomic(spark, cfg, log, directory, "ml-100k", name="movielens-100k")


# --- RecBole atomic files ------------------------------------------------------------------------


def read_recbole(spark: SparkSession, cfg: PrepareConfig, log: StageLog) -> RawSource:
    directory = _require_dir(cfg.source.path)
    return _read_atomic(spark, cfg, log, directory, _the_inter_file(directory).stem, name="recbole")


def _the_inter_file(directory: Path) -> Path:
    inters = sorted(directory.glob("*.inter"))
    if len(inters) != 1:
        raise PrepareError(f"source.path: expected exactly one .inter file in {directory}, found {[p.name for p in inters]}")
    return inters[0]


def _read_atomic(spark: SparkSession, cfg: PrepareConfig, log: StageLog, directory: Path, stem: str, name: str) -> RawSource:
    inter_path = _require_file(directory / f"{stem}.inter", "source.path")
    # Only the header is read here; a row that is not UTF-8 is named by its line when Spark reads the rows.
    with open(inter_path, encoding="utf-8", errors="replace") as stream:
        header = stream.readline().rstrip("\n").split("\t")
    names = [atomic_header_name(h) for h in header]
    columns = {
        "user": "user_id",
        "item": "item_id",
        "rating": "rating" if "rating" in names else None,
        "timestamp": "timestamp" if "timestamp" in names else None,
    }
    if cfg.split.method in TIMED_SPLITS and columns["timestamp"] is None:  # known now, not after the read
        raise PrepareError(f"{inter_path}: split.method={cfg.split.method} orders each user's interactions by time, and its "
                           f"header {names} has no timestamp field")
    rows = read_delimited_interactions(spark, inter_path, "\t", True, columns, header_parser=atomic_header_name)
    interactions, report = drop_malformed(rows, cfg.malformed, inter_path, log)
    if columns["timestamp"]:
        refuse_mixed_timestamp_forms(interactions, inter_path)
    malformed = {inter_path: report}
    files = [inter_path]
    item_text = user_text = None
    item_path, user_path = directory / f"{stem}.item", directory / f"{stem}.user"
    if item_path.is_file():
        item_text, malformed[str(item_path)] = read_metadata_table(spark, str(item_path), "item_id", "item", cfg.malformed, log)
        files.append(str(item_path))
    if user_path.is_file():
        user_text, malformed[str(user_path)] = read_metadata_table(spark, str(user_path), "user_id", "user", cfg.malformed, log)
        user_text = user_text.drop("title")
        files.append(str(user_path))
    numeric = _all_integer(interactions)  # RecBole's ids are tokens: "007" is not "7"
    return RawSource(
        name=name,
        interactions=_standard(interactions, has_split=False),
        numeric_ids=numeric,
        has_split=False,
        files=files,
        item_text=item_text,
        user_text=user_text,
        user_text_is_profile=False,
        malformed=malformed,
    )


def _all_integer(interactions: DataFrame) -> bool:
    """Whether every id is an integer that fits int64 written in one way only (no leading zeros): then ids are
    ordered as numbers. Otherwise they stay the strings they are ("007" and "7" two ids; ids beyond int64 no null)."""
    integer = is_integer(F.col("user"), canonical=True) & is_integer(F.col("item"), canonical=True)
    return interactions.where(~integer).limit(1).count() == 0


def _standard(df: DataFrame, has_split: bool) -> DataFrame:
    split = F.col("split") if has_split else F.lit(None).cast("string")
    return df.select(
        F.col("user").cast("string").alias("user"),
        F.col("item").cast("string").alias("item"),
        F.col("rating").cast("double").alias("rating"),
        F.col("timestamp").cast(TIMESTAMP).alias("timestamp"),
        split.alias("split"),
    )


# --- generic CSV / Parquet ------------------------------------------------------------------------


def read_csv_source(spark: SparkSession, cfg: PrepareConfig, log: StageLog) -> RawSource:
    src = cfg.source
    path = str(Path(src.interactions).expanduser())  # found by check_source_paths, before Spark started
    cols = src.columns
    columns = {"user": cols.user, "item": cols.item, "rating": cols.rating, "timestamp": cols.timestamp}
    if _is_parquet(Path(path)):
        rows = _parquet_rows(spark, path, columns)
    else:
        rows = read_delimited_interactions(spark, path, src.delimiter, src.header, columns, quoted=True)
    interactions, report = drop_malformed(rows, cfg.malformed, path, log)
    if cols.timestamp:
        refuse_mixed_timestamp_forms(interactions, path)
    files = [str(Path(path).resolve())]
    item_text = user_text = None
    # Integer ids are ordered as numbers, unless one is written with leading zeros (customer numbers, zip codes):
    # then every id stays the string it is in the file, and the exports give back "00017", not 17.
    numeric = _all_integer(interactions)
    if src.item_text:
        item_path = _require_file(Path(src.item_text).expanduser(), "source.item_text")
        item_text = read_text_csv(spark, item_path, cols.item, "text", numeric, "item")
        item_text = with_title(item_text)
        files.append(item_path)
    if src.user_text:
        user_path = _require_file(Path(src.user_text).expanduser(), "source.user_text")
        user_text = read_text_csv(spark, user_path, cols.user, "text", numeric, "user")
        files.append(user_path)
    return RawSource(
        name="csv",
        interactions=_standard(interactions, has_split=False),
        numeric_ids=numeric,
        has_split=False,
        files=files,
        item_text=item_text,
        user_text=user_text,
        user_text_is_profile=user_text is not None,
        malformed={files[0]: report},
    )


def _is_parquet_file(path: Path) -> bool:
    """A Parquet file begins with the magic bytes PAR1, whatever it is named (Hive's 000000_0, .parq, .pq)."""
    with open(path, "rb") as stream:
        return stream.read(4) == b"PAR1"


def _is_parquet(path: Path) -> bool:
    """Whether source.interactions is read as Parquet: a Parquet file (by its suffix in any case, or its magic bytes:
    X.PARQUET read as CSV gave its bytes as a header), or a folder of Parquet files (a Spark, Hive or pandas
    dataset). Any other folder is refused: Spark would read it as Parquet and fail on its first file with a Java
    stack trace."""
    if not path.is_dir():
        return path.name.lower().endswith(".parquet") or _is_parquet_file(path)
    # As Spark does, names starting with _ or . are no data (_SUCCESS, .crc files, _temporary/).
    files = sorted(f for f in path.rglob("*")
                   if f.is_file() and not any(part.startswith(("_", ".")) for part in f.relative_to(path).parts))
    others = [str(f.relative_to(path)) for f in files if not _is_parquet_file(f)]
    if not files or others:
        found = f"{len(others)} file(s) that are not Parquet: {others[:5]}{' ...' if len(others) > 5 else ''}" if others else "no files"
        raise PrepareError(f"source.interactions: {path} is a folder holding {found}; expected a .csv or .parquet file, or a "
                           "folder of Parquet files (a Parquet dataset; join CSV files into one file)")
    return True


def _parquet_rows(spark: SparkSession, path: str, columns: dict[str, str | None]) -> DataFrame:
    """Parquet interactions as validated rows: 'line' is the 1-based row number."""
    table = spark.read.parquet(local_uri(path))
    wanted = [c for c in columns.values() if c]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; found {table.columns}")
    types = {field.name: field.dataType for field in table.schema.fields}
    for column in (columns["user"], columns["item"]):
        if isinstance(types[column], (T.FloatType, T.DoubleType)) or (isinstance(types[column], T.DecimalType) and types[column].scale > 0):
            raise PrepareError(f"{path}: id column {column!r} holds {types[column].simpleString()} values; expected integer "
                               "or string ids (a float id such as 1.0 is an integer id stored as a float: cast it)")
        if not isinstance(types[column], (T.IntegralType, T.DecimalType, T.StringType)):
            # A struct, list or map would become its text form ("{1, a}"), one id per distinct value.
            raise PrepareError(f"{path}: id column {column!r} holds {types[column].simpleString()} values; expected integer "
                               "or string ids")

    def text_of(column: str):
        # A timestamp or date column counts microseconds since the epoch: whole seconds would leave a user's
        # interactions within one second unordered for a temporal split.
        if isinstance(types[column], (T.TimestampType, T.TimestampNTZType, T.DateType)) and column == columns["timestamp"]:
            return F.unix_micros(F.col(column).cast("timestamp")).cast("string").alias(column)
        return F.col(column).cast("string").alias(column)

    as_text = table.select(*[text_of(c) for c in wanted])
    numbered = spark.createDataFrame(
        as_text.rdd.zipWithIndex().map(lambda pair: (path, pair[1] + 1, list(pair[0]))),
        T.StructType([
            T.StructField("file", T.StringType()),
            T.StructField("line", T.LongType()),
            T.StructField("fields", T.ArrayType(T.StringType())),
        ]),
    ).withColumn("value", F.concat_ws(",", F.transform("fields", lambda f: F.coalesce(f, F.lit("null")))))
    numbered = numbered.withColumn("fields", F.transform("fields", lambda f: F.coalesce(f, F.lit(""))))
    order = {name: i for i, name in enumerate(wanted)}
    pos = ColumnPositions(count=len(wanted), **{k: order[v] if v else None for k, v in columns.items()})
    return parse_interactions(numbered, pos)


# --- RLMRec directories (pickled sparse matrices + profile CSVs) -----------------------------------


def read_rlmrec(spark: SparkSession, cfg: PrepareConfig, log: StageLog) -> RawSource:
    directory = _require_dir(cfg.source.path)
    frames, shape, files = [], None, []
    for split, stem in (("train", "trn_mat"), ("val", "val_mat"), ("test", "tst_mat")):
        path = directory / f"{stem}.pkl"
        if split == "val" and not path.is_file():
            continue
        matrix = load_matrix(_require_file(path, "source.path"))
        if shape is not None and matrix.shape != shape:
            raise PrepareError(f"{path}: shape {matrix.shape} differs from trn_mat.pkl's {shape}")
        shape = matrix.shape
        keep = matrix.data != 0
        frames.append(pd.DataFrame({"user": matrix.row[keep].astype(np.int64), "item": matrix.col[keep].astype(np.int64), "split": split}))
        files.append(str(path.resolve()))
    interactions = pd.concat(frames, ignore_index=True)
    log.log(f"rlmrec: matrices {shape[0]} users x {shape[1]} items, {len(interactions)} interactions")
    df = spark.createDataFrame(interactions).withColumn("rating", F.lit(None)).withColumn("timestamp", F.lit(None))
    item_text = user_text = None
    if (directory / "itm_prf.csv").is_file():
        item_text = read_text_csv(spark, str(directory / "itm_prf.csv"), "item_id_int", "profile_text", True, "item")
        _refuse_ids_beyond(item_text, "item", shape[1], directory / "itm_prf.csv", "item_id_int")
        item_text = with_title(item_text)
        files.append(str((directory / "itm_prf.csv").resolve()))
    if (directory / "usr_prf.csv").is_file():
        user_text = read_text_csv(spark, str(directory / "usr_prf.csv"), "user_id_int", "profile_text", True, "user")
        _refuse_ids_beyond(user_text, "user", shape[0], directory / "usr_prf.csv", "user_id_int")
        files.append(str((directory / "usr_prf.csv").resolve()))
    return RawSource(
        name="rlmrec",
        interactions=_standard(df, has_split=True),
        numeric_ids=True,
        has_split=True,
        files=files,
        item_text=item_text,
        user_text=user_text,
        user_text_is_profile=user_text is not None,
    )


def _refuse_ids_beyond(table: DataFrame, kind: str, count: int, path: Path, file_column: str) -> None:
    """A profile's ids index the matrices' rows (users) or columns (items): one outside them names no node, and
    profiles counted from 1 would pair every node with its neighbour's text."""
    node = F.col(kind).cast("long")
    outside = [r[kind] for r in table.where((node < 0) | (node >= count)).orderBy(node).limit(3).collect()]
    if outside:
        raise PrepareError(f"{path}: {file_column} {outside} outside the matrices' {count} {kind}s (0 to {count - 1}); "
                           "ids count from 0, as the matrices' " + ("rows" if kind == "user" else "columns") + " do")


# --- LightGCN txt (one line per user: user item item ...) -----------------------------------------


def read_lightgcn(spark: SparkSession, cfg: PrepareConfig, log: StageLog) -> RawSource:
    directory = _require_dir(cfg.source.path)
    parts, files, malformed = [], [], {}
    for split in ("train", "test"):
        path = _require_file(directory / f"{split}.txt", "source.path")
        lines = split_fields(numbered_lines(spark, [path]), r"\s+", regex=True)
        lines = lines.withColumn(
            "problem",
            first_problem(
                (F.trim(F.col("value")) == "", "empty line"),
                (F.exists("fields", lambda t: ~t.rlike(r"^[0-9]+$")), "non-numeric id (expected 'user item item ...')"),
                # One that no int64 holds would become a null id, its interactions silently lost.
                (F.exists("fields", lambda t: ~is_integer(t)), "id beyond the 64-bit integer range"),
            ),
        )
        good, report = drop_malformed(lines, cfg.malformed, path, log)
        malformed[path] = report
        exploded = good.select(
            F.col("fields").getItem(0).alias("user"),
            F.explode(F.slice("fields", 2, 1_000_000_000)).alias("item"),
        ).select(
            F.col("user").try_cast("long").cast("string").alias("user"),
            F.col("item").try_cast("long").cast("string").alias("item"),
            F.lit(None).cast("double").alias("rating"),
            F.lit(None).cast("long").alias("timestamp"),
            F.lit(split).alias("split"),
        )
        parts.append(exploded)
        files.append(path)
    return RawSource(
        name="lightgcn",
        interactions=parts[0].unionByName(parts[1]),
        numeric_ids=True,
        has_split=True,
        files=files,
        malformed=malformed,
    )
