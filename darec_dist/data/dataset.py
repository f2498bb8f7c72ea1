"""Open a prepared dataset directory: check its manifest and files, hand out lazy arrays."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from darec_dist.data import layout


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete, corrupted or of another schema."""


REQUIRED_KEYS = ("schema_version", "num_users", "num_items", "splits", "embedding", "graph", "shards", "arrays")


def check_manifest_fields(manifest: dict, path: Path) -> None:
    """The manifest's fields that the trainer reads, each of the type and range it needs, named where not (one
    written by hand, or edited, crashed later as a KeyError or, with a negative shard count, trained no step)."""
    def expect(value, ok: bool, where: str, what: str) -> None:
        if not ok:
            raise DatasetError(f"{path}: key {where!r}: expected {what}, got {value!r}")

    def count(value, where: str, least: int) -> None:
        expect(value, isinstance(value, int) and not isinstance(value, bool) and value >= least, where,
               "a positive integer" if least else "an integer >= 0")

    def section(where: str, keys: tuple[str, ...]) -> dict:
        value = manifest[where]
        expect(value, isinstance(value, dict) and all(k in value for k in keys), where,
               f"an object with the key(s) {', '.join(keys)}")
        return value

    count(manifest["num_users"], "num_users", 1)
    count(manifest["num_items"], "num_items", 1)
    for split, n in section("splits", layout.SPLITS).items():
        count(n, f"splits.{split}", 0)
    embedding = section("embedding", ("dim", "model"))
    count(embedding["dim"], "embedding.dim", 1)
    expect(embedding["model"], isinstance(embedding["model"], str) and embedding["model"] != "", "embedding.model",
           "the name of the model that embedded the profiles")
    graph = section("graph", ("layers",))
    count(graph["layers"], "graph.layers", 0)
    for flag in ("per_layer", "self_loops"):
        expect(graph.get(flag, False), isinstance(graph.get(flag, False), bool), f"graph.{flag}", "true or false")
    arrays = section("arrays", ())
    for rel in layout.array_files():
        expect(arrays.get(rel), isinstance(arrays.get(rel), str), f"arrays.{rel}", "the array's sha256")
    shards = manifest["shards"]
    expect(shards, isinstance(shards, list) and len(shards) > 0, "shards", "a non-empty list of the training shards")
    for i, shard in enumerate(shards):
        where = f"shards[{i}]"
        expect(shard, isinstance(shard, dict) and all(k in shard for k in ("path", "sha256", "interactions")), where,
               "an object with the keys path, sha256, interactions")
        relative = isinstance(shard["path"], str) and shard["path"] != "" and not Path(shard["path"]).is_absolute() \
            and ".." not in Path(shard["path"]).parts
        expect(shard["path"], relative, f"{where}.path", "a path inside the dataset directory")
        expect(shard["sha256"], isinstance(shard["sha256"], str), f"{where}.sha256", "the tar's sha256")
        count(shard["interactions"], f"{where}.interactions", 1)
    sharded = sum(shard["interactions"] for shard in shards)
    expect(sharded, sharded == manifest["splits"]["train"], "shards[*].interactions",
           f"counts summing to splits.train = {manifest['splits']['train']}")


@dataclass
class CSR:
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray | None = None

    def row(self, r: int) -> np.ndarray:
        return self.indices[self.indptr[r] : self.indptr[r + 1]]

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1


