"""Exports PDR retrieval beside a ranking model version:

    python -m serving.export_retrieval --pdr-dir P --data OUT --base-path B \
        [--ranking-model-name qin] [--version V] [--top-k 500] [--exact-below 20000]

writes, for version V (default: the latest version of B/<ranking-model-name>, so retrieval and
ranking versions pair up):

    B/pdr_query/V/   SavedModel of the query-user tower, stock TensorFlow ops only (no `Scann>`
                     op: checked), servable by stock TF Serving as model `pdr_query`:
                       serving_default: request + sequence inputs (the rank_listwise names,
                         candidates left out) -> `query_vector` [B, d]
                       retrieve: the same inputs -> `item_index`, `score` [B, top_k] by
                         tfrs.layers.factorized_top_k.BruteForce over the item vectors
    B/pdr_index/V/   the corpus index (serving/item_index.py): ScaNN above --exact-below items,
                     exact below; plus vertex/embeddings.json, the item vectors in Vertex AI
                     Vector Search's JSON-lines input format, one {"id": raw item id,
                     "embedding": [...]} per line, ready for `gcloud storage cp` and an index
                     (batch) update
    manifest.json    in each, written last

Items come from the feature store (DATA/feature_store.sqlite). An item without a content
embedding is counted and left out of the index. New items enter at the next export: the
index is rebuilt from the feature store's items as a new version (ScaNN indexes cannot be
appended to).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Dict, Optional, Sequence

import numpy as np

import common  # noqa: F401

QUERY_MODEL_NAME = "pdr_query"
INDEX_NAME = "pdr_index"
VERTEX_DIR = "vertex"
VERTEX_FILE = "embeddings.json"
QUERY_VECTOR = "query_vector"
RETRIEVE_SIGNATURE = "retrieve"
DEFAULT_TOP_K = 500


def query_input_specs(metadata) -> Dict[str, Any]:
    """The rank_listwise input specs without the candidate ones (the query tower's inputs)."""
    from common import features as F
    from serving import signatures as S

    candidates = set(F.candidate_feature_names(metadata, with_labels=False))
    return {name: spec for name, spec in S.listwise_input_specs(metadata).items()
            if name not in candidates}


def query_inputs(request_inputs: Dict[str, np.ndarray], metadata) -> Dict[str, np.ndarray]:
    """The query tower's subset of a `serving.signatures.listwise_inputs` dict."""
    return {name: request_inputs[name] for name in query_input_specs(metadata)}


def corpus_for_index(model, corpus) -> Dict[str, Any]:
    """Item vectors of the corpus items that have a content embedding (others counted)."""
    keep = np.asarray(corpus.has_embedding, bool)
    vectors = model.corpus_vectors(corpus)
    return {"vectors": vectors[keep], "item_index": np.asarray(corpus.item_index)[keep],
            "skipped_without_embedding": int((~keep).sum())}


def build_index(model, corpus, config=None, backend: Optional[str] = None):
    """(ItemIndex over the corpus' item vectors, counts)."""
    from serving.item_index import IndexConfig, ItemIndex

    items = corpus_for_index(model, corpus)
    index = ItemIndex.build(items["vectors"], items["item_index"], config or IndexConfig(),
                            backend=backend)
    return index, {"skipped_without_embedding": items["skipped_without_embedding"]}


def write_vertex_jsonl(path: str, vectors: np.ndarray, raw_ids: Sequence[str]) -> int:
    """Vertex AI Vector Search input: one JSON object per line, {"id", "embedding"}."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for raw, vector in zip(raw_ids, np.asarray(vectors, np.float32)):
            f.write(json.dumps({"id": str(raw), "embedding": [float(x) for x in vector]}) + "\n")
    return len(raw_ids)


def save_query_tower(model, metadata, directory: str, index_vectors: np.ndarray,
                     index_items: np.ndarray, top_k: int = DEFAULT_TOP_K) -> Dict[str, Any]:
    """The query tower as a stock-op SavedModel with serving_default and `retrieve`
    (BruteForce top-k over `index_vectors`)."""
    import tensorflow as tf
    import tensorflow_recommenders as tfrs

    specs = query_input_specs(metadata)
    top_k = int(min(top_k, len(index_items)))

    class QueryTower(tf.Module):
        def __init__(self):
            super().__init__()
            self.tower = model.query_tower
            self.brute_force = tfrs.layers.factorized_top_k.BruteForce(k=top_k)
            self.brute_force.index(tf.constant(index_vectors, tf.float32),
                                   tf.constant(np.asarray(index_items, np.int64)))

        @tf.function(input_signature=[specs])
        def serve(self, inputs):
            return {QUERY_VECTOR: self.tower(inputs)}

        @tf.function(input_signature=[specs])
        def retrieve(self, inputs):
            scores, items = self.brute_force(self.tower(inputs), k=top_k)
            return {"item_index": items, "score": scores}

    module = QueryTower()
    tf.saved_model.save(module, directory, signatures={
        "serving_default": module.serve.get_concrete_function(),
        RETRIEVE_SIGNATURE: module.retrieve.get_concrete_function()})
    ops = savedmodel_op_types(directory)
    scann_ops = sorted(op for op in ops if op.startswith("Scann"))
    if scann_ops:
        raise RuntimeError(f"the query tower SavedModel uses ScaNN ops {scann_ops}: stock TF "
                           "Serving could not load it")
    return {"top_k": top_k, "op_types": len(ops)}


def savedmodel_op_types(directory: str) -> set:
    """Every op type in a SavedModel's graph and functions."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(directory, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    ops = set()
    for graph in sm.meta_graphs:
        ops.update(node.op for node in graph.graph_def.node)
        for fn in graph.graph_def.library.function:
            ops.update(node.op for node in fn.node_def)
    return ops


def export_retrieval(model, metadata, corpus, base_path: str, version: int,
                     raw_item_ids: Optional[Sequence[str]] = None, index_config=None,
                     backend: Optional[str] = None, top_k: int = DEFAULT_TOP_K,
                     ranking_model: Optional[str] = None) -> Dict[str, Any]:
    """Writes B/pdr_query/V and B/pdr_index/V (module docstring); returns their manifests."""
    from serving.item_index import MANIFEST_FILE, version_dir

    query_dir = version_dir(base_path, QUERY_MODEL_NAME, version)
    index_dir = version_dir(base_path, INDEX_NAME, version)
    for d in (query_dir, index_dir):
        if os.path.exists(d):
            raise FileExistsError(f"{d} exists: versions are immutable; pick another --version")
    index, counts = build_index(model, corpus, index_config, backend)
    common_manifest = {"version": int(version), "ranking_model": ranking_model,
                       "items": len(index), **counts}
    index_manifest = index.save(index_dir, **common_manifest)
    if raw_item_ids is not None:
        raw = np.asarray(raw_item_ids, object)
        lines = write_vertex_jsonl(os.path.join(index_dir, VERTEX_DIR, VERTEX_FILE),
                                   index.vectors, raw[index.item_indices - 1])
        index_manifest["vertex_jsonl_lines"] = lines
        with open(os.path.join(index_dir, MANIFEST_FILE), "w") as f:
            json.dump(index_manifest, f, indent=2, sort_keys=True)
    tmp = query_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    query_info = save_query_tower(model, metadata, tmp, index.vectors, index.item_indices,
                                  top_k)
    query_manifest = {**common_manifest, **query_info, "output_dim": model.config.output_dim,
                      "use_user": model.config.use_user}
    with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
        json.dump(query_manifest, f, indent=2, sort_keys=True)
    os.makedirs(os.path.dirname(query_dir), exist_ok=True)
    os.rename(tmp, query_dir)
    return {"index": index_manifest, "query": query_manifest,
            "index_dir": index_dir, "query_dir": query_dir}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.export_retrieval",
        description="Export a trained PDR model for serving: the query tower as a stock-op "
                    "SavedModel (B/pdr_query/V) and the item corpus index, ScaNN or exact "
                    "(B/pdr_index/V, with Vertex AI Vector Search JSON lines), versioned beside "
                    "the ranking model version V.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pdr-dir", required=True, help="MODEL_DIR of `python -m trainer.pdr_task`")
    p.add_argument("--data", required=True, help="preprocessing output (feature store, vocab)")
    p.add_argument("--base-path", required=True, help="folder holding the model folders")
    p.add_argument("--ranking-model-name", default="qin",
                   help="the ranking model whose latest version V pairs with this export")
    p.add_argument("--version", type=int, default=None,
                   help="version to write (default: the ranking model's latest version)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help="k of the query tower's BruteForce `retrieve` signature")
    p.add_argument("--exact-below", type=int, default=None,
                   help="search exactly below this many items (default: IndexConfig's)")
    p.add_argument("--backend", choices=("exact", "scann"), default=None,
                   help="force a backend (default: by corpus size)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from common import features as F
    from serving.export import numeric_versions
    from serving.item_index import IndexConfig
    from trainer.pdr import ItemCorpus, load_pdr_model

    args = _parser().parse_args(argv)
    try:
        version = args.version
        if version is None:
            versions = numeric_versions(os.path.join(args.base_path, args.ranking_model_name))
            if not versions:
                raise ValueError(f"no version of {args.ranking_model_name} under "
                                 f"{args.base_path}: export the ranking model first or give "
                                 "--version")
            version = versions[-1]
        metadata = F.DatasetMetadata.load(args.data)
        corpus = ItemCorpus.from_data_dir(args.data)
        model = load_pdr_model(args.pdr_dir, args.data, corpus)
        config = IndexConfig() if args.exact_below is None else IndexConfig(
            exact_below=args.exact_below)
        result = export_retrieval(model, metadata, corpus, args.base_path, version,
                                  raw_item_ids=F.read_vocabulary(args.data, "items"),
                                  index_config=config, backend=args.backend, top_k=args.top_k,
                                  ranking_model=args.ranking_model_name)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("index_dir", "query_dir")}, indent=2))
    print(f"{result['index']['items']} items indexed ({result['index']['backend']}), "
          f"{result['index']['skipped_without_embedding']} skipped without embedding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
