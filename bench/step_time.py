"""Training-step time per aligner: the cost DaRec (or RLMRec) adds to the base step.

    python bench/step_time.py --data data/amazon-book --train-config configs/train/amazon-book.yaml \
        --methods none rlmrec-con rlmrec-gen darec --nproc 2 --steps 30

For each method this starts `torchrun --nproc_per_node=NPROC bench/step_time.py --worker ...`,
which builds the trainer, loads the batches of the first steps into memory (so the loader is not
timed), runs a few warm-up steps, then times `--steps` training steps and reports the slowest
rank's mean step time. Printed: ms per step, interactions per second, and the ratio to `none`.
With `--repeat R` the methods run in turn R times (none, darec, none, darec, ...), so that a
machine whose speed drifts affects them alike; printed are the median and the range over the
rounds, the ratio taken within each round.
With `--profile ROWS`, every rank runs the timed steps once more under torch.profiler (their
collectives need all ranks), and rank 0's operators that took the most self CPU time, summed over
the steps, are printed: where a method's extra time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cli import at_least  # noqa: E402  (needs the path above)
from bench.torchrun_worker import add_worker_arguments, run_worker, slowest_rank_seconds  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from darec_dist.config import load_config
    from darec_dist.data.dataset import PreparedDataset
    from darec_dist.data.loader import epoch_batches
    from darec_dist.distributed.env import distributed
    from darec_dist.train.config import TrainConfig, resolve_path
    from darec_dist.train.trainer import Trainer

    cfg = load_config(TrainConfig, args.train_config, [f"data.path={args.data}", f"align.method={args.method}", *args.override])
    with distributed(cfg.device) as env:
        dataset = PreparedDataset.open(resolve_path(cfg.data.path), verify_checksums=False)
        trainer = Trainer(cfg, env, dataset)
        batches = []
        for batch in epoch_batches(dataset, cfg.loader, trainer.features, cfg.seed, 0, env.world_size):
            batches.append(batch)
            if len(batches) == args.warmup + args.steps:
                break
        if len(batches) < args.warmup + args.steps:
            raise SystemExit(f"only {len(batches)} batches in an epoch; lower --steps")
        for batch in batches[: args.warmup]:
            trainer.train_step(batch)
        dist.barrier()
        started = time.perf_counter()
        for batch in batches[args.warmup :]:
            trainer.train_step(batch)
        elapsed = slowest_rank_seconds(started, env.device)
        result = {"method": args.method}
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
                for batch in batches[args.warmup :]:
                    trainer.train_step(batch)
            result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)
        if env.is_main:
            step = elapsed / args.steps
            result.update(ms_per_step=1000 * step, interactions_per_s=cfg.loader.batch_size / step)
            Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-config", default="configs/train/default.yaml")
    parser.add_argument("--methods", nargs="+", default=["none", "darec"])
    parser.add_argument("--steps", type=at_least(1), default=20)
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--repeat", type=at_least(1), default=1, help="rounds over the methods, alternating")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print this many top operators per method")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    repeated = sorted({m for m in args.methods if args.methods.count(m) > 1})
    if repeated:  # each would run (and be printed) twice, as if two methods
        parser.error(f"--methods: {', '.join(repeated)} given more than once")
    check_before_launch(args)
    # A profile is a second pass over the timed steps: only the last round takes it.
    rounds = [[run_method(args, method, profile=r == args.repeat - 1) for method in args.methods] for r in range(args.repeat)]
    print(f"{'method':<12} {'ms/step':>9} {'interactions/s':>15} {'x base':>7}" + ("   (median; range over rounds)" if args.repeat > 1 else ""))
    for i, method in enumerate(args.methods):
        runs = [round_[i] for round_ in rounds]
        ms = [r["ms_per_step"] for r in runs]
        base = [next((r["ms_per_step"] for r in round_ if r["method"] == "none"), None) for round_ in rounds]
        ratios = [m / b for m, b in zip(ms, base) if b]
        ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
        line = f"{method:<12} {statistics.median(ms):>9.1f} {statistics.median(r['interactions_per_s'] for r in runs):>15.0f} {ratio:>7}"
        if args.repeat > 1:
            line += f"   ms {min(ms):.1f} to {max(ms):.1f}" + (f", x base {min(ratios):.2f} to {max(ratios):.2f}" if ratios else "")
        print(line)
    for r in rounds[-1]:
        if "profile" in r:
            print(f"\n{r['method']}: rank 0, {args.steps} steps\n{r['profile']}")


def check_before_launch(args: argparse.Namespace) -> None:
    """Each method's config and the dataset, checked here: under torchrun the error comes after seconds of startup,
    once per rank, among the launcher's own lines."""
    from darec_dist.config import ConfigError, load_config
    from darec_dist.data.dataset import DatasetError, PreparedDataset
    from darec_dist.train.config import TrainConfig, resolve_path

    try:
        for method in args.methods:
            cfg = load_config(TrainConfig, args.train_config, [f"data.path={args.data}", f"align.method={method}", *args.override])
        PreparedDataset.open(resolve_path(cfg.data.path), verify_checksums=False)
    except (ConfigError, DatasetError) as err:
        raise SystemExit(f"error: {err}") from None


def run_method(args: argparse.Namespace, method: str, profile: bool) -> dict:
    """One torchrun of the worker for `method` (profiling it when `profile` and --profile are set); its result."""
    worker_args = [
        "--data", args.data, "--train-config", args.train_config, "--method", method, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--profile", str(args.profile if profile else 0), "--override", *args.override,
    ]
    return run_worker(__file__, args.nproc, worker_args, method)


if __name__ == "__main__":
    main()
