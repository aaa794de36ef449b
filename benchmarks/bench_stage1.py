"""Benchmark of RSU stage 1 over lifelong histories: exact (NumPy) vs ScaNN.

For each history length L it builds per-user indices with `serving.behaviour_index` and
measures, through the same `Stage1Searcher.top_k` call serving makes:

* per-request latency (p50 / p90 / p99 / mean) of exact and ScaNN stage 1,
* recall@K1 of ScaNN against exact cosine (the training-time ground truth),
* index build time and memory per user (vectors + ScaNN assets).

Embeddings are clustered like pretrained multimodal embeddings: items belong to topics, a user's
behaviours concentrate on a few interests (Dirichlet mixture), and most queries are about one of
the user's interests. Pass `--item-embeddings item_embeddings.npy` (written by preprocessing,
e.g. on `preprocessing.synthetic` lifelong data) to draw behaviours from real item vectors
instead. `--sweep` also compares a few ScaNN settings at the largest L (how the defaults in
`Stage1Config` were chosen). NumPy runs with one BLAS thread, like one request on one core.

Example (about 3 minutes on 2 cores):
  python -m benchmarks.bench_stage1 --lengths 1000 10000 100000 --output bench_stage1.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

# One BLAS thread: a serving process answers one request per core, and multi-threaded OpenBLAS
# on a busy 2-core machine is 10x slower per matrix-vector product, which would flatter ScaNN.
# Set before NumPy loads; an explicit OPENBLAS_NUM_THREADS in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import serving  # noqa: E402,F401  (legacy Keras switch before TensorFlow loads)
from common import features  # noqa: E402
from serving.behaviour_index import Stage1Config, Stage1Searcher  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def clustered_items(rng, num_items: int, dim: int, num_topics: int, noise: float) -> np.ndarray:
    """[num_items + 1, dim] item table (row 0 = unknown): topic centre + isotropic noise."""
    centres = rng.normal(size=(num_topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = rng.integers(0, num_topics, num_items)
    table = centres[topic] + noise * rng.normal(size=(num_items, dim)).astype(np.float32)
    return np.vstack([np.zeros((1, dim), np.float32), table]).astype(np.float32)


def topics_of(table: np.ndarray, rng, num_topics: int) -> np.ndarray:
    """Topic id of each item row (k-means-free: nearest of num_topics sampled items)."""
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    seeds = unit[rng.choice(np.arange(1, table.shape[0]), num_topics, replace=False)]
    topics = np.zeros(table.shape[0], np.int64)
    for start in range(0, table.shape[0], 65536):
        topics[start:start + 65536] = np.argmax(unit[start:start + 65536] @ seeds.T, axis=1)
    return topics


def user_history(rng, topics: np.ndarray, items_by_topic: List[np.ndarray], length: int,
                 interests: int):
    """A user's behaviours: items drawn from a Dirichlet mixture over a few interest topics
    (plus 10% exploration anywhere), in time order."""
    num_topics = len(items_by_topic)
    liked = rng.choice(num_topics, interests, replace=False)
    weights = rng.dirichlet(np.full(interests, 0.7))
    chosen = np.where(rng.random(length) < 0.9, rng.choice(liked, length, p=weights),
                      rng.integers(0, num_topics, length))
    items = np.array([items_by_topic[t][rng.integers(0, len(items_by_topic[t]))]
                      for t in chosen], dtype=np.int64)
    times = 1_600_000_000_000 + np.cumsum(rng.integers(1_000, 600_000, length))
    return items, times, liked


def queries_for(rng, table, items_by_topic, liked, count: int, noise: float) -> np.ndarray:
    """Query embeddings: 80% about one of the user's interests, 20% about any topic."""
    out = []
    for _ in range(count):
        topic = rng.choice(liked) if rng.random() < 0.8 else rng.integers(0, len(items_by_topic))
        anchor = table[items_by_topic[topic][rng.integers(0, len(items_by_topic[topic]))]]
        out.append(anchor + noise * rng.normal(size=anchor.shape[0]))
    return np.asarray(out, np.float32)


