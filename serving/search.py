"""One search call: (user, query, time) -> ranked results, PR2's retrieval and ranking stages
(Kuaishou, arXiv 2409.11281) end to end.

    python -m serving.search --server 127.0.0.1:8500 --data OUT --base-path B \
        --user U123 --query "cooking_3 how" [--k 10] [--now-ms T] [--json]

`Searcher.search(user_id, query, now_ms, k)`:

1. Query. Encoded with the feature store's query vocabulary; words it does not know are
   listed in a note (and ignored). No known word: no result, said in a note.
2. User. Profile and behaviours strictly before `now_ms` from the feature store; the
   long-term and real-time sequences by `serving.client.user_sequences`, the function the
   ranking client uses (the training rule of common.point_in_time).
3. Retrieval, three sources:
   * qrcf: query-relevant collaborative filtering (serving/qrcf.py) over the item-to-item
     table; every item carries the seed behaviours that drove it;
   * pdr: the query-user tower (the exported stock-op SavedModel B/pdr_query/V) and the
     corpus index (B/pdr_index/V, ScaNN or exact);
   * content: the non-personalized baseline, cosine of content embeddings
     (`serving.client.retrieve`).
   An unknown user or a user without behaviours gets non-personalized retrieval (content
   only), said in a note.
4. Merge: per-source quotas and dedupe (serving/merge.py); every item lists every source that
   found it. Items without a content embedding or unknown to the store are counted and
   skipped.
5. Features and ranking: the candidates' features from the store, the request by
   `serving.signatures.listwise_inputs`, QIN's `rank_listwise` over TF Serving's gRPC API
   (`serving.client.predict_request`). The top k come back with their task scores and fused
   score, their sources (rank in each), the QRCF seeds and the behaviours the RSU attended to.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from common import features as F
from serving import client as C
from serving import signatures as S
from serving.merge import merge_sources

QRCF, PDR, CONTENT = "qrcf", "pdr", "content"
SOURCES = (QRCF, PDR, CONTENT)
# Chosen on the eval split of the default generated dataset (docs/RETRIEVAL.md, Evaluation):
# QRCF and content add fewer clicked items than the PDR items they would displace.
DEFAULT_QUOTAS = {PDR: 0.9, QRCF: 0.0, CONTENT: 0.1}


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Settings of one search call."""

    candidates: int = 200  # merged candidates sent to the ranker
    quotas: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    per_source: int = 200  # items asked from each source before merging
    model_name: str = "qin"
    signature: str = S.RANK_LISTWISE
    version_label: Optional[str] = None
    timeout: float = 30.0
    max_drivers: int = 3
    max_seeds: int = 3

    def __post_init__(self):
        unknown = set(self.quotas) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown sources in quotas: {sorted(unknown)}; known: {SOURCES}")
        if self.candidates < 1 or self.per_source < 1:
            raise ValueError("candidates and per_source must be >= 1")


@dataclasses.dataclass
class SourceHit:
    rank: int  # 0 = the source's best
    score: float  # the source's own score (QRCF score, PDR dot product, content cosine)


@dataclasses.dataclass
class Seed:
    """A behaviour of the user that drove a QRCF item."""

    item_id: str
    seconds_before: Optional[float]
    relevance: float
    contribution: float


@dataclasses.dataclass
class SearchItem:
    item_id: str
    item_index: int
    score: float  # QIN's fused ranking score
    task_scores: Dict[str, float]
    sources: Dict[str, SourceHit]  # every retriever that found it
    qrcf_seeds: List[Seed]
    drivers: List[C.Driver]  # long-term behaviours the RSU attended to, strongest first


@dataclasses.dataclass
class SearchResult:
    user_id: str
    query: str
    now_ms: int
    personalized: bool
    items: List[SearchItem]
    notes: List[str]
    counts: Dict[str, int]
    timings_ms: Dict[str, float]
    model_version: Optional[int] = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


