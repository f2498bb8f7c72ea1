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
from contextlib import closing
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from tqdm import tqdm

from darec_dist.config import ConfigError, load_config
from darec_dist.data.dataset import DatasetError
from darec_dist.data.loader import epoch_batches, steps_per_epoch, uneven_shards_warning
from darec_dist.distributed.collectives import all_reduce_sum, decided_by_rank0, max_over_ranks
from darec_dist.distributed.env import DistEnv, distributed, exit_without_finalisation, first_to_report, seed_everything
from darec_dist.train import checkpoint, memory, report
from darec_dist.train.config import TrainConfig
from darec_dist.train.evaluate import evaluate, gathered_blocks
from darec_dist.train.lock import exclusive_run_dir
from darec_dist.train.resume import check_best_reachable, check_resumable, fresh_state, resume_settings, resume_source, table_layout
from darec_dist.train.run_dataset import dataset_in_use, open_dataset
from darec_dist.train.trainer import Trainer, dense_training_settings


def seconds_per_epoch(state: dict, world_size: int) -> float | None:
    """Mean time of the epochs run at this world size (a run resumed at another size ran some at that one);
    None when there are none."""
    seconds = state["epoch_seconds"]
    sizes = state["epoch_world_sizes"]
    timed = [s for s, size in zip(seconds, sizes) if size == world_size]
    return sum(timed) / len(timed) if timed else None


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
            check_best_reachable(run_dir, source, cfg.train)
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
            (run_dir / report.DIVERGED).unlink(missing_ok=True)  # an earlier attempt's, before its first checkpoint

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
        if os.environ.get("RANK", "0") == "0":  # a resume refuses the run from now on (resume_source)
            report.record_divergence(Path(cfg.run_dir).expanduser(), str(err))
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