def synthetic_world(num_items: int, seed: int):
    """Item table, item topics and a query maker from `preprocessing.synthetic`'s generative
    model (topic/subtopic latent vectors, noisy content embeddings, queries = normalised mean of
    topic and generic word embeddings), with a catalogue of `num_items` items."""
    try:
        from preprocessing import synthetic
    except ImportError as err:
        raise SystemExit(f"--synthetic-items needs preprocessing.synthetic: {err}")
    cfg = synthetic.GeneratorConfig(items=num_items, seed=seed)
    world = synthetic.build_world(cfg)
    table = np.vstack([np.zeros((1, cfg.embedding_dim)), world.item_embedding]).astype(np.float32)
    # The benchmark's row k + 1 is the world's item k (row 0 = unknown), topics are 1-based.
    topics = np.concatenate([[0], world.item_topic + 1]).astype(np.int64)
    words, vocab = world.vocab_words, world.vocab_embeddings
    topic_words = cfg.words_per_topic
    generic = np.arange(cfg.topics * topic_words, len(words))

    def make_queries(rng, liked, count):
        out = []
        for _ in range(count):
            # Topics are 1-based here; 60% of queries are about one of the user's interests,
            # like the generator's query_topic_share.
            topic = (int(rng.choice(liked)) if rng.random() < cfg.query_topic_share
                     else int(rng.integers(1, cfg.topics + 1))) - 1
            tokens = list(topic * topic_words + rng.choice(topic_words, rng.integers(1, 3),
                                                           replace=False))
            tokens += list(rng.choice(generic, rng.integers(0, 3), replace=False))
            vector = vocab[tokens].mean(axis=0)
            out.append(vector / np.linalg.norm(vector))
        return np.asarray(out, np.float32)

    return table, topics, make_queries


