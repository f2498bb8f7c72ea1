"""Bad training inputs fail before training starts, with an error that names the file or key."""

import json
import subprocess
import sys

import pytest

from darec_dist.config import ConfigError, load_config
from darec_dist.data.dataset import DatasetError, PreparedDataset
from darec_dist.data.loader import LoaderConfig, check_every_epoch_has_a_batch, check_world_fits, local_batch_size, steps_per_epoch, uneven_shards_warning
from darec_dist.models.aligners import build_aligner
from darec_dist.models.backbones import propagation_rows
from darec_dist.models.tables import check_column_shards
from darec_dist.train import checkpoint
from darec_dist.train.config import TrainConfig
from darec_dist.train.trainer import feature_builder
from tests.conftest import REPO

# torchrun stops (SIGTERM, exit code -15) the ranks still running when a poll finds one failed. Polled every 5 s
# instead of 0.1 s, ranks that stop on their own at the same step all reach their exit first: at the default, a
# 1.5 ms window was measured open in 1 of 5 runs on a loaded machine.
TORCHRUN_LETTING_RANKS_EXIT = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval=5"]


def test_schema_mismatch(dataset_copy):
    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (dataset_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="schema_version 99 but this trainer reads 2"):
        PreparedDataset.open(dataset_copy)


def test_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="no manifest.json; not a finished dataset"):
        PreparedDataset.open(tmp_path)


def test_missing_shard(dataset_copy):
    (dataset_copy / "train" / "shard-00003.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard-00003.tar: shard listed in the manifest is missing"):
        PreparedDataset.open(dataset_copy)


def test_corrupted_shard(dataset_copy):
    path = dataset_copy / "train" / "shard-00001.tar"
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-00001.tar: sha256 differs from the manifest"):
        PreparedDataset.open(dataset_copy)
    # Processes sharing the digests (launch/train.py): exactly one of them reads that file.
    shared = [PreparedDataset.open(dataset_copy, verify_checksums=False).checksum_problem(part, 2) for part in (0, 1)]
    assert sorted(p is None for p in shared) == [False, True] and "shard-00001.tar: sha256 differs" in "".join(filter(None, shared))


def test_corrupted_array(dataset_copy):
    # One flipped byte in the vectors (past the .npy header): shapes still agree, only the checksum can tell.
    path = dataset_copy / "embeddings" / "item.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"embeddings/item.npy: sha256 differs from the manifest"):
        PreparedDataset.open(dataset_copy)
    PreparedDataset.open(dataset_copy, verify_checksums=False)


def test_embedding_shape_disagrees_with_manifest(dataset_copy):
    import numpy as np

    np.save(dataset_copy / "embeddings" / "item.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(DatasetError, match=r"item.npy: shape \(3, 8\)"):
        PreparedDataset.open(dataset_copy)


def edit_manifest(root, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    # A negative count passed every check and made every epoch one of no steps (an untrained model was tested).
    (lambda m: [s.update(interactions=-s["interactions"]) for s in m["shards"]], r"key 'shards\[0\].interactions': expected a positive integer, got -"),
    (lambda m: m["shards"][0].update(interactions=float(m["shards"][0]["interactions"]) + 0.9), r"'shards\[0\].interactions': expected a positive integer"),
    (lambda m: m["shards"][1].update(interactions=m["shards"][1]["interactions"] + 1), r"'shards\[\*\].interactions': expected counts summing to splits.train"),
    (lambda m: m.update(num_users="60 users"), r"key 'num_users': expected a positive integer, got '60 users'"),
    (lambda m: m.update(num_items=True), r"key 'num_items': expected a positive integer, got True"),
    (lambda m: m.update(embedding={}), r"key 'embedding': expected an object with the key\(s\) dim, model"),
    (lambda m: m["embedding"].pop("model"), r"key 'embedding': expected an object with the key\(s\) dim, model"),
    (lambda m: m["shards"][0].pop("path"), r"key 'shards\[0\]': expected an object with the keys path, sha256, interactions"),
    (lambda m: m["shards"][0].update(path="../elsewhere.tar"), r"key 'shards\[0\].path': expected a path inside the dataset directory"),
    (lambda m: m.update(shards={"a": 1}), r"key 'shards': expected a non-empty list"),
    (lambda m: m["graph"].update(per_layer="yes"), r"key 'graph.per_layer': expected true or false"),
    (lambda m: m["graph"].pop("layers"), r"key 'graph': expected an object with the key\(s\) layers"),
    (lambda m: m["splits"].pop("test"), r"key 'splits': expected an object with the key\(s\) train, val, test"),
    (lambda m: m["arrays"].pop("graph/indptr.npy"), r"key 'arrays.graph/indptr.npy': expected the array's sha256"),
])
def test_a_manifest_field_of_the_wrong_type_is_named(dataset_copy, change, message):
    """Each was a KeyError, TypeError or ValueError traceback later (or, for a negative count, no error at all)."""
    edit_manifest(dataset_copy, change)
    with pytest.raises(DatasetError, match=message):
        PreparedDataset.open(dataset_copy, verify_checksums=False)


