"""The corpus index of PDR retrieval: maximum inner product search over the item tower's
vectors, ScaNN (Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector
Quantization", ICML 2020) above a corpus size, exact below it.

Built at export (`python -m serving.export_retrieval`) from the item vectors of a trained PDR
model and written as a version folder beside the ranking model's version:

    B/pdr_index/V/manifest.json        backend, sizes, settings, ranking version (written last)
    B/pdr_index/V/item_indices.npy     int64 [M]: the item of each row
    B/pdr_index/V/vectors.npy          float32 [M, d]: the item vectors (exact search, rebuilds)
    B/pdr_index/V/scann/               ScaNN's serialized searcher (backend "scann" only)

ScaNN indexes cannot be appended to: a new item enters the index at the next build (the next
export), which writes a new version; searchers pick the version they are told to (or the
latest). Exact search is a float32 matrix product and a partial sort, the same answer ScaNN
approximates; below `IndexConfig.exact_below` items it is as fast (docs/RETRIEVAL.md gives the
measured crossover), so small corpora never pay ScaNN's approximation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

MANIFEST_FILE = "manifest.json"
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "item_indices.npy"
SCANN_DIR = "scann"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the index is built and searched."""

    # Corpora smaller than this are searched exactly (docs/RETRIEVAL.md: the measured size
    # above which ScaNN is faster than a float32 matrix product on 2 cores).
    exact_below: int = 20_000
    leaves_per_sqrt_rows: float = 1.0  # num_leaves = this * sqrt(M)
    leaves_to_search_fraction: float = 0.2  # leaves searched per query
    min_leaves_to_search: int = 16
    ah_dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int = 3000  # candidates re-scored exactly after the quantized search
    training_sample_size: int = 100_000
    search_threads: int = 1

    def num_leaves(self, rows: int) -> int:
        return int(max(2, min(rows // 16, round(self.leaves_per_sqrt_rows * np.sqrt(rows)))))

    def leaves_to_search(self, num_leaves: int) -> int:
        return int(min(num_leaves, max(self.min_leaves_to_search,
                                       np.ceil(self.leaves_to_search_fraction * num_leaves))))


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(rows [B, k], scores [B, k]) of the k largest dot products, best first (ties: lower
    row first)."""
    scores = np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_scores, order, axis=1)


class ItemIndex:
    """Top-k items by inner product with a query vector, over a fixed set of item vectors."""

    def __init__(self, vectors: np.ndarray, item_indices: np.ndarray,
                 config: IndexConfig = IndexConfig(), searcher=None,
                 manifest: Optional[Dict[str, Any]] = None):
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        self.item_indices = np.asarray(item_indices, np.int64)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != self.item_indices.shape[0]:
            raise ValueError(f"vectors {self.vectors.shape} and item_indices "
                             f"{self.item_indices.shape} must have one row per item")
        self.config = config
        self.searcher = searcher
        self.manifest = manifest or {}

    @property
    def backend(self) -> str:
        return "exact" if self.searcher is None else "scann"

    def __len__(self) -> int:
        return int(self.item_indices.shape[0])

    @classmethod
    def build(cls, vectors: np.ndarray, item_indices: np.ndarray,
              config: IndexConfig = IndexConfig(), backend: Optional[str] = None
              ) -> "ItemIndex":
        """An index over `vectors` [M, d]; backend "exact", "scann" or None (exact below
        config.exact_below items, ScaNN above)."""
        vectors = np.ascontiguousarray(vectors, np.float32)
        if backend is None:
            backend = "exact" if vectors.shape[0] < config.exact_below else "scann"
        if backend not in ("exact", "scann"):
            raise ValueError(f"backend must be 'exact' or 'scann', got {backend!r}")
        started = time.time()
        searcher = None
        if backend == "scann":
            if vectors.shape[0] < 64:
                raise ValueError("ScaNN needs at least 64 items to partition; use exact")
            searcher = _build_scann(vectors, config)
        return cls(vectors, item_indices, config, searcher,
                   {"build_seconds": round(time.time() - started, 3)})

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """(item indices [B, k'], scores [B, k']) best first, k' = min(k, items)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        k = int(min(k, len(self)))
        if k < 1:
            return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0),
                                                                       np.float32)
        if self.searcher is None:
            rows, scores = exact_top_k(self.vectors, queries, k)
        else:
            leaves = self.config.leaves_to_search(self.config.num_leaves(len(self)))
            rows, scores = self.searcher.search_batched(
                queries, final_num_neighbors=k, leaves_to_search=leaves,
                pre_reorder_num_neighbors=max(self.config.reorder, k))
            rows = np.asarray(rows, np.int64)
            scores = np.asarray(scores, np.float32)
        return self.item_indices[rows], scores

    # ---- files ---------------------------------------------------------------------------
    def save(self, directory: str, **manifest: Any) -> Dict[str, Any]:
        """Writes the index to `directory` (which must not exist); the manifest last."""
        if os.path.exists(directory):
            raise FileExistsError(f"{directory} exists: index versions are immutable")
        tmp = directory.rstrip("/") + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        np.save(os.path.join(tmp, VECTORS_FILE), self.vectors)
        np.save(os.path.join(tmp, ITEMS_FILE), self.item_indices)
        if self.searcher is not None:
            os.makedirs(os.path.join(tmp, SCANN_DIR))
            self.searcher.serialize(os.path.join(tmp, SCANN_DIR), True)
        record = {"format_version": FORMAT_VERSION, "backend": self.backend,
                  "items": len(self), "dim": int(self.vectors.shape[1]),
                  "config": dataclasses.asdict(self.config), **self.manifest, **manifest}
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.rename(tmp, directory)
        self.manifest = record
        return record

    @classmethod
    def load(cls, directory: str) -> "ItemIndex":
        path = os.path.join(directory, MANIFEST_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: not a finished index version (built by "
                                    "`python -m serving.export_retrieval`)")
        with open(path) as f:
            manifest = json.load(f)
        config = IndexConfig(**manifest["config"])
        searcher = None
        if manifest["backend"] == "scann":
            from scann.scann_ops.py import scann_ops_pybind

            searcher = scann_ops_pybind.load_searcher(os.path.join(directory, SCANN_DIR))
            searcher.set_num_threads(config.search_threads)
        return cls(np.load(os.path.join(directory, VECTORS_FILE)),
                   np.load(os.path.join(directory, ITEMS_FILE)), config, searcher, manifest)


def _build_scann(vectors: np.ndarray, config: IndexConfig):
    """ScaNN: k-means tree partitioning, anisotropic asymmetric hashing, exact reordering."""
    from scann.scann_ops.py import scann_ops_pybind

    rows = vectors.shape[0]
    leaves = config.num_leaves(rows)
    builder = scann_ops_pybind.builder(vectors, 10, "dot_product")
    builder = builder.tree(num_leaves=leaves, num_leaves_to_search=config.leaves_to_search(leaves),
                           training_sample_size=min(rows, config.training_sample_size))
    builder = builder.score_ah(
        config.ah_dims_per_block,
        anisotropic_quantization_threshold=config.anisotropic_quantization_threshold)
    searcher = builder.reorder(config.reorder).build()
    searcher.set_num_threads(config.search_threads)
    return searcher


def version_dir(base_path: str, name: str, version: int) -> str:
    return os.path.join(base_path, name, str(int(version)))


def latest_version(model_root: str) -> Optional[int]:
    """The largest numeric version folder holding a manifest (a finished build), or None."""
    if not os.path.isdir(model_root):
        return None
    done = [int(n) for n in os.listdir(model_root)
            if n.isdigit() and os.path.exists(os.path.join(model_root, n, MANIFEST_FILE))]
    return max(done) if done else None
