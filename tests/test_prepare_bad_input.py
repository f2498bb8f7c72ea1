"""Each kind of bad input fails with an error that names the place, and leaves no output behind."""

import decimal
import os
import pickle
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from darec_dist.config import ConfigError, load_config
from darec_dist.data.dataset import PreparedDataset
from spark_jobs.config import PrepareConfig
from spark_jobs.errors import PrepareError
from spark_jobs.prepare import prepare
from spark_jobs.readers.safe_pickle import load_matrix
from spark_jobs.write import write_vectors
from tests.conftest import REPO
from tests.prepare_helpers import small_config
from tests.synthetic import interaction_rows, write_csv_source


def assert_nothing_left(tmp_path):
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "raw")
    assert leftovers == [], leftovers


def fails(spark, tmp_path, source, match, **extra):
    with pytest.raises(PrepareError, match=match):
        prepare(small_config(tmp_path / "out", source, **extra), spark=spark)
    assert_nothing_left(tmp_path)


def csv_with_lines(tmp_path, body_lines, header="user,item,rating,timestamp", **kwargs):
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=20), header=header, **kwargs)
    path = tmp_path / "raw" / "interactions.csv"
    lines = path.read_text().splitlines()
    lines[5:5] = body_lines  # lines 6.. of the file
    path.write_text("\n".join(lines) + "\n")
    return source, path


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("101,501,4", "expected 4 columns, got 3"),
        ("101,501,four,881250949", "non-numeric rating 'four'"),
        ("101,501,4,yesterday", "timestamp 'yesterday' is neither a number nor a date-time"),
        # Spark's own cast would date a bare time of day on the day the job runs, and read unpadded dates.
        ("101,501,4,08:00:00", "timestamp '08:00:00' is neither a number nor a date-time"),
        ("101,501,4,2024-1-5", "timestamp '2024-1-5' is neither a number nor a date-time"),
        ("101,501,4,1e30", r"timestamp '1e30' beyond the timestamp range \(at most 20 digits before the decimal point\)"),
        ("", "empty line"),
        ('"101,501,4,881250949', "unclosed double quote"),
    ],
)
def test_malformed_rows_fail_with_file_and_line(spark, tmp_path, bad_line, message):
    source, path = csv_with_lines(tmp_path, [bad_line], item_text=False)
    fails(spark, tmp_path, source, rf"1 of 161 rows are malformed[\s\S]*{path}:6: {message}")


def test_malformed_fraction_can_be_tolerated_and_is_reported(spark, tmp_path):
    import json

    source, path = csv_with_lines(tmp_path, ["101,501,x,1", "oops"], item_text=False)
    with pytest.raises(PrepareError, match="2 of 162 rows"):
        prepare(small_config(tmp_path / "out", source, **{"malformed.max_fraction": 0.01}), spark=spark)
    out = prepare(small_config(tmp_path / "out", source, **{"malformed.max_fraction": 0.02}), spark=spark)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["malformed_rows"] == {str(path): {"rows": 162, "malformed": 2}}
    assert sum(manifest["splits"].values()) == 160


def test_a_rerun_in_the_same_session_reads_the_corrected_file(spark, tmp_path):
    """Spark matches a cached read by its plan: a job that left its rows cached would hand them to the next one."""
    source, path = csv_with_lines(tmp_path, ["101,501,four,881250949"], item_text=False)
    fails(spark, tmp_path, source, "non-numeric rating 'four'")
    path.write_text(path.read_text().replace("101,501,four,881250949\n", ""))
    prepare(small_config(tmp_path / "out", source), spark=spark)


def test_quoted_csv_fields_may_hold_the_delimiter(spark, tmp_path):
    import json

    import pandas as pd

    quoted = [f'"Smith, John",{item},"4",881250949' for item in range(1, 6)]
    source, path = csv_with_lines(tmp_path, quoted, item_text=False)
    out = prepare(small_config(tmp_path / "out", source), spark=spark)
    assert json.loads((out / "manifest.json").read_text())["malformed_rows"] == {str(path): {"rows": 165, "malformed": 0}}
    assert "Smith, John" in set(pd.read_parquet(out / "ids" / "user.parquet")["raw"])


@pytest.mark.parametrize("bad_line, message", [("x7 1 2", "non-numeric id"),
                                               ("7 1 99999999999999999999", "id beyond the 64-bit integer range")])
def test_bad_id_in_lightgcn_format(spark, tmp_path, bad_line, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text("".join(f"{u} {u % 7} {u % 7 + 1} {u % 7 + 2}\n" for u in range(30)) + bad_line + "\n")
    (raw / "test.txt").write_text("".join(f"{u} {u % 7 + 3}\n" for u in range(30)))
    fails(spark, tmp_path, {"source.format": "lightgcn", "source.path": str(raw)}, rf"{raw / 'train.txt'}:31: {message}")


def test_missing_columns(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], header="user,product,rating,timestamp", item_text=False)
    fails(spark, tmp_path, source, r"interactions.csv: missing column\(s\) \['item'\]")


def test_empty_after_filtering(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], item_text=False)
    fails(spark, tmp_path, source, "no interactions left after cleaning", **{"clean.rating_threshold": 10})


def test_duplicate_ids_in_text_table(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], item_text=True)
    items = tmp_path / "raw" / "items.csv"
    first_item = items.read_text().splitlines()[1]
    items.write_text(items.read_text() + first_item + "\n")
    fails(spark, tmp_path, source, rf"items.csv: duplicate ids in column 'item': '{first_item.split(',')[0]}' \(2 rows\)",
          **{"embedding.encoder": "sentence-transformers"})


