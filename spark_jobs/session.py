"""Spark session setup and per-stage progress reporting."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from pyspark import SparkConf, SparkContext
from pyspark.sql import DataFrame, SparkSession

from darec_dist.signals import ctrl_c_held
from spark_jobs.config import SparkConfig


def local_uri(path: str | os.PathLike) -> str:
    """A path without a scheme as an absolute file: URI, for Spark to read or write where the job's own file I/O does.

    Spark resolves a scheme-less path on Hadoop's default filesystem, HDFS on many clusters, while the job reads its
    inputs' folders and writes the dataset (the driver its manifest and arrays, the executors their shards) with plain
    file I/O: on such a cluster `data/x.csv` was read from HDFS and the sorted parts written there.
    """
    text = str(path)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", text):
        return text
    # Not Path.as_uri(): Hadoop does not decode its percent-escapes (a space would become a literal %20).
    return "file://" + os.path.abspath(os.path.expanduser(text))


def cut_lineage(df: DataFrame) -> DataFrame:
    """`df` computed once, its lineage cut: on the context's checkpoint directory where it has one, else locally.

    A local checkpoint's blocks live in the executors that computed them: on a cluster that later loses one of them,
    a recomputation that needs its blocks fails the job ("Checkpoint block ... not found"). Files on storage that
    every node mounts survive it."""
    return df.checkpoint() if df.sparkSession.sparkContext.getCheckpointDir() else df.localCheckpoint()


def launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with a gateway already running; its
    # --master (or spark-defaults) then decides, not our config's default.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def effective_master(cfg: SparkConfig) -> str | None:
    """The master URL the session is (or was to be) started with: spark-submit's under it, else the config's."""
    if not launched_by_spark_submit():
        return cfg.master
    SparkContext._ensure_initialized()  # the gateway spark-submit started, whose JVM holds --master
    return SparkConf().get("spark.master", None)


def start_session(cfg: SparkConfig) -> SparkSession:
    # Workers must run this interpreter, or they miss pandas/torch ("No module named ...").
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    if not launched_by_spark_submit() and (cfg.master or "").startswith("local"):
        # Local mode talks only to itself; on a cluster the driver must bind an address its executors can reach.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    settings = {
        "spark.app.name": cfg.app_name,
        "spark.driver.memory": cfg.driver_memory,
        "spark.sql.shuffle.partitions": str(cfg.shuffle_partitions),
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.ui.enabled": "false",
        # Reuse Python workers so that a text encoder is loaded once per worker, not per task.
        "spark.python.worker.reuse": "true",
        "spark.sql.session.timeZone": "UTC",
        # Parquet TIMESTAMP(NANOS) columns (pandas' default) are unreadable otherwise; as long nanoseconds they
        # still order the interactions, which is all a temporal split asks of a timestamp.
        "spark.sql.legacy.parquet.nanosAsLong": "true",
    }
    if cfg.master and not launched_by_spark_submit():
        settings["spark.master"] = cfg.master
    settings.update(cfg.conf)
    start_context(SparkConf().setAll(list(settings.items())))
    builder = SparkSession.builder
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


# Set by Ctrl-C once the context runs. The KeyboardInterrupt it raises inside a JVM call does not always come out as
# such: pyspark's error wrapper calls the JVM again on the broken connection and raises py4j's network error instead.
CTRL_C_PRESSED = threading.Event()


def start_context(conf: SparkConf) -> SparkContext:
    """The Spark context, with Ctrl-C held until it has started (a second one is taken at once), then cancelling its jobs.

    Ctrl-C while the JVM starts leaves it running, orphaned (pyspark holds no handle on it yet); and pyspark's own
    handler, installed with the context, cancels the jobs from inside the interrupted JVM call, which py4j cannot
    re-enter (it logs a network error's traceback). Ours cancels from another thread and raises KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return SparkContext.getOrCreate(conf)
    context = None
    try:
        with ctrl_c_held():
            context = SparkContext.getOrCreate(conf)
    except KeyboardInterrupt:
        if context is not None:  # held until the JVM had started: stopped, not left running
            context.stop()
        raise

    def cancel_jobs() -> None:
        with suppress(Exception):  # the interrupted job may stop the context first: nothing left to cancel
            context.setLogLevel("OFF")  # else each cancelled or refused task logs an error, after the interrupt's line
            context.cancelAllJobs()

    def cancel_and_interrupt(signum, frame):
        CTRL_C_PRESSED.set()
        threading.Thread(target=cancel_jobs, daemon=True).start()
        # py4j logs the broken connection of the interrupted JVM call with a traceback, on its own loggers (which a
        # filter on the root logger does not see): the interrupt is the cause, and the job says so in one line.
        for name in [n for n in logging.root.manager.loggerDict if n == "py4j" or n.startswith("py4j.")]:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, cancel_and_interrupt)
    return context


def wait_for_jvm_exit(timeout: float = 60.0) -> None:
    """Let the JVM this process started finish exiting, so that the job's own last line really is its last: its
    executors log the tasks that Ctrl-C cancelled (Java stack traces) a moment later. Under spark-submit the JVM is
    not ours."""
    proc = getattr(SparkContext._gateway, "proc", None)
    if proc is None:
        return
    with suppress(OSError):
        proc.stdin.close()  # the gateway server exits at the end of its stdin
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


@dataclass
class StageLog:
    """Prints progress per stage and keeps the time each took for the final summary."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        self.log(f"{name} ...")
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.seconds[name] = round(took, 3)
        self.log(f"{name} done in {took:.1f}s")

    def log(self, message: str) -> None:
        print(f"[prepare] {message}", flush=True)
