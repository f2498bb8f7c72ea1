"""Evaluate a checkpoint of a finished (or running) training run, at any world size.

    torchrun --nproc_per_node=N launch/evaluate.py RUN_DIR [--checkpoint best|latest|PATH] [--split val,test] [key=value ...]
    python launch/evaluate.py RUN_DIR ...           (one process)

The run's resolved config (RUN_DIR/config.yaml) rebuilds the model; overrides may change anything but
the model (model.*, align.*), e.g. `data.path=DIR` for a dataset that moved or `eval.ks=[10,20,50]`. The tables are
resharded to this world size (torch.distributed.checkpoint), the dense module is read from DeepSpeed's
checkpoint, and the split is ranked exactly as at the end of training. Prints a metric table; rank 0
writes RUN_DIR/eval-<checkpoint>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from darec_dist.config import ConfigError, load_config
from darec_dist.data.dataset import DatasetError
from darec_dist.distributed.collectives import decided_by_rank0
from darec_dist.distributed.env import DistEnv, distributed, exit_without_finalisation, first_to_report, seed_everything
from darec_dist.files import reading_lock, write_text_atomic
from darec_dist.train import checkpoint, report
from darec_dist.train.config import TrainConfig
from darec_dist.train.evaluate import evaluate
from darec_dist.train.run_dataset import dataset_in_use, open_dataset
from darec_dist.train.trainer import Trainer

SPLITS = ("val", "test")
# Config sections that decide the shapes and meaning of what a checkpoint holds.
MODEL_SECTIONS = ("model", "align")


def checkpoint_path(run_dir: Path, which: str, digest: bool = True) -> Path:
    """The checkpoint `which` names (best, latest, one of the run's by name, or a path), refused where it is none of the
    run's; digest=False: `latest` by its completion marker only (a cheap check before the model is built)."""
    if which == "latest":
        found = checkpoint.latest(run_dir) if digest else next(
            (p for p in reversed(checkpoint.step_checkpoints(run_dir)) if (p / checkpoint.COMPLETE).exists()), None)
        if found is None:
            raise ConfigError(f"{run_dir}: no complete step checkpoint under {checkpoint.CHECKPOINTS}/")
        return found
    path = run_dir / checkpoint.CHECKPOINTS / (checkpoint.BEST if which == "best" else which)  # a name: one of the run's
    if which != "best" and not path.is_dir():
        path = Path(which)
    checkpoint.check_complete(path)
    if not checkpoint.belongs_to(path, run_dir):  # its scores would be written into this run as its own
        raise ConfigError(f"{path}: not a checkpoint of {run_dir}; evaluate it with the run it belongs to "
                          f"(launch/evaluate.py {path.resolve().parent.parent} --checkpoint {path})")
    return path


def load_run_model(
    cfg: TrainConfig, env: DistEnv, run_dir: Path, which: str, verify_checksums: bool = True, splits: tuple[str, ...] = ()
) -> tuple[Trainer, dict, Path]:
    """Every rank calls it: the run's model with the weights of its checkpoint `which` (checkpoint_path's; rank 0
    chooses for every rank), refused when written for another model or dataset shape, or when the dataset has none of
    `splits` to rank; resharded to this world size and ready to rank. Returns it, the checkpoint's loop state and path."""
    # Only ranking happens here: the batch size, which training splits over its ranks, need not suit this world size.
    batch = env.world_size * -(-cfg.loader.batch_size // env.world_size)
    cfg = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, batch_size=batch))
    dataset = open_dataset(cfg, env.world_size, verify_checksums, training=False)
    empty = [split for split in splits if dataset.manifest["splits"][split] == 0]
    if empty:
        raise DatasetError(f"{dataset.root}: no {' or '.join(empty)} interactions to rank")
    trainer = Trainer(cfg, env, dataset, ranking_only=True)
    with ExitStack() as held:  # from the choice to the end of the load: a running run's pruning passes it by
        def choose() -> Path:
            path = checkpoint_path(run_dir, which)
            held.enter_context(reading_lock(path))
            checkpoint.check_complete(path)  # pruned between the choice and the lock: said so, not a missing file
            return path

        # Rank 0 chooses for all: with `latest` on a running run, ranks choosing alone could load different steps.
        source = decided_by_rank0(choose)
        if not env.is_main:
            held.enter_context(reading_lock(source))
        checkpoint.check_identity(source, checkpoint.identity(cfg, dataset))
        # Weights only: the optimizer state of a ZeRO run is partitioned by the world size that wrote it.
        state = checkpoint.load_weights(trainer, source)
    trainer.set_train(False)
    return trainer, state, source