@pytest.mark.parametrize("bad_row", ["i5,a book, about topic 5", "i6"])
def test_text_row_with_the_wrong_number_of_fields(spark, tmp_path, bad_row):
    source, _ = csv_with_lines(tmp_path, [], item_text=True)
    items = tmp_path / "raw" / "items.csv"
    items.write_text(items.read_text() + bad_row + "\n")
    line = len(items.read_text().splitlines())
    fails(spark, tmp_path, source, rf"items.csv: row\(s\) without exactly 2 fields \(item, text\): line {line}: {bad_row!r}; quote",
          **{"embedding.encoder": "sentence-transformers"})


def test_a_text_table_that_mixes_line_ends_is_said_to(spark, tmp_path):
    """CRLF lines with LF-only rows appended (QA: a csv.writer file extended by `echo >>`): Spark's multi-line reader
    takes the first line's kind, so the LF rows merge into one; the error said to quote commas."""
    source, _ = csv_with_lines(tmp_path, [], item_text=True)
    items = tmp_path / "raw" / "items.csv"
    items.write_bytes(items.read_text().replace("\n", "\r\n").encode() + b"i90,Extra 90\ni91,Extra 91\n")
    fails(spark, tmp_path, source, r"items.csv: row\(s\) without exactly 2 fields .* the file mixes CRLF and LF line ends",
          **{"embedding.encoder": "sentence-transformers"})


def test_missing_text_for_some_items(spark, tmp_path, capsys):
    source, _ = csv_with_lines(tmp_path, [], item_text=True)
    items = tmp_path / "raw" / "items.csv"
    lines = items.read_text().splitlines()
    dropped = [line.split(",")[0] for line in lines[-3:]]
    items.write_text("\n".join(lines[:-3]) + "\n")
    # Named by the text file and the source's own ids (not the dataset's contiguous ones, which die with the job).
    fails(spark, tmp_path, source, rf"{re.escape(str(items))}: 3 item\(s\) have no text to embed \(ids {re.escape(repr(dropped))}\)",
          **{"embedding.encoder": "sentence-transformers"})
    assert "[prepare] split" not in capsys.readouterr().out  # known once the ids are: before the split and the graph


