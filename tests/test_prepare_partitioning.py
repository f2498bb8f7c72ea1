"""The dataset does not depend on how Spark partitions the work: the same inputs and seed give the same bytes under
any shuffle partitioning."""

import json

from darec_dist.data import layout
from spark_jobs.prepare import prepare
from tests.prepare_helpers import small_config
from tests.synthetic import interaction_rows, write_csv_source


def test_the_dataset_is_the_same_under_any_shuffle_partitioning(spark, tmp_path):
    rows = interaction_rows(num_users=80)
    source = write_csv_source(tmp_path / "raw", rows, item_text=True)
    # Texts of many lengths: the encoder pads a batch to its longest text, which changes the last bits of a vector
    # whenever the texts that share a batch change.
    items = sorted({row[1] for row in rows})
    lines = [f'{i},"Item {i} {" ".join(f"word{(i * j) % 97}" for j in range((i * 7) % 40))}"' for i in items]
    (tmp_path / "raw" / "items.csv").write_text("item,text\n" + "\n".join(lines) + "\n")
    default = spark.conf.get("spark.sql.shuffle.partitions")
    manifests = []
    try:
        for partitions in (2, 7):
            spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
            cfg = small_config(tmp_path / f"out-{partitions}", source, **{"embedding.encoder": "sentence-transformers",
                                                                        "graph.top_k": "null", "graph.layers": 3,
                                                                        "spark.shuffle_partitions": partitions})
            manifests.append(json.loads((prepare(cfg, spark=spark) / layout.MANIFEST).read_text()))
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", default)
    assert manifests[0]["arrays"] == manifests[1]["arrays"]
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[1]["shards"]]
