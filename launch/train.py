"""Train a recommender (optionally aligned with LLM embeddings) on a prepared dataset.

    torchrun --nproc_per_node=N launch/train.py configs/train/default.yaml data.path=DIR [key=value ...] [--resume auto|PATH]
    python launch/train.py ...           (one process)

The story of a run: open and check the dataset, build the sharded tables and the
DeepSpeed engine, then per epoch stream the rank's batches through train_step,
evaluate on validation, keep the best model and a resumable checkpoint, and stop
early when validation stops improving; finally test the best model once.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from darec_dist.config import ConfigError, differences, listed, load_config, to_dict
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.data.loader import check_every_epoch_has_a_batch, check_world_fits, epoch_batches, steps_per_epoch, uneven_shards_warning
from darec_dist.distributed import collectives
from darec_dist.distributed.collectives import all_reduce_sum, decided_by_rank0, max_over_ranks
from darec_dist.distributed.env import DistEnv, distributed, exit_without_finalisation, first_to_report, seed_everything
from darec_dist.files import reading_lock
from darec_dist.train import checkpoint, memory, report
from darec_dist.train.config import TrainConfig, resolve_path, what_a_run_computes
from darec_dist.train.evaluate import evaluate, gathered_blocks
from darec_dist.train.lock import exclusive_run_dir
from darec_dist.train.metrics import metric_names
from darec_dist.train.trainer import Trainer, dense_training_settings


def fresh_state(world_size: int, identity: dict, settings: dict) -> dict:
    # wall_seconds: the run's time up to the end of its last finished epoch, summed over every attempt (resumes).
    return {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_loss_sums": {}, "best": None, "bad_evals": 0,
        "epoch_seconds": [], "epoch_world_sizes": [], "wall_seconds": 0.0, "world_size": world_size, "identity": identity,
        "stopped": False, **settings,
    }


def resume_settings(cfg: TrainConfig, tables: dict, zero_stage: int, dense: dict | None) -> dict:
    """What a checkpoint records so that a resume can be checked against it (check_resumable):
    config: everything the run computes with (what_a_run_computes), of which a resume may change only
    RESUME_MAY_CHANGE (so not its seed, model selection, loader batches or table optimizer), with the DeepSpeed
    settings of its dense part, if any, as dense.deepspeed (dense: dense_training_settings);
    tables: the trainable tables' optimizer and sharding (the shape of their optimizer state);
    zero_stage: the DeepSpeed ZeRO stage of the dense part (0 without one), whose layout its optimizer state has
    (the config names the DeepSpeed JSON, not what it holds)."""
    config = what_a_run_computes(to_dict(cfg))
    if dense is not None:
        config["dense"]["deepspeed"] = dense
    return {"config": config, "tables": tables, "zero_stage": zero_stage}


# What a resume may change (as differences() spells keys): how long the run goes on, where its data lies, how its
# work is laid out, what it writes; not what it learns, or one run would hold epochs of two configs under the
# last one's name (config.yaml, and an experiment's reuse of the run, read that name).
RUN_LENGTH = ("train.epochs:", "train.patience:", "train.min_epochs:")
RESUME_MAY_CHANGE = (*RUN_LENGTH, "loader.num_workers:", "data.", "device:",
                     "sparse.sharding:", "sparse.llm_sharding:", "eval.user_chunk:", "eval.node_chunk:", "eval.item_block:",
                     "output.")


def table_layout(cfg: TrainConfig, trainer: Trainer) -> dict:
    """What the shape of the trainable tables' optimizer state depends on, beyond the world size: the optimizer,
    each table's sharding, and its kernel (fbgemm's fused kernel keeps the optimizer state in its own form, the
    dense kernel in torch's optimizer), and how many shards split a column-wise table's columns (row-wise Adagrad
    keeps a state per column shard)."""
    plans = trainer.tables.plan.items()
    return {"optimizer": cfg.sparse.optimizer,
            "sharding": {table: plan[0] for table, plan in plans},
            "kernel": {table: plan[1] for table, plan in plans},
            "column_shards": {table: len(plan[2]) for table, plan in plans if "column" in plan[0]}}


def seconds_per_epoch(state: dict, world_size: int) -> float | None:
    """Mean time of the epochs run at this world size (a run resumed at another size ran some at that one);
    None when there are none."""
    seconds = state["epoch_seconds"]
    sizes = state["epoch_world_sizes"]
    timed = [s for s, size in zip(seconds, sizes) if size == world_size]
    return sum(timed) / len(timed) if timed else None


def check_fresh(run_dir: Path) -> None:
    """A new run must not start among another run's checkpoints: pruning keeps the highest step numbers, so
    the old ones would outlive the new run's, and a later --resume auto would pick them up. Nor beside its results
    (its checkpoints deleted): until the new run wrote its own, they would pass for its (an experiment reused them)."""
    root = run_dir / checkpoint.CHECKPOINTS
    found = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    if found:
        how = ("continue it with --resume auto" if checkpoint.step_checkpoints(run_dir) else
               f"it has no step checkpoint to continue, so delete {root} to start over there")
        raise ConfigError(f"{run_dir}: holds checkpoints of an earlier run ({', '.join(found[:3])}); {how}, or give this run "
                          "another run_dir (or delete that one)")
    check_no_results(run_dir)


def check_no_results(run_dir: Path) -> None:
    """A run starting in run_dir must not find an earlier run's results there (see check_fresh)."""
    outputs = [name for name in (*report.RESULT_FILES, "export") if (run_dir / name).exists()]
    if outputs:
        raise ConfigError(f"{run_dir}: holds the results of an earlier run ({', '.join(outputs)}); give this run another "
                          "run_dir, or delete that one")


