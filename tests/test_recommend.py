"""launch/recommend.py on exports written here: a damaged export or run config is named, not a traceback (or, with
--keep-seen, rankings over the rows that happen to be there)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from darec_dist.config import ConfigError
from darec_dist.data import layout
from darec_dist.data.dataset import CSR, DatasetError, PreparedDataset
from launch.recommend import main, recommend, recommendation_table, top_items

USERS, ITEMS, DIM = 4, 6, 3


def write_export(run_dir, users=USERS, items=ITEMS, dim=DIM):
    """An export as launch/train.py writes it: row i of the vectors is contiguous id i of the id map (raw, id)."""
    export = run_dir / "export"
    export.mkdir(parents=True)
    (run_dir / "results.json").write_text("{}")  # a finished run's
    rng = np.random.default_rng(0)
    for kind, count in (("user", users), ("item", items)):
        np.save(export / f"{kind}_vectors.npy", rng.normal(size=(count, dim)).astype(np.float32))
        pd.DataFrame({"id": np.arange(count), "raw": [f"{kind}{i}" for i in range(count)]}).to_parquet(export / f"{kind}_ids.parquet")
    return export


def test_a_sound_export_ranks_every_item(tmp_path, capsys):
    write_export(tmp_path)
    assert main([str(tmp_path), "--keep-seen", "--k", "3", "--users", "user1"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("user1") == 3


def test_a_repeated_user_is_listed_once_in_the_order_first_given(tmp_path, capsys):
    """--users user2 user1 user2 printed user2's list twice."""
    write_export(tmp_path)
    assert main([str(tmp_path), "--keep-seen", "--k", "2", "--users", "user2", "user1", "user2"]) == 0
    users = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert users == ["user2", "user2", "user1", "user1"]


def test_users_without_an_unseen_item_are_named_not_silently_absent():
    """A user with every item in train got no row: alone, a bare empty table; among others, silently missing."""
    rng = np.random.default_rng(1)
    users, item_vectors = rng.normal(size=(3, DIM)).astype(np.float32), rng.normal(size=(ITEMS, DIM)).astype(np.float32)
    seen = CSR(indptr=np.array([0, ITEMS, ITEMS + 2, ITEMS + 2]), indices=np.array([*range(ITEMS), 0, 5]))
    items, scores = top_items(np.arange(3), users, item_vectors, ITEMS, seen)
    table, unserved = recommendation_table(np.array(["a", "b", "c"]), np.array([f"item{i}" for i in range(ITEMS)]), items, scores)
    assert list(unserved) == ["a"]
    assert table.groupby("user").size().to_dict() == {"b": ITEMS - 2, "c": ITEMS}
    assert not set(table[table.user == "b"].item) & {"item0", "item5"}


def test_out_writes_the_format_its_suffix_names(tmp_path, capsys):
    """--out recs.csv wrote Parquet under a .csv name; another suffix is refused before anything is computed."""
    write_export(tmp_path)
    expected = recommend(tmp_path, None, k=3, keep_seen=True)
    assert main([str(tmp_path), "--keep-seen", "--k", "3", "--out", str(tmp_path / "recs.csv")]) == 0
    written = pd.read_csv(tmp_path / "recs.csv", dtype={"user": str, "item": str})  # fails on Parquet bytes
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert main([str(tmp_path), "--keep-seen", "--k", "3", "--out", str(tmp_path / "recs.parquet")]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "recs.parquet"), expected)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "--keep-seen", "--out", str(tmp_path / "recs.txt")])
    assert stopped.value.code == 2 and not (tmp_path / "recs.txt").exists()
    assert f"--out {tmp_path / 'recs.txt'}: expected a file ending in .parquet or .csv" in capsys.readouterr().err


def truncate(path):
    path.write_bytes(path.read_bytes()[:60])


@pytest.mark.parametrize("damage, message", [
    (lambda export: truncate(export / "item_vectors.npy"), "item_vectors.npy: not a readable .npy array (EOF"),
    (lambda export: (export / "user_ids.parquet").write_bytes(b"not parquet"), "user_ids.parquet: not a readable id map (Parquet with columns raw and id)"),
    (lambda export: pd.DataFrame({"id": [0, 1], "name": ["a", "b"]}).to_parquet(export / "item_ids.parquet"), "item_ids.parquet: not a readable id map"),
    (lambda export: pd.DataFrame({"id": [0, 1, 2, 5], "raw": list("abcd")}).to_parquet(export / "user_ids.parquet"), "user_ids.parquet: ids are not 0..3, each once"),
    # Fewer rows than ids: --keep-seen ranked only the rows there, silently.
    (lambda export: np.save(export / "item_vectors.npy", np.ones((ITEMS - 2, DIM), np.float32)), f"item_vectors.npy: shape ({ITEMS - 2}, {DIM}), expected ({ITEMS}, dim)"),
    (lambda export: np.save(export / "user_vectors.npy", np.ones(USERS, np.float32)), f"user_vectors.npy: shape ({USERS},), expected ({USERS}, dim)"),
    (lambda export: np.save(export / "item_vectors.npy", np.ones((ITEMS, DIM + 1), np.float32)), f"user vectors have {DIM} columns and item vectors {DIM + 1}"),
], ids=["truncated-npy", "not-parquet", "no-raw-column", "ids-with-a-gap", "fewer-rows", "one-dimensional", "other-widths"])
def test_a_damaged_export_is_named_with_what_was_expected(tmp_path, capsys, damage, message):
    damage(write_export(tmp_path))
    assert main([str(tmp_path), "--keep-seen"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'export'}") and message in err, err


def test_what_is_not_a_finished_run_is_named_as_such(tmp_path, capsys):
    """A missing directory, a file and an unfinished run were all reported as an export turned off by a setting."""
    write_export(tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()  # killed, or training on after a resume
    for path, message in ((tmp_path / "nope", "not a run directory"), (tmp_path / "run" / "config.yaml", "not a run directory"),
                          (tmp_path / "run", "no results.json, so not a finished run")):
        assert main([str(path), "--keep-seen"]) == 2
        assert f"error: {path}: {message}" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("data: {path: %s}\n" % (tmp_path / "moved"))
    (tmp_path / "run" / "results.json").write_text("{}")
    assert main([str(tmp_path / "run")]) == 2  # recommend.py's own flag is named, not only the trainer's key
    assert "launch/recommend.py's --data DIR" in capsys.readouterr().err


def test_a_run_config_without_a_data_section_is_named(tmp_path, capsys):
    write_export(tmp_path)
    (tmp_path / "config.yaml").write_text("data: 3\n")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'config.yaml'}: expected a section data with the dataset's directory as path" in err and "got data: 3" in err, err


def test_data_with_keep_seen_is_refused(tmp_path, capsys):
    """--data is read only for the train items to leave out: with --keep-seen it was silently ignored."""
    write_export(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "--keep-seen", "--data", str(tmp_path / "nonexistent")])
    assert stopped.value.code == 2 and "--data is read only to leave the users' train items out" in capsys.readouterr().err


