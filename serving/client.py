"""Ranks candidates for a user's search query through a TF Serving gRPC endpoint.

    python -m serving.client --server 127.0.0.1:8500 --feature-store OUT/feature_store.sqlite \
        --user U123 --query "funny cat videos" [--top-k 10 --candidates 100]

What it does, per request:
1. Query: encoded with the feature store's query vocabulary (token ids; embedding = L2-normalised
   mean of the known words' embeddings). An empty query, or one with no known word, is an error.
2. User: profile and full behaviour history from the store. Only behaviours strictly before
   "now" (`--now-ms`, default the current time) are used, most recent first: the first
   `long_term_length` form the long-term sequence, the first `real_time_length` the real-time
   one. An unknown user is still ranked, with an empty history and an OOV profile (a note says
   so).
3. Candidates: a simple retrieval stage stands in for the production recall system: the
   `--candidates` items whose content embedding has the highest cosine with the query embedding.
4. Ranking: one PredictRequest on the `rank_listwise` signature through the official
   PredictionServiceStub; the printed list is sorted by the fused `score`, with every task's
   probability and the long-term behaviours that drove each score (the positions the RSU kept,
   `rsu_selected_index`, with their attention weights, mapped back to raw item ids).

`rank(...)` is the same thing as a Python function returning `RankingResult`.

The store is any object with the methods of `FeatureStoreView` (below); `open_feature_store`
opens the SQLite store that `python -m preprocessing` writes (`common.feature_store`).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import common  # noqa: F401  (legacy-Keras switch before TensorFlow loads)
import numpy as np

from common import features as F
from common.cli import HelpFormatter
from common import point_in_time as pit
from serving import signatures as S

DEFAULT_TOP_K = 10
DEFAULT_CANDIDATES = 100
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class FeatureStoreView(Protocol):
    """What the client reads from a feature store (all ids raw strings, times in ms)."""

    def metadata(self) -> F.DatasetMetadata:
        """The dataset metadata the served model was trained with."""

    def user(self, user_id: str) -> Optional[Dict[str, Any]]:
        """{'user_index': int, 'user_profile': [USER_PROFILE_DIM ints]} or None if unknown."""

    def behaviours(self, user_id: str, before_ms: int, limit: int) -> List[Dict[str, Any]]:
        """Up to `limit` behaviours with timestamp < before_ms, most recent first; each has
        item_id, item_index, author_index, category [NUM_CATEGORY_LEVELS],
        engagement [ENGAGEMENT_DIM], source (int), timestamp_ms."""

    def encode_query(self, text: str) -> Tuple[List[int], np.ndarray]:
        """(query token indices as the model sees them, query embedding [D])."""

    def items(self) -> Dict[str, Any]:
        """All items: item_id [M] (str), item_index [M], author_index [M],
        category [M, NUM_CATEGORY_LEVELS], embedding [M, D] float32."""


@dataclasses.dataclass
class Driver:
    """A past item the RSU attended to for a candidate: its attention weight (summed over its
    views), how similar its content is to the candidate's, its most recent view."""

    item_id: str
    weight: float
    position: int  # index in the long-term sequence of the most recent view (0 = most recent)
    seconds_before: float
    views: int = 1
    target_similarity: Optional[float] = None  # cosine of the two items' content embeddings