def test_a_built_user_profile_without_text_fails_before_the_graph(spark, tmp_path, capsys):
    """A user profile built from train items is empty for a user with none (a source split can leave one)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    train = np.ones((6, 5), dtype=np.float32)
    train[5] = 0  # user 5 only in test
    test = np.zeros_like(train)
    test[5, 2] = 1
    for name, matrix in (("trn", train), ("val", np.zeros_like(train)), ("tst", test)):
        (raw / f"{name}_mat.pkl").write_bytes(pickle.dumps(sp.coo_matrix(matrix)))
    (raw / "itm_prf.csv").write_text("item_id_int,profile_text\n" + "".join(f'{i},"Book {i}"\n' for i in range(5)))
    fails(spark, tmp_path, {"source.format": "rlmrec", "source.path": str(raw)}, r"1 user\(s\) have no text to embed \(ids \['5'\]\)",
          **{"embedding.encoder": "sentence-transformers"})
    assert "[prepare] graph" not in capsys.readouterr().out


def test_source_without_text_needs_id_hash(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], item_text=False)
    fails(spark, tmp_path, source, r"no item text to embed \(a text table given as source.item_text\)",
          **{"embedding.encoder": "sentence-transformers"})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_pickle_with_code_is_refused(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    matrix = sp.coo_matrix(np.eye(6))
    for name in ("val_mat.pkl", "tst_mat.pkl"):
        (raw / name).write_bytes(pickle.dumps(matrix))
    marker = tmp_path / "raw" / "pwned"
    (raw / "trn_mat.pkl").write_bytes(pickle.dumps({"matrix": matrix, "x": _Payload(str(marker))}))
    fails(spark, tmp_path, {"source.format": "rlmrec", "source.path": str(raw)}, r"trn_mat.pkl: refusing to unpickle (builtins.dict|os.makedirs)")
    assert not marker.exists()
    (raw / "trn_mat.pkl").write_bytes(pickle.dumps({"matrix": matrix}))
    with pytest.raises(PrepareError, match="expected a scipy sparse matrix or numpy array, got dict"):
        load_matrix(raw / "trn_mat.pkl")
    (raw / "trn_mat.pkl").write_bytes(pickle.dumps(matrix.tocsr()))
    assert load_matrix(raw / "trn_mat.pkl").nnz == 6


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("form", ["coo", "lil", "dok", "bsr", "dia", "csr_array", "dense", "np.matrix"])
def test_any_pickle_protocol_of_any_scipy_or_numpy_matrix_is_read(tmp_path, protocol, form):
    matrix = sp.coo_matrix(np.array([[1, 0, 1], [0, 2, 0]], dtype=np.float32))
    made = {"coo": matrix, "lil": matrix.tolil(), "dok": matrix.todok(), "bsr": matrix.tobsr(), "dia": matrix.todia(),
            "csr_array": sp.csr_array(matrix), "dense": matrix.toarray(), "np.matrix": np.asmatrix(matrix.toarray())}[form]
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(made, protocol=protocol))
    np.testing.assert_array_equal(load_matrix(tmp_path / "m.pkl").toarray(), matrix.toarray())


@pytest.mark.parametrize("values, message", [
    (np.array([["1", "0"]]), "expected a numeric users x items matrix, got dtype <U1"),
    (np.array([[1.0, -1.0]]), r"1 entries are negative or not finite \(first: row 0, column 1, value -1.0\)"),
    (np.array([[np.nan, 1.0]]), r"1 entries are negative or not finite \(first: row 0, column 0, value nan\)"),
])
def test_matrix_values_that_are_no_interactions_are_refused(tmp_path, values, message):
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(values))
    with pytest.raises(PrepareError, match=f"m.pkl: {message}"):
        load_matrix(tmp_path / "m.pkl")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(0, [1.0, 2.0]), (2, [1.0, 2.0]), (1, [0.0, 1.0])], "3 embeddings for 4 ids"),
        ([(0, [1.0, 2.0]), (1, [1.0, 2.0]), (3, [1.0, 2.0]), (4, [1.0, 2.0])], "expected id 2, found 3"),
        ([(0, [1.0, 2.0]), (1, [1.0]), (2, [1.0, 2.0]), (3, [1.0, 2.0])], r"ids \[1\] have \[1\], expected 2"),
        ([(0, [1.0, 2.0]), (1, [float("nan"), 2.0]), (2, [1.0, 2.0]), (3, [1.0, 2.0])], r"NaN or inf in the embeddings of ids \[1\]"),
        ([(0, [1.0, 2.0]), (1, [1e6, 2.0]), (2, [1.0, 2.0]), (3, [1.0, 2.0])], r"overflow float16 \(ids \[1\]\)"),
    ],
)
def test_embeddings_that_disagree_with_the_ids(spark, tmp_path, rows, message):
    df = spark.createDataFrame(rows, "id long, vector array<float>")
    with pytest.raises(PrepareError, match=message):
        write_vectors(df, 4, "float16", tmp_path, "user.npy", tmp_path / "scratch", 2, "user embeddings")


def test_float16_embeddings_are_stored_rounded_to_half_precision(spark, tmp_path):
    """embedding.dtype=float16 (the counterpart of the overflow case above): in-range rows are kept, as float16."""
    vectors = np.array([[0.1, 1 / 3], [2.0, -0.7], [1e-3, 300.5], [-1.0, 0.0]], np.float32)
    df = spark.createDataFrame([(i, row.tolist()) for i, row in enumerate(vectors)], "id long, vector array<float>")
    write_vectors(df, 4, "float16", tmp_path, "user.npy", tmp_path / "scratch", 2, "user embeddings")
    stored = np.load(tmp_path / "user.npy")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, vectors.astype(np.float16))
    assert not np.array_equal(stored.astype(np.float32), vectors), "half-precision rounding must be visible in this data"


def test_unknown_format_and_keys_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'source.format': 'xlsx' is not one of"):
        load_config(PrepareConfig, None, ["source.format=xlsx"])
    done = subprocess.run(
        [sys.executable, "-m", "spark_jobs.prepare", str(REPO / "configs/data/ml-100k.yaml"), "grph.layers=2"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 2
    assert "unknown key(s) grph" in done.stderr


def test_source_vectors_only_from_a_source_that_has_them(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], item_text=False)
    fails(spark, tmp_path, source, "embedding.encoder=source: source.format=csv brings no vectors", **{"embedding.encoder": "source"})


def test_integer_ids_beyond_int64_stay_ids(spark, tmp_path):
    import pandas as pd

    from darec_dist.data import layout

    huge = 12345678901234567890  # above int64: a numeric cast would make it null and drop its rows
    rows = interaction_rows(num_users=20) + [(huge, 500 + i, 4.0, 10**8 + i) for i in range(8)]
    source = write_csv_source(tmp_path / "raw", rows, item_text=False)
    dataset = PreparedDataset.open(prepare(small_config(tmp_path / "out", source), spark=spark))
    users = pd.read_parquet(dataset.root / layout.id_map("user"))
    assert str(huge) in set(users["raw"]) and users["raw"].notna().all() and dataset.num_users == 21
    assert sum(dataset.manifest["splits"].values()) == len(rows)


def test_repeated_pairs_kept_by_dedupe_false_stay_in_one_split(spark, tmp_path):

    rows = [(u, i, 4.0, 10**8 + c) for u in range(100, 112) for i in range(500, 510) for c in range(3)]
    source = write_csv_source(tmp_path / "raw", rows, item_text=False)
    dataset = PreparedDataset.open(prepare(small_config(tmp_path / "out", source, **{"clean.dedupe": "false"}), spark=spark))
    splits = {name: dataset.interactions(name) for name in ("train", "val", "test")}
    for user in range(dataset.num_users):
        rows = {name: splits[name].row(user).tolist() for name in ("train", "val", "test")}
        # Each item once per split: a repeated held-out pair would count twice in Recall's denominator.
        assert all(len(set(items)) == len(items) for items in rows.values()), user
        train, val, test = (set(rows[name]) for name in ("train", "val", "test"))
        assert not (train & val) and not (train & test) and not (val & test), user
    assert dataset.manifest["splits"]["val"] > 0 and dataset.manifest["splits"]["test"] > 0


def test_a_tab_delimiter_whose_quotes_a_shell_removed_is_a_tab():
    # source.delimiter="\t" unquoted by a shell reaches YAML as backslash-t, which would split on those two characters.
    cfg = load_config(PrepareConfig, REPO / "configs" / "data" / "csv.yaml", ["source.delimiter=\\t"])
    assert cfg.source.delimiter == "\t"


@pytest.mark.parametrize("override, message", [
    ("source.columns.user=item", "must name different, non-empty columns"),
    ("source.delimiter=|", "source.delimiter is empty; quote it"),
    ("embedding.dim=0", "embedding.dim must be >= 1"),
    ("spark.shuffle_partitions=0", "spark.shuffle_partitions must be >= 1"),
    ("spark.driver_memory=lots", "spark.driver_memory must be a JVM size"),
    ("spark.master=sprak://host:7077", "spark.master must be local, local[N], local[*], spark://HOST:PORT, yarn or k8s://URL"),
    ("clean.k_core=-1", "clean.k_core must be >= 0"),
    ("graph.layer_weights=[1,-1,0,0]", "graph.layer_weights must be >= 0"),
    ("split.ratios=[.inf,1,1]", "key 'split.ratios[0]': expected a finite number, got inf"),
    ("profiles.max_chars=0", "profiles.max_chars >= 1"),
    ("split.method=temporal", "name the timestamp column, source.columns.timestamp=COLUMN"),
    ("clean.rating_threshold=4", "name the rating column, source.columns.rating=COLUMN"),
    ("source.format=rlmrec split.method=temporal", "split.method=temporal orders each user's interactions by time, and "
     "source.format=rlmrec has no timestamps"),
    ("split.method=source", "split.method=source: source.format=csv has no split of its own"),
    # 10 users x 20 items in 2 communities hold at most 10 x 10 + 20 distinct interactions (the generator made 91).
    ("source.synthetic.users=10 source.synthetic.items=20 source.synthetic.communities=2 source.synthetic.interactions=100000",
     "source.synthetic.interactions (100000) exceeds what 10 users can hold: at most users x min(max_user_interactions, "
     "items // communities) + items = 120"),
    ("source.synthetic.users=10 source.synthetic.items=20 source.synthetic.communities=5 source.synthetic.interactions=100",
     "source.synthetic.min_user_interactions (5) exceeds a community's catalogue (items // communities = 4)"),
])
def test_nonsense_prepare_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(PrepareConfig, REPO / "configs" / "data" / "csv.yaml", override.split())


def test_a_killed_jobs_staging_is_removed_and_a_running_one_refuses_a_second_job(spark, tmp_path):
    import socket

    from spark_jobs.prepare import OWNER

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # that process has exited
    killed, running = tmp_path / ".out.tmp-killed00", tmp_path / ".out.tmp-running0"
    for staging, pid in ((killed, dead_pid), (running, os.getpid())):
        staging.mkdir()
        (staging / OWNER).write_text(f"{socket.gethostname()} {pid}")
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=20), item_text=False)
    # Two jobs writing one output: the later rename would win, whatever overwrite said.
    with pytest.raises(PrepareError, match=rf"another prepare job \(host {socket.gethostname()}, process {os.getpid()}\) "
                                           rf"is writing {tmp_path / 'out'} in {running}; wait for it"):
        prepare(small_config(tmp_path / "out", source), spark=spark)
    assert not killed.exists() and running.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-running0", "raw"]  # its own staging is gone
    shutil.rmtree(running)
    output = prepare(small_config(tmp_path / "out", source), spark=spark)
    assert not (output / OWNER).exists()  # the marker does not reach the dataset


def test_a_job_on_another_host_is_taken_for_killed_once_it_stops_touching_its_staging(spark, tmp_path, monkeypatch):
    """Its process cannot be looked up from here: its OWNER file's age, by the filesystem's own clock, tells instead."""
    from spark_jobs import prepare as job

    silent, beating = tmp_path / ".out.tmp-silent00", tmp_path / ".out.tmp-beating0"
    for staging in (silent, beating):
        staging.mkdir()
        (staging / job.OWNER).write_text("another-host 4242")
    eleven_minutes_ago = time.time() - 660
    os.utime(silent / job.OWNER, (eleven_minutes_ago, eleven_minutes_ago))
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=20), item_text=False)
    with pytest.raises(PrepareError, match=r"another prepare job \(host another-host, process 4242\) is writing"):
        prepare(small_config(tmp_path / "out", source), spark=spark)
    assert not silent.exists() and beating.exists()
    # A running job keeps its file fresh.
    monkeypatch.setattr(job, "HEARTBEAT_S", 0.05)
    os.utime(beating / job.OWNER, (eleven_minutes_ago, eleven_minutes_ago))
    stop = job._start_heartbeat(beating / job.OWNER)
    time.sleep(0.5)
    stop.set()
    assert time.time() - (beating / job.OWNER).stat().st_mtime < 60


def test_an_output_path_that_is_a_file_is_refused(spark, tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a dataset")
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=20), item_text=False)
    with pytest.raises(PrepareError, match="is a file; give a directory path"):
        prepare(small_config(target, source), spark=spark)


def test_a_split_without_validation_or_with_untrained_users_is_warned_about(spark, tmp_path, capsys):
    source = tmp_path / "raw"
    source.mkdir()
    # LightGCN's format: "user item item ...". Too few train items per user for a 10% validation share, and
    # user 7 only in test.
    (source / "train.txt").write_text("".join(f"{u} 0 1 2 3 {u + 4}\n" for u in range(5)))
    (source / "test.txt").write_text("0 5\n1 6\n7 1 2\n")
    settings = {"source.format": "lightgcn", "source.path": str(source), "split.method": "source", "shards.factor": 1}
    prepare(small_config(tmp_path / "out", {}, **settings), spark=spark)
    out = capsys.readouterr().out
    assert "warning: the split left no validation interactions" in out
    assert "warning: 1 user(s) have held-out interactions but none in train" in out


def test_text_rows_of_ids_that_are_not_in_the_interactions_are_left_out(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], item_text=True)
    items = tmp_path / "raw" / "items.csv"
    items.write_text(items.read_text() + "abc,an item nobody rated\n99999,another one\n")
    # A text encoder: id-hash reads no text, so only this reaches the profile join.
    output = prepare(small_config(tmp_path / "out", source, **{"embedding.encoder": "sentence-transformers"}), spark=spark)
    rated = set(pd.read_csv(tmp_path / "raw" / "interactions.csv")["item"].astype(str))
    assert set(pd.read_parquet(output / "ids" / "item.parquet")["raw"].astype(str)) == rated
    profiles = pd.read_parquet(output / "profiles" / "item.parquet")
    assert sorted(profiles["id"]) == list(range(len(rated)))
    assert not profiles["text"].str.contains("nobody rated|another one").any()


def _read_csv_source(spark, interactions, **settings):
    from spark_jobs.config import PrepareConfig
    from spark_jobs.readers.formats import read_csv_source
    from spark_jobs.session import StageLog

    cfg = load_config(PrepareConfig, REPO / "configs" / "data" / "csv.yaml", [f"source.interactions={interactions}",
                                                                                *(f"{k}={v}" for k, v in settings.items())])
    return read_csv_source(spark, cfg, StageLog())


def test_ids_written_with_leading_zeros_keep_their_form(spark, tmp_path):
    """Customer numbers or zip codes: "00017" is exported and looked up as "00017", not as 17."""
    path = tmp_path / "inter.csv"
    path.write_text("user,item\n00017,7\n00017,8\n2,7\n")
    raw = _read_csv_source(spark, path)
    assert not raw.numeric_ids
    assert sorted((r["user"], r["item"]) for r in raw.interactions.collect()) == [("00017", "7"), ("00017", "8"), ("2", "7")]
    canonical = tmp_path / "canonical.csv"
    canonical.write_text("user,item\n17,7\n2,7\n")
    assert _read_csv_source(spark, canonical).numeric_ids  # integers written one way are ordered as numbers


def test_parquet_timestamp_columns_count_microseconds_and_float_ids_are_refused(spark, tmp_path):
    times = pd.to_datetime(["2024-01-01 00:00:00", "2024-01-01 00:00:10"])
    frame = pd.DataFrame({"user": [1, 2], "item": [5, 6], "when": times})
    frame.to_parquet(tmp_path / "nanos.parquet")  # pandas writes TIMESTAMP(NANOS), which Spark cannot read as a timestamp
    frame.to_parquet(tmp_path / "micros.parquet", coerce_timestamps="us")
    gap = {}
    for name in ("nanos", "micros"):
        raw = _read_csv_source(spark, tmp_path / f"{name}.parquet", **{"source.columns.timestamp": "when"})
        stamps = sorted(r["timestamp"] for r in raw.interactions.collect())
        gap[name] = stamps[1] - stamps[0]
    assert gap["micros"] == 10_000_000 and gap["nanos"] > 0  # microseconds; nanoseconds still order them
    # Integer ids in a decimal column of scale 0 (database exports) are ids; floats are not.
    frame.assign(user=frame["user"].map(decimal.Decimal)).to_parquet(tmp_path / "decimal.parquet")
    assert sorted(r["user"] for r in _read_csv_source(spark, tmp_path / "decimal.parquet").interactions.collect()) == ["1", "2"]
    frame.assign(user=frame["user"].astype(float)).to_parquet(tmp_path / "float.parquet")
    with pytest.raises(PrepareError, match="id column 'user' holds double values; expected integer or string ids"):
        _read_csv_source(spark, tmp_path / "float.parquet")
    # A struct or list would become its text form ("{1, a}"), an id per distinct value.
    frame.assign(item=[[5, 6], [6]]).to_parquet(tmp_path / "list.parquet")
    with pytest.raises(PrepareError, match=r"list.parquet: id column 'item' holds array<bigint> values; expected integer or string ids$"):
        _read_csv_source(spark, tmp_path / "list.parquet")


def test_csv_timestamps_may_be_iso_dates_and_times_but_not_mixed_with_numbers(spark, tmp_path):
    path = tmp_path / "inter.csv"
    path.write_text("user,item,when\n1,5,2024-01-01T00:00:10Z\n1,6,2024-01-01 00:00:00\n1,7,2024-01-01T02:00:05+02:00\n"
                    "2,5,2023-12-31\n")
    raw = _read_csv_source(spark, path, **{"source.columns.timestamp": "when"})
    stamps = {r["item"]: r["timestamp"] for r in raw.interactions.where("user = '1'").collect()}
    midnight = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z in microseconds
    assert stamps == {"5": midnight + 10_000_000, "6": midnight, "7": midnight + 5_000_000}
    assert raw.interactions.where("user = '2'").first()["timestamp"] == midnight - 86_400_000_000
    path = tmp_path / "mixed.csv"  # another name: the session keeps the first file's rows cached
    path.write_text("user,item,when\n1,5,1704067200\n1,6,1704067200\n2,6,2024-01-01\n")
    with pytest.raises(PrepareError, match=rf"{path}: timestamps written both as numbers and as date-times: "
                                           r"date-times from line 4 \('2,6,2024-01-01'\); numbers from line 2"):
        _read_csv_source(spark, path, **{"source.columns.timestamp": "when"})


def test_integer_timestamps_keep_every_digit(spark, tmp_path):
    """Nanosecond stamps are beyond a double's 53 bits: through a double these three would round to one value.
    A fraction is kept too (through a long it was cut off)."""
    path = tmp_path / "nanos.csv"
    path.write_text("user,item,when\n1,5,1704067200000000003\n1,6,1704067200000000001\n1,7,1704067200000000002\n"
                    "2,5,978300760.9\n")
    raw = _read_csv_source(spark, path, **{"source.columns.timestamp": "when"})
    stamps = {(r["user"], r["item"]): r["timestamp"] for r in raw.interactions.collect()}
    assert stamps == {("1", "5"): 1704067200000000003, ("1", "6"): 1704067200000000001,
                      ("1", "7"): 1704067200000000002, ("2", "5"): decimal.Decimal("978300760.9")}


def test_a_text_table_whose_ids_are_not_integers_like_the_interactions_is_refused(spark, tmp_path):
    (tmp_path / "inter.csv").write_text("user,item\n1,1000\n2,1000\n")
    (tmp_path / "items.csv").write_text("item,text\n1000.0,Product 1000\n")
    with pytest.raises(PrepareError, match=r"items.csv: id\(s\) \['1000.0'\] in column 'item' are not integers"):
        _read_csv_source(spark, tmp_path / "inter.csv", **{"source.item_text": tmp_path / "items.csv"})


def test_an_output_that_cannot_be_written_and_a_repeated_column_are_named(spark, tmp_path):
    source, _ = csv_with_lines(tmp_path, [], item_text=False)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PrepareError, match=rf"output: cannot write beside {tmp_path / 'a-file' / 'ds'} \(Not a directory"):
        prepare(small_config(tmp_path / "a-file" / "ds", source), spark=spark)
    source, _ = csv_with_lines(tmp_path, [], header="user,item,item,rating,timestamp", item_text=False)
    with pytest.raises(PrepareError, match=r"interactions.csv: column\(s\) \['item'\] appear more than once in header"):
        prepare(small_config(tmp_path / "out", source), spark=spark)


def test_a_header_row_read_as_data_is_refused(spark, tmp_path):
    """With source.header=false a header line would become a user "user" and turn every id into a string."""
    named = tmp_path / "named.csv"
    named.write_text("user,item\n1,5\n2,6\n")
    with pytest.raises(PrepareError, match=r"named.csv: line 1 \('user,item'\) looks like a header, but source.header is false"):
        _read_csv_source(spark, named, **{"source.header": "false"})
    renamed = tmp_path / "renamed.csv"  # names other than the configured ones: the only ids that are not integers
    renamed.write_text("customer,product\n1,5\n2,6\n")
    with pytest.raises(PrepareError, match=r"renamed.csv: line 1 \('customer,product'\) looks like a header"):
        _read_csv_source(spark, renamed, **{"source.header": "false"})
    headerless = tmp_path / "headerless.csv"  # string ids throughout: a first row like the others is data
    headerless.write_text("alice,book\nbob,film\n")
    raw = _read_csv_source(spark, headerless, **{"source.header": "false"})
    assert sorted((r["user"], r["item"]) for r in raw.interactions.collect()) == [("alice", "book"), ("bob", "film")]


def test_text_table_headers_are_trimmed_and_an_empty_one_is_named(spark, tmp_path):
    (tmp_path / "inter.csv").write_text("user,item\n1,5\n2,6\n")
    (tmp_path / "items.csv").write_text("item , text\n5,Five\n6,Six\n")  # trimmed like the interactions' fields
    raw = _read_csv_source(spark, tmp_path / "inter.csv", **{"source.item_text": tmp_path / "items.csv"})
    assert sorted((r["item"], r["text"]) for r in raw.item_text.collect()) == [("5", "Five"), ("6", "Six")]
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(PrepareError, match=r"empty.csv: file is empty; expected a header line naming columns item and text"):
        _read_csv_source(spark, tmp_path / "inter.csv", **{"source.item_text": tmp_path / "empty.csv"})


@pytest.mark.parametrize("key", ["source.interactions", "source.item_text", "source.user_text"])
def test_a_missing_source_file_is_named_before_spark_starts(tmp_path, monkeypatch, key):
    import spark_jobs.prepare as job

    def no_session(*args, **kwargs):
        raise AssertionError("a Spark session was started for a source file that does not exist")

    monkeypatch.setattr(job, "start_session", no_session)
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=5), user_text=True)
    source[key] = str(tmp_path / "raw" / "typo.csv")
    with pytest.raises(PrepareError, match=rf"{re.escape(key)}: (file )?{re.escape(str(tmp_path))}/raw/typo.csv not found"):
        prepare(small_config(tmp_path / "out", source))
    assert_nothing_left(tmp_path)


def test_rows_swallowed_by_an_unclosed_quote_in_a_text_table_are_traced_to_it(spark, tmp_path):
    source = write_csv_source(tmp_path / "raw", interaction_rows(num_users=20), item_text=False)
    items = sorted({row[1] for row in interaction_rows(num_users=20)})
    rows = [f"{i},Item {i}" for i in items]
    rows[3] = f'{items[3]},"Item {items[3]}, a film'  # the quote is never closed: the rows after it become its text
    (tmp_path / "raw" / "items.csv").write_text("item,text\n" + "\n".join(rows) + "\n")
    source["source.item_text"] = str(tmp_path / "raw" / "items.csv")
    fails(spark, tmp_path, source, rf"item\(s\) have no text to embed \(ids \['{items[4]}', [\s\S]*the text of item "
          rf"'{items[3]}' holds lines that start like their rows: a double quote opened in its row may be unclosed",
          **{"embedding.encoder": "sentence-transformers"})


def test_rlmrec_profiles_counted_from_one_are_refused(spark, tmp_path):
    """Profile ids index the matrices: ids 1..5 for 5 items would pair each item with its neighbour's text."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("trn", "tst"):
        (raw / f"{name}_mat.pkl").write_bytes(pickle.dumps(sp.coo_matrix(np.eye(6, 5))))
    (raw / "itm_prf.csv").write_text("item_id_int,profile_text\n" + "".join(f'{i + 1},"Book {i}"\n' for i in range(5)))
    fails(spark, tmp_path, {"source.format": "rlmrec", "source.path": str(raw)},
          r"itm_prf.csv: item_id_int \['5'\] outside the matrices' 5 items \(0 to 4\); ids count from 0")


