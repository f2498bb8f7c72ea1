"""The experiment runner: variants x seeds under torchrun, a resumable grid, and the summary table."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from darec_dist.config import ConfigError, differences, load_config, to_dict
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.train import checkpoint
from darec_dist.train.config import REPO_ROOT, TrainConfig
from launch.experiment import ExperimentConfig, check_run, markdown, run_experiment, summarise, trains_on_alike


def test_grid_runs_tabulates_and_skips_finished_runs(small_dataset, tmp_path):
    root, _ = small_dataset
    deepspeed = tmp_path / "zero0.json"
    shutil.copy(REPO_ROOT / "configs" / "deepspeed" / "zero0.json", deepspeed)
    cfg = ExperimentConfig(
        name="tiny",
        train_config="configs/train/default.yaml",
        overrides=[f"data.path={root}", "device=cpu", "model.dim=8", "loader.batch_size=64", "train.epochs=2", "output.plot=false", "model.backbone=mf",
                   "eval.ks=[5,10]", "eval.monitor=ndcg@10", f"dense.deepspeed_config={deepspeed}"],
        variants={"base": ["align.method=none"], "rlmrec-con": ["align.method=rlmrec-con"]},
        seeds=[1, 2],
        nproc=1,
        out_dir=str(tmp_path / "exp"),
    )
    summary = run_experiment(cfg)
    assert set(summary) == {"base", "rlmrec-con"} and summary["base"]["seeds"] == 2
    table = (tmp_path / "exp" / "table.md").read_text()
    assert "| base |" in table and "Relative gain over base" in table
    assert yaml.safe_load((tmp_path / "exp" / "experiment.yaml").read_text())["name"] == "tiny"  # what out_dir holds
    assert "id-hash" in table  # the embedding model is named next to the numbers
    # The metrics the runs computed (eval.ks) and the one they chose epochs by (eval.monitor).
    assert "| variant | val ndcg@10 | recall@5 | recall@10 | ndcg@5 | ndcg@10 | s/epoch |" in table
    assert "chosen on validation ndcg@10" in table and "@20" not in table
    first = json.loads((tmp_path / "exp" / "base" / "seed-1" / "results.json").read_text())
    assert first["align"] == "none" and 0 < first["test"]["recall@10"] <= 1 and first["monitor"] == "ndcg@10"
    # The trainer records the dataset it trained on (a finished run is reused only on that one).
    assert first["dataset_fingerprint"] == PreparedDataset.open(root).fingerprint
    stamp = (tmp_path / "exp" / "base" / "seed-1" / "results.json").stat().st_mtime
    run_experiment(cfg)  # everything is done: nothing is trained again
    assert (tmp_path / "exp" / "base" / "seed-1" / "results.json").stat().st_mtime == stamp
    # Finished runs copied into another experiment count there: only where they wrote and how they reported differ.
    copied = dataclasses.replace(cfg, out_dir=str(tmp_path / "other"), overrides=[*cfg.overrides, "loader.num_workers=0", "checkpoint.keep=1"])
    for variant in ("base", "rlmrec-con"):
        shutil.copytree(tmp_path / "exp" / variant, tmp_path / "other" / variant, copy_function=shutil.copy2)
    assert run_experiment(copied) == summary
    assert (tmp_path / "other" / "base" / "seed-1" / "results.json").stat().st_mtime == stamp  # not trained again
    # Nor at another world size (a seed's run is reproducible at its own only).
    with pytest.raises(ConfigError, match=r"base/seed-1: finished with 1 processes, and the experiment asks for nproc=2; "):
        run_experiment(dataclasses.replace(cfg, nproc=2))
    # Nor does a DeepSpeed JSON edited since (the config names it by path only; runs with a dense part record its contents).
    settings = json.loads(deepspeed.read_text())
    assert json.loads((tmp_path / "exp" / "rlmrec-con" / "seed-1" / "deepspeed.json").read_text())["optimizer"] == settings["optimizer"]
    assert not (tmp_path / "exp" / "base" / "seed-1" / "deepspeed.json").exists()  # no dense part: the file is not used
    lr = settings["optimizer"]["params"]["lr"]
    settings["optimizer"]["params"]["lr"] = lr * 10
    deepspeed.write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match=re.escape(f"rlmrec-con/seed-1: finished with other settings (ran -> asked now): "
                                                    f"dense.deepspeed.optimizer.params.lr: {lr!r} -> {lr * 10!r}")):
        run_experiment(cfg)
    settings["optimizer"]["params"]["lr"] = lr
    deepspeed.write_text(json.dumps(settings))
    # An edited experiment does not pass off the old runs as its own.
    edited = dataclasses.replace(cfg, overrides=[*cfg.overrides, "model.reg=0.5"])
    with pytest.raises(ConfigError, match=r"base/seed-1: finished with other settings \(ran -> asked now\): model.reg: "):
        run_experiment(edited)
    # Nor does it finish an interrupted one under the new settings (its checkpoints would be resumed).
    (tmp_path / "exp" / "base" / "seed-1" / "results.json").unlink()
    # Nor at another world size (the trainer would resume it at an epoch's end: one run of two world sizes).
    with pytest.raises(ConfigError, match=r"base/seed-1: interrupted after training with 1 processes, and the experiment "
                                          "asks for nproc=2"):
        run_experiment(dataclasses.replace(cfg, nproc=2))
    with pytest.raises(ConfigError, match=r"base/seed-1: interrupted, and would be resumed, with other settings \(ran -> asked now\): "
                                          "model.reg: "):
        run_experiment(edited)
    # Longer runs go on from their last checkpoints, finished or interrupted, to what a 3-epoch experiment gives.
    longer = dataclasses.replace(cfg, overrides=[*cfg.overrides, "train.epochs=3"])
    extended, fresh = run_experiment(longer), run_experiment(dataclasses.replace(longer, out_dir=str(tmp_path / "fresh")))
    for variant in ("base", "rlmrec-con"):
        for key in ("test_mean", "test_std", "val_mean", "best_epochs"):
            assert extended[variant][key] == fresh[variant][key], (variant, key)
    for variant in ("base", "rlmrec-con"):
        trained = [json.loads(line)["epoch"] for line in (tmp_path / "exp" / variant / "seed-2" / "metrics.jsonl").open()
                   if json.loads(line)["kind"] == "train"]
        assert trained == [0, 1, 2], (variant, trained)
    stamp = (tmp_path / "exp" / "base" / "seed-1" / "results.json").stat().st_mtime
    assert run_experiment(longer) == extended  # the runs now record the longer settings: counted, not trained again
    assert (tmp_path / "exp" / "base" / "seed-1" / "results.json").stat().st_mtime == stamp


@pytest.mark.parametrize("ran, asked, alike", [
    ({"epochs": 2}, {"epochs": 3}, True),
    ({"epochs": 3}, {"epochs": 2}, False),  # a resume does not untrain: it would test epoch 2's best as a 2-epoch run's
    ({"patience": 10}, {"patience": 5}, False),  # a smaller patience would have stopped it sooner
    ({"min_epochs": 4}, {"min_epochs": 2}, False),
    ({"patience": 5, "min_epochs": 2}, {"patience": 8, "min_epochs": 3}, True),
    ({"epochs": 12, "eval_every": 5}, {"epochs": 20, "eval_every": 5}, False),  # epoch 11 was evaluated as the last
    ({"epochs": 10, "eval_every": 5}, {"epochs": 20, "eval_every": 5}, True),
])
def test_only_longer_runs_train_on(ran, asked, alike):
    base = {"epochs": 2, "patience": 10, "min_epochs": 0, "eval_every": 1}
    ran, asked = base | ran, base | asked
    changed = differences({"train": ran}, {"train": asked})
    assert trains_on_alike(ran, asked, changed) is alike
    assert not trains_on_alike(ran, asked, [*changed, "model.reg: 0.1 -> 0.2"])


def test_ctrl_c_stops_the_experiment_as_an_interruption_not_a_failure(small_dataset, tmp_path):
    root, _ = small_dataset
    experiment = tmp_path / "exp.yaml"
    out = tmp_path / "exp"
    experiment.write_text(
        "train_config: configs/train/default.yaml\n"
        f"overrides: [data.path={root}, device=cpu, model.dim=8, loader.batch_size=64, train.epochs=50, model.backbone=mf]\n"
        "variants: {base: [align.method=none]}\nseeds: [1]\nnproc: 1\n"
        f"out_dir: {out}\n"
    )
    # Its own session, so that the signal goes to the runner and its torchrun together, as Ctrl-C in a terminal does.
    runner = subprocess.Popen([sys.executable, "launch/experiment.py", str(experiment)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "base" / "seed-1" / "config.yaml").exists():  # the run has started
            assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
            time.sleep(0.2)
        os.killpg(runner.pid, signal.SIGINT)
        _, stderr = runner.communicate(timeout=300)
    finally:  # not left training beside the next tests after a failure here
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
    assert runner.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "error:" not in stderr


def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # reaped between is_running and status
        return True


def test_sigterm_stops_the_torchrun_job_and_a_rerun_resumes_it(small_dataset, tmp_path):
    """SIGTERM (timeout, systemd, Slurm's scancel) reaches the runner alone: it ended the runner and left its torchrun
    launcher and workers training on. It must stop them, wait, and exit as on Ctrl-C; the same command resumes."""
    root, _ = small_dataset
    experiment = tmp_path / "exp.yaml"
    run_dir = tmp_path / "exp" / "base" / "seed-1"
    experiment.write_text(
        "train_config: configs/train/default.yaml\n"
        f"overrides: [data.path={root}, device=cpu, model.dim=8, loader.batch_size=64, train.epochs=12, train.patience=20, "
        "model.backbone=mf, output.plot=false, output.export_embeddings=false]\n"
        f"variants: {{base: [align.method=none]}}\nseeds: [1]\nnproc: 2\nout_dir: {tmp_path / 'exp'}\n"
    )
    command = [sys.executable, "launch/experiment.py", str(experiment)]
    runner = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while checkpoint.latest(run_dir) is None:  # training has started, and a rerun has a checkpoint to resume
        assert runner.poll() is None and time.monotonic() < deadline, runner.communicate()
        time.sleep(0.1)
    # The torchrun launcher, its workers (and theirs), with their command lines.
    job = {}
    for p in psutil.Process(runner.pid).children(recursive=True):
        try:
            job[p] = " ".join(p.cmdline())
        except psutil.NoSuchProcess:  # (an epoch's loader worker, ended since the listing)
            pass
    assert sum("launch/train.py" in line for line in job.values()) >= 3, list(job.values())
    runner.send_signal(signal.SIGTERM)  # to the runner alone, as scancel or timeout send it
    _, stderr = runner.communicate(timeout=90)
    survivors = [p for p in job if p.is_running() and not ended(p)]
    for process in survivors:  # (not left training after a failure here)
        process.kill()
    assert not survivors, [job[p] for p in survivors]
    assert runner.returncode == 143 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert not (run_dir / "results.json").exists()
    rerun = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in (run_dir / "log.txt").read_text() and (run_dir / "results.json").exists()


def test_a_bad_dataset_fails_before_torchrun_starts(small_dataset, tmp_path):
    root, _ = small_dataset
    cfg = ExperimentConfig(
        overrides=[f"data.path={root}", "device=cpu", "model.backbone=mf"],
        variants={"base": ["align.method=none"]}, seeds=[1], nproc=64, out_dir=str(tmp_path / "exp"),
    )
    with pytest.raises(DatasetError, match="cannot feed 64 ranks"):
        run_experiment(cfg)
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    with pytest.raises(DatasetError, match="not a finished dataset"):
        run_experiment(dataclasses.replace(cfg, nproc=1, overrides=[f"data.path={empty}", "device=cpu"]))
    assert not (tmp_path / "exp" / "base" / "seed-1" / "log.txt").exists()  # no job was started


@pytest.mark.parametrize("overrides, message", [
    (["nproc=0"], "nproc must be >= 1"),
    (["seeds=[]"], "give at least one seed"),
    (["sweep.key=align.darec.clusters", "sweep.values=[]"], "give at least one value of align.darec.clusters"),
])
def test_an_experiment_that_would_run_nothing_is_refused(capsys, overrides, message):
    from launch.experiment import main

    assert main(["configs/experiments/quickstart.yaml", *overrides]) == 2
    assert message in capsys.readouterr().err
    assert main([]) == 2 and "error: give an experiment file" in capsys.readouterr().err


def test_repeated_seeds_are_refused_at_load(capsys):
    """seeds: [1, 1] reused one run and reported it as two seeds with a std of 0."""
    from launch.experiment import main

    # (no dataset: without the check, the first run would fail on it rather than train)
    assert main(["configs/experiments/quickstart.yaml", "seeds=[1,2,1]", "overrides=[data.path=/no/dataset]"]) == 2
    assert "seeds: [1] given more than once in [1, 2, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    # 'lr/hi' ran in lr_hi/seed-N, the directory of variant 'lr_hi', which then reused its finished runs as its own.
    (["variants={lr/hi: [sparse.lr=0.01], lr_hi: [sparse.lr=0.001]}"],
     "variants: 'lr/hi' and 'lr_hi' both run in runs/quickstart/lr_hi/seed-N ('/' in a name becomes '_')"),
    (["variants={base: [align.method=none], ..: [align.method=darec]}"], "variants: '..' names no directory of its own"),
    # A repeated value was one run (one variant) plotted twice.
    (["sweep.key=train.epochs", "sweep.values=[0.001,1e-5,0.001]"], "sweep.values: 0.001 given more than once in [0.001, 1e-05, 0.001]"),
], ids=["colliding-variants", "dot-dot-variant", "repeated-sweep-value"])
def test_variants_sharing_a_run_directory_are_refused_at_load(capsys, overrides, message):
    from launch.experiment import main

    # (no dataset: without the check, the first run would fail on it rather than train)
    assert main(["configs/experiments/quickstart.yaml", *overrides, "overrides=[data.path=/no/dataset]"]) == 2
    err = capsys.readouterr().err
    assert message in err and "/no/dataset" not in err, err


@pytest.mark.parametrize("overrides, message", [
    (["variants={a: [seed=7], b: [seed=8]}"], "variants.a sets seed, which the experiment sets for each run (seeds, and "
                                              "out_dir/VARIANT/seed-N); remove it"),
    (["sweep.key=seed", "sweep.values=[7,8]"], "sweep.key sets seed, which the experiment sets for each run"),
    (["overrides=[run_dir=/tmp/elsewhere]"], "overrides sets run_dir, which the experiment sets for each run"),
], ids=["variant-seed", "swept-seed", "shared-run-dir"])
def test_a_seed_or_run_dir_of_a_variant_is_refused_at_load(capsys, overrides, message):
    """The runner sets both after every override: two variants differing only in seed were one run under two names."""
    from launch.experiment import main

    assert main(["configs/experiments/quickstart.yaml", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_a_run_directory_reaches_the_trainer_as_named(tmp_path):
    """An override's value is read as YAML: a variant 'darec #1' trained in out_dir/darec (the rest a comment)."""
    from launch.experiment import run_settings

    cfg = ExperimentConfig(train_config="configs/train/default.yaml")
    for name in ("darec #1", "lambda: 0.5", "plain"):
        run_dir = tmp_path / name / "seed-1"
        settings = run_settings(cfg, run_dir, [], seed=1)
        assert load_config(TrainConfig, REPO_ROOT / cfg.train_config, settings).run_dir == str(run_dir)


def test_a_typo_in_a_later_variant_fails_before_the_first_run(small_dataset, tmp_path):
    cfg = ExperimentConfig(
        overrides=[f"data.path={small_dataset[0]}", "device=cpu", "loader.batch_size=64"],
        variants={"base": ["align.method=none"], "darec": ["align.method=darec", "align.darec.lamda=0.1"]},
        seeds=[1, 2], nproc=1, out_dir=str(tmp_path / "exp"),
    )
    with pytest.raises(ConfigError, match=r"variant darec, seed 1: .*unknown key\(s\) align.darec.lamda"):
        run_experiment(cfg)
    assert not (tmp_path / "exp").exists()  # no run was started


def write_finished_run(cfg, variant, seed, results):
    """A finished run of `variant` with exactly the settings `cfg` asks, as launch/train.py leaves it (config.yaml,
    results.json: the text `results`), without training it."""
    run_dir = Path(cfg.out_dir) / variant / f"seed-{seed}"
    run_dir.mkdir(parents=True)
    settings = [*cfg.overrides, *cfg.variants[variant], f"seed={seed}", f"run_dir={run_dir}", "train.progress_bar=false"]
    ran = load_config(TrainConfig, REPO_ROOT / cfg.train_config, settings)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(ran), sort_keys=False))
    (run_dir / "results.json").write_text(results)
    return run_dir


