"""Recovery: a rank killed after a checkpoint, restarted by torchrun --max-restarts with --resume auto,
ends with the same metrics as an uninterrupted run with the same seed."""

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

from darec_dist.config import ConfigError
from darec_dist.train import checkpoint
from darec_dist.train.config import LoopConfig
from tests.conftest import REPO
from tests.train_helpers import finish

SETTINGS = [
    "device=cpu", "model.dim=8", "loader.batch_size=64", "loader.num_workers=1", "train.epochs=5",
    "train.progress_bar=false", "train.patience=10", "checkpoint.every_steps=2", "checkpoint.keep=3",
    "output.plot=false", "sparse.optimizer=adam", "sparse.lr=0.01",
]


def run_config(*overrides):
    """What a run of the default config with these overrides computes (resume_settings' "config")."""
    from darec_dist.config import load_config, to_dict
    from darec_dist.train.config import TrainConfig, what_a_run_computes

    return what_a_run_computes(to_dict(load_config(TrainConfig, "configs/train/default.yaml", ["data.path=d", *overrides])))


def settings(tables, zero_stage=0, config=None):
    """darec_dist.train.resume's resume_settings, spelled out (by default, of the default config with the tables' optimizer)."""
    config = run_config(f"sparse.optimizer={tables['optimizer']}") if config is None else config
    return {"config": config, "tables": tables, "zero_stage": zero_stage}


def saved_state(tables, **changes):
    """A checkpoint's loop state as launch/train.py writes it, by 2 processes under settings(tables), with `changes`."""
    from darec_dist.train.resume import fresh_state

    return {**fresh_state(2, {}, settings(tables)), checkpoint.TABLE_STEPS: 0, **changes}


