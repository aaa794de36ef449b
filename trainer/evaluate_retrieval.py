"""Retrieval evaluation: `python -m trainer.evaluate_retrieval --data OUT --pdr-dir P
--query-only-dir Q [--raw RAW] --split test --output E`.

On every request of the split, each source retrieves from the whole item corpus and recall@K
(K = 50, 100, 200, 500) of the request's clicked items is pooled over requests
(trainer/retrieval_metrics.py):

* content: cosine of content embeddings, `serving.client.retrieve` (the non-personalized
  baseline of the serving client);
* query_only: the PDR dual encoder with the user inputs off (same code, PDRConfig.use_user
  false), trained with `python -m trainer.pdr_task --config '{"use_user": false}'`;
* pdr: the personalized dual encoder;
* qrcf: `serving.qrcf.QRCFRetriever` on the feature store and the item-to-item table (histories
  strictly before each request);
* merged: `serving.merge.merge_sources` of qrcf, pdr and content with `--quotas`, built for each
  K (the quotas are shares of K);
* oracle (generated data, `--raw`): the corpus ranked by the generator's true p(click)
  (trainer/retrieval_oracle.py); every source also gets oracle_clicks@K, the true expected
  clicks of its top K over those of the oracle's top K.

`--quota-grid` evaluates other quota settings of the merge at K = 200 (choose them on the eval
split, report them on the test split). `--eps` sweeps QRCF's seed threshold on the first
`--sweep-requests` requests: recall@200 and the mean query relevance (cosine of the retrieved
items to the query) for each eps, plotted to
E/qrcf_eps_sweep.png. Writes E/retrieval_metrics.json ({source: {metric: value}}) and
E/retrieval_metrics.md.

`python -m trainer.evaluate_retrieval search --server HOST:PORT --base-path B --data OUT --raw
RAW ...` judges the full search call instead (merged retrieval ranked by the served QIN, against
QIN ranking the content baseline's candidates and the oracle's best): trainer/evaluate_search.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

import common  # noqa: F401

logger = logging.getLogger("evaluate_retrieval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate_retrieval",
        description="Recall@K over the whole corpus of each retrieval source (content baseline, "
                    "query-only dual encoder, PDR, QRCF), of their merge, and on generated data "
                    "of the oracle ranking by true p(click), with the expected clicks captured; "
                    "optional QRCF eps sweep plot. `python -m trainer.evaluate_retrieval search "
                    "--help`: the full search call's top 10 judged by the oracle "
                    "(trainer.evaluate_search).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessing output (with item_to_item/)")
    p.add_argument("--item-to-item", default=None,
                   help="folder of the item-to-item table (default: DATA/item_to_item)")
    p.add_argument("--pdr-dir", required=True, help="trained PDR (trainer.pdr_task)")
    p.add_argument("--query-only-dir", default=None,
                   help="trained query-only dual encoder (PDRConfig use_user false)")
    p.add_argument("--raw", default=None,
                   help="generator output (truth/) for the oracle and expected clicks")
    p.add_argument("--split", default="test", choices=("train", "eval", "test"))
    p.add_argument("--output", required=True, help="folder for the metrics and the plot")
    p.add_argument("--quotas", default=None,
                   help="JSON source shares of the merge (default: serving.search's)")
    p.add_argument("--quota-grid", default=None,
                   help="JSON list of quota objects to compare (merged_<n> in the output)")
    p.add_argument("--eps", default=None,
                   help="comma-separated QRCF seed_eps values to sweep, e.g. 0,0.2,0.4,0.6")
    p.add_argument("--sweep-requests", type=int, default=500,
                   help="requests of the eps sweep (the first N)")
    p.add_argument("--max-requests", type=int, default=None, help="evaluate the first N only")
    p.add_argument("--qrcf-config", default=None, help="JSON QRCFConfig overrides")
    return p


def _source_lists(top: np.ndarray) -> List[List[int]]:
    return [[int(i) for i in row if i > 0] for row in top]


def merged_lists(lists: Dict[str, List[List[int]]], quotas: Dict[str, float], k: int
                 ) -> List[List[int]]:
    """Per request, the merge of the sources' lists at size k."""
    from serving.merge import merge_sources

    requests = len(next(iter(lists.values())))
    return [[m.item_index for m in merge_sources({s: lists[s][r] for s in lists}, quotas, k)]
            for r in range(requests)]


