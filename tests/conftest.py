"""Shared fixtures: one real local Spark session for all Spark tests (start-up costs ~8 s)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


@pytest.fixture(scope="session")
def spark():
    from spark_jobs.config import SparkConfig
    from spark_jobs.session import start_session

    session = start_session(SparkConfig(master="local[2]", driver_memory="2g", shuffle_partitions=4, app_name="darec-tests"))
    yield session
    session.stop()