def torchrun(dataset, run_dir, *extra):
    # One restart: the resumed attempt must come up at once (each attempt has its own store prefix).
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1", "--monitor-interval=0.5",
        "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}", *SETTINGS, *extra,
    ]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.parametrize("options", [
    ["model.backbone=lightgcn"],
    # A stateless fused optimizer on tables placed whole on either rank: checkpoints without table optimizer state.
    ["model.backbone=mf", "sparse.optimizer=sgd", "sparse.lr=0.5", "sparse.sharding=table_wise"],
], ids=["lightgcn-adam", "mf-sgd-table_wise"])
def test_killed_rank_recovers_with_the_same_metrics(small_dataset, tmp_path, options):
    root, _ = small_dataset
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    finish(torchrun(root, reference_dir, *options))
    _check_memory_record(root, reference_dir)
    _check_refused_resume_keeps_the_config(root, reference_dir, options)

    process = torchrun(root, crashed_dir, *options, "--resume", "auto")
    deadline = time.time() + 300
    while checkpoint.latest(crashed_dir) is None:
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    workers = [p for p in psutil.Process(process.pid).children() if "launch/train.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    killed_at = checkpoint.latest(crashed_dir)
    out = finish(process)
    assert "resumed from" in out, out[-3000:]
    assert killed_at.name != checkpoint.latest(crashed_dir).name
    assert checkpoint.loop_state(checkpoint.latest(crashed_dir))["world_size"] == 2

    reference = json.loads((reference_dir / "results.json").read_text())
    recovered = json.loads((crashed_dir / "results.json").read_text())
    assert recovered["best_epoch"] == reference["best_epoch"]
    for split in ("val", "test"):
        for metric, value in reference[split].items():
            assert recovered[split][metric] == pytest.approx(value, abs=1e-6), (split, metric)
    # The run's wall time spans every attempt: at least the epochs it logged, in either attempt.
    logged = [json.loads(line) for line in (crashed_dir / "metrics.jsonl").read_text().splitlines()]
    assert recovered["wall_seconds"] >= sum(r["seconds"] for r in logged if r["kind"] == "train")
    # Time per epoch counts whole epochs only: the rest of one resumed inside it is logged as such.
    epoch, step = map(int, re.search(r"resumed from \S+ at epoch (\d+), step (\d+)", out).groups())
    trained = [r for r in logged if r["kind"] == "train"]
    assert [r["epoch"] for r in trained if not r["whole_epoch"]] == ([epoch] if step else [])
    whole = [r["seconds"] for r in trained if r["whole_epoch"]]
    assert recovered["seconds_per_epoch"] == pytest.approx(sum(whole) / len(whole))
    # Each epoch's mean training loss too, the epoch interrupted mid-way included (its last record).
    losses = [{r["epoch"]: r["losses"] for r in _records(run_dir) if r["kind"] == "train"} for run_dir in (reference_dir, crashed_dir)]
    assert losses[0].keys() == losses[1].keys()
    for epoch, expected in losses[0].items():
        assert losses[1][epoch] == pytest.approx(expected, rel=1e-9), epoch


def test_a_rank_without_a_table_trains_and_resumes_under_the_dense_kernel(small_dataset, tmp_path):
    """CPU Adam (the dense kernel) with the two tables placed whole over 3 processes: the third holds neither, and its
    empty optimizer failed at start-up on that rank only, leaving the others waiting."""
    root, _ = small_dataset
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "launch/train.py",
               "configs/train/default.yaml", f"data.path={root}", f"run_dir={tmp_path}", *SETTINGS, "model.backbone=mf",
               "sparse.sharding=table_wise", "loader.batch_size=48", "checkpoint.every_steps=null", "train.epochs=1"]
    finish(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    plan = json.loads((tmp_path / "results.json").read_text())["sharding_plan"]
    assert plan == {"user_id": ["table_wise", "dense"], "item_id": ["table_wise", "dense"]}, plan
    out = finish(subprocess.Popen([*command[:-1], "train.epochs=2", "--resume", "auto"], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
    assert "resumed from" in out and "at epoch 1, step 0" in out, out[-3000:]
    assert json.loads((tmp_path / "results.json").read_text())["world_size"] == 3


def _check_refused_resume_keeps_the_config(dataset, run_dir, options):
    """A resume refused after the model is built (here: another table optimizer) leaves the run's config as it ran."""
    written = (run_dir / "config.yaml").read_text()
    command = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={dataset}", f"run_dir={run_dir}",
               *SETTINGS, *options, "sparse.optimizer=rowwise_adagrad", "--resume", "auto"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "-> 'rowwise_adagrad'; resume with the run's settings" in done.stderr, done.stderr[-2000:]
    assert (run_dir / "config.yaml").read_text() == written


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_memory_record(dataset, run_dir, dim=8):
    """Each rank records its share of the tables: every row stored at least once, at most replicated with Adam state."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    rows_mib = (manifest["num_users"] + manifest["num_items"]) * dim * 4 / 2**20
    train = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    memory = train["memory_mib"]
    assert len(memory["tables"]) == 2 and all(share > 0 for share in memory["tables"])
    assert rows_mib * 0.99 <= sum(memory["tables"]) <= 2 * 3 * rows_mib * 1.01
    assert all(rank["private"] > share and rank["peak_rss"] >= rank["private"] for rank, share in zip(memory["after_train"], memory["tables"]))


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    root = tmp_path / checkpoint.CHECKPOINTS
    (root / checkpoint.step_name(4)).mkdir(parents=True)
    (root / checkpoint.step_name(4) / checkpoint.STATE).write_text("{}")
    (root / checkpoint.step_name(4) / checkpoint.FILES).write_text("{}")
    (root / checkpoint.step_name(4) / checkpoint.COMPLETE).write_text("")
    (root / checkpoint.step_name(9)).mkdir()  # written, never marked complete
    (root / f".tmp-{checkpoint.step_name(12)}").mkdir()
    assert checkpoint.latest(tmp_path).name == checkpoint.step_name(4)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.load(None, root / checkpoint.step_name(9))


def test_checkpoint_resumes_at_another_world_size_only_at_an_epoch_end_without_zero_partitions(tmp_path):
    from darec_dist.train.resume import check_resumable

    path = tmp_path / checkpoint.step_name(7)
    path.mkdir()
    (path / checkpoint.FILES).write_text("{}")  # what a checkpoint lists as written (nothing here)
    (path / checkpoint.COMPLETE).write_text("")
    cases = [  # step_in_epoch, world size now, ZeRO stage, refusal
        (5, 2, 1, None), (0, 1, 0, None),
        (5, 1, 0, f"{path}: written by 2 processes inside epoch 3"),
        (0, 1, 1, f"{path}: written by 2 processes with ZeRO stage 1"),
    ]
    adam = {"optimizer": "adam", "sharding": {"user_id": "row_wise", "item_id": "row_wise"},
            "kernel": {"user_id": "fused", "item_id": "fused"}}
    for step_in_epoch, world_size, zero_stage, refusal in cases:
        state = saved_state(adam, epoch=3, step_in_epoch=step_in_epoch, zero_stage=zero_stage)
        (path / checkpoint.STATE).write_text(json.dumps(state))
        if refusal:
            with pytest.raises(ConfigError, match=refusal):
                check_resumable(path, world_size, settings(adam, zero_stage=zero_stage))
        else:
            check_resumable(path, world_size, settings(adam, zero_stage=zero_stage))
    # Another stage at any world size: DeepSpeed finds no state file (stage 0 after 2) or None to load (2 after 0).
    for saved, now in ((0, 2), (2, 0)):
        (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, epoch=3, zero_stage=saved)))
        with pytest.raises(ConfigError, match=rf"saved by DeepSpeed's ZeRO stage {saved}; resume it with that stage "
                                              rf"\(dense.deepspeed_config=configs/deepspeed/zero{saved}.json\)"):
            check_resumable(path, 2, settings(adam, zero_stage=now))


def test_a_checkpoint_inside_an_epoch_resumes_only_with_the_loader_that_counted_its_steps(tmp_path):
    """Its position is a count of batches: 20 steps of 2048 resumed at a batch of 512 skipped a quarter of them."""
    from darec_dist.train.resume import check_resumable

    path = tmp_path / checkpoint.step_name(20)
    path.mkdir()
    (path / checkpoint.FILES).write_text("{}")  # what a checkpoint lists as written (nothing here)
    (path / checkpoint.COMPLETE).write_text("")
    adam = {"optimizer": "adam", "sharding": {"user_id": "row_wise", "item_id": "row_wise"},
            "kernel": {"user_id": "fused", "item_id": "fused"}}
    two_readers = run_config("sparse.optimizer=adam", "loader.num_workers=2")
    for step_in_epoch in (0, 20):
        (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, step_in_epoch=step_in_epoch)))
        check_resumable(path, 2, settings(adam))
        # Other batches are another run, at any step (the negatives come from the shuffle's generator too).
        for changed, shown in (("loader.batch_size=512", "loader.batch_size: 4096 -> 512"),
                               ("loader.reject_train_positives=false", "loader.reject_train_positives: True -> False")):
            with pytest.raises(ConfigError, match=re.escape(f"(checkpoint -> now): {shown}; resume with")):
                check_resumable(path, 2, settings(adam, config=run_config("sparse.optimizer=adam", changed)))
        if step_in_epoch == 0:  # at an epoch's end the next epoch splits its shards afresh
            check_resumable(path, 2, settings(adam, config=two_readers))
            continue
        with pytest.raises(ConfigError, match=re.escape("inside epoch 0 (step 20), whose position counts batches of 1 "
                                                        "reader(s); resume it with loader.num_workers=1, or")):
            check_resumable(path, 2, settings(adam, config=two_readers))
        # 0 workers read the shards as one does.
        check_resumable(path, 2, settings(adam, config=run_config("sparse.optimizer=adam", "loader.num_workers=0")))


def test_a_resume_keeps_the_settings_its_best_epoch_was_chosen_by(tmp_path):
    """The saved best was scored by those metrics, users and validations: another monitor crashed the next
    comparison (KeyError), another user sample compared unlike scores."""
    from darec_dist.train.resume import check_resumable

    path = tmp_path / checkpoint.step_name(7)
    path.mkdir()
    (path / checkpoint.FILES).write_text("{}")  # what a checkpoint lists as written (nothing here)
    (path / checkpoint.COMPLETE).write_text("")
    adam = {"optimizer": "adam", "sharding": {"user_id": "row_wise", "item_id": "row_wise"},
            "kernel": {"user_id": "fused", "item_id": "fused"}}
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, epoch=3)))
    for changed, shown in [("eval.monitor=ndcg@10", "eval.monitor: 'recall@20' -> 'ndcg@10'"), ("eval.ks=[10,50]", "eval.ks: [5, 10, 20] -> [10, 50]"),
                           ("eval.validate=false", "eval.validate: True -> False"), ("eval.max_users=500", "eval.max_users: None -> 500"),
                           ("seed=7", "seed: 2024 -> 7")]:
        with pytest.raises(ConfigError, match=re.escape(f"(checkpoint -> now): {shown}; resume with")):
            check_resumable(path, 2, settings(adam, config=run_config("sparse.optimizer=adam", changed)))


def test_a_resume_changes_how_long_and_where_a_run_goes_on_not_what_it_learns(tmp_path):
    """A resume with another learning rate trained on (or, on a finished run, did nothing) and rewrote config.yaml
    with it: the run's epochs came from two configs, or none from the one it named."""
    from darec_dist.train.resume import check_resumable

    path = tmp_path / checkpoint.step_name(7)
    path.mkdir()
    (path / checkpoint.FILES).write_text("{}")  # what a checkpoint lists as written (nothing here)
    (path / checkpoint.COMPLETE).write_text("")
    adam = {"optimizer": "adam", "sharding": {"user_id": "row_wise", "item_id": "row_wise"},
            "kernel": {"user_id": "fused", "item_id": "fused"}}
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, epoch=3)))
    for allowed in (["train.epochs=500", "train.patience=50", "train.min_epochs=9"], ["loader.num_workers=4", "device=cpu"],
                    ["data.path=elsewhere", "data.verify_checksums=false", "output.plot=false", "eval.item_block=512"],
                    ["sparse.sharding=table_wise", "checkpoint.keep=9", "train.progress_bar=false", "run_dir=r"]):
        check_resumable(path, 2, settings(adam, config=run_config(*allowed)))
    saved = run_config()
    del saved["sparse"]["lr"]  # a key the config gained after the checkpoint was written: no change of this run's
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, epoch=3, config=saved)))
    check_resumable(path, 2, settings(adam, config=run_config("sparse.lr=0.5")))
    # The DeepSpeed settings the dense part trained by (the config names their file, which may be edited since).
    with_dense = run_config()
    with_dense["dense"]["deepspeed"] = {"optimizer": {"type": "AdamW", "params": {"lr": 0.001}}}
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, epoch=3, config=with_dense)))
    check_resumable(path, 2, settings(adam, config=with_dense))
    edited = json.loads(json.dumps(with_dense))
    edited["dense"]["deepspeed"]["optimizer"]["params"]["lr"] = 0.01
    with pytest.raises(ConfigError, match=re.escape("(checkpoint -> now): dense.deepspeed.optimizer.params.lr: 0.001 -> 0.01; resume")):
        check_resumable(path, 2, settings(adam, config=edited))
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(adam, epoch=3)))
    check_resumable(path, 2, settings(adam, config=edited))  # written before they were recorded
    for changed, shown in ((["sparse.lr=0.5"], "sparse.lr: 0.001 -> 0.5"), (["loader.batch_size=512"], "loader.batch_size: 4096 -> 512"),
                           (["dense.lr=0.1", "train.eval_every=2"], "dense.lr: None -> 0.1; train.eval_every: 1 -> 2")):
        with pytest.raises(ConfigError, match=re.escape(f"trained with other settings (checkpoint -> now): {shown}; resume with")):
            check_resumable(path, 2, settings(adam, config=run_config(*changed)))


