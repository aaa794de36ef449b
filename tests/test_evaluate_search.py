"""The oracle's judgement of the search call (trainer/evaluate_search.py) against hand
computations: clicks@k and watch_time@k of hand-made ranked lists under hand-made truth values,
the ceilings, the ratios and the paired differences, and the per-request loop with stand-ins for
the searcher, the ranking client, the store and the oracle."""
import types

import numpy as np
import pytest

from trainer import evaluate_search as ES

# 2 requests, items 1..5 (column 0 = index 0, never an item)
P_CLICK = np.array([[0.0, 0.1, 0.5, 0.2, 0.0, 0.4],
                    [0.0, 0.9, 0.0, 0.3, 0.1, 0.05]])
WATCH = np.array([[0.0, 10.0, 20.0, 5.0, 0.0, 40.0],
                  [0.0, 1.0, 0.0, 30.0, 2.0, 4.0]])


def test_sum_at_k_by_hand():
    lists = [[5, 1, 3], [4]]
    # k = 2: request 1 takes 5 and 1 -> 0.4 + 0.1; request 2 has one item -> 0.1
    np.testing.assert_allclose(ES.sum_at_k(P_CLICK, lists, 2), [0.5, 0.1])
    np.testing.assert_allclose(ES.sum_at_k(P_CLICK, lists, 10), [0.7, 0.1])
    np.testing.assert_allclose(ES.sum_at_k(WATCH, lists, 2), [50.0, 2.0])
    np.testing.assert_allclose(ES.sum_at_k(P_CLICK, [[], [0]], 3), [0.0, 0.0])
    with pytest.raises(ValueError):
        ES.sum_at_k(P_CLICK, [[1]], 2)


def test_best_k_over_the_corpus_and_over_candidates():
    assert ES.best_k(P_CLICK, 2) == [[2, 5], [1, 3]]
    assert ES.best_k(WATCH, 2) == [[5, 2], [3, 5]]
    # among candidates only (duplicates counted once); ties: lower index first
    assert ES.best_k(P_CLICK, 2, [[1, 3, 3], [4, 2]]) == [[3, 1], [4, 2]]
    assert ES.best_k(np.zeros((1, 4)), 2) == [[1, 2]]


def test_summary_ratios_and_paired_differences_by_hand():
    search = np.array([0.6, 0.2])
    content = np.array([0.4, 0.4])
    ceiling = np.array([1.0, 1.0])
    summary = ES.summarize({"search": {"click": search}, "content@200": {"click": content},
                            "ceiling": {"click": ceiling}}, 10, ["content@200"])
    assert summary["search"]["clicks@10"] == pytest.approx(0.4)
    # standard error of [0.6, 0.2]: std (ddof 1) 0.2828 / sqrt(2) = 0.2
    assert summary["search"]["clicks@10_se"] == pytest.approx(0.2)
    assert summary["ratios"]["clicks@10 search/content@200"] == pytest.approx(1.0)
    assert summary["ratios"]["clicks@10 search/ceiling"] == pytest.approx(0.4)
    assert summary["ratios"]["clicks@10 content@200/ceiling"] == pytest.approx(0.4)
    # paired: [0.2, -0.2] -> mean 0, se 0.2
    assert summary["paired"]["clicks@10 search-content@200"] == pytest.approx(0.0)
    assert summary["paired"]["clicks@10 search-content@200_se"] == pytest.approx(0.2)


class _Oracle:
    def __init__(self):
        self.rows = {"r1": 0, "r2": 1}

    def truth(self, request_ids, items):
        rows = [self.rows[r] for r in request_ids]
        items = np.asarray(items)
        return {"click": P_CLICK[rows][:, items[0]], "watch_time": WATCH[rows][:, items[0]]}


class _Store:
    def items(self):
        # item 4 has no content embedding: outside the corpus the ceiling may take
        embedding = np.ones((5, 2), np.float32)
        embedding[3] = 0
        return {"item_id": [f"i{i}" for i in range(1, 6)], "item_index": np.arange(1, 6),
                "embedding": embedding}


class _Searcher:
    config = types.SimpleNamespace(candidates=4, quotas={"pdr": 1.0})
    ranked = {"u1": [5, 3, 1, 2], "u2": [4, 1]}

    def __init__(self):
        self.calls = []

    def search(self, user, query, now, k):
        self.calls.append((user, query, now, k))
        items = [types.SimpleNamespace(item_index=i) for i in self.ranked[user][:k]]
        return types.SimpleNamespace(items=items, personalized=True,
                                     counts={"candidates": len(items)})