def check_own_checkpoint(source: Path, run_dir: Path) -> None:
    """A resume continues the run whose checkpoint it is: that run_dir holds its best model and its metrics."""
    if not checkpoint.belongs_to(source, run_dir):
        owner = source.resolve().parent.parent
        raise ConfigError(
            f"{source}: not a checkpoint of run_dir {run_dir} (it belongs to {owner}); resume a run in its own run_dir "
            f"(run_dir={owner}), or copy that run's directory and resume the copy"
        )


def resume_source(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint this job continues (None: it starts the run), or why it may not. Rank 0 decides, for every
    rank (decided_by_rank0)."""
    if resume is None:
        check_fresh(run_dir)
        return None
    # A job killed while writing a checkpoint (or swapping in a new best) left parts: first put them right.
    checkpoint.recover_interrupted_writes(run_dir)
    if resume == "auto":
        source = checkpoint.latest(run_dir)
        if source is None and checkpoint.step_checkpoints(run_dir):
            # Starting over would replace the run's metrics and best model with a new run's.
            names = ", ".join(p.name for p in checkpoint.step_checkpoints(run_dir)[-3:])
            raise ConfigError(f"{run_dir}: --resume auto found no complete, undamaged checkpoint to continue ({names}); "
                              "resume one by path to see why it is refused, or delete the run_dir to start over")
        if source is None:  # a run's first attempt (torchrun's restarts repeat the command)
            check_no_results(run_dir)
    else:
        source = Path(resume)
        if not source.is_dir():
            # A restart repeating `--resume PATH` after the job's own pruning (checkpoint.keep) removed PATH lands here.
            raise ConfigError(f"--resume {resume}: no such checkpoint directory (--resume takes auto or a checkpoint directory; "
                              "one pruned by its run, checkpoint.keep, is gone: continue the run with --resume auto)")
        checkpoint.check_complete(source)  # before whose run it is: a run_dir given here is no checkpoint
        check_own_checkpoint(source, run_dir)
        # A roll-back: the newer checkpoints would be taken for its own later steps (by --resume auto, by pruning).
        newer = [p for p in checkpoint.newer_than(run_dir, checkpoint.loop_state(source)["global_step"])
                 if (p / checkpoint.COMPLETE).exists() and checkpoint.damage(p, contents=True) is None]
        if newer:
            shown = ", ".join(p.name for p in newer[:3]) + (f" and {len(newer) - 3} more" if len(newer) > 3 else "")
            raise ConfigError(f"--resume {resume}: the run has {len(newer)} newer checkpoint(s) ({shown}), which a resume "
                              "from this one would be mixed with; delete every step checkpoint after it to roll the run back, "
                              "or continue the newest with --resume auto (also the one to give torchrun --max-restarts, "
                              "whose restarts repeat the command after the job has written newer checkpoints)")
    if source is not None:
        report.read_metrics(run_dir)  # damaged records refused before any setup
        if checkpoint.loop_state(source).get("best") is not None:  # the model the run tests at its end
            try:
                checkpoint.check_complete(run_dir / checkpoint.CHECKPOINTS / checkpoint.BEST, contents=True)
            except ConfigError as err:
                raise ConfigError(f"the run's best model, which it tests when done, cannot be read: {err}. Evaluate a step "
                                  "checkpoint instead (launch/evaluate.py RUN_DIR --checkpoint latest), or run again in "
                                  "another run_dir") from None
    return source


def with_defaults(saved: dict, current: dict) -> dict:
    """`saved`, with the keys it lacks taken from `current` (nested)."""
    filled = {key: with_defaults(saved[key], value) if isinstance(value, dict) and isinstance(saved.get(key), dict)
              else saved.get(key, value) for key, value in current.items()}
    return filled | {key: value for key, value in saved.items() if key not in current}


def check_resumable(source: Path, world_size: int, settings: dict) -> None:
    """A checkpoint resumes only the run it was written by: what that run computes with may change only as
    RESUME_MAY_CHANGE allows (settings: resume_settings), its ZeRO stage not at all; inside an epoch only with its
    readers, and at another world size only at an epoch's end and without state partitioned by world size.

    Inside an epoch its step count is a position in each rank's stream of shards, which another world size or
    reader count splits differently (the epoch would skip or repeat interactions); DeepSpeed's ZeRO stages 1 and 2
    partition the optimizer state by world size and cannot load it at another, and so does row-wise Adagrad
    on tables split into several column shards (each keeps its own per-row state).
    """
    saved = checkpoint.loop_state(source)
    missing = sorted({*fresh_state(world_size, {}, settings), checkpoint.TABLE_STEPS} - set(saved))
    if missing:
        raise ConfigError(f"{source}: written by an earlier darec-dist (its {checkpoint.STATE} lacks {', '.join(missing)}), "
                          "so a resume cannot be checked against it; start another run_dir (launch/evaluate.py reads its weights)")
    written_by, tables, saved_tables, zero_stage = saved["world_size"], settings["tables"], saved["tables"], saved["zero_stage"]
    if zero_stage != settings["zero_stage"]:
        # DeepSpeed saves each stage's optimizer state in its own layout: another stage finds no file, or None, to load.
        raise ConfigError(
            f"{source}: its dense optimizer state was saved by DeepSpeed's ZeRO stage {zero_stage}; resume it with that "
            f"stage (dense.deepspeed_config=configs/deepspeed/zero{zero_stage}.json) or start another run_dir"
        )
    # A key added to the config since the checkpoint was written is not a change of this run's.
    changed = [d for d in differences(with_defaults(checkpoint.with_implied(saved["config"]), settings["config"]), settings["config"])
               if not d.startswith(RESUME_MAY_CHANGE)]
    if changed:
        where = "config.yaml" + (" and deepspeed.json" if any(d.startswith("dense.deepspeed.") for d in changed) else "")
        raise ConfigError(
            f"{source}: a resume continues its run as it was trained, and it was trained with other settings "
            f"(checkpoint -> now): {listed(changed)}; resume with the run's settings (its {where}), or "
            "start another run_dir. A resume may change train.epochs, train.patience, train.min_epochs, "
            "loader.num_workers, data.*, device and the sharding (keeping the tables' kernels), eval's chunk sizes, "
            "checkpoint.* and output.*"
        )
    # Written before 2026-12-06 without kernels: a mismatch is then met by the load itself (its error names the keys).
    kernels = saved_tables.get("kernel", tables["kernel"])
    if tables["optimizer"] != "sgd" and kernels != tables["kernel"]:
        raise ConfigError(
            f"{source}: its tables' optimizer state was kept by the kernels {kernels} (fbgemm's fused kernel and the "
            f"dense kernel's torch optimizer keep it in different forms), and this run's are {tables['kernel']}; "
            "resume with the device and sparse.sharding that wrote it (on CPU, sparse.optimizer=adam runs the dense kernel), "
            "or start another run_dir"
        )
    def per_column_shard(layout: dict) -> list[str]:
        """The tables whose row-wise Adagrad state is kept per column shard, several per row. One column shard (a
        column-wise table on one process) keeps one per row, as the other shardings do; a checkpoint written before
        the count was recorded is taken to have several."""
        shards = layout.get("column_shards", {})
        return sorted(t for t, kind in layout["sharding"].items()
                      if kind == "grid_shard" or ("column" in kind and (t not in shards or shards[t] > 1)))

    if tables["optimizer"] == "rowwise_adagrad" and (written_by, saved_tables["sharding"]) != (world_size, tables["sharding"]):
        if per_column_shard(saved_tables):
            raise ConfigError(
                f"{source}: its column-wise tables ({', '.join(per_column_shard(saved_tables))}) keep row-wise "
                f"Adagrad state per column shard, which fits only the {written_by} processes and the sharding "
                f"{saved_tables['sharding']} that wrote it; resume with those"
            )
        if per_column_shard(tables):  # the other way round: one state per row, where the shards want one each
            raise ConfigError(
                f"{source}: this run would shard {', '.join(per_column_shard(tables))} column-wise, where row-wise "
                f"Adagrad keeps a state per column shard, and the checkpoint holds one per row (sharding "
                f"{saved_tables['sharding']}, {written_by} processes); resume with that sharding, or start another run_dir"
            )
    # The loader's readers split each rank's shards, so a position inside an epoch counts their batches (the config
    # holds num_workers as read: 0 as 1; it may change at an epoch's end).
    readers = saved["config"]["loader"]["num_workers"]
    if saved["step_in_epoch"] and readers != settings["config"]["loader"]["num_workers"]:
        raise ConfigError(
            f"{source}: written inside epoch {saved['epoch']} (step {saved['step_in_epoch']}), whose position counts batches "
            f"of {readers} reader(s); resume it with loader.num_workers={readers}, or from a checkpoint taken at an epoch's end"
        )
    if written_by == world_size:
        return
    if saved["step_in_epoch"]:
        raise ConfigError(
            f"{source}: written by {written_by} processes inside epoch {saved['epoch']} (step {saved['step_in_epoch']}); "
            f"resume it with {written_by} processes, or resume from a checkpoint taken at an epoch's end "
            f"(checkpoint.every_epochs) with {world_size}"
        )
    if zero_stage > 0:
        raise ConfigError(
            f"{source}: written by {written_by} processes with ZeRO stage {zero_stage}, whose optimizer state is "
            f"partitioned by world size; resume it with {written_by} processes (launch/evaluate.py reads it at any)"
        )


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


def epoch_steps(trainer: Trainer, cfg: TrainConfig, env: DistEnv, epoch: int) -> int:
    """Steps every rank takes in `epoch` (train.max_steps_per_epoch caps them)."""
    steps = steps_per_epoch(trainer.dataset, cfg.loader, cfg.seed, epoch, env.world_size)
    return steps if cfg.train.max_steps_per_epoch is None else min(steps, cfg.train.max_steps_per_epoch)


def train_epoch(trainer: Trainer, cfg: TrainConfig, env: DistEnv, state: dict, run_dir: Path) -> dict[str, float]:
    """One epoch (or its rest, after a resume); returns the mean losses over all ranks and steps."""
    epoch = state["epoch"]
    steps = epoch_steps(trainer, cfg, env, epoch)
    # A checkpoint holds the sums over all ranks of the epoch's earlier steps: rank 0 carries them on.
    carried = state["epoch_loss_sums"] if env.is_main else {}
    sums = {k: torch.tensor(v, dtype=torch.float64) for k, v in carried.items()}
    trainer.set_train(True)
    bar = tqdm(total=steps, initial=state["step_in_epoch"], desc=f"epoch {epoch}", disable=not (env.is_main and cfg.train.progress_bar), leave=False)
    # Closed on leaving, by an exception too: the epoch's loader workers end with it, not at garbage collection.
    with closing(epoch_batches(trainer.dataset, cfg.loader, trainer.features, cfg.seed, epoch, env.world_size,
                               skip=state["step_in_epoch"])) as batches:
        for batch in batches:
            if state["step_in_epoch"] >= steps:
                break
            losses = trainer.train_step(batch)
            # A non-finite loss stops every rank together, before a checkpoint keeps the weights it made: told to all by
            # the next step's lookup (trainer.nonfinite) or by the sums below. A rank stopping alone left the others in a collective.
            if trainer.nonfinite:
                raise diverged(epoch, state)
            trainer.nonfinite = not torch.isfinite(losses["total"]).item()
            for name, value in losses.items():
                sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64)) + value.double().cpu()
            state["step_in_epoch"] += 1
            state["global_step"] += 1
            if state["step_in_epoch"] % cfg.train.log_every == 0:
                bar.set_postfix(loss=f"{losses['total'].item():.4f}")
            bar.update(1)
            every = cfg.checkpoint.every_steps
            if every and state["global_step"] % every == 0 and state["step_in_epoch"] < steps:
                state["epoch_loss_sums"] = finite_sums(summed_over_ranks(sums, env), epoch, state)
                check_weights_finite(trainer, epoch, state)
                checkpoint.save(trainer, run_dir, checkpoint.step_name(state["global_step"]), state, keep=cfg.checkpoint.keep)
    bar.close()
    totals = finite_sums(summed_over_ranks(sums, env), epoch, state)
    check_weights_finite(trainer, epoch, state)  # the last update, which no loss has seen: before it is validated or saved
    return {name: total / (steps * env.world_size) for name, total in totals.items()}


def check_best_reachable(run_dir: Path, source: Path, epochs: int) -> None:
    """The best model on disk must come from an epoch the run trains: after a resume from an older checkpoint it
    may be a later epoch's, which the run writes again (same settings, same model) only if it gets that far."""
    best = run_dir / checkpoint.CHECKPOINTS / checkpoint.BEST
    resumed_at = checkpoint.loop_state(source)["epoch"]
    if not (best / checkpoint.STATE).is_file():
        if resumed_at >= epochs:  # no epoch left to train, and none saved a model to test
            raise ConfigError(f"{run_dir}: has trained {resumed_at} epochs and has no best model yet (one is saved at a "
                              "better validation, or with eval.validate=false after epoch train.epochs), and "
                              f"train.epochs={epochs} asks for no more; resume with train.epochs greater than {resumed_at}")
        return
    best_epoch = checkpoint.loop_state(best)["best"]["epoch"]
    if best_epoch >= resumed_at and best_epoch >= epochs:
        raise ConfigError(f"{run_dir}: its best model is epoch {best_epoch}'s, from beyond the checkpoint resumed (epoch "
                          f"{resumed_at}), and this run ends after {epochs} epochs; resume with train.epochs greater than "
                          f"{best_epoch}, or test that model as it is (launch/evaluate.py RUN_DIR)")


def patience_spent(state: dict, cfg: TrainConfig) -> bool:
    """Early stopping's rule: enough evaluations without a better score, and at least train.min_epochs run."""
    return state["bad_evals"] >= cfg.train.patience and state["epoch"] >= cfg.train.min_epochs


class Diverged(RuntimeError):
    """The loss stopped being a finite number."""


def diverged(epoch: int, state: dict) -> Diverged:
    return Diverged(f"training diverged: a loss or a weight was not finite in epoch {epoch}, by step {state['step_in_epoch']}; lower "
                    "sparse.lr / dense.lr, or check the data")


def finite_sums(sums: dict[str, float], epoch: int, state: dict) -> dict[str, float]:
    """The losses' sums over all ranks, the same on every rank: one rank's non-finite loss stops every rank here."""
    if not all(math.isfinite(total) for total in sums.values()):
        raise diverged(epoch, state)
    return sums


def check_weights_finite(trainer: Trainer, epoch: int, state: dict) -> None:
    """Collective: stop every rank if any rank holds a weight that is not a finite number."""
    (bad,) = max_over_ranks(int(not trainer.weights_finite()))
    if bad:
        raise diverged(epoch, state)


def summed_over_ranks(sums: dict[str, torch.Tensor], env: DistEnv) -> dict[str, float]:
    """Each loss's sum over every rank's steps (a collective: every rank calls it)."""
    names = sorted(sums)
    totals = all_reduce_sum(torch.stack([sums[n] for n in names]).to(env.device)).cpu() if names else torch.zeros(0)
    return {name: totals[i].item() for i, name in enumerate(names)}


def save_best(trainer: Trainer, run_dir: Path, state: dict, env: DistEnv) -> None:
    checkpoint.save(trainer, run_dir, checkpoint.BEST, state)
    if env.is_main:  # launch/evaluate.py's reading of the best model this one replaces
        (run_dir / report.EVAL_BEST).unlink(missing_ok=True)


def test_best(trainer: Trainer, cfg: TrainConfig, env: DistEnv, run_dir: Path, state: dict) -> dict:
    # The epoch and validation scores are the best checkpoint's own: after a resume from an older checkpoint (the newer
    # ones damaged) its loop state may name an earlier best, which the later one replaced.
    best = checkpoint.load_weights(trainer, run_dir / checkpoint.CHECKPOINTS / checkpoint.BEST)["best"]  # no optimizer state
    trainer.set_train(False)
    test = evaluate(trainer, "test", env.world_size, env.rank)
    results = {
        "best_epoch": best["epoch"],
        "monitor": cfg.eval.monitor if cfg.eval.validate else None,
        "val": best["metrics"],
        "test": test,
        "epochs_run": state["epoch"],
        "seconds_per_epoch": seconds_per_epoch(state, env.world_size),
        "steps_per_epoch": epoch_steps(trainer, cfg, env, 0),
        "world_size": env.world_size,
        # Validation and test covered a seeded sample of this many users only (eval.max_users; null: every user).
        "sampled_users": cfg.eval.max_users if (cfg.eval.max_users or math.inf) < trainer.dataset.num_users else None,
        "backbone": cfg.model.backbone,
        "align": cfg.align.method,
        "dataset": str(trainer.dataset.root),
        "dataset_fingerprint": trainer.dataset.fingerprint,  # an experiment reuses the run only for this dataset
        "embedding_model": trainer.dataset.manifest["embedding"]["model"],
        "sharding_plan": {t: list(p[:2]) for tables in (trainer.tables, trainer.llm) if tables is not None for t, p in tables.plan.items()},
    }
    if cfg.output.export_embeddings:
        counts = {"user": trainer.dataset.num_users, "item": trainer.dataset.num_items}
        blocks = {kind: (rows, gathered_blocks(trainer, kind, env.world_size, env.rank, cfg.eval.item_block)) for kind, rows in counts.items()}
        report.export_vectors(run_dir, trainer.dataset, blocks, write=env.is_main)
    return results


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


def train(cfg: TrainConfig, resume: str | None = None) -> dict:
    """Run a whole training job in this process (one rank of torchrun, or alone); returns results.json's content."""
    run_started = time.perf_counter()
    run_dir = Path(cfg.run_dir).expanduser()
    with distributed(cfg.device) as env, exclusive_run_dir(run_dir, env.is_main), dataset_in_use(cfg):
        seed_everything(cfg.seed, env.rank)
        dataset = open_dataset(cfg, env.world_size)
        uneven = uneven_shards_warning(dataset, cfg.loader, cfg.seed, env.world_size)
        if uneven and env.is_main:
            print(f"warning: {uneven}", file=sys.stderr, flush=True)
        identity = checkpoint.identity(cfg, dataset)
        source = decided_by_rank0(lambda: resume_source(run_dir, resume))
        if source is not None:
            checkpoint.check_complete(source)  # seen by every rank too (nodes share the run_dir)
            checkpoint.check_identity(source, identity)
        trainer = Trainer(cfg, env, dataset)
        zero_stage = trainer.engine.zero_optimization_stage() if trainer.engine else 0
        dense = dense_training_settings(cfg) if trainer.engine else None
        settings = resume_settings(cfg, table_layout(cfg, trainer), zero_stage, dense)
        if source is not None:
            check_resumable(source, env.world_size, settings)
            check_best_reachable(run_dir, source, cfg.train.epochs)
        if env.is_main:  # after the model is built and a resume checked: a refused run leaves the run_dir as it was
            report.write_config(run_dir, cfg, dense)
        memory_mib = {"after_setup": memory.per_rank(memory.stage())}
        state = fresh_state(env.world_size, identity, settings)
        if source is not None:
            # What was checked above (equal, or a change a resume may make) is written on as it is now.
            state = checkpoint.load(trainer, source) | {"world_size": env.world_size, "identity": identity, **settings}
            stopped_before = state["stopped"]
            if stopped_before:  # judged again by this config: a larger train.patience or min_epochs trains on
                state["stopped"] = patience_spent(state, cfg)
            if env.is_main:
                print(f"resumed from {source} at epoch {state['epoch']}, step {state['step_in_epoch']}", flush=True)
                # Epochs after the checkpoint were run (and logged) by the attempt that died: they are run again.
                report.keep_metrics_before(run_dir, state["epoch"])
                if state["epoch"] < cfg.train.epochs and not state["stopped"]:
                    report.drop_results(run_dir)
                for stale in checkpoint.newer_than(run_dir, state["global_step"]):  # damaged or incomplete: written again
                    print(f"removing {stale}: newer than the checkpoint resumed, and damaged or incomplete", flush=True)
                    shutil.rmtree(stale, ignore_errors=True)
                if state["stopped"]:
                    print(f"the run stopped early at epoch {state['epoch'] - 1}: testing its best model", flush=True)
                elif stopped_before and state["epoch"] < cfg.train.epochs:
                    print(f"the run stopped early at epoch {state['epoch'] - 1} after {state['bad_evals']} evaluations without a "
                          f"better {cfg.eval.monitor}: training on under train.patience={cfg.train.patience}, "
                          f"train.min_epochs={cfg.train.min_epochs}", flush=True)
        elif env.is_main:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)

        earlier = state["wall_seconds"]

        while state["epoch"] < cfg.train.epochs and not state["stopped"]:
            started, whole = time.perf_counter(), state["step_in_epoch"] == 0
            losses = train_epoch(trainer, cfg, env, state, run_dir)
            seconds = time.perf_counter() - started
            if whole:  # the rest of an epoch resumed inside it would pass for a short epoch
                state["epoch_seconds"].append(seconds)
                state["epoch_world_sizes"].append(env.world_size)
            epoch = state["epoch"]
            if "tables" not in memory_mib:  # fixed once the first step has created every optimizer's state
                tables = sum(t.local_bytes() for t in (trainer.tables, trainer.llm) if t is not None) / memory.MIB
                memory_mib["tables"] = memory.per_rank(tables)
            memory_mib["after_train"] = memory.per_rank(memory.stage())
            if env.is_main:
                report.append_metrics(run_dir, {
                    "kind": "train", "epoch": epoch, "loss": losses.get("total", math.nan), "losses": losses,
                    "seconds": seconds, "whole_epoch": whole, "memory_mib": memory_mib,
                })
            state.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sums={}, wall_seconds=earlier + time.perf_counter() - run_started)
            stop = False
            if not cfg.eval.validate:
                if state["epoch"] == cfg.train.epochs:  # the final model is the one tested
                    state["best"] = {"epoch": epoch, "metrics": {}}
                    save_best(trainer, run_dir, state, env)
            elif (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                trainer.set_train(False)
                val = evaluate(trainer, "val", env.world_size, env.rank)
                after_eval = memory.per_rank(memory.stage())
                if env.is_main:
                    report.append_metrics(run_dir, {"kind": "val", "epoch": epoch, **val, "memory_mib": after_eval})
                    print(f"epoch {epoch}: loss {losses.get('total', math.nan):.4f}  val " + "  ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "users"), flush=True)
                if state["best"] is None or val[cfg.eval.monitor] > state["best"]["metrics"][cfg.eval.monitor]:
                    state["best"], state["bad_evals"] = {"epoch": epoch, "metrics": val}, 0
                    save_best(trainer, run_dir, state, env)
                else:
                    state["bad_evals"] += 1
                    stop = patience_spent(state, cfg)
                    state["stopped"] = stop  # saved below: a restart after an early stop tests, not trains on
            if stop or (epoch + 1) % cfg.checkpoint.every_epochs == 0 or state["epoch"] == cfg.train.epochs:
                checkpoint.save(trainer, run_dir, checkpoint.step_name(state["global_step"]), state, keep=cfg.checkpoint.keep)
            if stop:
                if env.is_main:
                    print(f"early stop: no better validation {cfg.eval.monitor} for {cfg.train.patience} evaluations", flush=True)
                break

        results = test_best(trainer, cfg, env, run_dir, state)
        results["wall_seconds"] = earlier + time.perf_counter() - run_started
        if env.is_main:
            if cfg.output.plot:
                report.plot_curves(run_dir, cfg.eval.monitor)
            table = report.write_results(run_dir, results, cfg.eval.ks)  # results.json last: it marks the run finished
            print(table, flush=True)
        return results


def parse_args(argv: list[str]) -> tuple[str, list[str], str | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/train/default.yaml")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. data.path=data/ml-100k train.epochs=5")
    parser.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint in run_dir) or a checkpoint directory")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    return args.config, args.overrides, args.resume


def main(argv: list[str] | None = None) -> int:
    config, overrides, resume = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(TrainConfig, config, overrides)
        train(cfg, resume)
    except (ConfigError, DatasetError) as err:
        if first_to_report(str(err)):  # every rank meets a bad config or dataset alike: printed once, not per rank
            print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        if first_to_report(str(err)):  # every rank stops on it at the same step
            print(f"error: {err}", file=sys.stderr)
        return 1
    except checkpoint.CheckpointWriteError as err:
        if first_to_report(f"checkpoint write failed: {err.staging}"):  # one line, not one per rank that failed it
            print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk or a run_dir made read-only: the file and the reason, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err} (rank {os.environ.get('RANK', 0)})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank, wherever it is (a collective's traceback says nothing)
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: the run's complete checkpoints are kept; the same command with --resume auto continues it",
                  file=sys.stderr)
        return 130  # 128 + SIGINT, as the shell reports it
    return 0


if __name__ == "__main__":
    exit_without_finalisation(main())
