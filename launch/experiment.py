"""Run a grid of training runs (variants x seeds) under torchrun and tabulate their test metrics.

    python launch/experiment.py configs/experiments/ml-100k-lightgcn.yaml [key=value ...]

An experiment file names a training config, the variants (each a list of
overrides: methods, ablations, or one value of a swept key) and the seeds. Every
run goes to <out_dir>/<variant>/seed-<s> ('/' in a name becomes '_'; names that would share a directory are
refused, as are repeated seeds or sweep values); a run whose results.json exists is not
run again, so an interrupted experiment continues where it stopped (and one given a longer train.epochs, patience
or min_epochs trains its runs on from their last checkpoints, where that ends as a run trained so from the start;
any other change to a run's settings is refused). The summary
(table.md, summary.json, and for sweeps a plot) reports test metrics as mean and
standard deviation over seeds; each run chose its best epoch on validation only. out_dir also keeps the resolved
experiment (experiment.yaml); an out_dir holding another experiment, by name, is refused.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import yaml

from darec_dist.config import ConfigError, differences, listed, load_config, read_yaml, to_dict
from darec_dist.data.dataset import DatasetError
from darec_dist.files import atomic_path, write_text_atomic
from darec_dist.train import checkpoint, report
from darec_dist.train.config import REPO_ROOT, TrainConfig, resolve_path, what_a_run_computes
from darec_dist.train.resume import RUN_LENGTH
from darec_dist.train.run_dataset import open_dataset
from darec_dist.train.trainer import dense_training_settings


@dataclass
class SweepConfig:
    # Dotted training key swept over `values`, on top of `base` overrides; variants are named key=value.
    key: str = ""
    values: list[float] = field(default_factory=list)
    base: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    train_config: str = "configs/train/default.yaml"
    # Overrides every run shares (dataset, backbone, epochs ...).
    overrides: list[str] = field(default_factory=list)
    # name -> overrides; runs in this order. Ignored when `sweep.key` is set.
    variants: dict[str, list[str]] = field(default_factory=dict)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    nproc: int = 2
    out_dir: str = "runs/experiments/experiment"
    # Gains are reported relative to these variants when present.
    baselines: list[str] = field(default_factory=lambda: ["base", "rlmrec-con"])

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1 (processes per run), got {self.nproc}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        # A repeated seed would be the same run counted twice: its mean over "n seeds" and a std of 0 would be false.
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            raise ValueError(f"seeds: {repeated} given more than once in {self.seeds}; each seed is one run, give distinct seeds")
        if self.sweep.key and not self.sweep.values:
            raise ValueError(f"sweep.values: give at least one value of {self.sweep.key}")
        # The runner sets both per run, after every override: a variant's own would be dropped without a word, and
        # variants that differ only there would be one run under two names.
        keys = {where: [o.split("=", 1)[0].strip() for o in overrides] for where, overrides in
                {"overrides": self.overrides, "sweep.base": self.sweep.base,
                 **{f"variants.{name}": overrides for name, overrides in self.variants.items()}}.items()}
        for where, given in {**keys, "sweep.key": [self.sweep.key]}.items():
            owned = sorted({key for key in given if key in ("seed", "run_dir")})
            if owned:
                raise ValueError(f"{where} sets {', '.join(owned)}, which the experiment sets for each run (seeds, and "
                                 "out_dir/VARIANT/seed-N); remove it")
        # A repeated value names the same variant (one run directory): it was run once and plotted twice.
        repeated = sorted({value for value in self.sweep.values if self.sweep.values.count(value) > 1})
        if self.sweep.key and repeated:
            raise ValueError(f"sweep.values: {', '.join(map(_fmt, repeated))} given more than once in "
                             f"[{', '.join(map(_fmt, self.sweep.values))}]; each value is one variant, give distinct values")
        if not self.sweep.key:  # (variants are ignored under a sweep)
            check_variant_dirs(self.variants, self.out_dir)


def variant_dir(name: str) -> str:
    """The directory of a variant's runs under out_dir: a '/' in its name would nest directories."""
    return name.replace("/", "_")