def test_evaluate_judges_both_paths_by_hand(monkeypatch):
    from serving import client as C

    content = {"u1": ["i1", "i3", "i4"], "u2": ["i3", "i5", "i1"]}
    calls = []

    def rank(stub, store, user, query, top_k, candidates, model_name, now_ms):
        calls.append((user, query, top_k, candidates, now_ms))
        return types.SimpleNamespace(items=[types.SimpleNamespace(item_id=i)
                                            for i in content[user][:top_k]])

    monkeypatch.setattr(C, "rank", rank)
    searcher = _Searcher()
    requests = {"request_id": ["r1", "r2"], "user_id": ["u1", "u2"],
                "request_time": [1000, 2000]}
    summary, records = ES.evaluate(searcher, None, _Store(), _Oracle(), requests,
                                   ["q one", "q two"], k=2, content_candidates=(3,),
                                   log_every=0)
    # the search call asks for every candidate (its top k is the first k), at the request time
    assert searcher.calls == [("u1", "q one", 1000, 4), ("u2", "q two", 2000, 4)]
    assert calls == [("u1", "q one", 3, 3, 1000), ("u2", "q two", 3, 3, 2000)]
    # top 2: search r1 [5, 3] -> 0.4 + 0.2 = 0.6, r2 [4, 1] -> 0.1 + 0.9 = 1.0: mean 0.8
    assert summary["search"]["clicks@2"] == pytest.approx(0.8)
    # content r1 [1, 3] -> 0.3, r2 [3, 5] -> 0.35: mean 0.325
    assert summary["content@3"]["clicks@2"] == pytest.approx(0.325)
    # ceiling (items with an embedding: 1, 2, 3, 5): r1 [2, 5] 0.9, r2 [1, 3] 1.2
    assert summary["ceiling"]["clicks@2"] == pytest.approx(1.05)
    # best 2 among the candidates: search r1 {5,3,1,2} -> 0.9, r2 {4,1} -> 1.0
    assert summary["search_candidates_best"]["clicks@2"] == pytest.approx(0.95)
    # content r1 {1,3,4} -> 0.3, r2 {3,5,1} -> 1.2
    assert summary["content@3_candidates_best"]["clicks@2"] == pytest.approx(0.75)
    # watch time: search r1 40 + 5, r2 2 + 1 -> 24; content r1 15, r2 34 -> 24.5;
    # ceiling (own best by watch time) r1 [5, 2] 60, r2 [3, 5] 34 -> 47
    assert summary["search"]["watch_time@2"] == pytest.approx(24.0)
    assert summary["content@3"]["watch_time@2"] == pytest.approx(24.5)
    assert summary["ceiling"]["watch_time@2"] == pytest.approx(47.0)
    assert summary["ratios"]["clicks@2 search/content@3"] == pytest.approx(0.8 / 0.325)
    assert summary["ratios"]["clicks@2 search/ceiling"] == pytest.approx(0.8 / 1.05)
    assert summary["paired"]["clicks@2 search-content@3"] == pytest.approx(0.475)
    assert summary["run"]["requests"] == 2 and summary["run"]["corpus_items"] == 4
    assert records[0]["search"] == [5, 3] and records[1]["content@3"] == [3, 5]
    assert records[0]["ceiling"] == [2, 5]
    assert records[1]["clicks"]["search"] == pytest.approx(1.0)


def test_the_retrieval_evaluation_dispatches_the_search_subcommand(capsys):
    from trainer import evaluate_retrieval

    with pytest.raises(SystemExit) as exit_info:
        evaluate_retrieval.main(["search", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m trainer.evaluate_retrieval search ")
    assert "--content-candidates" in out and "--server" in out


# ---- end to end: the real search call and ranking client against the project's gRPC server
# (tests/test_search.py's fixtures: tiny data, untrained QIN and PDR), hand-made truth
from tests import test_search as TS  # noqa: E402

data_dir, base_path, server, searcher = TS.data_dir, TS.base_path, TS.server, TS.searcher


class _ByIndex:
    """p(click) = item index / 100 and watch time = item index seconds, for every request."""

    def truth(self, request_ids, items):
        items = np.asarray(items, np.float64)
        return {"click": items / 100.0, "watch_time": items}


def test_evaluate_end_to_end_through_the_served_model(searcher, server):
    from serving import client as C
    from tests.retrieval_fixtures import NOW

    requests = {"request_id": ["a", "b"], "user_id": ["u1", "u2"],
                "request_time": [NOW, NOW - 1000]}
    texts = ["topic1", "topic2"]
    summary, records = ES.evaluate(searcher, searcher.stub, searcher.store, _ByIndex(),
                                   requests, texts, k=3, content_candidates=(12,), log_every=0)
    expected_search, expected_content = [], []
    for r, user in enumerate(requests["user_id"]):
        now = requests["request_time"][r]
        top = [it.item_index for it in searcher.search(user, texts[r], now, k=3).items]
        assert records[r]["search"] == top
        ranked = C.rank(searcher.stub, searcher.store, user, texts[r], top_k=3, candidates=12,
                        now_ms=now)
        content = [int(i) for i in searcher.store.item_index([it.item_id
                                                              for it in ranked.items])]
        assert records[r]["content@12"] == content
        expected_search.append(sum(top) / 100.0)
        expected_content.append(sum(content) / 100.0)
    assert summary["search"]["clicks@3"] == pytest.approx(np.mean(expected_search))
    assert summary["content@12"]["clicks@3"] == pytest.approx(np.mean(expected_content))
    assert summary["search"]["watch_time@3"] == pytest.approx(100 * np.mean(expected_search))
    # the ceiling: the three highest indices among the items with a content embedding
    items = searcher.store.items()
    corpus = sorted(int(i) for i, e in zip(items["item_index"], items["embedding"]) if np.any(e))
    assert summary["ceiling"]["clicks@3"] == pytest.approx(sum(corpus[-3:]) / 100.0)
    assert summary["run"]["personalized_requests"] == 2