def _cosine(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else None


def candidate_drivers(selected_index: np.ndarray, selected_weight: np.ndarray,
                      long_history: Sequence[Mapping[str, Any]], now_ms: int,
                      limit: int, embeddings: Optional[Mapping[str, np.ndarray]] = None,
                      target_embedding: Optional[np.ndarray] = None) -> List[Driver]:
    """The behaviours that drove one candidate's score, as a reader needs them.

    `selected_index` / `selected_weight` are the candidate's `rsu_selected_index` /
    `rsu_selected_weight` outputs (positions in `long_history`, -1 = none). Views of the same
    item become one driver (weights summed, views counted). QIN's stage 2 keeps the behaviours
    most similar to the candidate and its attention over them is nearly flat (about 1/K2
    each), so ordering by weight alone would show the same few behaviours under every result;
    with `embeddings` (raw item id -> content vector) given, drivers are ordered by weight x
    max(similarity to the candidate, 0) (then weight), which names the attended behaviours
    that resemble this item most.
    """
    merged: Dict[str, Driver] = {}
    for pos, weight in zip(selected_index, selected_weight):
        if not 0 <= pos < len(long_history):
            continue
        b = long_history[int(pos)]
        item_id = str(b["item_id"])
        seconds = (now_ms - int(b["timestamp_ms"])) / 1000.0
        d = merged.get(item_id)
        if d is None:
            merged[item_id] = Driver(item_id, float(weight), int(pos), seconds)
        else:
            d.weight += float(weight)
            d.views += 1
            if seconds < d.seconds_before:
                d.position, d.seconds_before = int(pos), seconds
    drivers = list(merged.values())
    if embeddings is not None and target_embedding is not None:
        for d in drivers:
            vector = embeddings.get(d.item_id)
            d.target_similarity = None if vector is None else _cosine(vector, target_embedding)
    drivers.sort(key=lambda d: (-d.weight * max(d.target_similarity or 0.0, 0.0), -d.weight,
                                d.position))
    return drivers[:limit]


def embeddings_by_id(store: "FeatureStoreView", item_ids: Sequence[str]
                     ) -> Dict[str, np.ndarray]:
    """raw item id -> content embedding for the known ones among `item_ids`, in one vocabulary
    lookup and one item read (per request, not per behaviour)."""
    ids = sorted({str(i) for i in item_ids})
    if not ids:
        return {}
    indices = store.item_index(ids)
    known = [(i, int(x)) for i, x in zip(ids, indices) if x > 0]
    if not known:
        return {}
    vectors = store.items([x for _, x in known])["embedding"]
    return {i: vectors[n] for n, (i, _) in enumerate(known)}


def attended_item_ids(selected_index: np.ndarray, long_history: Sequence[Mapping[str, Any]]
                      ) -> List[str]:
    """Raw item ids of the long-term positions in `selected_index` (any shape; -1 = none)."""
    positions = np.unique(np.asarray(selected_index).reshape(-1))
    return [str(long_history[int(p)]["item_id"]) for p in positions
            if 0 <= p < len(long_history)]


@dataclasses.dataclass
class RankedItem:
    item_id: str
    score: float
    task_scores: Dict[str, float]
    retrieval_cosine: float
    drivers: List[Driver]


@dataclasses.dataclass
class RankingResult:
    user_id: str
    query: str
    items: List[RankedItem]
    notes: List[str]
    model_version: int
    latency_ms: float
    long_term_length: int
    real_time_length: int


def open_feature_store(path: str) -> FeatureStoreView:
    """Opens the SQLite feature store written by preprocessing."""
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"feature store {path} not found: it is written by "
                                "`python -m preprocessing` as OUT/feature_store.sqlite")
    try:
        from common.feature_store import SqliteFeatureStore
    except ImportError as exc:
        raise RuntimeError("common.feature_store (SqliteFeatureStore) is not available in "
                           f"this checkout: {exc}") from exc
    return SqliteFeatureStore(path)


