"""launch/plan.py: a plan and memory per device for a scale that fits, a clear error for one that does not."""

import re

import pytest

from launch.plan import NO_STATE, OPTIMIZER_STATE, main, table_bytes


def test_plan_for_a_cluster_that_fits(capsys):
    assert main(["--nodes", "2", "--gpus-per-node", "4", "--hbm-gb", "16", "--users", "1e7", "--items", "1e6", "--dim", "64", "--llm-dim", "128"]) == 0
    out = capsys.readouterr().out
    for table in ("user_id", "item_id", "user_llm", "item_llm"):
        assert table in out
    # The devices hold every table once: their mean times 8 is the tables' total, and none exceeds its 16 GiB.
    low, mean, high = map(float, re.search(r"HBM per device .*: min ([\d.]+) GiB, mean ([\d.]+) GiB, max ([\d.]+) GiB of 16 GiB", out).groups())
    total = (table_bytes(10**7, 64, 4, OPTIMIZER_STATE["rowwise_adagrad"]) + table_bytes(10**6, 64, 4, OPTIMIZER_STATE["rowwise_adagrad"])
             + table_bytes(10**7, 128, 4, NO_STATE) + table_bytes(10**6, 128, 4, NO_STATE)) / 2**30  # fp32: the trainer's default
    assert low <= mean <= high <= 16 and mean * 8 == pytest.approx(total, abs=8 * 0.005)


def test_scale_that_cannot_fit_says_by_how_much(capsys):
    code = main(["--nodes", "8", "--gpus-per-node", "8", "--hbm-gb", "80", "--users", "1e9", "--items", "1e8", "--dim", "128", "--llm-dim", "4096",
                 "--llm-dtype", "fp16"])
    assert code == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "short by 3,801.0 GiB" in err


def test_a_plan_with_tables_under_uvm_says_the_trainer_does_not_run_it(capsys):
    code = main(["--nodes", "16", "--gpus-per-node", "8", "--hbm-gb", "80", "--ddr-gb", "256", "--users", "1e9", "--items", "1e8",
                 "--dim", "128", "--llm-dim", "4096", "--llm-dtype", "fp16"])
    out = capsys.readouterr().out
    assert code == 0 and re.search(r"user_llm .* fused_uvm_caching", out)
    assert "note: user_llm under a UVM kernel: the trainer does not run those yet" in out


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "0"], "--nodes must be a finite number > 0, got 0"),
    (["--users", "-5"], "--users must be a finite number > 0, got -5"),
    (["--users", "inf"], "--users must be a finite number > 0, got inf"),
    (["--items", "0.5"], "--items counts rows: a whole number from 1 to 2^63 - 1, got 0.5"),
    (["--users", "100.7"], "--users counts rows: a whole number from 1 to 2^63 - 1, got 100.7"),
    (["--users", "1e30"], "--users counts rows: a whole number from 1 to 2^63 - 1, got 1e+30"),
    (["--llm-dim", "-1"], "--llm-dim and --ddr-gb must be >= 0"),
])
def test_nonsense_sizes_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        main(["--users", "1e6", "--items", "1e6", *flags])
    assert message in capsys.readouterr().err


def test_optimizer_state_is_counted_only_where_it_exists():
    weights = 1000 * 64 * 4
    assert table_bytes(1000, 64, 4, NO_STATE) == weights  # frozen LLM tables
    assert table_bytes(1000, 64, 4, OPTIMIZER_STATE["sgd"]) == weights
    assert table_bytes(1000, 64, 4, OPTIMIZER_STATE["rowwise_adagrad"]) == weights + 1000 * 4  # one float per row
    assert table_bytes(1000, 64, 4, OPTIMIZER_STATE["adam"]) == 3 * weights  # two moments per weight


def test_the_planner_counts_the_optimizer_state(capsys):
    """200M rows x 64 fit two 80 GiB devices by their weights (48 GiB) but not with Adam's two moments (143 GiB, 72 per
    device before the planner's reserve): printed as a plan that runs (a table of 107 GiB on one device) before."""
    scale = ["--nodes", "1", "--gpus-per-node", "2", "--hbm-gb", "80", "--users", "1.5e8", "--items", "0.5e8", "--dim", "64"]
    assert main([*scale, "--optimizer", "adam"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main([*scale, "--optimizer", "sgd"]) == 0
    high = float(re.search(r"HBM per device .*max ([\d.]+) GiB of 80 GiB", capsys.readouterr().out).group(1))
    assert high <= 80


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise"])
def test_the_llm_tables_are_planned_as_the_trainer_shards_them(capsys, sharding):
    """sparse.llm_sharding fixes the trainer's LLM tables' sharding: the planner may not choose another."""
    scale = ["--nodes", "2", "--gpus-per-node", "4", "--hbm-gb", "16", "--users", "1e7", "--items", "1e6", "--dim", "64", "--llm-dim", "128"]
    assert main([*scale, "--llm-sharding", sharding]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"user_llm +[\d,]+ +128 {sharding} ", out) and re.search(rf"item_llm +[\d,]+ +128 {sharding} ", out), out
