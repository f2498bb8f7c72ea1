"""What a run leaves in run_dir: metrics.jsonl, results.json/.md, curves.png, config.yaml (and deepspeed.json),
exported vectors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml

from darec_dist.config import ConfigError, to_dict
from darec_dist.data import layout
from darec_dist.files import atomic_path, fsync_tree, replace_dir, write_text_atomic
from darec_dist.train.metrics import metric_names

DENSE_SETTINGS = "deepspeed.json"
DIVERGED = "diverged.txt"


def record_divergence(run_dir: Path, message: str) -> None:
    """Why the run stopped as diverged: a resume of it is refused (it would train into the same non-finite step)."""
    write_text_atomic(run_dir / DIVERGED, message + "\n")


def write_config(run_dir: Path, cfg, dense: dict | None = None) -> None:
    """The run's resolved config, and the DeepSpeed settings its dense part (if any) trains by, which the config
    names by file only."""
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if dense is not None:
        write_text_atomic(run_dir / DENSE_SETTINGS, json.dumps(dense, indent=2))
    else:
        (run_dir / DENSE_SETTINGS).unlink(missing_ok=True)


def read_dense_settings(run_dir: Path) -> dict | None:
    """What write_config recorded of the DeepSpeed settings (None: no dense part, or a run written before 2026-12-06)."""
    path = run_dir / DENSE_SETTINGS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: unreadable ({err}); restore it, or delete that run") from None


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as stream:
        stream.write(json.dumps(record) + "\n")


def keep_metrics_before(run_dir: Path, epoch: int) -> None:
    """Drop the records of `epoch` and later (a resumed run logs them again)."""
    kept = [r for r in read_metrics(run_dir) if r["epoch"] < epoch]
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records; a last line cut short (a job killed, or a disk filled, while appending it) is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        elif position < len(lines) - 1:
            raise ConfigError(f"{path}:{number}: not a JSON record with an epoch; the file is damaged: repair or delete "
                              "that line (the run's curves then lack it), and run again")
    return records


def metrics_table(by_split: dict[str, dict], ks: list[int]) -> str:
    """One Markdown row per split that has metrics: Recall and NDCG at every k."""
    names = metric_names(ks)
    lines = ["| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for split, metrics in by_split.items():
        if metrics:
            lines.append(f"| {split} | " + " | ".join(f"{metrics[n]:.4f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict, ks: list[int]) -> str:
    chosen = "best epoch" if results["val"] else "final epoch (no validation)"
    timed = results["seconds_per_epoch"]
    pace = f"{timed:.2f} s/epoch" if timed is not None else "no whole epoch run at this world size"
    sampled = results["sampled_users"]
    scope = f"; validation and test over a seeded sample of {sampled} users (eval.max_users)" if sampled else ""
    header = f"{chosen} {results['best_epoch']}, {results['epochs_run']} epochs run, {pace}{scope}\n\n"
    return header + metrics_table({split: results[split] for split in ("val", "test")}, ks)


def write_results(run_dir: Path, results: dict, ks: list[int]) -> str:
    """results.md, then results.json: a run with a results.json is finished (launch/experiment.py skips it), so
    nothing of its output may come after it (an experiment stopped in between left a run without its curves)."""
    table = markdown_table(results, ks)
    write_text_atomic(run_dir / "results.md", table)
    write_text_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return table


# What a finished run leaves beside its checkpoints and metrics (eval-best.json: launch/evaluate.py's of its best model).
EVAL_BEST = "eval-best.json"
RESULT_FILES = ("results.json", "results.md", "curves.png", EVAL_BEST)


def drop_results(run_dir: Path) -> None:
    """Remove a finished run's results, curves and export before it trains on: a resume killed before its own would leave
    them beside newer checkpoints and metrics, and be taken for a finished run of what it had become."""
    for name in RESULT_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "export", ignore_errors=True)


def plot_curves(run_dir: Path, monitor: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    # Without validation (eval.validate=false) there is no curve to draw beside the loss: one panel, not an empty one.
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(10 if val else 5, 4), squeeze=False)
    left = axes[0][0]
    left.plot([r["epoch"] for r in train], [r["loss"] for r in train], marker=".")
    left.set(xlabel="epoch", ylabel="train loss (total)", title="loss")
    if val:
        right = axes[0][1]
        right.plot([r["epoch"] for r in val], [r[monitor] for r in val], marker=".")
        right.set(xlabel="epoch", ylabel=f"validation {monitor}", title=monitor)
    fig.tight_layout()
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


EXPORT_DATASET = "dataset.json"


def export_vectors(run_dir: Path, dataset, blocks: dict[str, tuple[int, Iterable]], write: bool) -> None:
    """Scoring vectors, row i = contiguous id i, with the id maps that give each row's original id, and the
    fingerprint of the dataset they came from (what a consumer checks its dataset against).

    blocks[kind] = (row count, (ids, vectors) blocks). Every rank consumes the blocks (they are
    collective); the writer fills a memory map block by block, so it never holds all rows.
    """
    out = run_dir / "export"
    staging = run_dir / ".export.tmp"
    if write:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    for kind, (rows, stream) in blocks.items():
        vectors = None
        for ids, block in stream:
            if not write:
                continue
            if vectors is None:
                vectors = np.lib.format.open_memmap(staging / f"{kind}_vectors.npy", "w+", np.float32, (rows, block.shape[1]))
            vectors[ids] = block.cpu().numpy()
        if write:
            vectors.flush()
            del vectors
            shutil.copyfile(dataset.root / layout.id_map(kind), staging / f"{kind}_ids.parquet")
    if write:
        (staging / EXPORT_DATASET).write_text(json.dumps({"fingerprint": dataset.fingerprint}))
        fsync_tree(staging)  # (before the rename: after a power loss it could otherwise name empty files)
        replace_dir(staging, out)