@pytest.mark.parametrize("damaged, message", [
    ('{"test": {"recall@20": 0.1', "not valid JSON"),  # truncated
    ("{}", r"missing key\(s\) \['test', 'val', 'best_epoch', 'seconds_per_epoch', 'monitor', 'wall_seconds', "
           r"'embedding_model', 'dataset_fingerprint'\]"),
])
def test_a_finished_run_with_a_damaged_results_json_is_named_to_delete(small_dataset, tmp_path, damaged, message):
    # "fresh" comes first and could train: the damaged run is named before it does.
    cfg = ExperimentConfig(overrides=[f"data.path={small_dataset[0]}", "device=cpu", "loader.batch_size=64"],
                           variants={"fresh": ["align.method=rlmrec-con"], "base": ["align.method=none"]},
                           seeds=[1], nproc=1, out_dir=str(tmp_path / "exp"))
    # A finished run of exactly these settings, as launch/train.py leaves it, but for its results.json.
    run_dir = write_finished_run(cfg, "base", seed=1, results=damaged)
    with pytest.raises(ConfigError, match=f"variant base, seed 1: {re.escape(str(run_dir / 'results.json'))}: {message}.*; "
                                          f"delete {re.escape(str(run_dir))} to run it again"):
        run_experiment(cfg)
    assert not (tmp_path / "exp" / "fresh").exists()


