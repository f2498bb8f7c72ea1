"""Build small prepare configs for tests: id-hash embeddings and few shards keep them fast."""

from __future__ import annotations

from pathlib import Path

from darec_dist.config import load_config
from spark_jobs.config import PrepareConfig
from tests.synthetic import overrides


def small_config(output: Path, source: dict, **extra) -> PrepareConfig:
    settings = {
        "output": str(output),
        "embedding.encoder": "id-hash",
        "embedding.dim": 8,
        "shards.factor": 4,
        "shards.block_size": 16,
        "graph.layers": 2,
        "graph.top_k": 8,
        "spark.shuffle_partitions": 4,
    }
    settings.update(source)
    settings.update(extra)
    return load_config(PrepareConfig, None, overrides(settings))
