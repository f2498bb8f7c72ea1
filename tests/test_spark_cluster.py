"""spark-submit to a standalone Spark cluster (a master and a worker started here, executors in their own JVM
and Python workers) writes the same dataset as the local session."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from darec_dist.config import load_config
from darec_dist.distributed.env import free_port
from spark_jobs.config import PrepareConfig
from spark_jobs.prepare import prepare
from tests.conftest import REPO
from tests.synthetic import overrides, write_csv_source

BIN = Path(sys.executable).parent


def start(tmp_path, name, *args, ready):
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SPARK_LOCAL_IP": "127.0.0.1"}
    # The child holds its own copy of the descriptor, so ours can close as soon as it has started.
    with open(log, "w") as log_file:
        process = subprocess.Popen([str(BIN / "spark-class"), *args], stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env, cwd=tmp_path, start_new_session=True)
    deadline = time.monotonic() + 300
    while ready not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    return process


@pytest.fixture
def standalone_cluster(tmp_path):
    master = start(tmp_path, "master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(free_port()),
                   "--webui-port", str(free_port()), ready="elected leader")
    # The port it bound, which is the next one where another process took the free one meanwhile.
    url = re.search(r"Starting Spark master at (spark://\S+)", (tmp_path / "master.log").read_text()).group(1)
    # One GPU to hand out, number 3 (found by a discovery script, as on a real GPU node), for tasks that ask for one.
    discovery = tmp_path / "gpus.sh"
    discovery.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["3"]}\'\n')
    discovery.chmod(0o755)
    properties = tmp_path / "worker.conf"
    properties.write_text(f"spark.worker.resource.gpu.amount 1\nspark.worker.resource.gpu.discoveryScript {discovery}\n")
    worker = start(tmp_path, "worker", "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1",
                   "--cores", "1", "--memory", "1g", "--webui-port", str(free_port()), "--work-dir", str(tmp_path / "work"),
                   "--properties-file", str(properties), ready="Successfully registered with master")
    yield url
    for process in (worker, master):
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_spark_submit_to_a_cluster_writes_the_local_sessions_dataset(spark, standalone_cluster, tmp_path):
    source = write_csv_source(tmp_path / "raw", item_text=True)
    # The real encoder: its fixed batches (ranked by text length across partitions) run in the executor too.
    settings = overrides({**source, "embedding.encoder": "sentence-transformers", "spark.shuffle_partitions": 4})
    config = REPO / "configs" / "data" / "csv.yaml"
    command = [str(BIN / "spark-submit"), "--master", standalone_cluster, str(REPO / "spark_jobs" / "prepare.py"), str(config),
               *settings, f"output={tmp_path / 'cluster'}"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Granted executor ID app-" in done.stderr  # the work ran on the cluster's executor, not in the driver
    # Lineage cut by checkpoints on shared storage (a local checkpoint is lost with its executor), gone once written.
    assert "checkpoints under" in done.stdout + done.stderr and not (tmp_path / "cluster" / "_checkpoints").exists()
    local = prepare(load_config(PrepareConfig, config, [*settings, f"output={tmp_path / 'local'}"]), spark=spark)
    on_cluster, here = (json.loads((root / "manifest.json").read_text()) for root in (tmp_path / "cluster", local))
    assert on_cluster["arrays"] == here["arrays"] and on_cluster["shards"] == here["shards"]


def test_a_task_given_a_gpu_encodes_on_that_gpu(standalone_cluster, tmp_path):
    """`embedding.device=cuda` means the GPU Spark assigned the task, not every worker's GPU 0."""
    job = tmp_path / "devices.py"
    job.write_text("from pyspark.sql import SparkSession\n"
                   "from spark_jobs.embed import task_device\n"
                   "spark = SparkSession.builder.getOrCreate()\n"
                   "print('DEVICES', spark.sparkContext.parallelize(range(2), 2).map(lambda _: (task_device('cuda'), task_device('cpu'))).collect())\n"
                   "spark.stop()\n")
    gpu_per_task = ["--conf", "spark.executor.resource.gpu.amount=1", "--conf", "spark.task.resource.gpu.amount=1"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run([str(BIN / "spark-submit"), "--master", standalone_cluster, *gpu_per_task, str(job)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DEVICES [('cuda:3', 'cpu'), ('cuda:3', 'cpu')]" in done.stdout, done.stdout[-3000:]