def test_a_finished_run_counts_only_on_the_dataset_it_trained_on(small_dataset, tmp_path):
    """A dataset re-prepared in place (same data.path, so the same config) has another fingerprint: a run finished on
    the old one was reused, its numbers tabulated as this dataset's."""
    cfg = ExperimentConfig(overrides=[f"data.path={small_dataset[0]}", "device=cpu", "loader.batch_size=64"],
                           variants={"fresh": ["align.method=rlmrec-con"], "base": ["align.method=none"]},
                           seeds=[1], nproc=1, out_dir=str(tmp_path / "exp"))
    now = PreparedDataset.open(small_dataset[0]).fingerprint
    record = {"test": {"recall@20": 0.1}, "val": {"recall@20": 0.1}, "best_epoch": 1, "seconds_per_epoch": 1.0,
              "monitor": "recall@20", "wall_seconds": 5.0, "embedding_model": "id-hash"}
    run_dir = write_finished_run(cfg, "base", seed=1, results=json.dumps({**record, "dataset_fingerprint": "0" * 16}))
    with pytest.raises(ConfigError, match=f"variant base, seed 1: {re.escape(str(run_dir))}: finished on a dataset with "
                                          f"fingerprint {'0' * 16} .*but {re.escape(str(small_dataset[0]))} now has "
                                          f"fingerprint {now} .*delete that run or give the experiment another out_dir"):
        run_experiment(cfg)
    assert not (tmp_path / "exp" / "fresh").exists()  # refused before the first run trained
    # On the dataset it trained on it counts.
    (run_dir / "results.json").write_text(json.dumps({**record, "dataset_fingerprint": now}))
    assert check_run(cfg, run_dir, cfg.variants["base"], 1) == {**record, "dataset_fingerprint": now}


