import re
from dataclasses import dataclass, field

import pytest

from darec_dist.config import ConfigError, from_dict, load_config, parse_override, read_yaml
from darec_dist.train.config import TrainConfig
from spark_jobs.config import PrepareConfig


@dataclass
class Inner:
    rate: float = 0.1
    layers: int = 3
    name: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flags: list[int] = field(default_factory=list)


def test_overrides_are_typed_by_yaml():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=0.5") == ("a", 0.5)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    # PyYAML reads exponents without a dot as strings; numeric keys take them anyway.
    assert from_dict(Inner, {"rate": "1e-4", "layers": "1e3"}) == Inner(rate=1e-4, layers=1000)
    with pytest.raises(ConfigError, match="expected an integer"):
        from_dict(Inner, {"layers": "1.5e0"})


def test_yaml_reads_booleans_and_integers_as_yaml_1_2_does():
    """PyYAML's YAML 1.1 made run_dir=no the string 'False', model.dim=064 the number 52 and 1:30 the number 90."""
    assert parse_override("run_dir=no") == ("run_dir", "no") and parse_override("data.path=on") == ("data.path", "on")
    assert parse_override("a=010") == ("a", 10) and parse_override("a=-7") == ("a", -7) and parse_override("a=1:30") == ("a", "1:30")
    assert parse_override("a=true") == ("a", True) and parse_override("a=False") == ("a", False)
    assert parse_override("a=1:30.5") == ("a", "1:30.5") and parse_override("a=-2.5e+3") == ("a", -2500.0)
    with pytest.raises(ConfigError, match="expected a decimal integer, got '0x10'"):
        parse_override("a=!!int 0x10")
    cfg = load_config(TrainConfig, None, ["data.path=x", "run_dir=no", "model.dim=064", "train.epochs=010"])
    assert (cfg.run_dir, cfg.model.dim, cfg.train.epochs) == ("no", 64, 10)
    with pytest.raises(ConfigError, match=r"key 'run_dir': expected a string, got True \(quote it to give it as text\)"):
        load_config(TrainConfig, None, ["data.path=x", "run_dir=true"])
    # A string field keeps a number as written (the directory '010', not '10').
    cfg = load_config(TrainConfig, None, ["data.path=1.50", "run_dir=010"])
    assert (cfg.data.path, cfg.run_dir) == ("1.50", "010")


def test_a_string_field_in_a_yaml_file_keeps_a_number_as_written(tmp_path):
    """`run_dir: 010` in a file trained in the directory '10' (overrides already kept the text)."""
    path = tmp_path / "train.yaml"
    path.write_text("data:\n  path: 1.50\nrun_dir: 010\nmodel:\n  dim: 064\ntrain:\n  epochs: 010\nsparse:\n  lr: 1.50\n")
    cfg = load_config(TrainConfig, path)
    assert (cfg.data.path, cfg.run_dir) == ("1.50", "010")
    # Numeric fields get plain numbers, not the remembering kind (their dumps and JSON are a plain int's and float's).
    assert (type(cfg.model.dim), cfg.model.dim, type(cfg.train.epochs), type(cfg.sparse.lr)) == (int, 64, int, float)
    # An integer past float's range (an OverflowError's traceback), a section set to null (it reset the file's section).
    with pytest.raises(ConfigError, match="key 'sparse.lr': expected a finite number"):
        load_config(TrainConfig, None, ["data.path=x", "sparse.lr=" + "1" * 400])
    with pytest.raises(ConfigError, match=re.escape("override train=null: 'train' is a section; set its keys (train.KEY=VALUE)")):
        load_config(TrainConfig, "configs/train/ml-100k.yaml", ["train=null"])


def test_a_mapping_override_of_a_section_keeps_the_settings_it_does_not_name():
    """'train={epochs: 1}' replaced the whole section: the config file's patience and min_epochs fell back to defaults."""
    base = load_config(TrainConfig, "configs/train/ml-100k.yaml")
    cfg = load_config(TrainConfig, "configs/train/ml-100k.yaml", ["train={epochs: 1}", "align={darec: {clusters: 8}}"])
    assert cfg.train.epochs == 1 and cfg.align.darec.clusters == 8
    assert (cfg.train.patience, cfg.train.min_epochs) == (base.train.patience, base.train.min_epochs) != (10, 0)
    assert cfg.align.darec.sample_size == base.align.darec.sample_size
    # A mapping-valued field is one value: an experiment's variants narrowed from the command line, names with dots.
    from launch.experiment import ExperimentConfig

    narrowed = load_config(ExperimentConfig, "configs/experiments/ml-100k-lightgcn.yaml", ["variants={darec-0.1: [align.method=darec]}"])
    assert narrowed.variants == {"darec-0.1": ["align.method=darec"]}
    # Spark's settings are text: a YAML boolean there is the word Spark reads.
    spark = load_config(PrepareConfig, None, ["spark.conf={spark.sql.adaptive.enabled: true, spark.executor.memory: 8g}"])
    assert spark.spark.conf == {"spark.sql.adaptive.enabled": "true", "spark.executor.memory": "8g"}