def evaluate_lists(lists: Sequence[Sequence[int]], clicked, probability=None, ks=None
                   ) -> Dict[str, float]:
    from trainer import retrieval_metrics as RM

    ks = ks or RM.KS
    padded = RM.pad_lists(lists, max(ks))
    out = RM.recall_at_k(padded, clicked, ks)
    if probability is not None:
        for k in ks:
            out[f"oracle_clicks@{k}"] = RM.expected_clicks_captured(padded, probability, k)
    return out


def qrcf_lists(retriever, requests, max_results: int):
    """QRCF's ranked item lists and mean query relevance of each request's items."""
    lists, relevance = [], []
    for user, t, q in zip(requests["user_id"], requests["request_time"],
                          requests["query_embedding"]):
        result = retriever.retrieve(user, q, int(t))
        lists.append(result.item_indices[:max_results])
        relevance += [it.relevance for it in result.items[:max_results]]
    return lists, (float(np.mean(relevance)) if relevance else float("nan"))


def run(args) -> Dict[str, Dict[str, float]]:
    from common import features as F
    from common.feature_store import FEATURE_STORE_FILE, SqliteFeatureStore
    from common.item_to_item import read_item_to_item
    from serving import client as C
    from serving.qrcf import QRCFConfig, QRCFRetriever
    from trainer import retrieval_metrics as RM
    from trainer.data import make_dataset
    from trainer.pdr import ItemCorpus, load_pdr_model
    from trainer.pdr_task import request_vectors

    started = time.time()
    metadata = F.DatasetMetadata.load(args.data)
    store = SqliteFeatureStore(os.path.join(args.data, FEATURE_STORE_FILE))
    corpus = ItemCorpus.from_store(store)
    indexed = corpus.subset(corpus.has_embedding)
    max_batches = None if args.max_requests is None else -(-args.max_requests // 256)

    def dataset():
        return make_dataset(args.data, args.split, metadata, 256, for_training=False)

    k_max = max(RM.KS)
    pdr = load_pdr_model(args.pdr_dir, args.data, corpus)
    requests = request_vectors(pdr, dataset(), max_batches)
    n = len(requests["clicked"]) if args.max_requests is None else min(
        args.max_requests, len(requests["clicked"]))
    for key in requests:
        requests[key] = requests[key][:n]
    clicked = requests["clicked"]
    logger.info("%d %s requests, %d clicked items, corpus %d items (%d with embedding)", n,
                args.split, sum(len(c) for c in clicked), len(corpus), len(indexed))

    lists: Dict[str, List[List[int]]] = {}
    lists["content"] = [[int(i) for i in C.retrieve(store, q, k_max)["item_index"]]
                        for q in requests["query_embedding"]]
    if args.query_only_dir:
        query_only = load_pdr_model(args.query_only_dir, args.data, corpus)
        if query_only.config.use_user:
            raise ValueError(f"{args.query_only_dir} was trained with use_user true: not the "
                             "query-only baseline")
        vectors = request_vectors(query_only, dataset(), max_batches)["vectors"][:n]
        lists["query_only"] = _source_lists(RM.top_k_by_score(
            vectors @ query_only.corpus_vectors(indexed).T, indexed.item_index, k_max))
    lists["pdr"] = _source_lists(RM.top_k_by_score(
        requests["vectors"] @ pdr.corpus_vectors(indexed).T, indexed.item_index, k_max))
    overrides = json.loads(args.qrcf_config) if args.qrcf_config else {}
    table = read_item_to_item(args.item_to_item or args.data)
    qrcf_config = QRCFConfig(**{"max_results": k_max, **overrides})
    lists["qrcf"], qrcf_relevance = qrcf_lists(QRCFRetriever(store, table, qrcf_config),
                                               requests, k_max)
    logger.info("sources retrieved (%.0fs)", time.time() - started)

    probability = None
    if args.raw:
        from trainer.retrieval_oracle import ClickOracle

        oracle = ClickOracle.from_raw(args.raw, F.read_vocabulary(args.data, "items"))
        probability = oracle.click_probability(requests["request_id"])
        lists["oracle"] = _source_lists(RM.top_k_by_score(
            probability[:, indexed.item_index], indexed.item_index, k_max))

    results: Dict[str, Dict[str, float]] = {}
    for source, source_lists in lists.items():
        results[source] = evaluate_lists(source_lists, clicked, probability)
    results["qrcf"]["mean_query_relevance"] = qrcf_relevance
    personal = {s: lists[s] for s in ("qrcf", "pdr", "content")}
    from serving.search import DEFAULT_QUOTAS

    quotas = json.loads(args.quotas) if args.quotas else dict(DEFAULT_QUOTAS)
    merged: Dict[str, object] = {}
    for k in RM.KS:
        merged.update(evaluate_lists(merged_lists(personal, quotas, k), clicked, probability,
                                     ks=(k,)))
    merged["quotas"] = quotas
    results["merged"] = merged
    for g, quotas in enumerate(json.loads(args.quota_grid) if args.quota_grid else [], 1):
        # alternatives at K = 200 only (the goal's K): the merge is pure Python
        results[f"merged_{g}"] = {**evaluate_lists(merged_lists(personal, quotas, 200), clicked,
                                                   probability, ks=(200,)), "quotas": quotas}

    sweep = []
    if args.eps:
        m = min(args.sweep_requests, n)
        subset = {key: value[:m] for key, value in requests.items()}
        for eps in [float(x) for x in args.eps.split(",")]:
            config = QRCFConfig(**{"max_results": k_max, **overrides, "seed_eps": eps})
            eps_lists, relevance = qrcf_lists(QRCFRetriever(store, table, config), subset,
                                              k_max)
            found = evaluate_lists(eps_lists, clicked[:m],
                                   None if probability is None else probability[:m], ks=(200,))
            sweep.append({"eps": eps, "recall@200": found["recall@200"],
                          "mean_query_relevance": relevance,
                          "mean_items": float(np.mean([len(x) for x in eps_lists]))})
            logger.info("eps %.2f: %s", eps, sweep[-1])
        results["qrcf_eps_sweep"] = sweep
    results["run"] = {"split": args.split, "requests": n,
                      "clicked_items": int(sum(len(c) for c in clicked)),
                      "corpus_items": len(corpus), "seconds": round(time.time() - started, 1)}
    write_outputs(args.output, results, sweep)
    return results


def write_outputs(output: str, results, sweep) -> None:
    from trainer import retrieval_metrics as RM

    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "retrieval_metrics.json"), "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    table = {s: {m: v for m, v in values.items() if isinstance(v, float)}
             for s, values in results.items() if isinstance(values, dict) and s != "run"}
    lines = RM.summarize(table)
    with open(os.path.join(output, "retrieval_metrics.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if sweep:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        eps = [s["eps"] for s in sweep]
        fig, left = plt.subplots(figsize=(6, 4))
        left.plot(eps, [s["recall@200"] for s in sweep], "o-", color="tab:blue")
        left.set_xlabel("QRCF seed threshold eps")
        left.set_ylabel("recall@200 of clicked items", color="tab:blue")
        right = left.twinx()
        right.plot(eps, [s["mean_query_relevance"] for s in sweep], "s--", color="tab:red")
        right.set_ylabel("mean cosine(query, retrieved item)", color="tab:red")
        left.set_title("QRCF: relevance vs diversity")
        fig.tight_layout()
        fig.savefig(os.path.join(output, "qrcf_eps_sweep.png"), dpi=110)
        plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["search"]:
        from trainer import evaluate_search

        return evaluate_search.main(argv[1:], prog="python -m trainer.evaluate_retrieval search")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout)
    try:
        results = run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for source, values in results.items():
        if isinstance(values, dict) and "recall@200" in values:
            print(f"{source:<12} " + " ".join(
                f"{m} {v:.4f}" for m, v in values.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