def test_the_table_names_every_embedding_model_of_its_runs():
    """The footer named the first variant's model only; variants may train on different datasets (data.path)."""
    def record(model):
        return {"best_epoch": 4, "monitor": "recall@20", "val": {"recall@20": 0.2}, "test": {"recall@20": 0.2},
                "seconds_per_epoch": 1.0, "wall_seconds": 5.0, "embedding_model": model, "dataset_fingerprint": model}

    table = markdown(ExperimentConfig(seeds=[1]), summarise({"base": [record("m1")], "darec": [record("m2")], "con": [record("m1")]}))
    assert "LLM embeddings: m1 (base, con); m2 (darec)." in table
    assert "LLM embeddings: m1." in markdown(ExperimentConfig(seeds=[1]), summarise({"base": [record("m1")], "darec": [record("m1")]}))
    # One variant's seeds on different datasets (a re-prepare in place, the dataset gone since): no mean over them.
    with pytest.raises(ConfigError, match=r"variant base: its runs trained on different datasets \(fingerprints 'm1' \(1 of 2 runs\), 'm2' \(1 of 2 runs\)"):
        summarise({"base": [record("m1"), record("m2")]})


def test_an_interrupted_run_whose_checkpoints_are_all_damaged_is_named_to_delete(tmp_path):
    """torchrun's --resume auto refuses it (starting over would replace its metrics): named here, before torchrun."""
    cfg = ExperimentConfig(overrides=["data.path=/no/dataset", "device=cpu"], variants={"base": ["align.method=none"]},
                           seeds=[1], nproc=1, out_dir=str(tmp_path / "exp"))
    damaged = tmp_path / "exp" / "base" / "seed-1" / "checkpoints" / "step-000000005"
    damaged.mkdir(parents=True)
    (damaged / "COMPLETE").write_text("")  # its state.json is gone
    with pytest.raises(ConfigError, match=f"{re.escape(str(damaged.parent.parent))}: interrupted, and every checkpoint it holds is damaged"):
        run_experiment(cfg)