def check_variant_dirs(variants: dict[str, list[str]], out_dir: str) -> None:
    """Each variant its own directory under out_dir: a variant sharing one would reuse the other's finished runs
    as its own (the runner skips a run whose results.json exists)."""
    owner: dict[str, str] = {}
    for name in variants:
        directory = variant_dir(name)
        if directory in ("", ".", ".."):
            raise ValueError(f"variants: {name!r} names no directory of its own under out_dir {out_dir} (its runs would "
                             "go to out_dir itself or above it); rename it")
        if directory in owner:
            raise ValueError(f"variants: {owner[directory]!r} and {name!r} both run in {out_dir}/{directory}/seed-N "
                             "('/' in a name becomes '_'), so one would reuse the other's runs; rename one of them")
        owner[directory] = name


def variants_of(cfg: ExperimentConfig) -> dict[str, list[str]]:
    if cfg.sweep.key:
        return {f"{cfg.sweep.key}={_fmt(v)}": cfg.sweep.base + [f"{cfg.sweep.key}={_fmt(v)}"] for v in cfg.sweep.values}
    if not cfg.variants:
        raise ConfigError("experiment: give `variants` or a `sweep.key` with `sweep.values`")
    return cfg.variants


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class Terminated(BaseException):  # (like KeyboardInterrupt: no `except Exception` swallows it)
    """SIGTERM reached the runner (timeout, systemd, Slurm's scancel): stop as on Ctrl-C."""


def raise_terminated(signum, frame) -> None:
    # Once: a second SIGTERM while the job stops would abandon it half-stopped (SIGKILL follows from whoever sent it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


# How long a job is given to stop on the Ctrl-C that reached it too, before it is sent SIGTERM (a SIGINT sent to the
# runner alone did not reach it).
CTRL_C_GRACE_S = 60.0