@pytest.mark.parametrize("form, present, missing", [
    ("lightgcn", ["train.txt"], "test.txt"),
    ("rlmrec", ["trn_mat.pkl", "val_mat.pkl"], "tst_mat.pkl"),
    ("movielens-100k", ["ml-100k.inter", "ml-100k.user"], "ml-100k.item"),
])
def test_a_source_directory_without_a_required_file_is_named_before_spark_starts(tmp_path, monkeypatch, form, present, missing):
    import spark_jobs.prepare as job

    monkeypatch.setattr(job, "start_session", lambda *a, **k: pytest.fail("a Spark session was started"))
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in present:
        (raw / name).write_text("")
    with pytest.raises(PrepareError, match=rf"source.path: file {re.escape(str(raw / missing))} not found; source.format={form} reads"):
        prepare(small_config(tmp_path / "out", {"source.format": form, "source.path": str(raw), "split.method": "auto"}))


def test_a_row_that_is_not_utf8_is_named_with_its_line(spark, tmp_path):
    """A Latin-1 byte in a RecBole .inter file: the header read crashed on it (a traceback), and Spark would have read
    it as U+FFFD, an id unlike the same name written elsewhere."""
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = "".join(f"{u}\t{i}\n" for u in range(1, 6) for i in range(1, 6))
    (raw / "x.inter").write_bytes(("user_id:token\titem_id:token\n" + rows).encode() + b"caf\xe9\t3\n")
    fails(spark, tmp_path, {"source.format": "recbole", "source.path": str(raw)},
          rf"{re.escape(str(raw / 'x.inter'))}:27: not UTF-8 text \(save the file as UTF-8\)")