def test_runs_without_validation_are_tabulated_by_their_final_epoch():
    def record(value):
        return {"best_epoch": 4, "monitor": None, "val": {}, "test": {"recall@20": value, "ndcg@20": value / 2},
                "seconds_per_epoch": 1.0, "wall_seconds": 5.0, "embedding_model": "id-hash (csv)", "dataset_fingerprint": "f"}

    summary = summarise({"base": [record(0.2), record(0.3)], "darec": [record(0.3), record(0.3)]})
    assert summary["base"]["val_mean"] == {} and summary["base"]["test_mean"]["recall@20"] == pytest.approx(0.25)
    table = markdown(ExperimentConfig(seeds=[1, 2]), summary)
    assert "the final epoch's model (no validation)" in table and "| base | - | 0.2500 ± 0.0707 | 0.1250 ± 0.0354 |" in table
    assert "| darec | +20.00% | +20.00% |" in table
    # Variants that monitor different metrics: each row names its own; runs without timings write null, not NaN.
    mixed = summarise({"base": [{**record(0.2), "monitor": "recall@20", "val": {"recall@20": 0.21}}],
                       "darec": [{**record(0.3), "monitor": "ndcg@20", "val": {"ndcg@20": 0.15}, "seconds_per_epoch": None}]})
    assert mixed["darec"]["seconds_per_epoch"] is None and "NaN" not in json.dumps(mixed)
    table = markdown(ExperimentConfig(seeds=[1]), mixed)
    assert "| variant | val (monitored) |" in table and "each variant's monitored validation metric" in table
    assert "| base | 0.2100 (recall@20) | 0.2000 | 0.1000 | 1.00 |" in table and "| darec | 0.1500 (ndcg@20) | 0.3000 | 0.1500 | - |" in table
    # A baseline at 0 (QA: a run over one user that missed) has no gain over it: "-", not a ZeroDivisionError.
    zero = markdown(ExperimentConfig(seeds=[1, 2]), summarise({"base": [record(0.0), record(0.0)], "darec": [record(0.3), record(0.3)]}))
    assert "| darec | - | - |" in zero


