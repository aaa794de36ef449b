"""Retrieval benchmarks: the corpus index (ScaNN vs exact) and the search call vs the ranking
call alone.

    python -m benchmarks.bench_retrieval ann [--items 100000 1000000] [--queries 500]
    python -m benchmarks.bench_retrieval crossover [--sizes 1000 10000 30000 100000]
    python -m benchmarks.bench_retrieval search --server HOST:PORT --data OUT --base-path B \
        [--requests 50] [--candidates 200]

ann: item vectors of the generator's world (preprocessing/synthetic.py: topics, subtopics,
noisy content embeddings, D = 32) at each corpus size, queries encoded from its query
vocabulary as the generator does. For each size: ScaNN (serving/item_index.py defaults) recall
of the exact top 100, single-query latency p50/p99 of both (one thread), speedup = exact p50 /
ScaNN p50, build time. crossover: the same at small sizes, to choose `exact_below`.
search: on test requests of OUT, `serving.search.Searcher.search` (QRCF + PDR + content, merge,
features, rank) vs `serving.client.rank` (content retrieval + rank) at the same candidate count,
p50/p99 and the breakdown of the search call. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

# One thread for the exact search's BLAS as for ScaNN (IndexConfig.search_threads): the
# comparison is per core, and a request should not take every core of a shared machine.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

import common  # noqa: F401,E402


def world_vectors(items: int, queries: int, seed: int = 0):
    """(unit item vectors [items, D], unit query vectors [queries, D]) of the generator."""
    from preprocessing import synthetic as G

    cfg = G.GeneratorConfig(items=items, seed=seed)
    world = G.build_world(cfg)
    rng = np.random.default_rng(seed + 1)
    words = cfg.topics * cfg.words_per_topic
    out = np.zeros((queries, cfg.embedding_dim), np.float32)
    for q in range(queries):
        topic = rng.integers(cfg.topics)
        picked = list(topic * cfg.words_per_topic + rng.choice(cfg.words_per_topic, 2,
                                                               replace=False))
        picked += list(words + rng.choice(len(G.GENERIC_WORDS), rng.integers(0, 3),
                                          replace=False))
        v = world.vocab_embeddings[picked].mean(axis=0)
        out[q] = v / np.linalg.norm(v)
    return world.item_embedding.astype(np.float32), out


def _latencies(fn, queries) -> np.ndarray:
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q[None, :])
        times.append((time.perf_counter() - start) * 1000)
    return np.asarray(times)


def bench_index(items: int, queries: int, k: int = 100, config=None) -> Dict[str, float]:
    from serving.item_index import IndexConfig, ItemIndex, exact_top_k

    config = config or IndexConfig()
    vectors, qs = world_vectors(items, queries)
    ids = np.arange(1, items + 1)
    started = time.time()
    scann = ItemIndex.build(vectors, ids, config, backend="scann")
    build = time.time() - started
    exact = ItemIndex.build(vectors, ids, config, backend="exact")
    truth, _ = exact_top_k(vectors, qs, k)
    got, _ = scann.search(qs, k)
    recall = float(np.mean([len(set(a) & set(ids[b])) / k for a, b in zip(got, truth)]))
    exact_ms = _latencies(lambda q: exact.search(q, k), qs[:min(queries, 200)])
    scann_ms = _latencies(lambda q: scann.search(q, k), qs)
    return {"items": items, "recall@100": round(recall, 4),
            "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 3),
            "exact_p99_ms": round(float(np.percentile(exact_ms, 99)), 3),
            "scann_p50_ms": round(float(np.percentile(scann_ms, 50)), 3),
            "scann_p99_ms": round(float(np.percentile(scann_ms, 99)), 3),
            "speedup": round(float(np.percentile(exact_ms, 50) / np.percentile(scann_ms, 50)), 1),
            "scann_build_s": round(build, 1)}


def bench_search(args) -> Dict[str, object]:
    from common import features as F
    from serving import client as C
    from serving import search as SE
    from trainer.data import make_dataset

    stub, channel = C.make_stub(args.server)
    config = SE.SearchConfig(candidates=args.candidates, per_source=args.candidates)
    searcher = SE.Searcher.from_paths(args.data, args.base_path, stub, config=config)
    md = F.DatasetMetadata.load(args.data)
    requests = []
    for batch in make_dataset(args.data, "test", md, 64, for_training=False):
        for r in range(batch[F.USER_ID].shape[0]):
            tokens = batch[F.QUERY_TOKENS][r][:int(batch[F.QUERY_LENGTH][r])].numpy()
            requests.append((batch[F.USER_ID][r].numpy().decode(),
                             int(batch[F.REQUEST_TIME][r].numpy()), tokens))
        if len(requests) >= args.requests:
            break
    words = {}
    vocab = searcher.store._query("SELECT token_id, word FROM query_vocab")
    for token_id, word in vocab:
        words[F.query_token_index(token_id, md.query_token_buckets)] = word
    searches: List[float] = []
    ranks: List[float] = []
    stages: Dict[str, List[float]] = {}
    for user, now, tokens in requests[:args.requests]:
        query = " ".join(words[int(t)] for t in tokens if int(t) in words)
        start = time.perf_counter()
        result = searcher.search(user, query, now, 10)
        searches.append((time.perf_counter() - start) * 1000)
        for name, ms in result.timings_ms.items():
            stages.setdefault(name, []).append(ms)
        start = time.perf_counter()
        C.rank(stub, searcher.store, user, query, top_k=10, candidates=args.candidates,
               now_ms=now)
        ranks.append((time.perf_counter() - start) * 1000)
    channel.close()
    p50 = {name: round(float(np.percentile(v, 50)), 2) for name, v in stages.items()}
    return {"requests": len(searches), "candidates": args.candidates,
            "search_p50_ms": round(float(np.percentile(searches, 50)), 2),
            "search_p99_ms": round(float(np.percentile(searches, 99)), 2),
            "rank_call_p50_ms": round(float(np.percentile(ranks, 50)), 2),
            "rank_call_p99_ms": round(float(np.percentile(ranks, 99)), 2),
            "search_over_rank_p50": round(float(np.percentile(searches, 50)
                                                / np.percentile(ranks, 50)), 2),
            "search_stage_p50_ms": p50,
            "data": os.path.basename(os.path.normpath(args.data))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_retrieval",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    ann = sub.add_parser("ann", help="ScaNN vs exact at large corpus sizes")
    ann.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ann.add_argument("--queries", type=int, default=500)
    cross = sub.add_parser("crossover", help="exact vs ScaNN latency at small sizes")
    cross.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 30_000, 100_000])
    cross.add_argument("--queries", type=int, default=200)
    search = sub.add_parser("search", help="the search call vs the ranking call alone")
    search.add_argument("--server", required=True)
    search.add_argument("--data", required=True)
    search.add_argument("--base-path", required=True)
    search.add_argument("--requests", type=int, default=50)
    search.add_argument("--candidates", type=int, default=200)
    args = p.parse_args(argv)
    if args.command == "search":
        out: object = bench_search(args)
    else:
        sizes = args.items if args.command == "ann" else args.sizes
        out = [bench_index(n, args.queries) for n in sizes]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