def test_a_held_out_pair_that_is_also_a_train_pair_is_reported(spark, tmp_path, capsys):
    source = tmp_path / "raw"
    source.mkdir()
    (source / "train.txt").write_text("".join(f"{u} 0 1 2 3 {u + 4}\n" for u in range(5)))
    (source / "test.txt").write_text("0 1 5\n1 6\n")  # (0, 1) is a train pair too: the source's test set loses it
    settings = {"source.format": "lightgcn", "source.path": str(source), "split.method": "source", "shards.factor": 1}
    dataset = PreparedDataset.open(prepare(small_config(tmp_path / "out", {}, **settings), spark=spark))
    assert "de-duplication dropped 1 repeated (user, item) interactions (1 test); each pair is kept once, in train" in capsys.readouterr().out
    assert dataset.manifest["splits"]["test"] == 2


def test_a_time_ordered_split_of_a_recbole_file_without_timestamps_is_refused_before_its_rows_are_read(spark, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "x.inter").write_text("user_id:token\titem_id:token\n" + "".join(f"{u}\t{i}\n" for u in range(3) for i in range(3)))
    fails(spark, tmp_path, {"source.format": "recbole", "source.path": str(raw), "split.method": "temporal"},
          rf"{re.escape(str(raw / 'x.inter'))}: split.method=temporal orders each user's interactions by time, and its "
          r"header \['user_id', 'item_id'\] has no timestamp field")
    assert "[prepare] read done" not in capsys.readouterr().out


