"""Top-K items for users from a run's exported vectors: retrieval without the trainer, tables or processes.

    python launch/recommend.py RUN_DIR --users 196 186 --k 10          # original user ids, printed
    python launch/recommend.py RUN_DIR --k 20 --out recs.parquet       # every user, written as Parquet (.csv: CSV)

Scores are user vector . item vector over RUN_DIR/export (the vectors the run ranked by when it
tested its best model); items in the user's train split are left out unless --keep-seen, as in
evaluation, so these lists are the ones the run's test metrics were computed from (for every user, or for the
sample eval.max_users drew).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd
import torch

from darec_dist.config import ConfigError, read_yaml
from darec_dist.data import layout
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.files import atomic_path
from darec_dist.train import report
from darec_dist.train.config import resolve_path
from darec_dist.train.evaluate import MAX_SCORES
from darec_dist.train.metrics import mask_rows, top_k


def load_export(run_dir: Path, kind: str) -> tuple[np.ndarray, pd.Series]:
    """(vectors, original ids) of `kind`; row i of the vectors is contiguous id i."""
    vectors_path, ids = run_dir / "export" / f"{kind}_vectors.npy", run_dir / "export" / f"{kind}_ids.parquet"
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a run directory (a run_dir written by launch/train.py)")
    if not (run_dir / "results.json").is_file():
        raise ConfigError(f"{run_dir}: no results.json, so not a finished run (the export is written at a run's end, "
                          "and removed while a resume trains on)")
    if not vectors_path.exists() or not ids.exists():
        raise ConfigError(f"{run_dir}: no export/{kind}_vectors.npy and {kind}_ids.parquet (runs export them unless output.export_embeddings=false)")
    try:
        vectors = np.load(vectors_path, mmap_mode="r")
    except (ValueError, OSError) as err:  # truncated or not a .npy file
        raise ConfigError(f"{vectors_path}: not a readable .npy array ({err})") from err
    raw = raw_ids(ids)
    # A row per id: with fewer rows, ranking with --keep-seen would silently leave the missing rows' items out.
    if vectors.ndim != 2 or vectors.shape[0] != len(raw):
        raise ConfigError(f"{vectors_path}: shape {vectors.shape}, expected ({len(raw)}, dim): a row per id in {ids.name}")
    return vectors, raw


def raw_ids(id_map: Path) -> pd.Series:
    """The original ids of an id map (Parquet of raw, id), in contiguous-id order."""
    try:
        table = pd.read_parquet(id_map, columns=["raw", "id"])
    except (ValueError, OSError) as err:  # not Parquet (pyarrow's ArrowInvalid is a ValueError), or without the columns
        raise ConfigError(f"{id_map}: not a readable id map (Parquet with columns raw and id): {str(err).splitlines()[0]}") from err
    ids = table["id"].sort_values().to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        # Row i of the vectors is contiguous id i: other ids would name the wrong rows.
        raise ConfigError(f"{id_map}: ids are not 0..{len(ids) - 1}, each once")
    return table.sort_values("id")["raw"].astype(str).reset_index(drop=True)


def exported_fingerprint(record: Path) -> str:
    try:
        return str(json.loads(record.read_text())["fingerprint"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{record}: expected JSON with the dataset's fingerprint ({type(err).__name__}: {err})") from None


def run_data_path(run_dir: Path) -> str:
    """The dataset the run trained on: data.path of its config.yaml."""
    config = run_dir / "config.yaml"
    data = read_yaml(config).get("data")
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or not data["path"]:
        raise ConfigError(f"{config}: expected a section data with the dataset's directory as path (data: {{path: DIR}}), "
                          f"got data: {data!r}; or give --data DIR")
    return data["path"]


def top_items(users: np.ndarray, user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, seen=None) -> tuple[np.ndarray, np.ndarray]:
    """(items, scores), each users x k, best first; `seen` (a CSR of items per user) is excluded when given."""
    items = torch.from_numpy(np.array(item_vectors, dtype=np.float32))  # a writable copy of the memory map
    k = min(k, items.shape[0])
    chunk = max(1, MAX_SCORES // items.shape[0])
    top, best = [], []
    for start in range(0, len(users), chunk):
        part = users[start : start + chunk]
        scores = torch.from_numpy(np.ascontiguousarray(user_vectors[part], dtype=np.float32)) @ items.T
        if seen is not None:
            mask_rows(scores, part, seen)
        values, indices = top_k(scores, k)
        top.append(indices.numpy())
        best.append(values.numpy())
    return np.concatenate(top), np.concatenate(best)


def recommend(run_dir: Path, raw_users: list[str] | None, k: int, keep_seen: bool = False, data: str | None = None) -> pd.DataFrame:
    """One row per (user, rank): user and item as original ids, the score."""
    user_vectors, user_raw = load_export(run_dir, "user")
    item_vectors, item_raw = load_export(run_dir, "item")
    if user_vectors.shape[1] != item_vectors.shape[1]:
        raise ConfigError(f"{run_dir / 'export'}: user vectors have {user_vectors.shape[1]} columns and item vectors "
                          f"{item_vectors.shape[1]}; a score is their dot product, so the widths must be equal")
    if raw_users is None:
        users = np.arange(len(user_raw), dtype=np.int64)
    else:
        raw_users = list(dict.fromkeys(raw_users))  # an id given again is listed once (its list was repeated)
        position = pd.Series(np.arange(len(user_raw)), index=user_raw)
        unknown = [u for u in raw_users if u not in position.index]
        if unknown:
            raise ConfigError(f"{run_dir}: unknown user ids {unknown[:5]} (not in export/user_ids.parquet)")
        users = position[raw_users].to_numpy(np.int64)
    seen = None
    if not keep_seen:
        path = data or run_data_path(run_dir)
        dataset = PreparedDataset.open(resolve_path(path), verify_checksums=False)
        for kind, raw in (("user", user_raw), ("item", item_raw)):
            # Another dataset's train items would be left out of the lists (or its ids would not fit them).
            theirs = raw_ids(dataset.root / layout.id_map(kind))
            if not theirs.equals(raw):
                raise DatasetError(
                    f"{dataset.root}: its {kind} ids are not those of {run_dir}/export ({len(theirs)} {kind}s against "
                    f"{len(raw)}); give --data the dataset the run trained on"
                )
        record = run_dir / "export" / report.EXPORT_DATASET
        if not record.is_file():
            raise ConfigError(f"{record}: missing, so the dataset whose train items to leave out is unknown (an export "
                              "written by an earlier darec-dist?); --keep-seen ranks without a dataset")
        trained_on = exported_fingerprint(record)
        if trained_on != dataset.fingerprint:
            raise DatasetError(f"{dataset.root}: the same ids, but not the dataset the run trained on (fingerprint "
                               f"{dataset.fingerprint}, the run's {trained_on} in {record}: its split or graph differ); "
                               "give --data the dataset the run trained on")
        # The fingerprint is the manifest's checksums, not the files': the arrays read here are checked against them
        # (a train split swapped for another would leave other items out of the lists).
        problem = dataset.checksum_problem(only=(layout.split_indptr("train"), layout.split_items("train")))
        if problem:
            raise DatasetError(problem)
        seen = dataset.interactions("train")
    items, scores = top_items(users, user_vectors, item_vectors, k, seen)
    table, unserved = recommendation_table(user_raw.to_numpy()[users], item_raw.to_numpy(), items, scores)
    if len(unserved):  # absent from the table, which would not say why
        more = f" and {len(unserved) - 10} more" if len(unserved) > 10 else ""
        print(f"note: nothing to recommend to user(s) {', '.join(map(str, unserved[:10]))}{more}: every item is among "
              "their train items (--keep-seen ranks those too)", file=sys.stderr)
    return table


def recommendation_table(users: np.ndarray, item_raw: np.ndarray, items: np.ndarray, scores: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """The (user, rank, item, score) rows of top_items' lists for `users` (original ids), and the users whose list is
    empty. Fewer than k unseen items leave -inf scores at the end of a row: those are not recommendations."""
    valid = np.isfinite(scores)
    table = pd.DataFrame({
        "user": np.repeat(users, items.shape[1])[valid.ravel()],
        "rank": np.tile(np.arange(1, items.shape[1] + 1), len(users))[valid.ravel()],
        "item": item_raw[items[valid]],
        "score": scores[valid],
    })
    return table, users[~valid.any(axis=1)]


# --out's formats, by the file's suffix.
WRITERS = {
    ".parquet": lambda table, path: table.to_parquet(path, index=False),
    ".csv": lambda table, path: table.to_csv(path, index=False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory written by launch/train.py")
    parser.add_argument("--users", nargs="+", help="original user ids (default: every user); an id given again is "
                        "listed once, where it was first given")
    parser.add_argument("--k", type=int, default=10, help="items per user (default: %(default)s; at most the catalogue)")
    parser.add_argument("--keep-seen", action="store_true", help="do not leave out the user's train items")
    parser.add_argument("--data", help="the prepared dataset, if it moved since the run (default: the run's data.path)")
    parser.add_argument("--out", type=Path, help="write the table here instead of printing: FILE.parquet or FILE.csv")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    if args.keep_seen and args.data is not None:
        # --data is read only for the train items to leave out; with --keep-seen it would be ignored unchecked.
        parser.error("--data is read only to leave the users' train items out, which --keep-seen keeps; give one of them")
    if args.out is not None and args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; give a file name such as {args.out / 'recs.parquet'}")
    # (mkdir would say only "File exists", after the ranking)
    blocking = next((parent for parent in (args.out.parents if args.out is not None else []) if parent.is_file()), None)
    if blocking is not None:
        parser.error(f"--out {args.out}: {blocking} is a file, not a directory to write into")
    # The suffix names the format: recs.csv written as Parquet was unreadable to whoever opened it as CSV.
    if args.out is not None and args.out.suffix.lower() not in WRITERS:
        parser.error(f"--out {args.out}: expected a file ending in {' or '.join(WRITERS)} (the suffix names the format)")
    try:
        table = recommend(args.run_dir, args.users, args.k, args.keep_seen, args.data)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        if len(table):  # (an empty one printed pandas' "Empty DataFrame"; the note above says why it is empty)
            print(table.to_string(index=False))
    else:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.out) as staging:
                WRITERS[args.out.suffix.lower()](table, staging)
        except OSError as err:
            print(f"error: cannot write {args.out}: {err.strerror or err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