def test_the_train_items_left_out_are_those_of_the_dataset_the_export_came_from(small_dataset, tmp_path, capsys):
    """A dataset re-prepared with another split (the same ids) left the wrong train items out unnoticed: the export
    records the fingerprint of the dataset it came from."""
    dataset = PreparedDataset.open(small_dataset[0])
    export = write_export(tmp_path, dataset.num_users, dataset.num_items)
    for kind in ("user", "item"):  # the dataset's ids, as a run exports them
        shutil.copyfile(dataset.root / layout.id_map(kind), export / f"{kind}_ids.parquet")
    data = str(dataset.root)
    with pytest.raises(ConfigError, match=f"{export / 'dataset.json'}: missing, so the dataset whose train items to leave out is unknown"):
        recommend(tmp_path, None, k=3, data=data)
    (export / "dataset.json").write_text(json.dumps({"fingerprint": "0" * 16}))  # trained on another split
    with pytest.raises(DatasetError, match=f"fingerprint {dataset.fingerprint}, the run's {'0' * 16} in {export / 'dataset.json'}"):
        recommend(tmp_path, None, k=3, data=data)
    assert main([str(tmp_path), "--data", data]) == 2
    assert "the same ids, but not the dataset the run trained on" in capsys.readouterr().err
    (export / "dataset.json").write_text(json.dumps({"fingerprint": dataset.fingerprint}))
    served = recommend(tmp_path, None, k=3, data=data)
    assert len(served) == 3 * dataset.num_users
    (export / "dataset.json").write_text("{")
    with pytest.raises(ConfigError, match=f"{export / 'dataset.json'}: expected JSON with the dataset's fingerprint"):
        recommend(tmp_path, None, k=3, data=data)



def test_train_arrays_swapped_under_the_same_manifest_are_named(small_dataset, tmp_path):
    """The fingerprint is the manifest's checksums: a train split replaced by another of the same shape (manifest kept)
    left other items out of every list without a word."""
    copy = tmp_path / "ds"
    shutil.copytree(small_dataset[0], copy)
    dataset = PreparedDataset.open(copy)
    run_dir = tmp_path / "run"
    export = write_export(run_dir, dataset.num_users, dataset.num_items)
    for kind in ("user", "item"):
        shutil.copyfile(copy / layout.id_map(kind), export / f"{kind}_ids.parquet")
    (export / "dataset.json").write_text(json.dumps({"fingerprint": dataset.fingerprint}))
    assert len(recommend(run_dir, None, k=3, data=str(copy))) == 3 * dataset.num_users
    items = np.load(copy / "interactions" / "train_items.npy")
    np.save(copy / "interactions" / "train_items.npy", (items + 1) % dataset.num_items)
    with pytest.raises(DatasetError, match=r"interactions/train_items.npy: sha256 differs from the manifest"):
        recommend(run_dir, None, k=3, data=str(copy))


def test_float64_vectors_rank_as_float32_ones(tmp_path):
    """Only the item vectors were cast: float64 user vectors (a converted export) failed in the product."""
    write_export(tmp_path)
    expected = recommend(tmp_path, None, k=3, keep_seen=True)
    path = tmp_path / "export" / "user_vectors.npy"
    np.save(path, np.load(path).astype(np.float64))
    assert recommend(tmp_path, None, k=3, keep_seen=True).equals(expected)


def test_out_under_a_file_is_refused_naming_the_file(tmp_path, capsys):
    """QA: --out under a file said only "File exists", after the ranking."""
    write_export(tmp_path)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "--keep-seen", "--out", str(tmp_path / "a-file" / "recs.csv")])
    assert stopped.value.code == 2
    assert f"{tmp_path / 'a-file'} is a file, not a directory to write into" in capsys.readouterr().err


def test_an_empty_list_prints_nothing_on_stdout(tmp_path, capsys, monkeypatch):
    """QA: users with nothing to recommend printed pandas' "Empty DataFrame" (the note on stderr says why)."""
    import launch.recommend

    write_export(tmp_path)
    monkeypatch.setattr(launch.recommend, "recommend", lambda *args: pd.DataFrame(columns=["user", "rank", "item", "score"]))
    assert main([str(tmp_path), "--keep-seen", "--users", "user1"]) == 0
    assert capsys.readouterr().out == ""