@dataclass
class PreparedDataset:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, verify_checksums: bool = True) -> "PreparedDataset":
        """Checks the manifest, every file's presence and shape, and (if asked) every tar's and array's sha256."""
        root = Path(root).expanduser()
        path = root / layout.MANIFEST
        if not path.is_file():
            raise DatasetError(f"{root}: no {layout.MANIFEST}; not a finished dataset (run spark_jobs.prepare first, or, "
                               "if the dataset moved, give its directory: data.path=DIR, or launch/recommend.py's --data DIR)")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(manifest, dict):
            raise DatasetError(f"{path}: expected a JSON object of the dataset's counts, checksums and shards, "
                               f"got {type(manifest).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise DatasetError(f"{path}: missing key(s) {missing}")
        if manifest["schema_version"] != layout.SCHEMA_VERSION:
            raise DatasetError(
                f"{path}: schema_version {manifest['schema_version']} but this trainer reads {layout.SCHEMA_VERSION}; re-run prepare"
            )
        check_manifest_fields(manifest, path)
        dataset = cls(root=root, manifest=manifest)
        dataset._check_files(verify_checksums)
        return dataset

    def _check_files(self, verify_checksums: bool) -> None:
        # The id maps too: the exported vectors are labelled with them after training.
        for rel in [*layout.array_files(), layout.id_map("user"), layout.id_map("item")]:
            if not (self.root / rel).is_file():
                raise DatasetError(f"{self.root}: missing file {rel}")
        for shard in self.shards:
            if not (self.root / shard["path"]).is_file():
                raise DatasetError(f"{self.root / shard['path']}: shard listed in the manifest is missing")
        # Shapes first: cheap, and a more telling error than a checksum when a whole file was swapped.
        for kind, count in (("user", self.num_users), ("item", self.num_items)):
            shape = self.embeddings(kind).shape
            if shape != (count, self.embedding_dim):
                raise DatasetError(f"{self.root / layout.EMBEDDING_FILES[kind]}: shape {shape}, manifest says ({count}, {self.embedding_dim})")
        if self.graph.num_rows != self.num_nodes * self.graph_blocks:
            raise DatasetError(
                f"{self.root / layout.GRAPH_INDPTR}: {self.graph.num_rows} rows, manifest says {self.num_nodes} nodes "
                f"x {self.graph_blocks} row block(s)"
            )
        self._check_structure()
        problem = self.checksum_problem() if verify_checksums else None
        if problem:
            raise DatasetError(problem)

    def _check_structure(self) -> None:
        """Each CSR array fits the others and the manifest's counts, and every id is in range. Checksums find a file
        changed after prepare; these find one never right (a hand-made or converted dataset), which would otherwise
        fail as an IndexError mid-run or be read silently out of bounds by a table lookup. One pass over each array."""
        checks = [(split, layout.split_indptr(split), layout.split_items(split), self.interactions(split), self.num_users,
                   self.num_items, "item") for split in layout.SPLITS]
        checks.append((None, layout.GRAPH_INDPTR, layout.GRAPH_INDICES, self.graph, self.num_nodes * self.graph_blocks,
                       self.num_nodes, "node"))
        for split, indptr_rel, indices_rel, csr, rows, ids, kind in checks:
            indptr, indices = self.root / indptr_rel, self.root / indices_rel
            if csr.indptr.ndim != 1 or csr.indices.ndim != 1 or len(csr.indptr) != rows + 1:
                raise DatasetError(f"{indptr}: shape {csr.indptr.shape}, expected ({rows + 1},) (a row pointer per "
                                   f"row, plus one), with 1-d {indices} (shape {csr.indices.shape})")
            for name, array in ((indptr, csr.indptr), (indices, csr.indices)):
                if array.dtype.kind not in "iu":
                    raise DatasetError(f"{name}: dtype {array.dtype}, expected integers")
            steps = np.diff(csr.indptr)
            if csr.indptr[0] != 0 or csr.indptr[-1] != len(csr.indices) or (len(steps) and steps.min() < 0):
                raise DatasetError(f"{indptr}: expected non-decreasing row pointers from 0 to {len(csr.indices)}, the "
                                   f"length of {indices}; got {csr.indptr[0]} to {csr.indptr[-1]}"
                                   + (f", falling at row {int(np.argmax(steps < 0))}" if len(steps) and steps.min() < 0 else ""))
            if len(csr.indices) and (csr.indices.min() < 0 or csr.indices.max() >= ids):
                bad = int(np.argmax((csr.indices < 0) | (csr.indices >= ids)))
                raise DatasetError(f"{indices}: entry {bad} is {kind} id {int(csr.indices[bad])}, outside 0..{ids - 1} "
                                   f"(the manifest's {ids} {kind}s)")
            if csr.values is not None and csr.values.shape != csr.indices.shape:
                raise DatasetError(f"{self.root / layout.GRAPH_WEIGHTS}: shape {csr.values.shape}, expected "
                                   f"{csr.indices.shape}, one weight per entry of {indices}")
            # The manifest counts rows, the arrays distinct pairs: with clean.dedupe=false a pair given twice is one.
            counted, held = (self.manifest["splits"][split], len(csr.indices)) if split else (0, 0)
            if held > counted or (held == 0) != (counted == 0):
                raise DatasetError(f"{indices}: {held} interactions, where the manifest's splits.{split} counts "
                                   f"{counted} (rows, of which these are the distinct pairs)")

    def checksum_problem(self, part: int = 0, parts: int = 1, only: tuple[str, ...] | None = None) -> str | None:
        """The first of the dataset's files (every `parts`-th from the `part`-th: processes can share the reading;
        `only` these, where given) whose sha256 differs from the manifest's, named; None if none does."""
        expected = [(rel, self.manifest["arrays"].get(rel), "array") for rel in layout.array_files()]
        expected += [(shard["path"], shard["sha256"], "shard") for shard in self.shards]
        expected = [entry for entry in expected if only is None or entry[0] in only]
        for rel, sha256, what in expected[part::parts]:
            if layout.sha256_of(self.root / rel) != sha256:
                return f"{self.root / rel}: sha256 differs from the manifest; the {what} is corrupted or was replaced"
        return None

    @property
    def num_users(self) -> int:
        return int(self.manifest["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def graph_blocks(self) -> int:
        """Row blocks of the graph: layers + 1 when each layer's rows are kept apart (GCCF), else 1."""
        graph = self.manifest["graph"]
        return int(graph["layers"]) + 1 if graph.get("per_layer", False) else 1

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding"]["dim"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    @property
    def fingerprint(self) -> str:
        """A digest of the manifest's checksums of every array and shard: the same for a byte-identical re-prepare
        (same inputs and seed) or a moved copy, different for another split, graph, embedding or shard order."""
        checksums = {"arrays": self.manifest["arrays"], "shards": [s["sha256"] for s in self.shards]}
        return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()[:16]

    def shard_urls(self) -> list[str]:
        return [str(self.root / s["path"]) for s in self.shards]

    def _load(self, rel: str) -> np.ndarray:
        try:
            return np.load(self.root / rel, mmap_mode="r")
        except (ValueError, EOFError, OSError) as err:  # a truncated or overwritten file: its header no longer fits
            raise DatasetError(f"{self.root / rel}: not a readable .npy array ({err}); the file is truncated or corrupted") from None

    def interactions(self, split: str) -> CSR:
        """Per-user sorted item ids of a split (memory-mapped)."""
        return CSR(self._load(layout.split_indptr(split)), self._load(layout.split_items(split)))

    @cached_property
    def graph(self) -> CSR:
        """Propagation rows over node ids (memory-mapped; only touched rows are read)."""
        return CSR(self._load(layout.GRAPH_INDPTR), self._load(layout.GRAPH_INDICES), self._load(layout.GRAPH_WEIGHTS))

    def embeddings(self, kind: str) -> np.ndarray:
        return self._load(layout.EMBEDDING_FILES[kind])