def percentiles(samples_s: List[float]) -> Dict[str, float]:
    ms = np.asarray(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def measure(table, histories, queries, k: int, config: Stage1Config, exact_rows) -> Dict:
    """Builds one searcher with `config` over all users and times every query through top_k."""
    searcher = Stage1Searcher(table, config)
    build_s, memory = [], []
    for user, (items, times) in histories.items():
        start = time.perf_counter()
        searcher.set_history(user, items, times)
        build_s.append(time.perf_counter() - start)
        stats = searcher.user_stats(user)
        memory.append(stats["vector_bytes"] + stats["scann_bytes"])
    latencies, recalls, backends = [], [], set()
    for user in histories:
        for q, query in enumerate(queries[user]):
            searcher.top_k(user, query, k)  # warm caches once per query shape
            start = time.perf_counter()
            got = searcher.top_k(user, query, k)
            latencies.append(time.perf_counter() - start)
            backends.add(got.backend)
            if exact_rows is not None:
                want = exact_rows[user][q]
                recalls.append(len(np.intersect1d(got.rows, want)) / max(1, len(want)))
    out = {"backend": sorted(backends), "build_s_per_user": float(np.mean(build_s)),
           "memory_mb_per_user": float(np.mean(memory)) / 2**20, **percentiles(latencies)}
    if recalls:
        out.update(recall_mean=float(np.mean(recalls)), recall_p5=float(np.percentile(recalls, 5)),
                   recall_min=float(np.min(recalls)))
    return out, searcher


def run(args) -> Dict:
    rng = np.random.default_rng(args.seed)
    dim = features.DEFAULT_EMBEDDING_DIM
    longest = max(args.lengths)
    query_maker = None
    if args.synthetic_items:
        table, topics, query_maker = synthetic_world(args.synthetic_items, args.seed)
        dim = table.shape[1]
        log(f"preprocessing.synthetic world: {args.synthetic_items} items, "
            f"{int(topics.max())} topics, D={dim}")
    elif args.item_embeddings:
        table = np.load(args.item_embeddings).astype(np.float32)
        dim = table.shape[1]
        log(f"item embeddings {table.shape} from {args.item_embeddings}")
    else:
        num_items = max(args.min_items, 10 * longest)
        table = clustered_items(rng, num_items, dim, args.topics, args.item_noise)
        log(f"clustered item table: {num_items} items, {args.topics} topics, D={dim}")
    if not args.synthetic_items:
        topics = topics_of(table, rng, args.topics)
    num_topics = int(topics.max()) + 1
    order = np.argsort(topics[1:], kind="stable") + 1
    bounds = np.searchsorted(topics[order], np.arange(num_topics + 1))
    items_by_topic = [order[bounds[t]:bounds[t + 1]] for t in range(num_topics)]
    items_by_topic = [t for t in items_by_topic if len(t)]
    interests = min(args.interests, len(items_by_topic))

    exact_config = Stage1Config(scann_min_history=2**62)
    scann_config = dataclasses.replace(Stage1Config(), scann_min_history=16)
    results = {"machine": "2 cores, no GPU, shared with other work", "k1": args.k1,
               "embedding_dim": dim, "users_per_length": args.users,
               "queries_per_user": args.queries, "scann_settings": {}, "lengths": {}}
    for length in args.lengths:
        log(f"L={length}: generating {args.users} users")
        histories, queries, liked = {}, {}, {}
        for u in range(args.users):
            items, times, liked = user_history(rng, topics, items_by_topic, length, interests)
            histories[f"user{u}"] = (items, times)
            queries[f"user{u}"] = (query_maker(rng, liked, args.queries) if query_maker else
                                   queries_for(rng, table, items_by_topic, liked, args.queries,
                                               args.query_noise))
        log(f"L={length}: exact")
        exact, exact_searcher = measure(table, histories, queries, args.k1, exact_config, None)
        exact_rows = {u: [exact_searcher.top_k(u, q, args.k1).rows for q in queries[u]]
                      for u in histories}
        del exact_searcher
        log(f"L={length}: scann")
        approx, searcher = measure(table, histories, queries, args.k1, scann_config, exact_rows)
        stats = searcher.user_stats("user0")
        results["scann_settings"][str(length)] = scann_settings(searcher, stats)
        approx["speedup_p50"] = exact["p50_ms"] / approx["p50_ms"]
        approx["speedup_mean"] = exact["mean_ms"] / approx["mean_ms"]
        results["lengths"][str(length)] = {"exact": exact, "scann": approx,
                                           "distinct_items_user0": stats["distinct_items_indexed"]}
        log(f"L={length}: exact p50 {exact['p50_ms']:.3f} ms, scann p50 {approx['p50_ms']:.3f} ms"
            f" (x{approx['speedup_p50']:.1f}), recall@{args.k1} {approx['recall_mean']:.4f}")
        if args.sweep and length in (10_000, longest):
            results.setdefault("sweep", {})[str(length)] = sweep(
                table, histories, queries, args.k1, exact_rows, exact)
    return results


def scann_settings(searcher: Stage1Searcher, stats: Dict) -> Dict:
    cfg = searcher.config
    points = stats["distinct_items_indexed"]
    leaves = cfg.num_leaves(points) if points else 0
    return {"points": points, "num_leaves": leaves,
            "num_leaves_to_search": cfg.leaves_to_search(leaves) if leaves else 0,
            "quantization": f"AH dims_per_block={cfg.ah_dims_per_block}, anisotropic "
                            f"threshold={cfg.anisotropic_quantization_threshold}",
            "reorder": "float32, max(min_reorder={}, {} x fetched)".format(
                cfg.min_reorder, cfg.reorder_multiplier)}


SWEEP = {  # name -> Stage1Config overrides
    "leaves 10%": dict(leaves_to_search_fraction=0.1),
    "leaves 20%, at least 8": dict(min_leaves_to_search=8),
    "leaves 20%, at least 48": dict(min_leaves_to_search=48),
    "leaves 15%": dict(leaves_to_search_fraction=0.15),
    "leaves 20%, at least 32 (default)": dict(),
    "leaves 30%": dict(leaves_to_search_fraction=0.3),
    "leaves 20%, reorder 8k": dict(reorder_multiplier=8.0, min_reorder=800),
    "2 x sqrt leaves, 20%": dict(leaves_per_sqrt_rows=2.0),
    "AH 1 dim/block": dict(ah_dims_per_block=1),
}


def sweep(table, histories, queries, k1, exact_rows, exact) -> Dict:
    out = {}
    for name, overrides in SWEEP.items():
        config = dataclasses.replace(Stage1Config(), scann_min_history=16, **overrides)
        result, _ = measure(table, histories, queries, k1, config, exact_rows)
        result["speedup_p50"] = exact["p50_ms"] / result["p50_ms"]
        out[name] = result
        log(f"  sweep {name}: p50 {result['p50_ms']:.3f} ms x{result['speedup_p50']:.1f} "
            f"recall {result['recall_mean']:.4f} build {result['build_s_per_user']:.2f}s")
    return out


def markdown(results: Dict) -> str:
    k1 = results["k1"]
    lines = [f"K1 = {k1}, D = {results['embedding_dim']}, {results['users_per_length']} users x "
             f"{results['queries_per_user']} queries per L; machine: {results['machine']}.", "",
             "| L | exact p50 / p99 ms | ScaNN p50 / p99 ms | speed-up p50 | recall@K1 mean (p5) |"
             " build s/user exact / ScaNN | MB/user exact / ScaNN |",
             "|---|---|---|---|---|---|---|"]
    for length, r in results["lengths"].items():
        e, s = r["exact"], r["scann"]
        lines.append(
            f"| {int(length):,} | {e['p50_ms']:.3f} / {e['p99_ms']:.3f} | {s['p50_ms']:.3f} / "
            f"{s['p99_ms']:.3f} | {s['speedup_p50']:.1f}x | {s['recall_mean']:.4f} "
            f"({s['recall_p5']:.2f}) | {e['build_s_per_user']:.3f} / {s['build_s_per_user']:.2f} "
            f"| {e['memory_mb_per_user']:.1f} / {s['memory_mb_per_user']:.1f} |")
    for length, sweep_results in results.get("sweep", {}).items():
        lines += ["", f"| ScaNN setting at L = {int(length):,} | p50 ms | speed-up | recall@K1 |"
                      " build s |", "|---|---|---|---|---|"]
        for name, r in sweep_results.items():
            lines.append(f"| {name} | {r['p50_ms']:.3f} | {r['speedup_p50']:.1f}x | "
                         f"{r['recall_mean']:.4f} | {r['build_s_per_user']:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="history lengths L to measure (default: 10^3 10^4 10^5)")
    parser.add_argument("--k1", type=int, default=features.DEFAULT_STAGE1_K,
                        help="stage-1 size K1 (default %(default)s, "
                             "common.features.DEFAULT_STAGE1_K)")
    parser.add_argument("--users", type=int, default=3, help="users per length (default 3)")
    parser.add_argument("--queries", type=int, default=100, help="queries per user (default 100)")
    parser.add_argument("--topics", type=int, default=1000, help="item topics (clusters)")
    parser.add_argument("--interests", type=int, default=20, help="topics per user")
    parser.add_argument("--item-noise", type=float, default=0.12,
                        help="per-dimension noise of items around their topic centre")
    parser.add_argument("--query-noise", type=float, default=0.12,
                        help="per-dimension noise of a query around an item of its topic")
    parser.add_argument("--min-items", type=int, default=20_000,
                        help="catalogue size at least this (default: also >= 10 x max L, so "
                             "histories are mostly distinct items, ScaNN's hardest case)")
    parser.add_argument("--item-embeddings", help="item_embeddings.npy to draw behaviours from")
    parser.add_argument("--synthetic-items", type=int, default=0,
                        help="use preprocessing.synthetic's world (item embeddings, topics, "
                             "query words) with this many items instead of the built-in "
                             "clusters")
    parser.add_argument("--sweep", action="store_true",
                        help="also compare ScaNN settings at L = 10^4 and the largest L")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if min(args.lengths) < 1 or args.k1 < 1 or args.users < 1 or args.queries < 1:
        parser.error("--lengths, --k1, --users and --queries must be >= 1")
    if args.interests > args.topics:
        parser.error("--interests cannot exceed --topics")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    results["wall_s"] = time.perf_counter() - start
    print(markdown(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
        log(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