def retrieve(store: FeatureStoreView, query_embedding: np.ndarray, count: int) -> Dict[str, Any]:
    """The `count` items closest to the query by cosine of content embeddings."""
    items = store.items()
    emb = np.asarray(items["embedding"], np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError("the feature store holds no items to retrieve candidates from")
    q = np.asarray(query_embedding, np.float32).reshape(-1)
    norms = np.linalg.norm(emb, axis=1) * max(float(np.linalg.norm(q)), 1e-12)
    cosine = emb @ q / np.maximum(norms, 1e-12)
    count = min(count, len(cosine))
    top = np.argpartition(-cosine, count - 1)[:count]
    top = top[np.argsort(-cosine[top], kind="stable")]
    return {"item_id": [items["item_id"][i] for i in top],
            "item_index": np.asarray(items["item_index"])[top],
            "author_index": np.asarray(items["author_index"])[top],
            "category": np.asarray(items["category"]).reshape(len(cosine), -1)[top],
            "cosine": cosine[top]}


def build_request(store: FeatureStoreView, user_id: str, query: str, candidates: int,
                  now_ms: Optional[int] = None):
    """The make_example-style request mapping, the candidates, history and notes."""
    if query is None or not query.strip():
        raise ValueError("empty query: give the search text with --query")
    metadata = store.metadata()
    now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
    notes: List[str] = []
    tokens, q_emb = store.encode_query(query)
    q_emb = np.asarray(q_emb, np.float32).reshape(-1)
    if not len(tokens) or not np.any(q_emb):
        raise ValueError(f"no word of the query {query!r} is in the feature store's query "
                         "vocabulary; try other words")
    user = store.user(user_id)
    if user is None:
        notes.append(f"unknown user {user_id!r}: ranked with an empty history and an unknown "
                     "profile")
        user = {"user_index": F.OOV_INDEX, "user_profile": [F.OOV_INDEX] * F.USER_PROFILE_DIM}
    sequences, long_history, seq_notes = user_sequences(store, user_id, q_emb, now_ms, metadata)
    if user_id and not len(sequences[F.seq_feature(F.REAL_TIME, F.SEQ_ITEM)]) and not notes:
        notes.append(f"user {user_id!r} has no behaviour before now: empty history")
    notes += seq_notes
    retrieved = retrieve(store, q_emb, candidates)
    request: Dict[str, Any] = {
        F.QUERY_TOKENS: list(tokens)[:F.MAX_QUERY_TOKENS], F.QUERY_EMBEDDING: q_emb,
        F.USER_INDEX: int(user["user_index"]), F.USER_PROFILE: list(user["user_profile"]),
        F.CANDIDATE_ITEM: retrieved["item_index"], F.CANDIDATE_AUTHOR: retrieved["author_index"],
        F.CANDIDATE_CATEGORY: retrieved["category"],
    }
    request.update(sequences)
    return metadata, request, retrieved, long_history, notes, now_ms


def user_sequences(store: FeatureStoreView, user_id: str, query_embedding: np.ndarray,
                   now_ms: int, metadata: F.DatasetMetadata):
    """The long-term and real-time sequences of a live request, with the training rule.

    Built by `common.point_in_time.join_request`, the function preprocessing uses for every
    training example, with the settings recorded in the dataset metadata (lengths, long-term
    mode, stage-1 K and threshold). Returns (the `long_*` / `rt_*` features, the long-term
    behaviours as dicts with item_id and timestamp_ms in sequence order, notes).
    """
    notes: List[str] = []
    stage1 = metadata.long_term_mode == "stage1"
    # Recent mode needs the last max(L, R) behaviours; stage 1 searches the whole history in
    # the behaviour index and needs only the real-time ones from the store.
    limit = metadata.real_time_length if stage1 else max(metadata.long_term_length,
                                                          metadata.real_time_length)
    rows = store.behaviours(user_id, now_ms, limit) if user_id else []
    late = [b for b in rows if int(b["timestamp_ms"]) >= now_ms]
    if late:
        raise RuntimeError(f"the feature store returned {len(late)} behaviours at or after "
                           f"now={now_ms}; they would leak the future into the ranking")
    history = pit.history_from_behaviours(rows)
    long_term = None
    long_history = list(rows[:metadata.long_term_length])
    if stage1:
        # Training ran RSU stage 1 over the whole history (preprocessing, exact cosine, with the
        # recorded K1 and threshold); serve the same selection from the behaviour index.
        selected = _stage1_searcher(store).top_k(user_id, query_embedding, metadata.stage1_k,
                                                 before_ms=now_ms,
                                                 threshold=metadata.stage1_threshold)
        long_term = selected.as_long_term()
        raw_ids = (store.items(selected.item_indices)["item_id"] if len(selected) else [])
        long_history = [{"item_id": i, "timestamp_ms": int(t)}
                        for i, t in zip(raw_ids, selected.timestamps_ms)]
        threshold = ("" if metadata.stage1_threshold is None
                     else f", cosine >= {metadata.stage1_threshold}")
        notes.append(f"long-term sequence: stage 1 ({selected.backend}{threshold}) kept "
                     f"{len(selected)} of {selected.history_length} behaviours")
    features = pit.join_request(history, now_ms, metadata, query_embedding, long_term=long_term)
    return features, long_history, notes


_SEARCHERS: Dict[int, Any] = {}


def _stage1_searcher(store: FeatureStoreView):
    """One behaviour index per feature store, built lazily per user and reused by requests."""
    if id(store) not in _SEARCHERS:
        from serving.behaviour_index import Stage1Searcher

        _SEARCHERS[id(store)] = Stage1Searcher.from_feature_store(store)
    return _SEARCHERS[id(store)]


def predict_request(inputs: Dict[str, np.ndarray], model_name: str, signature: str,
                    version_label: Optional[str] = None):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version_label:
        request.model_spec.version_label = version_label
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def make_stub(server: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(server, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes)])
    return prediction_service_pb2_grpc.PredictionServiceStub(channel), channel


