"""launch/recommend.py on exports written here: a damaged export or run config is named, not a traceback (or, with
--keep-seen, rankings over the rows that happen to be there)."""

import numpy as np
import pandas as pd
import pytest

from launch.recommend import main

USERS, ITEMS, DIM = 4, 6, 3


def write_export(run_dir, users=USERS, items=ITEMS, dim=DIM):
    """An export as launch/train.py writes it: row i of the vectors is contiguous id i of the id map (raw, id)."""
    export = run_dir / "export"
    export.mkdir(parents=True)
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