def test_a_manifest_that_is_no_json_object_is_named(dataset_copy):
    (dataset_copy / "manifest.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(DatasetError, match="manifest.json: not valid JSON"):
        PreparedDataset.open(dataset_copy)
    (dataset_copy / "manifest.json").write_text("5")
    with pytest.raises(DatasetError, match="manifest.json: expected a JSON object .* got int"):
        PreparedDataset.open(dataset_copy)


def test_arrays_that_do_not_fit_each_other_are_named(dataset_copy):
    """Arrays written wrong (a hand-made or converted dataset, whose checksums match it) crashed as an IndexError in
    evaluation, or were read out of bounds; each is now named at open."""
    import numpy as np

    dataset = PreparedDataset.open(dataset_copy, verify_checksums=False)
    users, items = dataset.num_users, dataset.num_items
    train_indptr = np.load(dataset_copy / "interactions" / "train_indptr.npy")
    train_items = np.load(dataset_copy / "interactions" / "train_items.npy")
    graph_indices = np.load(dataset_copy / "graph" / "indices.npy")

    def refused(rel, array, message):
        original = np.load(dataset_copy / rel)
        np.save(dataset_copy / rel, array)
        with pytest.raises(DatasetError, match=message):
            PreparedDataset.open(dataset_copy, verify_checksums=False)
        np.save(dataset_copy / rel, original)

    refused("interactions/train_indptr.npy", train_indptr[:-5], rf"train_indptr.npy: shape \({users - 4},\), expected \({users + 1},\)")
    refused("interactions/train_indptr.npy", np.where(np.arange(users + 1) == 3, 10**6, train_indptr),
            r"train_indptr.npy: expected non-decreasing row pointers .* falling at row 3")
    refused("interactions/train_items.npy", np.where(np.arange(len(train_items)) == 7, items, train_items),
            rf"train_items.npy: entry 7 is item id {items}, outside 0..{items - 1}")
    refused("interactions/train_items.npy", train_items.astype(np.float32), r"train_items.npy: dtype float32, expected integers")
    refused("graph/indices.npy", np.where(np.arange(len(graph_indices)) == 2, -1, graph_indices),
            r"graph/indices.npy: entry 2 is node id -1, outside")
    refused("graph/weights.npy", np.ones(3, np.float32), r"graph/weights.npy: shape \(3,\), expected")
    edit_manifest(dataset_copy, lambda m: m["splits"].update(val=m["splits"]["val"] - 1))
    with pytest.raises(DatasetError, match=r"val_items.npy: \d+ interactions, where the manifest's splits.val counts"):
        PreparedDataset.open(dataset_copy, verify_checksums=False)


def test_a_missing_id_map_is_named_before_training(dataset_copy):
    """Needed only to export the vectors after training: its absence failed the run then, with no results.json."""
    (dataset_copy / "ids" / "item.parquet").unlink()
    with pytest.raises(DatasetError, match=r"missing file ids/item.parquet"):
        PreparedDataset.open(dataset_copy, verify_checksums=False)


def test_a_shard_sample_written_wrong_is_named(dataset_copy):
    """A block whose arrays do not pair up paired every later user with another's item; an id out of range reached
    the table lookup. The checksums pass a tar written so; the reader names the shard and the sample."""
    import io
    import tarfile

    import numpy as np

    from darec_dist.data.shards import interaction_blocks

    dataset = PreparedDataset.open(dataset_copy, verify_checksums=False)
    shard = dataset_copy / dataset.shards[0]["path"]

    def rewrite(edit):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        first_items = next(m.name for m, _ in members if m.name.endswith(".item.npy"))
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                if member.name == first_items:
                    buffer = io.BytesIO()
                    np.save(buffer, edit(np.load(io.BytesIO(data))))
                    data = buffer.getvalue()
                    member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        return first_items.split(".")[0]

    def read_all():
        for _ in interaction_blocks([str(shard)], 0, 0, dataset.num_users, dataset.num_items):
            pass

    original = shard.read_bytes()
    key = rewrite(lambda items: items[:-1])
    with pytest.raises(DatasetError, match=rf"shard-00000.tar: sample '{key}': expected 1-d integer user and item arrays of one length"):
        read_all()
    shard.write_bytes(original)
    rewrite(lambda items: np.where(np.arange(len(items)) == 0, dataset.num_items + 5, items))
    with pytest.raises(DatasetError, match=rf"sample '{key}': item id {dataset.num_items + 5} outside 0..{dataset.num_items - 1}"):
        read_all()
    shard.write_bytes(original)
    read_all()


def test_truncated_array(dataset_copy):
    path = dataset_copy / "embeddings" / "item.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"embeddings/item.npy: not a readable .npy array .*truncated or corrupted"):
        PreparedDataset.open(dataset_copy)


def test_world_size_the_shards_cannot_serve(small_dataset):
    dataset = PreparedDataset.open(small_dataset[0])
    shards = len(dataset.shards)
    check_world_fits(dataset, 2, shards // 2)
    with pytest.raises(DatasetError, match=f"{shards} shards cannot feed 2 ranks x {shards} workers"):
        check_world_fits(dataset, 2, shards)
    with pytest.raises(ConfigError, match="loader.batch_size=7 is not divisible by the world size 2"):
        local_batch_size(LoaderConfig(batch_size=7), 2)
    with pytest.raises(DatasetError, match="fewer than one local batch"):
        steps_per_epoch(dataset, LoaderConfig(batch_size=10**6), 0, 0, 2)
    # Ranks holding unequal shares take the smallest one's steps: what that leaves out of an epoch is said.
    odd = next(w for w in (3, 5, 7) if shards % w)
    cfg = LoaderConfig(batch_size=2 * odd)
    assert uneven_shards_warning(dataset, cfg, 0, 2 if shards % 2 == 0 else 1) is None
    trained = steps_per_epoch(dataset, cfg, 0, 0, odd) * cfg.batch_size
    total = sum(s["interactions"] for s in dataset.shards)
    assert trained < total * (1 - 1 / shards)  # some rank holds a shard fewer than another
    warning = uneven_shards_warning(dataset, cfg, 0, odd)
    assert f"{shards} shards do not split evenly over {odd} ranks" in warning
    assert f"an epoch trains on {trained:,} of the {total:,} train interactions" in warning
    from darec_dist.train.run_dataset import open_dataset  # checked with the dataset, before the model is built or run_dir written

    with pytest.raises(DatasetError, match="fewer than one local batch"):
        open_dataset(load_config(TrainConfig, None, [f"data.path={small_dataset[0]}", "loader.batch_size=1000000"]), 2)


def test_a_later_epoch_without_a_batch_is_refused_before_training(small_dataset):
    """Shards that do not split evenly over the ranks are dealt anew each epoch: a batch size that the first epoch's
    order serves can leave a later epoch's smallest rank without a batch. The whole run is checked up front."""
    dataset = PreparedDataset.open(small_dataset[0])
    shards = dataset.shards
    world = next(w for w in (3, 5, 7) if len(shards) % w)

    def steps(cfg, epoch):
        try:
            return steps_per_epoch(dataset, cfg, 0, epoch, world)
        except DatasetError:
            return 0

    def first_case():
        # Unequal shards (the fixture's are nearly equal): one large, the rest small, so which rank is dealt the large
        # one decides whether the rank dealt the fewest interactions fills a batch.
        for large in range(len(shards)):
            dataset.manifest["shards"] = [dict(s, interactions=200 if i == large else 10) for i, s in enumerate(shards)]
            for local in range(1, 250):
                cfg = LoaderConfig(batch_size=world * local, num_workers=1)
                if steps(cfg, 0) > 0:
                    for epoch in range(1, 20):
                        if steps(cfg, epoch) == 0:
                            return cfg, epoch
        return None

    found = first_case()
    assert found, "the skewed shards must give such a case"
    cfg, epoch = found
    check_every_epoch_has_a_batch(dataset, cfg, 0, epoch, world)  # the epochs before it are served
    with pytest.raises(DatasetError, match=f"in epoch {epoch}'s shard order a worker's shards hold fewer than one local batch"):
        check_every_epoch_has_a_batch(dataset, cfg, 0, epoch + 1, world)


def test_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.layers"):
        load_config(TrainConfig, None, ["model.layers=3"])
    with pytest.raises(ConfigError, match=r"'train.epochs': expected an integer, got 'ten'"):
        load_config(TrainConfig, None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"'model.backbone': 'ngcf' is not one of"):
        load_config(TrainConfig, None, ["model.backbone=ngcf"])


@pytest.mark.parametrize("override, message", [
    ("eval.ks=[20,-1]", r"eval.ks must be a non-empty list of cut-offs >= 1, got \[20, -1\]"),
    ("eval.ks=[20,10,10]", r"eval.ks lists a cut-off twice: \[20, 10, 10\]"),
    ("eval.ks=[]", "eval.ks must be a non-empty list"),
    ("checkpoint.every_epochs=0", "checkpoint.every_epochs and checkpoint.keep must be >= 1"),
    ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch must be >= 1 or null, got 0"),
    ("sparse.lr=-1", "sparse.lr, sparse.eps and sparse.init_std must be > 0, got -1.0"),
    ("run_dir=", "run_dir: required"),  # the working directory would take the run's files
])
def test_values_out_of_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, None, [override])


@pytest.mark.parametrize("processes", [1, 2])
def test_cli_reports_errors_before_training(dataset_copy, processes):
    """With 2 processes each digests half of the files: a corrupted one stops both, named once."""
    (dataset_copy / "train" / "shard-00000.tar").write_bytes(b"not a tar")
    launcher = [*TORCHRUN_LETTING_RANKS_EXIT, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    done = subprocess.run(
        [*launcher, "launch/train.py", "configs/train/default.yaml", f"data.path={dataset_copy}", "device=cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == (2 if processes == 1 else 1), done.stderr[-2000:]  # torchrun's own code for failed workers
    assert done.stderr.count("shard-00000.tar: sha256 differs from the manifest") == 1, done.stderr[-2000:]
    if processes > 1:
        assert done.stderr.count("exitcode  : 2 ") == 2, done.stderr[-2000:]  # both workers refused it themselves


def test_graph_only_aligner_needs_a_graph_backbone(small_dataset):
    # RLMRec-Gen on MF would train nothing but the aligner (measured: base MF to the last digit, docs/results.md).
    dataset = PreparedDataset.open(small_dataset[0])

    def builder(backbone: str):
        overrides = [f"data.path={dataset.root}", f"model.backbone={backbone}", "align.method=rlmrec-gen"]
        cfg = load_config(TrainConfig, None, overrides)
        aligner = build_aligner(cfg.align, cfg.model.dim, dataset.embedding_dim)
        return feature_builder(cfg, dataset, aligner, world_size=1)

    assert builder("lightgcn").with_ego
    with pytest.raises(ConfigError, match="align.method=rlmrec-gen needs a graph backbone"):
        builder("mf")


def test_backbone_and_graph_rows_must_agree(small_dataset, exact_gccf_dataset):
    def builder(root, backbone: str):
        dataset = PreparedDataset.open(root)
        cfg = load_config(TrainConfig, None, [f"data.path={root}", f"model.backbone={backbone}"])
        return feature_builder(cfg, dataset, build_aligner(cfg.align, cfg.model.dim, dataset.embedding_dim), world_size=1)

    assert builder(exact_gccf_dataset, "gccf").rows.blocks == 4
    with pytest.raises(DatasetError, match="model.backbone=gccf needs per-layer rows of the self-loop graph"):
        builder(small_dataset[0], "gccf")
    with pytest.raises(DatasetError, match="model.backbone=lightgcn sums the layers, but this dataset keeps them apart"):
        builder(exact_gccf_dataset, "lightgcn")
    # Summed rows of the self-loop graph: propagation over A + I, which is not LightGCN's.
    manifest = json.loads((small_dataset[0] / "manifest.json").read_text())
    manifest["graph"]["self_loops"] = True
    with pytest.raises(DatasetError, match="model.backbone=lightgcn propagates over the graph without self-loops"):
        propagation_rows(load_config(TrainConfig, None, ["data.path=x"]).model, PreparedDataset(small_dataset[0], manifest))


def test_column_shards_that_fbgemm_cannot_take_are_refused_naming_the_key():
    """TorchRec refused a width its ranks cannot split evenly, fbgemm a shard narrower than a multiple of 4, each as a
    traceback on every rank."""
    check_column_shards({"user_id": 64, "item_id": 64}, 2, "sparse.sharding")
    with pytest.raises(ConfigError, match=r"sparse.sharding=column_wise: table user_id is 32 wide, which 3 processes cannot split"):
        check_column_shards({"user_id": 32}, 3, "sparse.sharding")
    with pytest.raises(ConfigError, match=r"sparse.llm_sharding=column_wise: table item_llm is 8 wide, .* divisible by 16"):
        check_column_shards({"item_llm": 8}, 4, "sparse.llm_sharding")


def test_dense_kernel_refuses_tables_split_across_ranks(small_dataset, tmp_path):
    # Adam on CPU runs the dense kernel, whose per-rank optimizer state a checkpoint cannot keep per shard.
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py", "configs/train/default.yaml",
         f"data.path={small_dataset[0]}", "device=cpu", "sparse.optimizer=adam", "sparse.sharding=row_wise", f"run_dir={tmp_path}",
         "loader.batch_size=64"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode != 0
    assert "sparse.sharding=row_wise with sparse.optimizer=adam on cpu: this runs the dense kernel" in done.stderr, done.stderr[-2000:]


def test_overrides_may_follow_the_options():
    from launch.train import parse_args

    assert parse_args(["c.yaml", "seed=2", "--resume", "auto", "run_dir=r"]) == ("c.yaml", ["seed=2", "run_dir=r"], "auto")
    assert parse_args(["c.yaml"]) == ("c.yaml", [], None)


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3; use 0, 1 or 2"),
    ({"fp16": {"enabled": True}}, "enables fp16"),
    ({"bf16": {"enabled": True}}, "enables bf16"),
    ({"optimizer": None}, "has no optimizer section"),
    ({"gradient_accumulation_steps": 4}, "sets gradient_accumulation_steps"),
])
def test_deepspeed_settings_the_trainer_cannot_honour_are_refused(tmp_path, change, message):
    from darec_dist.train.trainer import deepspeed_settings

    settings = json.loads((REPO / "configs" / "deepspeed" / "zero0.json").read_text())
    settings.update(change)
    settings = {k: v for k, v in settings.items() if v is not None}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    cfg = load_config(TrainConfig, None, [f"dense.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=message):
        deepspeed_settings(cfg, 2)


@pytest.mark.parametrize("processes, extra, stopped_by, kept", [
    # The first update makes the weights non-finite: caught before the checkpoint after it would keep them.
    (1, [], 1, []),
    (2, [], 1, []),
    # A loss sees them first when checkpoints are rarer; the weights written after the first step were finite.
    (2, ["checkpoint.every_steps=2"], 2, []),
    # The epoch's only update, which no loss saw: caught before its weights are validated, saved or tested.
    (2, ["train.max_steps_per_epoch=1"], 1, []),
], ids=["1-process", "2-processes", "loss-first", "last-update"])
def test_a_diverging_run_stops_with_a_clear_error(small_dataset, tmp_path, processes, extra, stopped_by, kept):
    """Every rank stops at the same step, the error printed once: a rank stopping alone left the others in a collective."""
    root, _ = small_dataset
    launcher = [*TORCHRUN_LETTING_RANKS_EXIT, f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    command = [*launcher, "launch/train.py", "configs/train/default.yaml", f"data.path={root}", f"run_dir={tmp_path}",
               "device=cpu", "model.backbone=mf", "model.dim=8", "loader.batch_size=64", "train.progress_bar=false",
               "sparse.optimizer=sgd", "sparse.lr=1e30", "model.reg=1e30", "checkpoint.every_steps=1", *extra]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    message = f"error: training diverged: a loss or a weight was not finite in epoch 0, by step {stopped_by};"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]
    if processes == 1:
        assert "Traceback" not in done.stderr
    else:  # torchrun's own report of failed workers, each of which ended by itself (none stopped by a signal)
        assert done.stderr.count("Traceback") == 1 and "ChildFailedError" in done.stderr
        assert done.stderr.count("exitcode  : 1 ") == 2 and "exitcode  : -" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "export").exists()
    assert sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS).glob("*")) == [checkpoint.step_name(s) for s in kept]
    # torchrun's restarts (--max-restarts) would each train into it again: a resume is refused at once.
    if processes == 1:
        again = subprocess.run([*command, "--resume", "auto"], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert again.returncode == 2 and "the run diverged (training diverged: a loss or a weight was not finite" in again.stderr, again.stderr[-3000:]


def test_a_dataset_without_test_interactions_or_a_monitor_not_computed_is_refused(dataset_copy):
    """Metrics over no test users would be reported as a model scoring 0 (a ratio split of users with few
    interactions holds none out)."""
    from darec_dist.train.run_dataset import open_dataset

    settings = [f"data.path={dataset_copy}", "loader.batch_size=64", "loader.num_workers=0"]
    cfg = load_config(TrainConfig, None, [*settings, "eval.ks=[10]", "eval.monitor=recall@10"])
    open_dataset(cfg, 1, verify_checksums=False)
    # The metric that picks the best epoch must be computed; evaluating a finished run picks nothing.
    cfg = load_config(TrainConfig, None, [*settings, "eval.ks=[10]"])
    with pytest.raises(ConfigError, match=r"eval.monitor: 'recall@20' is not among the metrics of eval.ks=\[10\]"):
        open_dataset(cfg, 1, verify_checksums=False)
    open_dataset(cfg, 1, verify_checksums=False, training=False)
    import numpy as np

    from darec_dist.data import layout

    manifest = json.loads((dataset_copy / "manifest.json").read_text())
    manifest["splits"]["test"] = manifest["splits"]["val"] = 0
    (dataset_copy / "manifest.json").write_text(json.dumps(manifest))
    for split in ("val", "test"):
        np.save(dataset_copy / layout.split_indptr(split), np.zeros(manifest["num_users"] + 1, np.int64))
        np.save(dataset_copy / layout.split_items(split), np.zeros(0, np.int64))
    # Without validation either: named first, since eval.validate=false (the answer to the other) would not help.
    with pytest.raises(DatasetError, match="no test interactions, so nothing to test"):
        open_dataset(load_config(TrainConfig, None, settings), 1, verify_checksums=False)


def test_cut_offs_beyond_the_catalogue_are_refused(small_dataset):
    """A K past the item count ranks every item: Recall@K was 1 for every user, reported as a perfect score."""
    from darec_dist.train.run_dataset import open_dataset

    root = small_dataset[0]
    items = PreparedDataset.open(root).num_items
    settings = [f"data.path={root}", "loader.batch_size=64", "loader.num_workers=0", "eval.monitor=recall@5"]
    open_dataset(load_config(TrainConfig, None, [*settings, f"eval.ks=[5,{items}]"]), 1, verify_checksums=False)
    cfg = load_config(TrainConfig, None, [*settings, f"eval.ks=[5,{items + 1}]"])
    refusal = rf"eval.ks=\[5, {items + 1}\]: {items + 1} exceeds the {items} items of {root}"
    for training in (True, False):  # launch/train.py, and launch/evaluate.py with the run's or an overridden eval.ks
        with pytest.raises(ConfigError, match=refusal):
            open_dataset(cfg, 1, verify_checksums=False, training=training)


def test_a_bad_override_under_torchrun_is_reported_once(tmp_path):
    """Every rank meets a bad config alike: each printed the message (twice on 2 processes). Once now, by the first
    rank to meet it (rank 0 alone could be stopped by torchrun before printing); every rank still exits with 2."""
    import re

    bad = ["launch/train.py", "configs/train/default.yaml", "model.layers=3", "device=cpu", f"run_dir={tmp_path}"]
    torchrun = [*TORCHRUN_LETTING_RANKS_EXIT, "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, *bad], capture_output=True, text=True, cwd=REPO, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and out.count("unknown key(s) model.layers") == 1, out[-3000:]
    codes = re.findall(r"exitcode\s*: (-?\d+)", out)  # torchrun's summary, per rank: 2, or -15 where it stopped the rank
    assert "2" in codes and set(codes) <= {"2", "-15"}, out[-3000:]
    alone = subprocess.run([sys.executable, *bad], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert alone.returncode == 2 and alone.stderr.startswith("error: ") and alone.stderr.count("unknown key(s) model.layers") == 1, alone.stderr


def test_a_rank_that_leaves_the_message_to_another_exits_alike(monkeypatch, capsys):
    import launch.train

    monkeypatch.setattr(launch.train, "first_to_report", lambda message: False)
    assert launch.train.main(["configs/train/default.yaml", "model.layers=3"]) == 2
    assert capsys.readouterr().err == ""


def test_more_processes_than_visible_gpus_are_refused(monkeypatch):
    # NCCL would stop at the first collective ("Duplicate GPU detected"); the check itself needs no GPU to run.
    import torch

    from darec_dist.distributed.env import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="3 processes on this node and 2 visible GPUs.*--nproc_per_node"):
        pick_device("cuda", 2, 3)


def test_llm_embeddings_fbgemm_cannot_hold_are_refused_before_sharding():
    """A dataset prepared elsewhere with 30-wide vectors: fbgemm asserted on every rank while the tables were sharded."""
    import numpy as np

    from darec_dist.models.tables import SparseConfig, llm_tables

    with pytest.raises(ConfigError, match="LLM embeddings are 30 wide, and the frozen LLM tables need a multiple of 4"):
        llm_tables({"user": np.zeros((3, 30), np.float32), "item": np.zeros((4, 30), np.float32)}, {}, SparseConfig(), None)
