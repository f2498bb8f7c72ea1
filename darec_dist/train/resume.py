"""Which checkpoint a training job continues, and whether it may: a resume continues only the run that wrote the
checkpoint, as it was trained (what may change: RESUME_MAY_CHANGE), in its own run_dir, from its newest complete
checkpoint; a fresh run never starts among another run's checkpoints or results."""

from __future__ import annotations

from pathlib import Path

from darec_dist.config import ConfigError, differences, listed, to_dict
from darec_dist.train import checkpoint, report
from darec_dist.train.config import LoopConfig, TrainConfig, what_a_run_computes
from darec_dist.train.trainer import Trainer


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
    if (run_dir / report.DIVERGED).is_file():
        # Deterministically again: torchrun's restarts (--max-restarts) would each retrain into it.
        raise ConfigError(f"{run_dir}: the run diverged ({(run_dir / report.DIVERGED).read_text().strip()}), and a resume "
                          f"would train into it again; start another run_dir (or delete {report.DIVERGED} to try anyway)")
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


def check_best_reachable(run_dir: Path, source: Path, loop: LoopConfig) -> None:
    """The best model on disk must come from an epoch the run trains: after a resume from an older checkpoint it
    may be a later epoch's, which the run writes again (same settings, same model) only if it gets that far: not
    past train.epochs, and not where a lower patience or min_epochs than the run's stops it earlier (it would then
    test a model it never chose)."""
    best = run_dir / checkpoint.CHECKPOINTS / checkpoint.BEST
    saved = checkpoint.loop_state(source)
    resumed_at, epochs = saved["epoch"], loop.epochs
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
    trained_with = saved["config"]["train"]  # (check_resumable has refused a checkpoint without its config)
    lowered = [f"train.{key}={getattr(loop, key)} (was {trained_with[key]})" for key in ("patience", "min_epochs")
               if getattr(loop, key) < trained_with[key]]
    if best_epoch >= resumed_at and lowered:
        raise ConfigError(f"{run_dir}: its best model is epoch {best_epoch}'s, from beyond the checkpoint resumed (epoch "
                          f"{resumed_at}), which the run saves again only if it gets that far; with {' and '.join(lowered)} "
                          "it may stop before, and would test a model it did not choose. Resume with the run's stopping "
                          "settings, or test that model as it is (launch/evaluate.py RUN_DIR)")
