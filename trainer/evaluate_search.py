"""The full search call judged by the generator's oracle: `python -m trainer.evaluate_search
--server HOST:PORT --base-path B --data OUT --raw RAW --split test --max-requests N --output E`
(also `python -m trainer.evaluate_retrieval search ...`).

For every request of the split, in the dataset's order (the order of trainer.evaluate_retrieval),
with the request's user, query text (its raw query tokens as words of RAW/query_vocab.parquet)
and time (`request_time`, only behaviours before it are used), through the QIN model served over
TF Serving's gRPC API:

* search: `serving.search.Searcher.search` (QRCF + PDR + content retrieval, merged with the
  default quotas, ranked by QIN's rank_listwise); its top k;
* content@N: `serving.client.rank` (the N items of highest content cosine, ranked by the same
  QIN); its top k (one row per N of `--content-candidates`);
* ceiling: the oracle's own best k of the corpus (the store's items with a content embedding),
  by each metric's true value;
* search_candidates_best / content@N_candidates_best: the oracle's best k among the candidates
  the ranker saw (what a perfect ranker would return from that retrieval).

Each list is judged by the generator's true values of its (request, item) pairs
(`trainer.retrieval_oracle.ClickOracle.truth`): clicks@k = the sum of p(click) over the top k
(the expected clicks), watch_time@k = the sum of the expected play time in seconds. Reported:
the mean over requests (with its standard error), the ratios of the means (search / content@N,
search / ceiling, content@N / ceiling) and the paired difference search - content@N (mean and
standard error). Writes E/search_oracle.json and E/search_oracle_requests.jsonl (per request:
the ids and the top-k item indices of every path, for reproducibility).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

import common  # noqa: F401

logger = logging.getLogger("evaluate_search")

CLICK, WATCH_TIME = "click", "watch_time"  # the oracle's keys (ClickOracle.truth)
METRICS = {CLICK: "clicks", WATCH_TIME: "watch_time"}
SEARCH, CEILING = "search", "ceiling"
OUTPUT_FILE, REQUESTS_FILE = "search_oracle.json", "search_oracle_requests.jsonl"


def build_parser(prog: str = "python -m trainer.evaluate_search") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Judge the full search call (QRCF + PDR + content retrieval, merged, ranked "
                    "by the served QIN) by the generator's oracle: mean true expected clicks "
                    "and watch time of its top k on the requests of a split, against QIN "
                    "ranking only the content baseline's candidates (serving.client.rank) and "
                    "against the oracle's own best k of the corpus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", required=True, help="HOST:PORT of the gRPC model server (QIN)")
    p.add_argument("--base-path", required=True,
                   help="folder holding pdr_query/ and pdr_index/ (serving.export_retrieval)")
    p.add_argument("--data", required=True,
                   help="preprocessing output (feature_store.sqlite, item_to_item/, splits)")
    p.add_argument("--raw", required=True,
                   help="generator output (query_vocab.parquet, requests.parquet, truth/)")
    p.add_argument("--item-to-item", default=None,
                   help="folder of the item-to-item table (default: DATA/item_to_item)")
    p.add_argument("--split", default="test", choices=("train", "eval", "test"))
    p.add_argument("--max-requests", type=int, default=500, help="the first N requests")
    p.add_argument("--k", type=int, default=10, help="results judged per request")
    p.add_argument("--content-candidates", default="200",
                   help="comma-separated candidate counts of the content path (the search "
                        "call ranks 200 merged candidates; serving.client's default is 100)")
    p.add_argument("--model-name", default="qin", help="ModelSpec.name of the ranker")
    p.add_argument("--output", required=True, help="folder for the JSON outputs")
    return p


# ---- the oracle's arithmetic (pure NumPy) ---------------------------------------------------
def sum_at_k(values: np.ndarray, lists: Sequence[Sequence[int]], k: int) -> np.ndarray:
    """float64 [R]: per request r, the sum of values[r, item] over the first k items of
    lists[r] (values [R, num_items + 1] by vocabulary index; a shorter list sums fewer)."""
    values = np.asarray(values, np.float64)
    if len(lists) != values.shape[0]:
        raise ValueError(f"{len(lists)} lists for {values.shape[0]} rows of values")
    return np.asarray([float(values[r, np.asarray(list(items[:k]), np.int64)].sum())
                       for r, items in enumerate(lists)], np.float64)


def best_k(values: np.ndarray, k: int, allowed: Optional[Sequence[Sequence[int]]] = None
           ) -> List[List[int]]:
    """Per request, the k items of highest value, best first (ties: lower index first), among
    `allowed[r]` (default: every item but index 0)."""
    values = np.asarray(values, np.float64)
    out = []
    for r in range(values.shape[0]):
        pool = (np.arange(1, values.shape[1]) if allowed is None
                else np.unique(np.asarray(list(allowed[r]), np.int64)))
        order = np.argsort(-values[r, pool], kind="stable")[:k]
        out.append([int(i) for i in pool[order]])
    return out


def summarize(per_request: Mapping[str, Mapping[str, np.ndarray]], k: int,
              baselines: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """{path: {metric@k mean, metric@k_se}} from per-request sums, plus `ratios` (of the means:
    search / each baseline, search / ceiling, baseline / ceiling) and `paired` (search -
    baseline per request: mean and standard error)."""
    def se(x):
        return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")

    out: Dict[str, Dict[str, float]] = {}
    for path, metrics in per_request.items():
        out[path] = {}
        for task, x in metrics.items():
            name = f"{METRICS.get(task, task)}@{k}"
            out[path][name] = float(np.mean(x))
            out[path][f"{name}_se"] = se(x)
    ratios, paired = {}, {}
    for task in per_request[SEARCH]:
        name = f"{METRICS.get(task, task)}@{k}"

        def ratio(a, b):
            denominator = float(np.mean(per_request[b][task]))
            return float(np.mean(per_request[a][task])) / denominator if denominator else \
                float("nan")
        for base in baselines:
            ratios[f"{name} search/{base}"] = ratio(SEARCH, base)
            diff = per_request[SEARCH][task] - per_request[base][task]
            paired[f"{name} search-{base}"] = float(np.mean(diff))
            paired[f"{name} search-{base}_se"] = se(diff)
        if CEILING in per_request:
            for path in (SEARCH, *baselines):
                ratios[f"{name} {path}/{CEILING}"] = ratio(path, CEILING)
    out["ratios"] = ratios
    out["paired"] = paired
    return out


# ---- the requests --------------------------------------------------------------------------
def split_requests(data_dir: str, split: str, max_requests: Optional[int]) -> Dict[str, list]:
    """request_id, user_id, request_time (ms) and query_embedding of the split's first N
    requests, in the dataset's order (trainer.evaluate_retrieval's)."""
    from common import features as F
    from trainer.data import make_dataset

    metadata = F.DatasetMetadata.load(data_dir)
    out: Dict[str, list] = {"request_id": [], "user_id": [], "request_time": [],
                            "query_embedding": []}
    for batch in make_dataset(data_dir, split, metadata, 256, for_training=False):
        out["request_id"] += [x.decode() for x in batch[F.REQUEST_ID].numpy()]
        out["user_id"] += [x.decode() for x in batch[F.USER_ID].numpy()]
        out["request_time"] += [int(t) for t in batch[F.REQUEST_TIME].numpy()]
        out["query_embedding"] += list(batch[F.QUERY_EMBEDDING].numpy())
        if max_requests is not None and len(out["request_id"]) >= max_requests:
            break
    n = len(out["request_id"]) if max_requests is None else min(max_requests,
                                                                  len(out["request_id"]))
    return {key: value[:n] for key, value in out.items()}


def query_texts(raw_dir: str, request_ids: Sequence[str]) -> List[str]:
    """The query text of each request: its raw query tokens as words of the query vocabulary
    (RAW/requests.parquet, RAW/query_vocab.parquet), as pipelines.demo builds them."""
    import pyarrow.parquet as pq

    vocab = pq.read_table(os.path.join(raw_dir, "query_vocab.parquet"),
                          columns=["token_id", "word"]).to_pydict()
    words = dict(zip(vocab["token_id"], vocab["word"]))
    requests = pq.read_table(os.path.join(raw_dir, "requests.parquet"),
                             columns=["request_id", "query_tokens"]).to_pydict()
    tokens = dict(zip(requests["request_id"], requests["query_tokens"]))
    missing = [r for r in request_ids if r not in tokens]
    if missing:
        raise ValueError(f"{len(missing)} requests (e.g. {missing[0]}) are not in "
                         f"{raw_dir}/requests.parquet: --raw is not the generator output of "
                         "--data")
    return [" ".join(words[t] for t in tokens[r] if t in words) for r in request_ids]


def evaluate(searcher, stub, store, oracle, requests: Mapping[str, Sequence], texts: Sequence[str],
             k: int = 10, content_candidates: Sequence[int] = (200,), model_name: str = "qin",
             log_every: int = 50):
    """Runs both paths per request and judges them (module docstring). `oracle` has
    `truth(request_ids, items [R, N])` -> {task: [R, N]} (ClickOracle). Returns (summary,
    per-request records)."""
    from serving import client as C

    n = len(requests["request_id"])
    table = store.items()
    index_of = dict(zip([str(i) for i in table["item_id"]],
                        np.asarray(table["item_index"], np.int64).tolist()))
    corpus = np.asarray(table["item_index"], np.int64)
    corpus = corpus[np.any(np.asarray(table["embedding"]) != 0, axis=1)]
    every = np.arange(int(corpus.max()) + 1 if len(corpus) else 1, dtype=np.int64)
    content_paths = [f"content@{c}" for c in content_candidates]
    paths = [SEARCH, *content_paths, CEILING, f"{SEARCH}_candidates_best",
             *[f"{p}_candidates_best" for p in content_paths]]
    sums = {p: {t: np.zeros(n) for t in METRICS} for p in paths}
    records = []
    started = time.time()
    for r in range(n):
        rid, user = requests["request_id"][r], requests["user_id"][r]
        now = int(requests["request_time"][r])
        truth = oracle.truth([rid], every[None, :])
        values = {t: np.asarray(truth[t], np.float64) for t in METRICS}
        result = searcher.search(user, texts[r], now, k=searcher.config.candidates)
        ranked = {SEARCH: [it.item_index for it in result.items]}
        for path, count in zip(content_paths, content_candidates):
            answer = C.rank(stub, store, user, texts[r], top_k=count, candidates=count,
                            model_name=model_name, now_ms=now)
            ranked[path] = [index_of[it.item_id] for it in answer.items]
        record = {"request_id": rid, "user_id": user, "now_ms": now, "query": texts[r],
                  "personalized": result.personalized,
                  "search_candidates": int(result.counts.get("candidates", 0))}
        for task, table in values.items():
            ceiling = best_k(table, k, [corpus])[0]
            sums[CEILING][task][r] = sum_at_k(table, [ceiling], k)[0]
            for path, items in ranked.items():
                sums[path][task][r] = sum_at_k(table, [items], k)[0]
                best = best_k(table, k, [items])[0]
                sums[f"{path}_candidates_best"][task][r] = sum_at_k(table, [best], k)[0]
            if task == CLICK:
                record["ceiling"] = ceiling
        record.update({path: items[:k] for path, items in ranked.items()})
        record["clicks"] = {p: round(float(sums[p][CLICK][r]), 6) for p in paths}
        records.append(record)
        if log_every and (r + 1) % log_every == 0:
            logger.info("%d/%d requests (%.0fs): mean clicks@%d search %.4f, %s %.4f, ceiling "
                        "%.4f", r + 1, n, time.time() - started, k,
                        sums[SEARCH][CLICK][:r + 1].mean(), content_paths[0],
                        sums[content_paths[0]][CLICK][:r + 1].mean(),
                        sums[CEILING][CLICK][:r + 1].mean())
    summary = summarize(sums, k, content_paths)
    summary["run"] = {"requests": n, "k": k, "content_candidates": list(content_candidates),
                      "search_candidates": searcher.config.candidates,
                      "search_quotas": dict(searcher.config.quotas),
                      "personalized_requests": int(sum(r["personalized"] for r in records)),
                      "corpus_items": int(len(corpus)),
                      "seconds": round(time.time() - started, 1)}
    return summary, records


def run(args):
    from common import features as F
    from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
    from serving import client as C
    from serving.search import SearchConfig, Searcher
    from trainer.retrieval_oracle import ClickOracle

    started = time.time()
    counts = [int(c) for c in str(args.content_candidates).split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.k < 1:
        raise ValueError("--content-candidates and --k must be positive")
    requests = split_requests(args.data, args.split, args.max_requests)
    texts = query_texts(args.raw, requests["request_id"])
    oracle = ClickOracle.from_raw(args.raw, F.read_vocabulary(args.data, "items"))
    stub, channel = C.make_stub(args.server)
    try:
        searcher = Searcher.from_paths(args.data, args.base_path, stub,
                                       config=SearchConfig(model_name=args.model_name),
                                       item_to_item=args.item_to_item)
        store = SqliteFeatureStore(os.path.join(args.data, FEATURE_STORE_FILE))
        # the text the search encodes must be the request's query (same embedding)
        drift = max((float(np.max(np.abs(store.encode_query(t)[1] - np.asarray(q))))
                     for t, q in zip(texts, requests["query_embedding"])), default=0.0)
        logger.info("%d %s requests; query text re-encodes the dataset's query embedding to "
                    "max |diff| %.2g", len(texts), args.split, drift)
        summary, records = evaluate(searcher, stub, store, oracle, requests, texts, args.k,
                                    counts, args.model_name)
    finally:
        channel.close()
    summary["run"].update({"split": args.split, "query_embedding_max_abs_diff": drift,
                           "total_seconds": round(time.time() - started, 1)})
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, OUTPUT_FILE), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    with open(os.path.join(args.output, REQUESTS_FILE), "w") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return summary


def format_summary(summary: Mapping[str, Mapping[str, float]], k: int) -> str:
    lines = []
    for path, values in summary.items():
        if path in ("ratios", "paired", "run"):
            continue
        lines.append(f"{path:<32} " + "  ".join(
            f"{m} {v:.4f} (± {values[m + '_se']:.4f})" for m, v in values.items()
            if not m.endswith("_se")))
    lines += [f"{name:<40} {v:.4f}" for name, v in summary["ratios"].items()]
    lines += [f"{name:<40} {v:+.4f}" for name, v in summary["paired"].items()
              if not name.endswith("_se")]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None,
         prog: str = "python -m trainer.evaluate_search") -> int:
    args = build_parser(prog).parse_args(argv)
    import grpc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: server {args.server} answered {exc.code().name}: {exc.details()}",
              file=sys.stderr)
        return 1
    print(format_summary(summary, args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
