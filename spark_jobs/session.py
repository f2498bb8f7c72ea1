"""Spark session setup and per-stage progress reporting."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from spark_jobs.config import SparkConfig


def launched_by_spark_submit() -> bool:
    # spark-submit starts the Python driver with a gateway already running; its
    # --master (or spark-defaults) then decides, not our config's default.
    return "PYSPARK_GATEWAY_PORT" in os.environ


def effective_master(cfg: SparkConfig) -> str | None:
    """The master URL the session is (or was to be) started with: spark-submit's under it, else the config's."""
    if not launched_by_spark_submit():
        return cfg.master
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # the gateway spark-submit started, whose JVM holds --master
    return SparkConf().get("spark.master", None)


def start_session(cfg: SparkConfig) -> SparkSession:
    # Workers must run this interpreter, or they miss pandas/torch ("No module named ...").
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.appName(cfg.app_name)
    if cfg.master and not launched_by_spark_submit():
        builder = builder.master(cfg.master)
    settings = {
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
    settings.update(cfg.conf)
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


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