def test_from_dict_builds_nested_dataclasses():
    cfg = from_dict(Outer, {"inner": {"rate": 1, "name": "x"}, "flags": [1, 2]})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.layers == 3 and cfg.flags == [1, 2]


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) inner.rte"):
        from_dict(Outer, {"inner": {"rte": 1}}, source="x.yaml")


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"x.yaml: key 'inner.layers': expected an integer"):
        from_dict(Outer, {"inner": {"layers": "three"}}, source="x.yaml")
    with pytest.raises(ConfigError, match="expected a list"):
        from_dict(Outer, {"flags": 3})


def test_literal_and_validation_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("source:\n  format: excel\n")
    with pytest.raises(ConfigError, match=r"key 'source.format': 'excel' is not one of"):
        load_config(PrepareConfig, path)
    with pytest.raises(ConfigError, match="malformed.max_fraction must be in"):
        load_config(PrepareConfig, None, ["malformed.max_fraction=2"])
    with pytest.raises(ConfigError, match="sparse.llm_sharding: the frozen LLM tables are sharded"):
        load_config(TrainConfig, None, ["data.path=x", "sparse.llm_sharding=data_parallel"])
    with pytest.raises(ConfigError, match="align.darec.neighbourhood_temperature and cluster_temperature must be > 0"):
        load_config(TrainConfig, None, ["data.path=x", "align.darec.neighbourhood_temperature=0"])
    # Each ran the whole prepare job: a dataset no trainer could shard (fbgemm needs widths in multiples of 4) or no
    # graph backbone accepts (GCCF needs both flags, LightGCN neither), or a traceback inside Spark (a negative seed).
    for override, message in (("embedding.encoder=id-hash embedding.dim=30", "embedding.dim must be a multiple of 4"),
                              ("source.synthetic.embedding_dim=30", "source.synthetic.embedding_dim must be a multiple of 4"),
                              ("graph.per_layer=true", "graph.per_layer and graph.self_loops: GCCF's rows need both"),
                              ("graph.self_loops=true", "graph.per_layer and graph.self_loops: GCCF's rows need both"),
                              ("seed=-1", "seed must be >= 0, got -1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(PrepareConfig, None, override.split())


@pytest.mark.parametrize("override, message", [
    # Each ran: a temperature of 0 ended in "training diverged: loss nan"; a negative weight trained against alignment;
    # a width not a multiple of 4 failed in TorchRec's sharder after setup.
    ("align.con.temperature=0", "align.con.temperature must be > 0 and align.con.weight >= 0"),
    ("align.con.weight=-5", "align.con.temperature must be > 0 and align.con.weight >= 0"),
    ("align.gen.temperature=0", "align.gen.temperature must be > 0 and align.gen.weight >= 0"),
    ("align.darec.cluster_temperature=0", "align.darec.neighbourhood_temperature and cluster_temperature must be > 0"),
    ("align.darec.structure_weight=-1", "align.darec.structure_weight, regulariser_weight and separation_weight must be >= 0"),
    ("model.dim=30", "model.dim must be a multiple of 4 (FBGEMM's embedding kernels need it), got 30"),
    # NaN passed every range check (a NaN weight trained to "training diverged"); a negative k-means count meant none;
    # one centre made the local term 0 for every node.
    ("align.darec.structure_weight=.nan", "key 'align.darec.structure_weight': expected a finite number, got nan"),
    ("model.reg=.inf", "key 'model.reg': expected a finite number, got inf"),
    ("align.darec.kmeans_iterations=-1", "align.darec.kmeans_iterations must be >= 0, got -1"),
    ("seed=-1", "seed must be in [0, 2**40), got -1"),
    # torch's generator overflowed on the loader's scaled seed in the first epoch.
    ("seed=20000000000000", "seed must be in [0, 2**40), got 20000000000000"),
    # Every node masked: the tables trained on the mask token only.
    ("align.gen.mask_ratio=1.0", "align.gen.mask_ratio must be in (0, 1), got 1.0"),
    ("align.darec.clusters=1", "align.darec.clusters=1: the local term compares soft assignments to the centres, which need at least 2"),
    # torch raised "value cannot be converted to type float without overflow" in the middle of Adam's first step.
    ("sparse.lr=1e38", "sparse.lr=1e+38: Adam's first step, lr / (1 - beta1) = 1e+39, is past float32's range"),
])
def test_settings_that_train_nonsense_are_refused(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainConfig, None, ["data.path=x", override])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PrepareConfig, tmp_path / "nope.yaml")


def test_dense_lr_replaces_the_deepspeed_json_lr(tmp_path):
    from darec_dist.train.trainer import deepspeed_settings

    cfg = load_config(TrainConfig, None, ["data.path=x", "loader.batch_size=64"])
    settings = deepspeed_settings(cfg, world_size=2)
    assert settings["optimizer"]["params"]["lr"] == 0.001  # the JSON's own
    assert (settings["train_batch_size"], settings["train_micro_batch_size_per_gpu"]) == (64, 32)
    cfg = load_config(TrainConfig, None, ["data.path=x", "dense.lr=2.5e-4"])
    assert deepspeed_settings(cfg, world_size=1)["optimizer"]["params"]["lr"] == 2.5e-4
    with pytest.raises(ConfigError, match="dense.lr must be > 0"):
        load_config(TrainConfig, None, ["data.path=x", "dense.lr=0"])
    no_optimizer = tmp_path / "ds.json"
    no_optimizer.write_text('{"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW"}}')  # no params to set lr in
    cfg = load_config(TrainConfig, None, ["data.path=x", "dense.lr=1e-4", f"dense.deepspeed_config={no_optimizer}"])
    with pytest.raises(ConfigError, match="no optimizer.params"):
        deepspeed_settings(cfg, world_size=1)
    # Adam's first step, lr / (1 - beta1), overflowed float32 with a traceback in the middle of training.
    cfg = load_config(TrainConfig, None, ["data.path=x", "dense.lr=1e38"])
    with pytest.raises(ConfigError, match=re.escape("makes Adam's first step, lr / (1 - beta1) = 1e+39, past float32's range")):
        deepspeed_settings(cfg, world_size=1)
    assert deepspeed_settings(load_config(TrainConfig, None, ["data.path=x", "dense.lr=1e30"]), 1)  # large, but it fits


def test_integers_beyond_64_bits_are_refused_at_load():
    """Spark failed on graph.top_k=1e20 with a Java NumberFormatException, stages into the job."""
    from spark_jobs.config import PrepareConfig

    for value in ("1e20", "100000000000000000000"):
        with pytest.raises(ConfigError, match="key 'graph.top_k': expected a 64-bit integer"):
            load_config(PrepareConfig, None, [f"graph.top_k={value}"])
    with pytest.raises(ConfigError, match=re.escape("key 'graph.layer_weights[1]': expected a finite number, got nan")):
        load_config(PrepareConfig, None, ["graph.layers=2", "graph.layer_weights=[1, .nan, 1]"])
    assert load_config(PrepareConfig, None, ["graph.top_k=1e3"]).graph.top_k == 1000


def test_a_key_given_twice_is_refused_naming_it(tmp_path):
    """PyYAML keeps the last of two equal keys silently (QA: an experiment's first variant of a name vanished)."""
    path = tmp_path / "experiment.yaml"
    path.write_text("seeds: [1]\nvariants:\n  a: []\n  a: [model.backbone=mf]\n")
    with pytest.raises(ConfigError, match=r"experiment.yaml: not valid YAML \(key 'a' given twice \(first on line 3\)"):
        read_yaml(path)
    path.write_text("variants:\n  a: []\n  b: [model.backbone=mf]\nnested: {a: 1, b: {a: 2}}\n")
    assert read_yaml(path) == {"variants": {"a": [], "b": ["model.backbone=mf"]}, "nested": {"a": 1, "b": {"a": 2}}}


def test_yaml_merge_keys_merge_with_the_explicit_keys_winning(tmp_path):
    """`<<: *defaults` (a section shared by several in one file) was refused: no constructor for the merge tag."""
    path = tmp_path / "train.yaml"
    path.write_text("shared: &shared {epochs: 7, patience: 3}\ntrain:\n  <<: *shared\n  patience: 5\n")
    assert read_yaml(path)["train"] == {"epochs": 7, "patience": 5}
    path.write_text("shared: &shared {epochs: 7}\ntrain:\n  <<: *shared\n  patience: 5\n  patience: 6\n")
    with pytest.raises(ConfigError, match=r"key 'patience' given twice"):  # among the explicit keys, still refused
        read_yaml(path)
