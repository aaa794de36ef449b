"""Retrieval metrics (trainer/retrieval_metrics.py), the merge used by the evaluation, and the
generator's click oracle (trainer/retrieval_oracle.py), against hand computations."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import retrieval_metrics as RM
from trainer.evaluate_retrieval import evaluate_lists, merged_lists
from trainer.retrieval_oracle import ClickOracle

# A toy corpus of items 1..6; three requests with their clicked items and retrieved lists.
CLICKED = [[2, 5], [1], [], ]
RETRIEVED = [[5, 1, 3, 2], [4, 3, 1], [1, 2, 3, 4]]


def test_recall_matches_the_hand_count():
    padded = RM.pad_lists(RETRIEVED, 4)
    assert padded[1].tolist() == [4, 3, 1, -1]
    # top 1: request 1 finds 5 (1 of 2), request 2 nothing -> 1 of 3 clicked items
    # top 2: same; top 3: + item 1 of request 2 -> 2 of 3; top 4: + item 2 -> 3 of 3
    got = RM.recall_at_k(padded, CLICKED, ks=(1, 2, 3, 4))
    assert got == {"recall@1": pytest.approx(1 / 3), "recall@2": pytest.approx(1 / 3),
                   "recall@3": pytest.approx(2 / 3), "recall@4": pytest.approx(1.0)}
    # duplicated clicks of one item count once
    assert RM.recall_at_k(padded, [[2, 2, 5], [1], []], ks=(1,))["recall@1"] == \
        pytest.approx(1 / 3)


def test_expected_clicks_captured_by_hand():
    p = np.zeros((2, 7))
    p[0, 1:] = [0.1, 0.5, 0.2, 0.0, 0.4, 0.3]
    p[1, 1:] = [0.9, 0.0, 0.0, 0.1, 0.0, 0.0]
    retrieved = RM.pad_lists([[5, 1], [4]], 2)
    # request 1: got 0.4 + 0.1, best 0.5 + 0.4; request 2: got 0.1, best 0.9 + 0.1
    assert RM.expected_clicks_captured(retrieved, p, 2) == pytest.approx(0.6 / 1.9)
    oracle = RM.top_k_by_score(p[:, 1:], np.arange(1, 7), 2)
    assert oracle.tolist() == [[2, 5], [1, 4]]
    assert RM.expected_clicks_captured(oracle, p, 2) == pytest.approx(1.0)
    result = evaluate_lists([[5, 1], [4]], [[2], [1]], p, ks=(2,))
    assert result == {"recall@2": 0.0, "oracle_clicks@2": pytest.approx(0.6 / 1.9)}


def test_merged_lists_follow_the_quotas():
    lists = {"pdr": [[1, 2, 3], [4]], "content": [[3, 9], [5, 6]]}
    merged = merged_lists(lists, {"pdr": 0.5, "content": 0.5}, 3)
    assert merged == [[1, 3, 2], [4, 5, 6]]


def test_click_oracle_reproduces_the_generator_formula(tmp_path):
    truth = tmp_path / "truth"
    truth.mkdir()
    config = {"click_bias": -3.2, "relevance_effect": 1.8, "affinity_effect": 1.6}
    (truth / "generator.json").write_text(json.dumps({"config": config}))
    pq.write_table(pa.table({"item_id": ["a", "b", "c"], "topic": [0, 0, 1],
                             "subtopic": [1, 2, 1], "quality": [0.5, -0.2, 0.0]}),
                   truth / "items.parquet")
    pq.write_table(pa.table({"request_id": ["r1"], "user_id": ["u"], "query_topic": [0]}),
                   truth / "requests.parquet")
    pq.write_table(pa.table({"user_id": ["u"], "topic": [0], "preferred_subtopic": [2]}),
                   truth / "user_interests.parquet")
    oracle = ClickOracle.from_raw(str(tmp_path), ["c", "a", "b", "unknown"])
    p = oracle.click_probability(["r1"])[0]

    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    # vocabulary index 1 = c (other topic), 2 = a (topic, other subtopic), 3 = b (preferred)
    np.testing.assert_allclose(p, [0.0, sigmoid(-3.2), sigmoid(-3.2 + 1.8 + 0.5),
                                   sigmoid(-3.2 + 1.8 + 1.6 - 0.2), 0.0])
    with pytest.raises(FileNotFoundError):
        ClickOracle.from_raw(os.path.join(str(tmp_path), "missing"), ["a"])