def rank(stub, store: FeatureStoreView, user_id: str, query: str, top_k: int = DEFAULT_TOP_K,
         candidates: int = DEFAULT_CANDIDATES, model_name: str = "qin",
         signature: str = S.RANK_LISTWISE, now_ms: Optional[int] = None,
         version_label: Optional[str] = None, timeout: float = 30.0,
         max_drivers: int = 3) -> RankingResult:
    """Ranks `candidates` retrieved items for (user, query); returns the top `top_k`.

    `stub` is a tensorflow_serving PredictionServiceStub (see `make_stub`). Raises ValueError
    for an empty or unknown query and grpc.RpcError when the server refuses the request.
    """
    import tensorflow as tf

    if top_k < 1 or candidates < 1:
        raise ValueError("top_k and candidates must be >= 1")
    metadata, request, retrieved, long_history, notes, now_ms = build_request(
        store, user_id, query, candidates, now_ms)
    inputs = S.listwise_inputs([request], metadata)
    started = time.perf_counter()
    response = stub.Predict(predict_request(inputs, model_name, signature, version_label),
                            timeout=timeout)
    latency_ms = (time.perf_counter() - started) * 1000
    out = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    missing = [k for k in S.predict_output_keys(metadata.tasks, listwise=True) if k not in out]
    if missing:
        raise RuntimeError(f"signature '{signature}' returned no {missing}; is it the listwise "
                           "ranking signature?")
    n = len(retrieved["item_id"])
    score = out[S.SCORE][0, :n]
    order = np.argsort(-score, kind="stable")[:top_k]
    ranked = []
    # One lookup for every behaviour and candidate shown, not one per driver; a minimal
    # FeatureStoreView without the id lookup orders drivers by weight alone.
    embeddings = embeddings_by_id(store, attended_item_ids(
        out[S.RSU_SELECTED_INDEX][0, order], long_history) + [
            str(retrieved["item_id"][c]) for c in order]) \
        if hasattr(store, "item_index") else {}
    for c in order:
        drivers = candidate_drivers(
            out[S.RSU_SELECTED_INDEX][0, c], out[S.RSU_SELECTED_WEIGHT][0, c], long_history,
            now_ms, max_drivers, embeddings, embeddings.get(str(retrieved["item_id"][c])))
        ranked.append(RankedItem(
            item_id=str(retrieved["item_id"][c]), score=float(score[c]),
            task_scores={t: float(out[t][0, c]) for t in metadata.tasks},
            retrieval_cosine=float(retrieved["cosine"][c]), drivers=drivers))
    return RankingResult(user_id, query, ranked, notes, response.model_spec.version.value,
                         latency_ms, len(long_history),
                         min(len(long_history), metadata.real_time_length))