def test_rows_dropped_from_a_recbole_item_file_are_counted_in_the_manifest(spark, tmp_path):
    """Only the .inter file's counts reached manifest.malformed_rows; the .item file's dropped rows were logged only."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "x.inter").write_text("user_id:token\titem_id:token\n" + "".join(f"{u}\t{i}\n" for u in range(8) for i in range(8)))
    items = "".join(f"{i}\tmovie {i}\n" for i in range(8))
    (raw / "x.item").write_text("item_id:token\ttitle:token_seq\n" + items + "8\tmovie 8\textra field\n")
    settings = {"source.format": "recbole", "source.path": str(raw), "malformed.max_fraction": 0.2, "shards.factor": 1}
    manifest = PreparedDataset.open(prepare(small_config(tmp_path / "out", {}, **settings), spark=spark)).manifest
    assert manifest["malformed_rows"] == {str(raw / "x.inter"): {"rows": 64, "malformed": 0},
                                          str(raw / "x.item"): {"rows": 9, "malformed": 1}}


def test_a_folder_of_csv_files_is_refused_before_spark_starts(tmp_path, monkeypatch):
    """Any folder was read as Parquet: a folder of CSV files failed in Java ('... is not a Parquet file')."""
    import spark_jobs.prepare as job

    monkeypatch.setattr(job, "start_session", lambda *a, **k: pytest.fail("a Spark session was started"))
    raw = tmp_path / "raw"
    raw.mkdir()
    for part in ("a.csv", "b.csv", "_SUCCESS"):  # Spark's marker is no data file
        (raw / part).write_text("user,item\n1,5\n")
    with pytest.raises(PrepareError, match=rf"source.interactions: {re.escape(str(raw))} is a folder holding 2 file\(s\) that are "
                                           r"not Parquet: \['a.csv', 'b.csv'\]; expected a .csv or .parquet file, or a folder of Parquet files"):
        prepare(small_config(tmp_path / "out", {"source.format": "csv", "source.interactions": str(raw)}))
    assert_nothing_left(tmp_path)


def test_parquet_is_told_by_its_suffix_in_any_case_or_a_folder_of_parquet_files(spark, tmp_path):
    """X.PARQUET was read as CSV, its bytes shown as the header; Parquet files named otherwise (Hive's 000000_0) count
    by their magic bytes, alone or in a folder."""
    frame = pd.DataFrame({"user": [1, 2], "item": [5, 6]})
    frame.to_parquet(tmp_path / "upper.PARQUET")
    frame.to_parquet(tmp_path / "data.pq")
    for folder, part in (("folder", "part-0.parquet"), ("hive", "000000_0")):
        (tmp_path / folder).mkdir()
        frame.to_parquet(tmp_path / folder / part)
        (tmp_path / folder / "_SUCCESS").write_text("")
    for path in (tmp_path / "upper.PARQUET", tmp_path / "data.pq", tmp_path / "folder", tmp_path / "hive"):
        rows = sorted((r["user"], r["item"]) for r in _read_csv_source(spark, path).interactions.collect())
        assert rows == [("1", "5"), ("2", "6")], path


def test_quoted_ids_with_spaces_name_the_same_node_in_the_interactions_and_the_text_table(spark, tmp_path):
    """The interactions kept ' x ' (spaces inside quotes), the text table trimmed it to 'x': an item without text."""
    (tmp_path / "inter.csv").write_text('user,item\n1," x "\n2," x "\n2,y\n')
    (tmp_path / "items.csv").write_text('item,text\n" x ",Ex\ny,Why\n')
    raw = _read_csv_source(spark, tmp_path / "inter.csv", **{"source.item_text": tmp_path / "items.csv"})
    assert {r["item"] for r in raw.interactions.collect()} == {r["item"] for r in raw.item_text.collect()} == {"x", "y"}


def test_rows_swallowed_by_an_unclosed_quote_in_a_text_tables_id_are_traced_to_it(spark, tmp_path):
    """Closed in a later row's id, the quote made one row of the rows between: their items had no text, unexplained."""
    (tmp_path / "inter.csv").write_text("user,item\n" + "".join(f"1,{i}\n" for i in range(500, 507)))
    rows = [f"{i},Item {i}" for i in range(500, 507)]
    rows[3], rows[5] = '"503,Item 503', '"505",Item 505'
    (tmp_path / "items.csv").write_text("item,text\n" + "\n".join(rows) + "\n")
    with pytest.raises(PrepareError, match=r"items.csv: line 5: the item field holds line breaks \('\"503,Item 503\\n504,Item "
                                           r"504\\n\"505\"'\): a double quote opened in it may be unclosed"):
        _read_csv_source(spark, tmp_path / "inter.csv", **{"source.item_text": tmp_path / "items.csv"})


def test_repeated_pairs_of_a_csv_are_reported_when_dropped(spark, tmp_path, capsys):
    """Pre-split sources said how many repeats de-duplication dropped; a CSV's went silently."""
    rows = interaction_rows(num_users=20)
    source, _ = csv_with_lines(tmp_path, [",".join(str(v) for v in row) for row in rows[:10]], item_text=False)
    dataset = PreparedDataset.open(prepare(small_config(tmp_path / "out", source), spark=spark))
    assert "de-duplication dropped 10 repeated (user, item) interactions; each pair is kept once" in capsys.readouterr().out
    assert sum(dataset.manifest["splits"].values()) == len(rows)


@pytest.mark.parametrize("delay", [0.5, 8.0])  # while the JVM starts; while Spark works (on this machine)
def test_ctrl_c_leaves_no_staging_and_says_so_in_one_line(tmp_path, delay):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it): the staging directory is removed, nothing
    is written, and the job says so in its last line with the shell's exit status 130. A JVM left running
    (Ctrl-C during its start once orphaned it) would hold the job's stderr open: communicate() would time out."""
    import signal
    import time

    output = tmp_path / "out"
    job = subprocess.Popen(
        [sys.executable, "-m", "spark_jobs.prepare", str(REPO / "configs/data/synthetic.yaml"), f"output={output}",
         "source.synthetic.users=20000", "source.synthetic.items=20000", "source.synthetic.interactions=400000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".out.tmp-*")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(delay)
        assert job.poll() is None, "the job must still be running when interrupted"
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=180)
    finally:  # its JVM not left running beside the next tests after a failure here
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted: no dataset was written; the same command starts it again"
    # No traceback: py4j logged one while closing the interrupted connection (seen once in CI), now silenced.
    assert "Traceback" not in err, err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_error_out_of_the_interrupted_jvm_call_is_taken_for_the_interrupt(monkeypatch, capsys):
    """After Ctrl-C broke the connection of a JVM call, pyspark's error wrapper calls the JVM again and py4j's network
    error replaces the KeyboardInterrupt (once in eight runs of the test above): the interrupt's line and status still.
    Without Ctrl-C the same error is the job's failure and propagates."""
    from py4j.protocol import Py4JNetworkError

    from spark_jobs import prepare as prepare_module
    from spark_jobs.session import CTRL_C_PRESSED

    def interrupted_job(cfg):
        raise Py4JNetworkError("Answer from Java side is empty")

    monkeypatch.setattr(prepare_module, "prepare", interrupted_job)
    monkeypatch.setattr(prepare_module, "wait_for_jvm_exit", lambda: None)  # this process's JVM serves the other tests
    config = str(REPO / "configs/data/synthetic.yaml")
    with pytest.raises(Py4JNetworkError):
        prepare_module.main([config])
    CTRL_C_PRESSED.set()
    try:
        assert prepare_module.main([config]) == 130
    finally:
        CTRL_C_PRESSED.clear()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted: no dataset was written; the same command starts it again")