def test_a_resume_keeps_the_table_optimizer_and_per_column_shard_state_its_shape(tmp_path):
    from darec_dist.train.resume import check_resumable

    path = tmp_path / checkpoint.step_name(7)
    path.mkdir()
    (path / checkpoint.FILES).write_text("{}")  # what a checkpoint lists as written (nothing here)
    (path / checkpoint.COMPLETE).write_text("")
    column_wise = {"optimizer": "rowwise_adagrad", "sharding": {"user_id": "column_wise", "item_id": "table_wise"},
                   "kernel": {"user_id": "fused", "item_id": "fused"}}
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(column_wise, epoch=1)))
    check_resumable(path, 2, settings(column_wise))
    with pytest.raises(ConfigError, match=r"\(checkpoint -> now\): sparse.optimizer: 'rowwise_adagrad' -> 'adagrad'; resume with"):
        check_resumable(path, 2, settings({**column_wise, "optimizer": "adagrad"}))
    with pytest.raises(ConfigError, match=r"column-wise tables \(user_id\) keep row-wise Adagrad state per column shard"):
        check_resumable(path, 1, settings(column_wise))  # another world size: another number of column shards
    with pytest.raises(ConfigError, match="per column shard"):
        check_resumable(path, 2, settings({**column_wise, "sharding": {"user_id": "row_wise", "item_id": "table_wise"}}))
    table_wise = {**column_wise, "sharding": {"user_id": "table_wise", "item_id": "table_wise"}}
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(table_wise, epoch=1)))
    check_resumable(path, 2, settings({**table_wise, "sharding": {"user_id": "row_wise", "item_id": "table_wise"}}))
    with pytest.raises(ConfigError, match=r"this run would shard user_id column-wise, where row-wise Adagrad keeps a state per "
                                          r"column shard, and the checkpoint holds one per row"):
        check_resumable(path, 2, settings(column_wise))  # QA: was DCP's size mismatch (943 saved, 1886 wanted)
    # One column shard (column-wise on one process) keeps one state per row, as the other shardings do: both ways.
    one_shard = {**column_wise, "column_shards": {"user_id": 1}}
    check_resumable(path, 1, settings(one_shard))
    with pytest.raises(ConfigError, match="this run would shard user_id column-wise"):
        check_resumable(path, 1, settings({**column_wise, "column_shards": {"user_id": 2}}))
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(one_shard, epoch=1, world_size=1)))
    check_resumable(path, 2, settings(table_wise))
    (path / checkpoint.STATE).write_text(json.dumps(saved_state({**column_wise, "column_shards": {"user_id": 2}}, epoch=1)))
    with pytest.raises(ConfigError, match=r"column-wise tables \(user_id\) keep row-wise Adagrad state per column shard"):
        check_resumable(path, 1, settings(table_wise))
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(column_wise, epoch=1)))
    # Another kernel keeps the optimizer state in another form (Adam moved between CPU and GPU, a table made data-parallel):
    # refused by name, where DCP's load failed with a traceback of missing keys.
    dense_kernels = {**column_wise, "kernel": {"user_id": "dense", "item_id": "fused"}}
    with pytest.raises(ConfigError, match=re.escape("kept by the kernels {'user_id': 'fused', 'item_id': 'fused'} (fbgemm's fused "
                                                    "kernel and the dense kernel's torch optimizer keep it in different forms), "
                                                    "and this run's are {'user_id': 'dense', 'item_id': 'fused'}")):
        check_resumable(path, 2, settings(dense_kernels))
    sgd = {**column_wise, "optimizer": "sgd"}  # no state to keep
    (path / checkpoint.STATE).write_text(json.dumps(saved_state(sgd, epoch=1)))
    check_resumable(path, 2, settings({**sgd, "kernel": dense_kernels["kernel"]}, config=run_config("sparse.optimizer=sgd")))
    # Written before kernels were recorded: left to the load, whose error names the checkpoint (the test below).
    (path / checkpoint.STATE).write_text(json.dumps(saved_state({k: v for k, v in column_wise.items() if k != "kernel"}, epoch=1)))
    check_resumable(path, 2, settings(dense_kernels))