def stop_job(job: subprocess.Popen, forward: bool) -> None:
    """Stop a torchrun job and wait for it: its workers left running would keep writing into the run that a rerun
    resumes (and hold the GPUs). torchrun stops its workers on SIGTERM; Ctrl-C in a terminal reaches it directly."""
    if not forward:
        try:
            job.wait(timeout=CTRL_C_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            pass
    job.terminate()
    job.wait()


class RunFailed(RuntimeError):
    """A training run of the experiment exited with an error (its log names it)."""


# What summarise reads of every run's results.json.
RESULTS_KEYS = ("test", "val", "best_epoch", "seconds_per_epoch", "monitor", "wall_seconds", "embedding_model", "dataset_fingerprint")


def run_settings(cfg: ExperimentConfig, run_dir: Path, overrides: list[str], seed: int) -> list[str]:
    """The overrides of the training config that make one run of the grid."""
    # Quoted: an override's value is read as YAML, where " #" starts a comment and ": " a mapping.
    return [*cfg.overrides, *overrides, f"seed={seed}", f"run_dir={json.dumps(str(run_dir))}", "train.progress_bar=false"]


def read_results(run_dir: Path) -> dict:
    """A finished run's results.json, refused (naming it) when damaged: it would count as a run in the table."""
    results = run_dir / "results.json"
    try:
        record = json.loads(results.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{results}: not valid JSON ({err}); delete {run_dir} to run it again") from err
    missing = [key for key in RESULTS_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise ConfigError(f"{results}: missing key(s) {missing} of a finished run's results; delete {run_dir} to run it again")
    return record


def trains_on_alike(ran: dict, asked: dict, changed: list[str]) -> bool:
    """Whether a run given only these changes of how long it trains, trained on from its last checkpoint, ends as a
    run trained under them from the start does: none may shrink (a resume does not untrain, nor unstop an early stop
    a smaller patience would have made sooner), and more epochs only where the run's last epoch fell on an
    evaluation anyway (the last epoch is always evaluated: with train.eval_every > 1 that one would be extra)."""
    if not all(d.startswith(RUN_LENGTH) for d in changed):
        return False
    if any(asked[key] < ran[key] for key in ("epochs", "patience", "min_epochs")):
        return False
    return asked["epochs"] == ran["epochs"] or ran["epochs"] % ran["eval_every"] == 0


def check_run(cfg: ExperimentConfig, run_dir: Path, overrides: list[str], seed: int) -> dict | None:
    """Everything one run of the grid can be refused for before torchrun starts (a bad key, a finished or interrupted
    run under other settings, a damaged one, its dataset); returns a finished run's results.json, else None."""
    results = run_dir / "results.json"
    settings = run_settings(cfg, run_dir, overrides, seed)
    asked_cfg = load_config(TrainConfig, REPO_ROOT / cfg.train_config, settings)
    asked = to_dict(asked_cfg)
    finished = results.exists()
    has_checkpoints = bool(checkpoint.step_checkpoints(run_dir))
    # Once (it warns about each damaged checkpoint), and only where it is used: it reads the checkpoints to digest them.
    latest = checkpoint.latest(run_dir) if has_checkpoints and not finished else None
    if not finished and has_checkpoints and latest is None:
        raise ConfigError(f"{run_dir}: interrupted, and every checkpoint it holds is damaged (the trainer names why when "
                          "resuming one by path); delete that run to run it again")
    if latest is not None:
        # As for a finished run below: the trainer would resume it at another world size (at an epoch's end, ZeRO 0),
        # and its epochs, and the table, would then mix the two.
        saved = checkpoint.loop_state(latest)
        sizes = sorted({saved["world_size"], *saved.get("epoch_world_sizes", [])} - {cfg.nproc})
        if sizes:
            raise ConfigError(f"{run_dir}: interrupted after training with {', '.join(map(str, sizes))} processes, and the "
                              f"experiment asks for nproc={cfg.nproc}; a run would mix the two. Run the experiment with "
                              "that nproc to finish it, delete that run, or give the experiment another out_dir")
    if finished or has_checkpoints:
        # A finished run counts, and an interrupted one is resumed, only if it computed what is asked now (an
        # edited experiment must not reuse it, nor finish it under the new settings); one copied from another
        # experiment's out_dir counts (docs/results.md reuses runs so).
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: holds a run's {'results' if finished else 'checkpoints'} but no config.yaml to "
                              "compare with what is asked; restore it, or delete that run")
        ran = to_dict(load_config(TrainConfig, run_dir / "config.yaml"))
        changed = differences(what_a_run_computes(ran), what_a_run_computes(asked))
        ran_dense = report.read_dense_settings(run_dir)  # the file the config names may have been edited since
        if ran_dense is not None:  # also beside a longer run: its resume would be refused after earlier runs trained
            changed += differences({"deepspeed": ran_dense}, {"deepspeed": dense_training_settings(asked_cfg)}, "dense.")
        goes_on = bool(changed) and trains_on_alike(ran["train"], asked["train"], changed)
        if goes_on and finished:  # a finished run goes on from its last checkpoint
            latest = checkpoint.latest(run_dir)
        goes_on = goes_on and latest is not None
        if changed and not goes_on:
            raise ConfigError(f"{run_dir}: {'finished' if finished else 'interrupted, and would be resumed,'} with other "
                              f"settings (ran -> asked now): {listed(changed)}; delete that run or give the "
                              "experiment another out_dir")
        if goes_on:
            print(f"[experiment] {run_dir}: will train on from its last checkpoint under {listed(changed)}", flush=True)
        if finished:
            record = read_results(run_dir)
            check_trained_on(cfg, run_dir, record, asked_cfg)
            # A seed's run is the same to the bit only at the same world size (other batches per rank, other sums).
            if record.get("world_size", cfg.nproc) != cfg.nproc:
                raise ConfigError(f"{run_dir}: finished with {record['world_size']} processes, and the experiment asks for "
                                  f"nproc={cfg.nproc}; a table would mix the two. Delete that run, or give the "
                                  "experiment another out_dir")
            if not goes_on:
                return record
    # The dataset too (all but its checksums, which the job verifies): torchrun would restart a job that fails on it.
    open_dataset(asked_cfg, cfg.nproc, verify_checksums=False)
    return None


def check_trained_on(cfg: ExperimentConfig, run_dir: Path, record: dict, asked_cfg: TrainConfig) -> None:
    """A finished run counts only on the dataset it trained on: one re-prepared in place (the same data.path, so the
    same config) has another split, graph or embeddings, and the run's numbers are not its."""
    trained_on = record["dataset_fingerprint"]
    if not resolve_path(asked_cfg.data.path).is_dir():  # moved or deleted since: the finished runs still tabulate
        print(f"warning: {run_dir}: its dataset {asked_cfg.data.path} is gone, so which one it trained on is not checked",
              file=sys.stderr)
        return
    # (training=False: a finished run is not fed again, so only the dataset itself is checked, not this world size)
    dataset = open_dataset(asked_cfg, cfg.nproc, verify_checksums=False, training=False)
    if trained_on != dataset.fingerprint:
        raise ConfigError(f"{run_dir}: finished on a dataset with fingerprint {trained_on} ({run_dir / 'results.json'}), "
                          f"but {dataset.root} now has fingerprint {dataset.fingerprint} (re-prepared since?), so its "
                          "results are not this dataset's; delete that run or give the experiment another out_dir")


def run_one(cfg: ExperimentConfig, run_dir: Path, overrides: list[str], seed: int) -> dict:
    """One torchrun job (resuming the run where it stopped); returns its results.json."""
    settings = run_settings(cfg, run_dir, overrides, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}", "--max-restarts=1",
        str(REPO_ROOT / "launch" / "train.py"), cfg.train_config, *settings, "--resume", "auto",
    ]
    with open(run_dir / "log.txt", "a") as log:
        job = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            returncode = job.wait()
        except (KeyboardInterrupt, Terminated) as stop:
            stop_job(job, forward=isinstance(stop, Terminated))
            raise
    if returncode != 0:
        raise RunFailed(f"run failed ({returncode}): {' '.join(command)}; see {run_dir / 'log.txt'}")
    # Its wall_seconds is the trainer's, which also counts the time before a resume.
    return read_results(run_dir)


def summarise(runs: dict[str, list[dict]]) -> dict:
    summary = {}
    for name, records in runs.items():
        # One variant's seeds share a data.path: other fingerprints there mean runs from before a re-prepare in place
        # that check_trained_on could not see (the dataset gone since), and a mean over them compares nothing.
        prints = [r["dataset_fingerprint"] for r in records]
        if len(set(prints)) > 1:
            counts = ", ".join(f"{p!r} ({prints.count(p)} of {len(prints)} runs)" for p in dict.fromkeys(prints))
            raise ConfigError(f"variant {name}: its runs trained on different datasets (fingerprints {counts}); delete "
                              "the runs of the dataset it no longer is and run the experiment again")
        reported = [m for m in records[0]["test"] if "@" in m]  # eval.ks' metrics in results.json's order (not "users")
        test = np.array([[r["test"][m] for m in reported] for r in records])
        summary[name] = {
            "seeds": len(records),
            "monitor": records[0]["monitor"],
            "test_mean": dict(zip(reported, test.mean(0).tolist())),
            # One seed has no spread: null, not a std of 0 (which reads as seeds that agreed).
            "test_std": dict(zip(reported, test.std(0, ddof=1).tolist() if len(records) > 1 else [None] * len(reported))),
            # Empty without validation (eval.validate=false).
            "val_mean": {m: float(np.mean([r["val"][m] for r in records])) for m in records[0]["val"]},
            "best_epochs": [r["best_epoch"] for r in records],
            # null where no run timed an epoch (NaN is not JSON).
            "seconds_per_epoch": float(np.mean(timed)) if (timed := [r["seconds_per_epoch"] for r in records
                                                                        if r["seconds_per_epoch"] is not None]) else None,
            "wall_seconds": float(np.sum([r["wall_seconds"] for r in records])),
            "embedding_model": records[0]["embedding_model"],
        }
    return summary


def markdown(cfg: ExperimentConfig, summary: dict) -> str:
    first = next(iter(summary.values()))
    reported = list(first["test_mean"])
    # Variants may monitor different metrics (eval.monitor among their overrides): each row then names its own.
    monitors = list(dict.fromkeys(s["monitor"] for s in summary.values()))
    monitor = monitors[0] if len(monitors) == 1 else "(monitored)"
    if len(monitors) > 1:
        chosen = "best epoch chosen on each variant's monitored validation metric, named in the val column"
    else:
        chosen = f"best epoch chosen on validation {monitor}" if monitor else "the final epoch's model (no validation)"
    over = f"mean ± std over seeds {cfg.seeds}" if len(cfg.seeds) > 1 else f"one seed ({cfg.seeds[0]}), so no std"
    lines = [f"# {cfg.name}", "", f"Test metrics, {over}; {chosen}.", ""]
    # The monitored validation metric is the column to choose settings by; test is reported, never chosen on.
    lines.append(f"| variant | val {monitor or '-'} | " + " | ".join(reported) + " | s/epoch |")
    lines.append("|---" * (len(reported) + 3) + "|")
    for name, s in summary.items():
        cells = ["-" if m not in s["test_mean"] else f"{s['test_mean'][m]:.4f}" if s["test_std"][m] is None
                 else f"{s['test_mean'][m]:.4f} ± {s['test_std'][m]:.4f}" for m in reported]
        val = f"{s['val_mean'][s['monitor']]:.4f}" if s["monitor"] in s["val_mean"] else "-"
        if len(monitors) > 1:
            val += f" ({s['monitor'] or 'none'})"
        timing = "-" if s["seconds_per_epoch"] is None else f"{s['seconds_per_epoch']:.2f}"
        lines.append(f"| {name} | {val} | " + " | ".join(cells) + f" | {timing} |")
    for baseline in cfg.baselines:
        if baseline not in summary or len(summary) == 1:  # (no other variant to gain over it)
            continue
        lines += ["", f"Relative gain over {baseline} (mean test metric):", ""]
        lines.append("| variant | " + " | ".join(reported) + " |")
        lines.append("|---" * (len(reported) + 1) + "|")
        ref = summary[baseline]["test_mean"]
        for name, s in summary.items():
            if name != baseline:
                gains = [f"{100 * (s['test_mean'][m] / ref[m] - 1):+.2f}%" if m in s["test_mean"] and ref.get(m) else "-"
                         for m in reported]  # (no gain over a baseline at 0)
                lines.append(f"| {name} | " + " | ".join(gains) + " |")
    # Variants may train on different datasets (data.path among their overrides): each model is named with its variants.
    variants_of_model: dict[str, list[str]] = {}
    for name, s in summary.items():
        variants_of_model.setdefault(s["embedding_model"], []).append(name)
    if len(variants_of_model) == 1:
        models = str(next(iter(variants_of_model)))
    else:
        models = "; ".join(f"{model} ({', '.join(names)})" for model, names in variants_of_model.items())
    wall = sum(s["wall_seconds"] for s in summary.values())
    lines += ["", f"LLM embeddings: {models}. Total wall time of the runs (the trainers' own, without process start-up): {wall / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def sweep_metrics(summary: dict) -> list[str]:
    """Each metric at the largest cut-off the runs computed (eval.ks): recall@20 and ndcg@20 by default."""
    reported = list(next(iter(summary.values()))["test_mean"])
    largest = max(int(m.split("@")[1]) for m in reported)
    return [m for m in reported if m.endswith(f"@{largest}")]


def sweep_points(cfg: ExperimentConfig, summary: dict, metric: str) -> tuple[list[float], list[float], list]:
    """The swept values in increasing order (a line through them in the listed order would zigzag), with the mean
    and std of `metric` at each."""
    values = sorted(cfg.sweep.values)
    rows = [summary[f"{cfg.sweep.key}={_fmt(v)}"] for v in values]
    return values, [r["test_mean"][metric] for r in rows], [r["test_std"][metric] for r in rows]


def plot_sweep(cfg: ExperimentConfig, summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sweep_metrics(summary)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values, means, stds = sweep_points(cfg, summary, metric)
        ax.errorbar(values, means, yerr=None if None in stds else stds, marker="o", capsize=3)  # (None: one seed)
        ax.set(xlabel=cfg.sweep.key, ylabel=f"test {metric}", title=metric)
        if min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


EXPERIMENT_FILE = "experiment.yaml"


def check_out_dir_is_its_own(cfg: ExperimentConfig, out: Path) -> None:
    """An out_dir that holds another experiment (by the name in its experiment.yaml) is refused: that one's table.md
    and summary.json would be replaced by this one's without a word. The same experiment, edited (a variant or a seed
    added), keeps its out_dir."""
    record = out / EXPERIMENT_FILE
    held = read_yaml(record).get("name") if record.is_file() else cfg.name
    if held != cfg.name:
        raise ConfigError(f"out_dir {out} holds the experiment {held!r} ({record}), not {cfg.name!r}; its table.md and "
                          "summary.json would be replaced. Give this experiment another out_dir (or that name, if it is "
                          "the same experiment renamed)")


def run_experiment(cfg: ExperimentConfig) -> dict:
    out = Path(cfg.out_dir).expanduser()
    if not out.is_absolute():
        out = REPO_ROOT / out
    # Its variants' directories and its table would land among the sources (a variant named launch, in launch/).
    if out.resolve() == REPO_ROOT.resolve():
        raise ConfigError(f"out_dir {cfg.out_dir!r} is the repository itself; give the experiment a directory of its own "
                          "(runs/experiments/NAME)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file; give the experiment a directory")
    variants = variants_of(cfg)
    check_out_dir_is_its_own(cfg, out)
    # Seed-major, so that an interrupted experiment already holds every variant for its first seeds.
    grid = [(name, overrides, seed, out / variant_dir(name) / f"seed-{seed}")
            for seed in cfg.seeds for name, overrides in variants.items()]
    # Every run is checked before the first one trains: a typo in a later variant, or a damaged later run, would
    # stop the experiment only when its turn came, hours in.
    finished = []
    for name, overrides, seed, run_dir in grid:
        try:
            finished.append(check_run(cfg, run_dir, overrides, seed))
        except (ConfigError, DatasetError) as err:
            raise type(err)(f"variant {name}, seed {seed}: {err}") from err
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / EXPERIMENT_FILE, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    runs: dict[str, list[dict]] = {}
    started = time.perf_counter()
    for (name, overrides, seed, run_dir), results in zip(grid, finished):
        print(f"[experiment] {name} seed {seed}" + (" (finished before: not run again)" if results is not None else ""), flush=True)
        runs.setdefault(name, []).append(results if results is not None else run_one(cfg, run_dir, overrides, seed))
    summary = summarise(runs)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    table = markdown(cfg, summary)
    write_text_atomic(out / "table.md", table)
    if cfg.sweep.key:
        plot_sweep(cfg, summary, out / "sweep.png")
    print(table)
    print(f"[experiment] done in {(time.perf_counter() - started) / 60:.1f} min; {out / 'table.md'}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python launch/experiment.py EXPERIMENT.yaml [key=value ...]\nerror: give an experiment file "
              "(configs/experiments/*.yaml)", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    # SIGTERM would end this process at once and leave its torchrun job (launcher and workers) running.
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        cfg = load_config(ExperimentConfig, argv[0], argv[1:])
        run_experiment(cfg)
    except (ConfigError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as stop:
        # The job was stopped and waited for (run_one), so the run stopped as asked: not a failure, and nothing is lost.
        print("interrupted: finished runs are kept, and the same command continues (the interrupted run resumes "
              "from its last checkpoint)", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130  # 128 + the signal, as the shell reports it
    finally:
        signal.signal(signal.SIGTERM, previous)  # (main is also called in-process, by tests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