class PDRRetriever:
    """The exported query tower (B/pdr_query/V, loaded with tf.saved_model.load, stock ops)
    and the corpus index (B/pdr_index/V)."""

    def __init__(self, query_dir: str, index_dir: str, metadata: F.DatasetMetadata):
        import tensorflow as tf

        from serving.item_index import ItemIndex

        self.metadata = metadata
        self._loaded = tf.saved_model.load(query_dir)
        self._serve = self._loaded.signatures["serving_default"]
        self.index = ItemIndex.load(index_dir)
        self.query_dir, self.index_dir = query_dir, index_dir

    @classmethod
    def from_base_path(cls, base_path: str, metadata: F.DatasetMetadata,
                       version: Optional[int] = None) -> "PDRRetriever":
        from serving.export_retrieval import INDEX_NAME, QUERY_MODEL_NAME
        from serving.item_index import latest_version

        if version is None:
            version = latest_version(os.path.join(base_path, INDEX_NAME))
            if version is None:
                raise FileNotFoundError(f"no PDR index under {base_path}/{INDEX_NAME}: run "
                                        "`python -m serving.export_retrieval`")
        return cls(os.path.join(base_path, QUERY_MODEL_NAME, str(version)),
                   os.path.join(base_path, INDEX_NAME, str(version)), metadata)

    def query_vector(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        import tensorflow as tf

        from serving.export_retrieval import QUERY_VECTOR, query_inputs

        feed = {k: tf.constant(v) for k, v in query_inputs(dict(inputs), self.metadata).items()}
        return self._serve(**feed)[QUERY_VECTOR].numpy()

    def retrieve(self, inputs: Mapping[str, np.ndarray], count: int):
        items, scores = self.index.search(self.query_vector(inputs), count)
        return items[0], scores[0]


class Searcher:
    """The search call over a feature store, the retrievers and a TF Serving stub."""

    def __init__(self, store, stub, qrcf=None, pdr: Optional[PDRRetriever] = None,
                 config: SearchConfig = SearchConfig()):
        self.store = store
        self.stub = stub
        self.qrcf = qrcf
        self.pdr = pdr
        self.config = config
        self.metadata = store.metadata()
        self._item_embeddings = store.item_embeddings() if hasattr(store, "item_embeddings") \
            else None
        self._pool = concurrent.futures.ThreadPoolExecutor(len(SOURCES),
                                                           thread_name_prefix="retrieve")

    @classmethod
    def from_paths(cls, data_dir: str, base_path: str, stub, version: Optional[int] = None,
                   config: SearchConfig = SearchConfig(), qrcf_config=None,
                   item_to_item: Optional[str] = None) -> "Searcher":
        """Store from DATA, the i2i table from `item_to_item` (default DATA/item_to_item), PDR
        from B/pdr_query and B/pdr_index."""
        from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
        from common.item_to_item import read_item_to_item
        from serving.qrcf import QRCFConfig, QRCFRetriever

        store = SqliteFeatureStore(os.path.join(data_dir, FEATURE_STORE_FILE))
        qrcf = QRCFRetriever(store, read_item_to_item(item_to_item or data_dir),
                             qrcf_config or QRCFConfig(max_results=config.per_source))
        pdr = PDRRetriever.from_base_path(base_path, store.metadata(), version)
        return cls(store, stub, qrcf, pdr, config)

    # ---- steps -----------------------------------------------------------------------------
    def _encode(self, query: str, notes: List[str]):
        tokens, embedding = self.store.encode_query(query)
        unknown = [w for w in query.split() if not len(self.store.encode_query(w)[0])]
        if unknown:
            notes.append(f"unknown query word(s) ignored: {', '.join(unknown)}")
        return list(tokens), np.asarray(embedding, np.float32).reshape(-1)

    def _has_embedding(self, item_indices: np.ndarray) -> np.ndarray:
        if self._item_embeddings is None:
            return np.ones(len(item_indices), bool)
        table = self._item_embeddings
        idx = np.asarray(item_indices, np.int64)
        inside = (idx > 0) & (idx < table.shape[0])
        out = np.zeros(len(idx), bool)
        out[inside] = np.any(table[idx[inside]] != 0, axis=1)
        return out

    def search(self, user_id: str, query: str, now_ms: Optional[int] = None, k: int = 10
               ) -> SearchResult:
        """Retrieves, merges and ranks; the top k (module docstring)."""
        import tensorflow as tf

        if query is None or not query.strip():
            raise ValueError("empty query: give the search text")
        if k < 1:
            raise ValueError("k must be >= 1")
        cfg, md = self.config, self.metadata
        now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
        notes: List[str] = []
        counts: Dict[str, int] = {}
        timings: Dict[str, float] = {}
        started = time.perf_counter()

        def lap(name, since):
            timings[name] = round((time.perf_counter() - since) * 1000, 3)
            return time.perf_counter()

        tokens, q_emb = self._encode(query, notes)
        if not tokens or not np.any(q_emb):
            notes.append(f"no word of the query {query!r} is in the query vocabulary: nothing "
                         "to retrieve")
            return SearchResult(user_id, query, now_ms, False, [], notes, counts, timings)
        user = self.store.user(user_id) if user_id else None
        sequences, long_history, seq_notes = C.user_sequences(self.store, user_id or "", q_emb,
                                                              now_ms, md)
        notes += seq_notes
        has_history = bool(user_id) and len(self.store.behaviours(user_id, now_ms, 1)) > 0
        personalized = user is not None and has_history
        if user is None:
            notes.append(f"unknown user {user_id!r}: non-personalized retrieval (content "
                         "baseline only) and an empty history for ranking")
            user = {"user_index": F.OOV_INDEX, "user_profile": [F.OOV_INDEX] * F.USER_PROFILE_DIM}
        elif not personalized:
            notes.append(f"user {user_id!r} has no behaviour before the request time: "
                         "non-personalized retrieval (content baseline only)")
        request: Dict[str, Any] = {
            F.QUERY_TOKENS: tokens[:F.MAX_QUERY_TOKENS], F.QUERY_EMBEDDING: q_emb,
            F.USER_INDEX: int(user["user_index"]), F.USER_PROFILE: list(user["user_profile"])}
        request.update(sequences)
        t = lap("features_request", started)

        lists: Dict[str, List[int]] = {}
        hits: Dict[str, Dict[int, SourceHit]] = {}
        qrcf_items: Dict[int, Any] = {}

        def timed(name, fn):
            since = time.perf_counter()
            out = fn()
            timings[name] = round((time.perf_counter() - since) * 1000, 3)
            return out

        def run_qrcf():
            return self.qrcf.retrieve(user_id, q_emb, now_ms)

        def run_pdr():
            inputs = S.listwise_inputs([dict(request, **{F.CANDIDATE_ITEM: [],
                                                         F.CANDIDATE_AUTHOR: [],
                                                         F.CANDIDATE_CATEGORY: []})], md)
            return self.pdr.retrieve(inputs, cfg.per_source)

        def run_content():
            return C.retrieve(self.store, q_emb, cfg.per_source)

        # The sources are independent: they run concurrently (SQLite, NumPy, TensorFlow and
        # ScaNN release the GIL), so retrieval costs about its slowest source.
        jobs = {CONTENT: ("retrieve_content", run_content)}
        if personalized and self.qrcf is not None:
            jobs[QRCF] = ("retrieve_qrcf", run_qrcf)
        if personalized and self.pdr is not None:
            jobs[PDR] = ("retrieve_pdr", run_pdr)
        futures = {source: self._pool.submit(timed, *job) for source, job in jobs.items()}
        answers = {source: future.result() for source, future in futures.items()}
        if QRCF in answers:
            result = answers[QRCF]
            lists[QRCF] = result.item_indices[:cfg.per_source]
            hits[QRCF] = {it.item_index: SourceHit(r, it.score)
                          for r, it in enumerate(result.items[:cfg.per_source])}
            qrcf_items = {it.item_index: it for it in result.items[:cfg.per_source]}
            if result.reason:
                notes.append(f"qrcf found nothing: {result.explanation}")
            counts["qrcf_seeds"] = len(result.seeds)
        if PDR in answers:
            items, scores = answers[PDR]
            lists[PDR] = [int(i) for i in items]
            hits[PDR] = {int(i): SourceHit(r, float(s))
                         for r, (i, s) in enumerate(zip(items, scores))}
        content = answers[CONTENT]
        with_embedding = self._has_embedding(content["item_index"])
        counts["content_without_embedding"] = int((~with_embedding).sum())
        lists[CONTENT] = [int(i) for i in np.asarray(content["item_index"])[with_embedding]]
        hits[CONTENT] = {int(i): SourceHit(r, float(s)) for r, (i, s) in enumerate(
            zip(np.asarray(content["item_index"])[with_embedding],
                np.asarray(content["cosine"])[with_embedding]))}
        t = lap("retrieve", t)
        for source, items in lists.items():
            counts[f"retrieved_{source}"] = len(items)

        merged = merge_sources(lists, cfg.quotas, cfg.candidates)
        indices = np.asarray([m.item_index for m in merged], np.int64)
        keep = self._has_embedding(indices)
        counts["skipped_without_embedding"] = int((~keep).sum())
        indices = indices[keep]
        try:
            items = self.store.items(indices)
        except KeyError:
            known = self.store.items()["item_index"]
            present = np.isin(indices, known)
            counts["skipped_unknown_items"] = int((~present).sum())
            indices = indices[present]
            items = self.store.items(indices)
        counts["candidates"] = int(len(indices))
        if counts["skipped_without_embedding"]:
            notes.append(f"{counts['skipped_without_embedding']} retrieved item(s) without a "
                         "content embedding skipped")
        t = lap("merge_and_item_features", t)
        if not len(indices):
            notes.append("no candidate retrieved")
            return SearchResult(user_id, query, now_ms, personalized, [], notes, counts,
                                timings)
        request[F.CANDIDATE_ITEM] = indices
        request[F.CANDIDATE_AUTHOR] = np.asarray(items["author_index"], np.int64)
        request[F.CANDIDATE_CATEGORY] = np.asarray(items["category"], np.int64).reshape(
            len(indices), F.NUM_CATEGORY_LEVELS)
        inputs = S.listwise_inputs([request], md)
        response = self.stub.Predict(C.predict_request(inputs, cfg.model_name, cfg.signature,
                                                       cfg.version_label), timeout=cfg.timeout)
        out = {key: tf.make_ndarray(v) for key, v in response.outputs.items()}
        missing = [key for key in S.predict_output_keys(md.tasks, listwise=True)
                   if key not in out]
        if missing:
            raise RuntimeError(f"signature {cfg.signature!r} returned no {missing}")
        t = lap("rank", t)
        n = len(indices)
        score = out[S.SCORE][0, :n]
        ranked = []
        top = np.argsort(-score, kind="stable")[:k]
        seeds = self._seeds([qrcf_items[int(indices[c])] for c in top
                             if int(indices[c]) in qrcf_items], now_ms)
        embeddings = C.embeddings_by_id(self.store, C.attended_item_ids(
            out[S.RSU_SELECTED_INDEX][0, top], long_history))
        for c in top:
            item = int(indices[c])
            sources = {s: hits[s][item] for s in SOURCES if s in hits and item in hits[s]}
            ranked.append(SearchItem(
                item_id=str(items["item_id"][c]), item_index=item, score=float(score[c]),
                task_scores={task: float(out[task][0, c]) for task in md.tasks},
                sources=sources, qrcf_seeds=seeds.get(item, []),
                drivers=C.candidate_drivers(
                    out[S.RSU_SELECTED_INDEX][0, c], out[S.RSU_SELECTED_WEIGHT][0, c],
                    long_history, now_ms, self.config.max_drivers, embeddings,
                    items["embedding"][c] if "embedding" in items else None)))
        timings["total"] = round((time.perf_counter() - started) * 1000, 3)
        return SearchResult(user_id, query, now_ms, personalized, ranked, notes, counts, timings,
                            int(response.model_spec.version.value))

    def _seeds(self, retrieved, now_ms: int) -> Dict[int, List[Seed]]:
        """The strongest `max_seeds` seed behaviours of each QRCF item (one store lookup)."""
        chosen = {it.item_index: it.seeds[:self.config.max_seeds] for it in retrieved}
        wanted = sorted({c.seed.item_index for cs in chosen.values() for c in cs})
        raw = dict(zip(wanted, self.store.items(wanted)["item_id"])) if wanted else {}
        return {item: [Seed(item_id=str(raw[c.seed.item_index]),
                            seconds_before=None if c.seed.timestamp_ms is None
                            else (now_ms - c.seed.timestamp_ms) / 1000.0,
                            relevance=c.seed.relevance, contribution=c.contribution)
                       for c in cs] for item, cs in chosen.items()}



def format_result(result: SearchResult) -> str:
    lines = [f"search {result.query!r} for user {result.user_id!r}: {len(result.items)} results"
             f" ({'personalized' if result.personalized else 'non-personalized'} retrieval, "
             f"{result.counts.get('candidates', 0)} candidates ranked by model version "
             f"{result.model_version}; {result.timings_ms.get('total', 0):.1f} ms)"]
    lines += [f"note: {n}" for n in result.notes]
    for i, item in enumerate(result.items, 1):
        found = ", ".join(f"{s}#{h.rank + 1}" for s, h in item.sources.items())
        lines.append(f"{i:>3}. {item.item_id:<12} score {item.score:.4f}  "
                     + " ".join(f"{t} {v:.3f}" for t, v in item.task_scores.items())
                     + f"  found by: {found}")
        if item.qrcf_seeds:
            lines.append("       qrcf seeds: " + ", ".join(
                f"{s.item_id} (relevance {s.relevance:.2f})" for s in item.qrcf_seeds))
        if item.drivers:
            lines.append("       ranking drivers: " + ", ".join(
                f"{d.item_id} {d.weight:.2f}" for d in item.drivers))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.search",
        description="Search for a user: retrieve candidates from QRCF (the user's query-"
                    "relevant behaviours expanded by item-to-item similarity), PDR (the "
                    "personalized dual encoder and its item index) and the content-embedding "
                    "baseline, merge them with per-source quotas, rank them with the served QIN "
                    "model over TF Serving's gRPC API (rank_listwise) and print the top k with "
                    "their scores, the retrievers that found each, the behaviours that drove "
                    "QRCF and the ranking. Unknown users and users without history get "
                    "non-personalized retrieval; unknown query words are reported.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", required=True, help="HOST:PORT of the gRPC model server (QIN)")
    p.add_argument("--data", required=True,
                   help="preprocessing output: feature_store.sqlite (and item_to_item/)")
    p.add_argument("--item-to-item", default=None,
                   help="folder of the item-to-item table (python -m preprocessing.item_to_item "
                        "--output DIR); default: DATA/item_to_item")
    p.add_argument("--base-path", required=True,
                   help="folder holding pdr_query/ and pdr_index/ (serving.export_retrieval)")
    p.add_argument("--version", type=int, default=None,
                   help="retrieval version (default: the latest pdr_index version)")
    p.add_argument("--user", required=True, help="raw user id")
    p.add_argument("--query", required=True, help="search text")
    p.add_argument("--k", type=int, default=10, help="results returned")
    p.add_argument("--now-ms", type=int, default=None,
                   help="request time, ms since the epoch (default: now); only behaviours "
                        "before it are used")
    p.add_argument("--candidates", type=int, default=200, help="merged candidates ranked")
    p.add_argument("--quotas", default=json.dumps(DEFAULT_QUOTAS),
                   help="JSON shares of the candidates per source (qrcf, pdr, content)")
    p.add_argument("--model-name", default="qin", help="ModelSpec.name of the ranker")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def call():
        config = SearchConfig(candidates=args.candidates, quotas=json.loads(args.quotas),
                              per_source=max(args.candidates, 1), model_name=args.model_name)
        stub, channel = C.make_stub(args.server)
        try:
            searcher = Searcher.from_paths(args.data, args.base_path, stub, args.version,
                                           config, item_to_item=args.item_to_item)
            return searcher.search(args.user, args.query, args.now_ms, args.k)
        finally:
            channel.close()

    code, result = C.run_server_call(args.server, call)
    if code == 0:
        print(result.to_json() if args.json else format_result(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
