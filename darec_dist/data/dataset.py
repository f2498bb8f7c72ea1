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
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from err
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise DatasetError(f"{path}: missing key(s) {missing}")
        if manifest["schema_version"] != layout.SCHEMA_VERSION:
            raise DatasetError(
                f"{path}: schema_version {manifest['schema_version']} but this trainer reads {layout.SCHEMA_VERSION}; re-run prepare"
            )
        dataset = cls(root=root, manifest=manifest)
        dataset._check_files(verify_checksums)
        return dataset

    def _check_files(self, verify_checksums: bool) -> None:
        for rel in layout.array_files():
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
        problem = self.checksum_problem() if verify_checksums else None
        if problem:
            raise DatasetError(problem)

    def checksum_problem(self, part: int = 0, parts: int = 1) -> str | None:
        """The first of the dataset's files (every `parts`-th from the `part`-th: processes can share the reading)
        whose sha256 differs from the manifest's, named; None if none does."""
        expected = [(rel, self.manifest["arrays"].get(rel), "array") for rel in layout.array_files()]
        expected += [(shard["path"], shard["sha256"], "shard") for shard in self.shards]
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