def test_row_wise_adagrad_state_moves_from_two_table_wise_processes_to_one_column_shard(small_dataset, tmp_path):
    """A 2-process table-wise run under row-wise Adagrad, resumed by 1 process column-wise (one column shard per
    table, one state per row), trains on as the same checkpoint resumed table-wise does."""
    root, _ = small_dataset
    common = ["launch/train.py", "configs/train/default.yaml", f"data.path={root}", "device=cpu", "model.dim=8",
              "loader.batch_size=64", "loader.num_workers=1", "train.progress_bar=false", "output.plot=false",
              "train.min_epochs=1", "sparse.optimizer=rowwise_adagrad", "sparse.lr=0.1"]
    first = tmp_path / "column_wise"
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    finish(subprocess.Popen([*runner, *common, f"run_dir={first}", "sparse.sharding=table_wise", "train.epochs=1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    shutil.copytree(first, tmp_path / "table_wise")
    results = {}
    for sharding in ("column_wise", "table_wise"):
        run_dir = tmp_path / sharding
        finish(subprocess.Popen([sys.executable, *common, f"run_dir={run_dir}", f"sparse.sharding={sharding}", "train.epochs=2",
                                 "--resume", "auto"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[sharding] = [r["loss"] for r in records if r["kind"] == "train"], json.loads((run_dir / "results.json").read_text())
        assert results[sharding][1]["sharding_plan"]["user_id"][0] == sharding
    (column_losses, column), (table_losses, table) = results["column_wise"], results["table_wise"]
    assert len(column_losses) == 2 and column_losses == pytest.approx(table_losses, rel=1e-6)
    for split in ("val", "test"):
        assert column[split] == pytest.approx(table[split], abs=1e-6)


def test_tables_that_do_not_fit_the_checkpoint_are_refused_naming_it(tmp_path):
    """torch.distributed.checkpoint raises a BaseException holding every rank's traceback, which no handler caught."""
    import torch
    import torch.distributed.checkpoint as dcp

    dcp.save({"tables": {"fused.user_id.momentum1": torch.zeros(2)}}, checkpoint_id=str(tmp_path / "tables"))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: its tables could not be loaded into this run's (RuntimeError: "
                                                    "Missing key in checkpoint state_dict: tables.dense.user_id.sum.)")):
        checkpoint._load_tables({"tables": {"dense.user_id.sum": torch.zeros(2)}}, tmp_path)


def test_a_resume_continues_its_own_run_only(tmp_path):
    from darec_dist.train.resume import check_own_checkpoint

    run_dir = tmp_path / "run"
    check_own_checkpoint(run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(3), run_dir)
    check_own_checkpoint(run_dir / checkpoint.CHECKPOINTS / checkpoint.BEST, tmp_path / "." / "run")
    with pytest.raises(ConfigError, match=r"not a checkpoint of run_dir .*other \(it belongs to .*run\); resume a run in its own run_dir"):
        check_own_checkpoint(run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(3), tmp_path / "other")


def test_one_job_per_run_dir(tmp_path):
    from darec_dist.train.lock import exclusive_run_dir

    run_dir = tmp_path / "run"
    with exclusive_run_dir(run_dir, is_main=True):
        with pytest.raises(ConfigError, match="another training job is using this run_dir"):
            with exclusive_run_dir(run_dir, is_main=True):
                pass
        (run_dir / "config.yaml").write_text("")
    with exclusive_run_dir(run_dir, is_main=True):  # released with the job
        pass
    assert (run_dir / "config.yaml").exists()
    with exclusive_run_dir(tmp_path / "refused", is_main=True):
        pass  # nothing written: the directory it created goes again
    assert not (tmp_path / "refused").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"run_dir: {tmp_path / 'file'} is a file"):
        with exclusive_run_dir(tmp_path / "file", is_main=True):
            pass
    with pytest.raises(ConfigError, match=f"run_dir: cannot create {tmp_path / 'file' / 'run'} \\(Not a directory\\)"):
        with exclusive_run_dir(tmp_path / "file" / "run", is_main=True):
            pass


def test_a_resumed_run_drops_the_records_it_will_log_again(tmp_path):
    from darec_dist.train import report

    for epoch in (0, 1, 2):
        report.append_metrics(tmp_path, {"kind": "train", "epoch": epoch})
        report.append_metrics(tmp_path, {"kind": "val", "epoch": epoch})
    report.keep_metrics_before(tmp_path, 2)
    assert [(r["kind"], r["epoch"]) for r in report.read_metrics(tmp_path)] == [("train", 0), ("val", 0), ("train", 1), ("val", 1)]
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"kind": "train", "ep')  # a killed job's last append
    report.keep_metrics_before(tmp_path, 2)
    assert path.read_text().count("\n") == 4 and path.read_text().endswith("}\n")
    path.write_text('{"kind": "train", "ep\n' + path.read_text())  # damage anywhere else is named
    with pytest.raises(ConfigError, match=rf"{path}:1: not a JSON record with an epoch"):
        report.read_metrics(tmp_path)
    path.write_text('{"kind": "val"}\n' + path.read_text()[path.read_text().index("\n") + 1:])  # JSON, but no epoch
    with pytest.raises(ConfigError, match=rf"{path}:1: not a JSON record with an epoch"):
        report.read_metrics(tmp_path)


def test_results_name_the_epoch_and_scores_of_the_model_they_test(small_dataset, tmp_path):
    """Resumed from an older checkpoint (the newest damaged), the loop's state names an earlier best than the
    model in checkpoints/best, which is the one tested: results.json reported the earlier epoch's validation."""
    root, _ = small_dataset
    command = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={tmp_path}",
               *SETTINGS, "model.backbone=mf", "train.epochs=2", "checkpoint.every_steps=null", "sparse.lr=0.05"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["best_epoch"] == 1  # the case: the newest checkpoint's epoch is the best one
    newest = checkpoint.latest(tmp_path)
    (newest / checkpoint.STATE).unlink()  # damaged: the resume starts from the end of epoch 0, whose best was epoch 0
    # Ended before epoch 1, it would test epoch 1's model, which it never trained (QA: "best epoch 7, 6 epochs run").
    shorter = subprocess.run([*command, "train.epochs=1", "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert shorter.returncode == 2 and "its best model is epoch 1's, from beyond the checkpoint resumed" in shorter.stderr, shorter.stderr[-2000:]
    again = subprocess.run([*command, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert (rerun["best_epoch"], rerun["val"], rerun["test"]) == (results["best_epoch"], results["val"], results["test"])
    # A finished run tests its best again under a smaller train.epochs: that model is no later than its checkpoint.
    retest = subprocess.run([*command, "train.epochs=1", "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert retest.returncode == 0, retest.stdout[-2000:] + retest.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["test"] == results["test"]
    # A roll-back by path beside newer checkpoints would be mixed with them (pruning, --resume auto): refused.
    oldest = checkpoint.step_checkpoints(tmp_path)[0]
    back = subprocess.run([*command, "--resume", str(oldest)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert back.returncode == 2 and "the run has 1 newer checkpoint(s) (step-" in back.stderr, back.stderr[-2000:]


def test_a_run_that_stopped_early_is_tested_not_trained_on_when_started_again(small_dataset, tmp_path):
    root, _ = small_dataset
    command = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={tmp_path}",
               *SETTINGS, "model.backbone=mf", "train.epochs=40", "train.patience=1", "sparse.lr=0.5", "output.plot=true",
               "--resume", "auto"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "early stop" in first.stdout, first.stdout[-2000:] + first.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    records = (tmp_path / "metrics.jsonl").read_text()
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)  # as torchrun's restart would
    assert again.returncode == 0 and "stopped early" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert (tmp_path / "metrics.jsonl").read_text() == records
    rerun = json.loads((tmp_path / "results.json").read_text())
    assert (rerun["best_epoch"], rerun["epochs_run"], rerun["test"]) == (results["best_epoch"], results["epochs_run"], results["test"])
    # A larger patience is this config's choice: the run trains on from where it stopped.
    # Its results go while it trains on: killed before it writes new ones, it is no finished run of this config.
    longer = subprocess.Popen([*command, "train.patience=3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in longer.stdout:
        seen.append(line)
        if "training on under train.patience=3" in line:
            assert not any((tmp_path / name).exists() for name in ("results.json", "results.md", "curves.png", "export"))
            break
    assert longer.wait(timeout=600) == 0 and seen and "training on" in seen[-1], "".join(seen)[-2000:] + longer.stdout.read()[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["epochs_run"] > results["epochs_run"]
    # results.json marks a finished run (launch/experiment.py skips such a run): it comes after the rest of the output.
    assert (tmp_path / "results.json").stat().st_mtime_ns >= max((tmp_path / n).stat().st_mtime_ns for n in ("curves.png", "results.md"))


def test_a_checkpoint_loads_only_into_the_model_and_dataset_it_was_written_for(tmp_path):
    from types import SimpleNamespace

    from darec_dist.config import load_config
    from darec_dist.train.config import TrainConfig

    def identity(*overrides, users=943, fingerprint="a1"):
        cfg = load_config(TrainConfig, "configs/train/default.yaml", ["model.backbone=mf", *overrides])
        return checkpoint.identity(cfg, SimpleNamespace(num_users=users, num_items=1682, embedding_dim=384, fingerprint=fingerprint))

    path = tmp_path / checkpoint.step_name(7)
    path.mkdir()
    (path / checkpoint.FILES).write_text("{}")  # what a checkpoint lists as written (nothing here)
    (path / checkpoint.COMPLETE).write_text("")
    (path / checkpoint.STATE).write_text(json.dumps({"epoch": 1, "step_in_epoch": 0, "identity": identity()}))
    checkpoint.check_identity(path, identity("train.epochs=9", "sparse.lr=0.5"))  # the loop may change, not the model
    refusals = [
        (identity("model.backbone=lightgcn"), "model.backbone: 'mf' -> 'lightgcn'"),
        (identity("align.method=darec"), "align.method: 'none' -> 'darec'"),
        (identity(users=40), "dataset.users: 943 -> 40"),
        # Re-prepared with another split or graph: the same shape, other contents.
        (identity(fingerprint="b2"), r"dataset.fingerprint: 'a1' -> 'b2' \(dataset.fingerprint digests the dataset's checksums"),
    ]
    for current, refusal in refusals:
        with pytest.raises(ConfigError, match=refusal):
            checkpoint.check_identity(path, current)
    # Written before identity() recorded the fingerprint: named as such, not as a dataset that differs.
    older = identity()
    del older["dataset"]["fingerprint"]
    (path / checkpoint.STATE).write_text(json.dumps({"epoch": 1, "step_in_epoch": 0, "identity": older}))
    with pytest.raises(ConfigError, match=r"written by an earlier darec-dist \(its identity lacks dataset.fingerprint\)"):
        checkpoint.check_identity(path, identity())
    # Written before align.projector_init existed: trained under what is now its default, so read as such.
    older = identity()
    del older["align"]["projector_init"]
    (path / checkpoint.STATE).write_text(json.dumps({"epoch": 1, "step_in_epoch": 0, "identity": older}))
    checkpoint.check_identity(path, identity())
    with pytest.raises(ConfigError, match="align.projector_init: 'torch' -> 'xavier'"):
        checkpoint.check_identity(path, identity("align.projector_init=xavier"))


def test_a_new_run_refuses_a_run_dir_that_holds_another_runs_checkpoints(tmp_path):
    from darec_dist.train.resume import check_fresh

    check_fresh(tmp_path / "new")
    (tmp_path / checkpoint.CHECKPOINTS / f".tmp-{checkpoint.step_name(3)}").mkdir(parents=True)  # a crashed save only
    check_fresh(tmp_path)
    (tmp_path / checkpoint.CHECKPOINTS / checkpoint.step_name(42)).mkdir()
    with pytest.raises(ConfigError, match=f"{tmp_path}: holds checkpoints of an earlier run .*--resume auto"):
        check_fresh(tmp_path)
    # Its results, its checkpoints deleted (to free space): a new run killed before its own results left them to pass
    # for its (an experiment counted them as the new settings' run). A killed first attempt's metrics are no results.
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINTS)
    (tmp_path / "metrics.jsonl").write_text("")
    check_fresh(tmp_path)
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "export").mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: holds the results of an earlier run (results.json, export); "
                                                    "give this run another run_dir, or delete that one")):
        check_fresh(tmp_path)
    from darec_dist.train.resume import resume_source  # the same where --resume auto finds nothing to continue (experiment.py's runs)

    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: holds the results of an earlier run")):
        resume_source(tmp_path, "auto")


def test_a_missing_checkpoint_is_named_as_missing(tmp_path):
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        checkpoint.check_complete(tmp_path / "nope")


def test_a_checkpoint_damaged_after_it_was_written_is_refused_by_name_and_skipped(tmp_path, capsys):
    def written(step):  # its file list as darec-dist wrote it before 2026-12-06: sizes only
        path = tmp_path / checkpoint.CHECKPOINTS / checkpoint.step_name(step)
        (path / "tables").mkdir(parents=True)
        (path / "tables" / "__0_0.distcp").write_bytes(b"x" * 100)
        (path / checkpoint.STATE).write_text(json.dumps({"epoch": 1, "step_in_epoch": 0, "global_step": step}))
        (path / checkpoint.FILES).write_text(json.dumps({"tables/__0_0.distcp": 100, checkpoint.STATE: (path / checkpoint.STATE).stat().st_size}))
        (path / checkpoint.COMPLETE).write_text("")
        return path

    older, newer = written(4), written(8)
    assert checkpoint.latest(tmp_path) == newer
    (newer / "tables" / "__0_0.distcp").write_bytes(b"x" * 60)  # truncated
    with pytest.raises(ConfigError, match=r"damaged since it was written \(tables/__0_0.distcp holds 60 bytes, 100 were written\)"):
        checkpoint.loop_state(newer)
    assert checkpoint.latest(tmp_path) == older
    assert "skipping the damaged checkpoint" in capsys.readouterr().err
    (older / checkpoint.FILES).write_text("[]")
    with pytest.raises(ConfigError, match=r"files.json is unreadable"):
        checkpoint.check_complete(older)
    (older / checkpoint.FILES).unlink()  # a missing list hid every other damage (a truncated shard loaded: EOFError)
    with pytest.raises(ConfigError, match=r"files.json is missing"):
        checkpoint.check_complete(older)
    (older / checkpoint.STATE).unlink()
    with pytest.raises(ConfigError, match=r"state.json is missing"):
        checkpoint.check_complete(older)
    assert checkpoint.latest(tmp_path) is None
    # Nothing to continue: --resume auto refuses rather than start over (the run's metrics and best model would go).
    from darec_dist.train.resume import resume_source

    with pytest.raises(ConfigError, match=rf"{tmp_path}: --resume auto found no complete, undamaged checkpoint to continue "
                                          rf"\({checkpoint.step_name(4)}, {checkpoint.step_name(8)}\)"):
        resume_source(tmp_path, "auto")
    assert resume_source(tmp_path / "new", "auto") is None  # torchrun's first attempt of a self-healing run
    with pytest.raises(ConfigError, match="--resume latest: no such checkpoint directory"):
        resume_source(tmp_path, "latest")
    with pytest.raises(ConfigError, match=f"{tmp_path}: not a complete checkpoint"):  # the run_dir, not one of its checkpoints
        resume_source(tmp_path, str(tmp_path))
    # A checkpoint whose run has a best model resumes only where that model can be read.
    (older / checkpoint.STATE).write_text(json.dumps({"epoch": 1, "step_in_epoch": 0, "global_step": 4, "best": {"epoch": 0, "metrics": {}}}))
    (older / checkpoint.FILES).write_text(json.dumps({"tables/__0_0.distcp": 100}))
    with pytest.raises(ConfigError, match=r"the run's best model, which it tests when done, cannot be read: .*best: no such checkpoint"):
        resume_source(tmp_path, str(older))


def _count_optimizer_steps(rank, world_size, root, run_dir):
    from darec_dist.data.dataset import PreparedDataset
    from darec_dist.data.loader import epoch_batches
    from darec_dist.train.evaluate import evaluate
    from darec_dist.train.trainer import Trainer
    from tests.dist_helpers import cpu_env
    from tests.train_helpers import train_config

    dataset = PreparedDataset.open(root)
    env = cpu_env(rank, world_size)
    cfg = train_config(root, run_dir, "model.backbone=mf", "sparse.optimizer=rowwise_adagrad", "loader.batch_size=64")
    trainer = Trainer(cfg, env, dataset)
    for _, batch in zip(range(3), epoch_batches(dataset, cfg.loader, trainer.features, cfg.seed, 0, world_size)):
        trainer.train_step(batch)
    trained = trainer.tables.optimizer_step
    assert trained >= 3
    trainer.set_train(False)
    evaluate(trainer, "val", world_size, rank)
    assert trainer.tables.optimizer_step == trained, "an evaluation moved the fused optimizer's step count"
    checkpoint.save(trainer, run_dir, checkpoint.step_name(3), {"epoch": 0, "step_in_epoch": 3})
    fresh = Trainer(cfg, env, dataset)
    assert fresh.tables.optimizer_step == 0
    checkpoint.load(fresh, run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(3))
    assert fresh.tables.optimizer_step == trained, "a resume restarted the fused optimizer's step count"


def test_the_fused_optimizers_step_count_survives_evaluation_and_resume(small_dataset, tmp_path):
    """fbgemm counts steps per module (Adam's bias correction reads the count on GPU), outside TorchRec's state_dict."""
    from tests.dist_helpers import run_distributed

    run_distributed(_count_optimizer_steps, 1, small_dataset[0], tmp_path)


def _overwritten_checkpoint_is_refused(rank, world_size, root, run_dir):
    from darec_dist.data.dataset import PreparedDataset
    from darec_dist.data.loader import epoch_batches
    from darec_dist.train.trainer import Trainer
    from tests.dist_helpers import cpu_env
    from tests.train_helpers import train_config

    dataset = PreparedDataset.open(root)
    cfg = train_config(root, run_dir, "model.backbone=mf", "align.method=darec", "loader.batch_size=64")
    trainer = Trainer(cfg, cpu_env(rank, world_size), dataset)
    trainer.train_step(next(epoch_batches(dataset, cfg.loader, trainer.features, cfg.seed, 0, world_size)))
    for step in (3, 6):
        checkpoint.save(trainer, run_dir, checkpoint.step_name(step), {"epoch": 0, "step_in_epoch": step, "global_step": step})
    newer = run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(6)
    checkpoint.load(trainer, newer)
    # Bytes flipped in place, the size kept (bit rot, a bad copy): the tensors would load without complaint.
    shard = sorted((newer / "tables").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    name = shard.relative_to(newer)
    with pytest.raises(ConfigError, match=rf"damaged since it was written \({name}'s sha256 differs from the one it was written with\)"):
        checkpoint.load(trainer, newer)
    with pytest.raises(ConfigError, match=rf"{name}'s sha256 differs"):
        checkpoint.load_weights(trainer, newer)
    assert checkpoint.latest(run_dir).name == checkpoint.step_name(3)  # --resume auto falls back to the older one
    checkpoint.loop_state(newer)  # reading its loop position checks sizes only


def test_a_checkpoint_overwritten_in_place_is_refused_and_skipped(small_dataset, tmp_path):
    from tests.dist_helpers import run_distributed

    run_distributed(_overwritten_checkpoint_is_refused, 1, small_dataset[0], tmp_path)


def test_a_best_model_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    """The run could not resume ('the run's best model ... cannot be read') though its copy lay beside it; the
    staging directory of the best never swapped in stayed until the next better model."""
    root = tmp_path / checkpoint.CHECKPOINTS
    best = root / checkpoint.BEST

    def aside(name, files):
        path = root / name
        path.mkdir(parents=True)
        for file, text in files.items():
            (path / file).write_text(text)
        return path

    listed = {checkpoint.STATE: "{}", checkpoint.FILES: "{}", checkpoint.COMPLETE: ""}
    moved = aside(f".{checkpoint.BEST}.old-1a2b3c4d", listed)  # what replace_dir's first rename leaves
    half_removed = aside(f".{checkpoint.BEST}.old-5e6f7a8b", {checkpoint.COMPLETE: ""})  # newer, but damaged
    staging = aside(f".tmp-{checkpoint.BEST}", listed)  # the new one, never swapped in
    checkpoint.recover_interrupted_writes(tmp_path)
    assert best.is_dir() and not moved.exists()
    checkpoint.check_complete(best)
    assert not half_removed.exists() and not staging.exists()
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.BEST]
    checkpoint.recover_interrupted_writes(tmp_path)  # in place: nothing moves
    assert best.is_dir()


def test_a_checkpoint_being_read_is_not_pruned(tmp_path):
    from darec_dist.files import reading_lock

    root = tmp_path / checkpoint.CHECKPOINTS
    for step in (3, 6, 9):
        (root / checkpoint.step_name(step)).mkdir(parents=True)
        (root / checkpoint.step_name(step) / checkpoint.COMPLETE).write_text("")
    # As load_weights holds it (launch/evaluate.py --checkpoint on a running run).
    with reading_lock(root / checkpoint.step_name(3)):
        checkpoint._prune(root, keep=1)
        assert sorted(p.name for p in root.iterdir()) == [checkpoint.step_name(3), checkpoint.step_name(9)]
    checkpoint._prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.step_name(9)]


def test_a_prune_killed_part_way_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / checkpoint.CHECKPOINTS
    for step in (3, 6):
        (root / checkpoint.step_name(step)).mkdir(parents=True)
        (root / checkpoint.step_name(step) / checkpoint.COMPLETE).write_text("")
        (root / checkpoint.step_name(step) / "tables").write_text("x")

    def killed_after_one_file(path, ignore_errors=False):
        (Path(path) / checkpoint.COMPLETE).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        checkpoint._prune(root, keep=1)
    monkeypatch.undo()
    assert checkpoint.step_checkpoints(tmp_path) == [root / checkpoint.step_name(6)]
    checkpoint.recover_interrupted_writes(tmp_path)  # what a resume does first
    assert sorted(p.name for p in root.iterdir()) == [checkpoint.step_name(6)]


def test_a_rank_the_saved_run_did_not_have_takes_rank_0s_torch_generator(tmp_path):
    """torch's generator is the same on every rank (RLMRec-Gen draws its masks from it); a resume on more processes
    than wrote the checkpoint must not leave the new ranks on another one."""
    import numpy as np
    import torch

    torch.manual_seed(5)
    torch.rand(3)
    torch.save(checkpoint._rng_state(), tmp_path / "rng-rank0.pt")
    expected = torch.randint(2**31, (4,))
    torch.manual_seed(99)
    np.random.seed(7)
    numpy_own = np.random.get_state()[1].copy()
    checkpoint.restore_rng(tmp_path, rank=1)
    assert torch.equal(torch.randint(2**31, (4,)), expected)
    assert np.array_equal(np.random.get_state()[1], numpy_own)  # numpy's generator stays the rank's own


def test_a_checkpoint_lacking_a_key_a_resume_checks_is_refused_naming_it(small_dataset, tmp_path):
    """One written by an earlier darec-dist cannot be checked for a resume: refused naming what it lacks, not
    resumed on assumed values (which every check used to fill in for itself)."""
    root, _ = small_dataset
    command = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={tmp_path}",
               *SETTINGS, "model.backbone=mf"]
    first = subprocess.run([*command, "train.epochs=1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    old = checkpoint.latest(tmp_path)
    state = json.loads((old / checkpoint.STATE).read_text())
    del state["zero_stage"], state[checkpoint.TABLE_STEPS]
    (old / checkpoint.STATE).write_text(json.dumps(state))
    sizes = json.loads((old / checkpoint.FILES).read_text())
    (old / checkpoint.FILES).write_text(json.dumps({**sizes, checkpoint.STATE: (old / checkpoint.STATE).stat().st_size}))
    again = subprocess.run([*command, "train.epochs=2", "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert (f"{old}: written by an earlier darec-dist (its state.json lacks {checkpoint.TABLE_STEPS}, zero_stage), so a "
            "resume cannot be checked against it; start another run_dir") in again.stderr, again.stderr[-2000:]


def _decide_on_each_rank(rank, world_size, out_dir):
    from darec_dist.distributed.collectives import decided_by_rank0

    chosen = decided_by_rank0(lambda: f"step chosen by rank {rank}")  # each rank would choose its own
    try:
        decided_by_rank0(lambda: (_ for _ in ()).throw(ConfigError(f"refused by rank {rank}")))
        refusal = None
    except ConfigError as err:
        refusal = str(err)
    (out_dir / f"rank{rank}.json").write_text(json.dumps([chosen, refusal]))


def test_every_rank_takes_rank_0s_choice_of_checkpoint_and_its_refusal(tmp_path):
    """Which checkpoint a resume or an evaluation loads is decided once: ranks choosing alone could load
    different ones (a running run writing or pruning, nodes' differing views of a shared filesystem)."""
    from tests.dist_helpers import run_distributed

    run_distributed(_decide_on_each_rank, 2, tmp_path)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ["step chosen by rank 0", "refused by rank 0"]


def test_a_resume_with_no_epoch_left_and_no_model_to_test_is_refused(tmp_path):
    """eval.validate=false saves its model after epoch train.epochs: a run killed past a lower train.epochs had none,
    and the resume failed at the end naming a missing best checkpoint."""
    from darec_dist.train.resume import check_best_reachable

    source = tmp_path / checkpoint.CHECKPOINTS / checkpoint.step_name(40)
    source.mkdir(parents=True)
    (source / checkpoint.FILES).write_text("{}")
    (source / checkpoint.COMPLETE).write_text("")
    (source / checkpoint.STATE).write_text(json.dumps({"epoch": 4, "step_in_epoch": 0, "global_step": 40, "best": None}))
    check_best_reachable(tmp_path, source, LoopConfig(epochs=5))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: has trained 4 epochs and has no best model yet (one is "
                                                    "saved at a better validation, or with eval.validate=false after epoch "
                                                    "train.epochs), and train.epochs=3 asks for no more; resume with "
                                                    "train.epochs greater than 4")):
        check_best_reachable(tmp_path, source, LoopConfig(epochs=3))


def test_a_resume_that_may_stop_before_the_best_model_on_disk_is_refused(tmp_path):
    """A best model saved after the checkpoint resumed is written again only by a replay that gets that far: a lower
    patience could stop it earlier, and the run would test a model it never chose."""
    from darec_dist.train.resume import check_best_reachable

    root = tmp_path / checkpoint.CHECKPOINTS
    source, best = root / checkpoint.step_name(50), root / checkpoint.BEST
    trained_with = {"train": {"epochs": 100, "patience": 10, "min_epochs": 0}}
    for path, epoch, best_epoch in ((source, 5, 4), (best, 8, 7)):
        path.mkdir(parents=True)
        (path / checkpoint.FILES).write_text("{}")
        (path / checkpoint.COMPLETE).write_text("")
        (path / checkpoint.STATE).write_text(json.dumps({"epoch": epoch, "step_in_epoch": 0, "global_step": 10 * epoch,
                                                         "best": {"epoch": best_epoch}, "config": trained_with}))
    check_best_reachable(tmp_path, source, LoopConfig(epochs=100, patience=10))
    check_best_reachable(tmp_path, source, LoopConfig(epochs=100, patience=30))  # never stops earlier than the run did
    with pytest.raises(ConfigError, match=re.escape("its best model is epoch 7's, from beyond the checkpoint resumed "
                                                    "(epoch 5), which the run saves again only if it gets that far; with "
                                                    "train.patience=2 (was 10) it may stop before")):
        check_best_reachable(tmp_path, source, LoopConfig(epochs=100, patience=2))


def test_ctrl_c_ends_a_training_run_in_one_line_keeping_its_checkpoints(small_dataset, tmp_path):
    """QA: Ctrl-C printed the traceback of wherever the step was (a DeepSpeed collective); now one line, exit 130."""
    root, _ = small_dataset
    command = [sys.executable, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={tmp_path}",
               *SETTINGS, "model.backbone=mf", "align.method=rlmrec-con", "train.epochs=400", "train.patience=400",
               "checkpoint.every_steps=1", "train.progress_bar=false", "--resume", "auto"]
    # (A checkpoint every step: Ctrl-C often lands inside a save, where DCP's collectives wrapped it in an exception.)
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.step_checkpoints(tmp_path) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert job.poll() is None, "the run must still be training when interrupted"
        os.killpg(job.pid, signal.SIGINT)  # as a terminal sends it
        _, err = job.communicate(timeout=120)
    finally:  # not left training beside the next tests after a failure here
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: the run's complete checkpoints are kept")
    assert "Traceback" not in err, err[-3000:]
    assert checkpoint.latest(tmp_path) is not None  # what --resume auto continues from
