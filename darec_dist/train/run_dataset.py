"""The prepared dataset a job reads: opened and checked against the run's settings before anything is built, and
held against replacement while the job runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from darec_dist.config import ConfigError
from darec_dist.data import layout
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.data.loader import check_every_epoch_has_a_batch, check_world_fits
from darec_dist.data.sampling import users_without_negatives
from darec_dist.distributed import collectives
from darec_dist.files import reading_lock
from darec_dist.train.config import TrainConfig, resolve_path
from darec_dist.train.metrics import metric_names


def open_dataset(cfg: TrainConfig, world_size: int, verify_checksums: bool = True, training: bool = True) -> PreparedDataset:
    """The dataset, checked against this run's settings (checksums too where both arguments ask for it); training:
    also against how this world size reads its shards in batches."""
    if not cfg.data.path:
        raise ConfigError("data.path: required (a directory made by spark_jobs.prepare)")
    dataset = PreparedDataset.open(resolve_path(cfg.data.path), verify_checksums=False)
    if verify_checksums and cfg.data.verify_checksums:
        # The processes of a node share the reading, so that each node reads its copy of the dataset once, not
        # once per process (nodes may hold copies of their own); a corrupted file stops every rank.
        part, parts = 0, 1
        if collectives.world_size() > 1:
            part = int(os.environ.get("LOCAL_RANK", collectives.rank()))
            parts = int(os.environ.get("LOCAL_WORLD_SIZE", collectives.world_size()))
        problem = collectives.first_problem(dataset.checksum_problem(part, parts))
        if problem:
            raise DatasetError(problem)
    if training:
        check_world_fits(dataset, world_size, cfg.loader.num_workers)
        check_every_epoch_has_a_batch(dataset, cfg.loader, cfg.seed, cfg.train.epochs, world_size)
        if cfg.loader.reject_train_positives:
            check_negatives_exist(dataset)
    # Test first: without it no setting helps, while eval.validate=false answers a missing validation split.
    if dataset.manifest["splits"]["test"] == 0:
        # Metrics over no users would read as a model that scores 0.
        raise DatasetError(
            f"{dataset.root}: no test interactions, so nothing to test the model on; re-prepare with a test share in "
            "split.ratios (a ratio split gives users with few interactions no held-out rows: 3:1:1 needs 5)"
        )
    if cfg.eval.validate and dataset.manifest["splits"]["val"] == 0:
        raise DatasetError(
            f"{dataset.root}: no validation interactions; early stopping needs a validation split "
            "(eval.validate=false trains exactly train.epochs epochs and tests the final model)"
        )
    # A cut-off past the catalogue ranks every item: Recall@K is then 1 for every user, a score that means nothing.
    # (The monitored metric is one of eval.ks, checked below, so this covers it too.)
    beyond = [k for k in cfg.eval.ks if k > dataset.num_items]
    if beyond:
        raise ConfigError(f"eval.ks={cfg.eval.ks}: {', '.join(map(str, beyond))} {'exceeds' if len(beyond) == 1 else 'exceed'} "
                          f"the {dataset.num_items} items of {dataset.root} (Recall@{beyond[0]} would be 1 for every user); "
                          f"give cut-offs of at most {dataset.num_items}")
    if training and cfg.eval.validate and cfg.eval.monitor not in metric_names(cfg.eval.ks):  # evaluation monitors nothing
        raise ConfigError(f"eval.monitor: {cfg.eval.monitor!r} is not among the metrics of eval.ks={cfg.eval.ks}")
    return dataset


def check_negatives_exist(dataset: PreparedDataset) -> None:
    """Every user needs an item outside its train positives, or the sampler has no negative to give it."""
    full = users_without_negatives(dataset.interactions("train"), dataset.num_items)
    if len(full):
        shown = ", ".join(map(str, full[:5])) + (f" and {len(full) - 5} more" if len(full) > 5 else "")
        raise DatasetError(
            f"{dataset.root}: {len(full)} user(s) have every one of the {dataset.num_items} items among their train "
            f"positives (contiguous ids {shown}; raw ids in {dataset.root / layout.id_map('user')}), so no negative can be "
            "drawn for them; drop them from the source and prepare again, or set loader.reject_train_positives=false"
        )


@contextmanager
def dataset_in_use(cfg: TrainConfig) -> Iterator[None]:
    """Held for a job's life by each of its ranks: the dataset's arrays and shards are read by path again every epoch,
    so spark_jobs.prepare with overwrite=true refuses to replace the dataset meanwhile (a run would go on, unwarned,
    with another split, or fail on other shapes)."""
    root = resolve_path(cfg.data.path) if cfg.data.path else None
    # Missing: open_dataset says what is wrong. Unreadable as a listing (mode 711): its files still open by name.
    if root is None or not root.is_dir() or not os.access(root, os.R_OK):
        yield
        return
    with reading_lock(root):
        yield