def format_result(result: RankingResult) -> str:
    lines = [f"query {result.query!r} for user {result.user_id!r}: {len(result.items)} results "
             f"(model version {result.model_version}, {result.latency_ms:.1f} ms; history "
             f"{result.long_term_length} long-term / {result.real_time_length} real-time)"]
    lines += [f"note: {n}" for n in result.notes]
    tasks = list(result.items[0].task_scores) if result.items else []
    lines.append(f"{'rank':>4}  {'item':<16} {'score':>8} " +
                 " ".join(f"{task_column(t):>12}" for t in tasks) + "  driven by (item, weight)")
    for i, item in enumerate(result.items, 1):
        drivers = ", ".join(f"{d.item_id} {d.weight:.2f}" for d in item.drivers) or "-"
        lines.append(f"{i:>4}  {item.item_id:<16} {item.score:>8.4f} " +
                     " ".join(f"{format_task_value(t, item.task_scores[t]):>12}"
                              for t in tasks) + f"  {drivers}")
    return "\n".join(lines)


def task_column(task: str) -> str:
    """Column title of a task: probabilities by name, watch time as expected seconds."""
    return f"p({task})" if F.is_binary_task(task) else f"E[{task}] s"


def format_task_value(task: str, value: float) -> str:
    return f"{value:.4f}" if F.is_binary_task(task) else f"{value:.1f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving.client",
        description="Rank search results for a user and a query with a served QIN model: the "
                    "request is assembled from the feature store (profile, behaviours strictly "
                    "before now, query encoding, candidates retrieved by content-embedding "
                    "cosine) and sent to the rank_listwise signature over TF Serving gRPC.",
        formatter_class=HelpFormatter)
    p.add_argument("--server", required=True, help="HOST:PORT of the gRPC model server")
    p.add_argument("--feature-store", required=True,
                   help="OUT/feature_store.sqlite written by `python -m preprocessing`")
    p.add_argument("--user", required=True, help="raw user id (unknown users still rank)")
    p.add_argument("--query", required=True, help="search text")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="results to print")
    p.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                   help="items retrieved for ranking")
    p.add_argument("--model-name", default="qin", help="ModelSpec.name")
    p.add_argument("--signature", default=S.RANK_LISTWISE, help="listwise signature name")
    p.add_argument("--version-label", help="ModelSpec.version_label, e.g. canary")
    p.add_argument("--now-ms", type=int,
                   help="request time in ms since the epoch (default: now); only behaviours "
                        "before it are used")
    p.add_argument("--timeout", type=float, default=30.0, help="RPC deadline in seconds")
    return p


def run_server_call(server: str, call: Callable[[], Any]) -> Tuple[int, Any]:
    """A command line's call to the model server: (0, its result); or, after printing one
    error line, (2, None) for bad input (ValueError, FileNotFoundError, RuntimeError) and
    (1, None) when the server refused (its gRPC status and details)."""
    import grpc

    try:
        return 0, call()
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except grpc.RpcError as exc:
        print(f"error: server {server} answered {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def call():
        store = open_feature_store(args.feature_store)
        stub, channel = make_stub(args.server)
        try:
            return rank(stub, store, args.user, args.query, top_k=args.top_k,
                        candidates=args.candidates, model_name=args.model_name,
                        signature=args.signature, now_ms=args.now_ms,
                        version_label=args.version_label, timeout=args.timeout)
        finally:
            channel.close()

    code, result = run_server_call(args.server, call)
    if code == 0:
        print(format_result(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