def run_config(run_dir: Path, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """The run's resolved config with `overrides` of anything but the model (e.g. data.path=DIR for a dataset that
    moved): the checkpoint holds the run's model."""
    config = run_dir / "config.yaml"
    if not config.exists():
        raise ConfigError(f"{run_dir}: no config.yaml; not a run directory written by launch/train.py")
    shaping = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in MODEL_SECTIONS]
    if shaping:
        raise ConfigError(f"{shaping}: these keys shape the model the checkpoint holds; the run's are kept ({config})")
    return load_config(TrainConfig, config, [*overrides, f"run_dir={json.dumps(str(run_dir))}"])  # YAML reads " #" as a comment


def evaluate_run(run_dir: Path, which: str = "best", splits: tuple[str, ...] = ("test",), overrides: tuple[str, ...] = ()) -> dict:
    """Every rank calls it; returns {"checkpoint", "epochs_trained", "world_size", split: metrics, ...}."""
    cfg = run_config(run_dir, overrides)
    checkpoint_path(run_dir, which, digest=False)  # a missing checkpoint named before the dataset and the model
    with distributed(cfg.device) as env, dataset_in_use(cfg):
        seed_everything(cfg.seed, env.rank)
        trainer, state, source = load_run_model(cfg, env, run_dir, which, splits=splits)
        results = {"checkpoint": str(source), "epochs_trained": state["epoch"], "world_size": env.world_size}
        for split in splits:
            results[split] = evaluate(trainer, split, env.world_size, env.rank)
        if env.is_main:
            print(f"{source} ({state['epoch']} epoch{'' if state['epoch'] == 1 else 's'} trained)\n\n" + report.metrics_table({s: results[s] for s in splits}, cfg.eval.ks), flush=True)
            record = run_dir / f"eval-{source.name}.json"
            try:
                write_text_atomic(record, json.dumps(results, indent=2))
            except OSError as err:  # a read-only run (an archive, another user's): the table above is the result
                print(f"warning: could not write {record}: {err.strerror or err}", file=sys.stderr, flush=True)
            # Checked after the write: the trainer drops the file after it replaces `best`, so one of the two removes it.
            if source.name == checkpoint.BEST and not still_in_place(source, state):
                record.unlink(missing_ok=True)
                print(f"warning: the run replaced its best model while this evaluated it; {record} is not kept "
                      "(the table above is of the model it replaced)", file=sys.stderr, flush=True)
    return results


def still_in_place(source: Path, state: dict) -> bool:
    """Whether the checkpoint at `source` is still the one loaded: a running run replaces its `best`."""
    try:
        return checkpoint.loop_state(source)["global_step"] == state["global_step"]
    except (ConfigError, OSError):  # between the two renames of the swap
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run directory written by launch/train.py")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the run's config, e.g. data.path=DIR")
    parser.add_argument("--checkpoint", default="best", help="'best' (default), 'latest' (newest step checkpoint) or one of the run's checkpoints by name (step-000000020) or path")
    parser.add_argument("--split", default="test", help="splits to rank, comma-separated: test (default), val or val,test")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # overrides may follow the options
    splits = tuple(args.split.split(","))
    if not splits or not set(splits) <= set(SPLITS):
        parser.error(f"--split {args.split!r}: expected a comma-separated list of {', '.join(SPLITS)}")
    try:
        evaluate_run(args.run_dir, args.checkpoint, splits, tuple(args.overrides))
    except (ConfigError, DatasetError) as err:
        if first_to_report(str(err)):  # every rank meets it alike: printed once, not per rank
            print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. `--checkpoint latest` of a running run, pruned by it before it could be read
        message = f"error: {err.filename}: {err.strerror}" if err.filename else f"error: {err}"
        if first_to_report(message):
            print(message, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # on every rank, wherever it is: one line, not a traceback per rank
        if os.environ.get("RANK", "0") == "0":
            print("interrupted (its eval-*.json is written whole or not at all)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    exit_without_finalisation(main())