def test_one_seed_reports_no_std_and_no_empty_gain_table(tmp_path):
    """One seed printed "± 0.0000" and stored a std of 0.0 (seeds that agreed), and a baseline alone printed a gain
    table with no rows."""
    from launch.experiment import SweepConfig, plot_sweep

    record = {"best_epoch": 4, "monitor": "recall@20", "val": {"recall@20": 0.2}, "test": {"recall@20": 0.25, "ndcg@20": 0.125},
              "seconds_per_epoch": 1.0, "wall_seconds": 5.0, "embedding_model": "m1", "dataset_fingerprint": "f"}
    summary = summarise({"base": [record]})
    assert summary["base"]["test_std"] == {"recall@20": None, "ndcg@20": None}
    assert json.loads(json.dumps(summary))["base"]["test_std"]["recall@20"] is None  # null in summary.json
    table = markdown(ExperimentConfig(seeds=[7], baselines=["base"]), summary)
    assert "Test metrics, one seed (7), so no std;" in table and "| base | 0.2000 | 0.2500 | 0.1250 | 1.00 |" in table
    assert "±" not in table and "Relative gain" not in table
    # A one-seed sweep is plotted without error bars.
    cfg = ExperimentConfig(seeds=[7], sweep=SweepConfig(key="align.darec.clusters", values=[4, 8]))
    plot_sweep(cfg, summarise({"align.darec.clusters=4": [record], "align.darec.clusters=8": [record]}), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_a_sweep_is_plotted_with_the_metrics_its_runs_computed(tmp_path):
    """A sweep whose runs computed other cut-offs than 20 (eval.ks) is plotted at its largest one."""
    from PIL import Image

    from launch.experiment import SweepConfig, plot_sweep, sweep_metrics

    cfg = ExperimentConfig(sweep=SweepConfig(key="align.darec.clusters", values=[4, 8]))
    metrics = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    summary = {f"align.darec.clusters={k}": {"test_mean": {m: 0.1 * k for m in metrics}, "test_std": {m: 0.01 for m in metrics}}
               for k in (4, 8)}
    assert sweep_metrics(summary) == ["recall@10", "ndcg@10"]
    plot_sweep(cfg, summary, tmp_path / "sweep.png")
    assert Image.open(tmp_path / "sweep.png").size[0] > 0


@pytest.mark.parametrize("out_dir", ["", ".", "a-file"])
def test_an_out_dir_that_is_the_repository_or_a_file_is_refused_before_any_run(tmp_path, out_dir):
    """QA: an empty out_dir wrote the runs and the table into the repository root; a file gave a traceback."""
    if out_dir == "a-file":
        out_dir = str(tmp_path / "a-file")
        Path(out_dir).write_text("")
    cfg = ExperimentConfig(overrides=["data.path=/no/dataset"], variants={"base": []}, seeds=[1], nproc=1, out_dir=out_dir)
    with pytest.raises(ConfigError, match="is the repository itself|is a file; give the experiment a directory"):
        run_experiment(cfg)


def test_a_sweep_is_plotted_in_increasing_order_of_its_values():
    """QA: the plot joined its points in the listed order, so values given out of order drew a zigzag."""
    from launch.experiment import SweepConfig, sweep_points

    cfg = ExperimentConfig(sweep=SweepConfig(key="align.darec.clusters", values=[8, 2, 4]))
    summary = {f"align.darec.clusters={k}": {"test_mean": {"recall@20": k / 10}, "test_std": {"recall@20": None}} for k in (2, 4, 8)}
    assert sweep_points(cfg, summary, "recall@20") == ([2, 4, 8], [0.2, 0.4, 0.8], [None, None, None])


def test_an_out_dir_holding_another_experiment_is_refused(small_dataset, tmp_path):
    """QA: a second experiment given the same out_dir replaced the first one's table.md and summary.json silently."""
    root, _ = small_dataset
    cfg = ExperimentConfig(name="first", overrides=[f"data.path={root}", "train.epochs=1"], variants={"base": []},
                           seeds=[1], nproc=1, out_dir=str(tmp_path / "exp"))
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.yaml").write_text(yaml.safe_dump(to_dict(dataclasses.replace(cfg, name="other"))))
    with pytest.raises(ConfigError, match=r"holds the experiment 'other' .*not 'first'"):
        run_experiment(cfg)
    assert not (tmp_path / "exp" / "base").exists()
