"""Mechanism probes against the generator's truth: the hand-checkable parts are exact, and on
generated logs RSU stage 1 finds the query topic far better than recency, as planted."""
import numpy as np
import pytest

from trainer import probes


def test_embedding_separation_counts_neighbours_by_hand():
    # items 1-4: two tight pairs (topic 0: items 1, 2; topic 1: items 3, 4), row 0 unknown
    table = np.array([[0, 0], [1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    topic = np.array([-1, 0, 0, 1, 1])
    subtopic = np.array([-1, 0, 1, 0, 0])
    sep = probes.embedding_separation(table, topic, subtopic, neighbours=1)
    assert sep["topic_purity@10"] == 1.0  # each item's nearest is its pair
    assert sep["subtopic_purity_within_topic@10"] == 0.5  # pair 1-2 differs, pair 3-4 agrees
    sep2 = probes.embedding_separation(table, topic, subtopic, neighbours=2)
    assert sep2["topic_purity@10"] == 0.5


def test_logit_decomposition_recovers_known_terms_despite_request_offsets():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 8)
    rel = rng.integers(0, 2, groups.size).astype(float)
    aff = rel * rng.integers(0, 2, groups.size)
    q = rng.normal(size=groups.size)
    offset = rng.normal(size=50)[groups] * 5  # request-level terms cancel within requests
    logits = offset + 1.8 * rel + 0.7 * aff + 0.9 * q
    d = probes.logit_decomposition(groups, logits, {"rel": rel, "aff": aff, "q": q})
    assert d["rel"] == pytest.approx(1.8) and d["aff"] == pytest.approx(0.7)
    assert d["q"] == pytest.approx(0.9) and d["r2"] == pytest.approx(1.0)
    noisy = probes.logit_decomposition(groups, logits + rng.normal(size=groups.size),
                                       {"rel": rel, "aff": aff, "q": q})
    assert 0.5 < noisy["r2"] < 0.95


def test_auc_matches_pairwise_count():
    labels = [1, 0, 1, 0, 0]
    scores = [0.9, 0.1, 0.4, 0.4, 0.8]
    pairs = [(p, n) for p in (0, 2) for n in (1, 3, 4)]
    by_hand = sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0
                  for p, n in pairs) / len(pairs)
    assert probes._auc(labels, scores) == pytest.approx(by_hand)
    assert probes._auc([1, 1], [0.2, 0.3]) is None


def test_stage1_finds_the_query_topic_better_than_recency(tmp_path):
    from preprocessing import pipeline as P
    from preprocessing import synthetic

    raw, out = str(tmp_path / "raw"), str(tmp_path / "data")
    synthetic.generate(raw, users=25, items=400, requests=250, seed=5, embedding_dim=8,
                       mean_history=60)
    P.run(["--input-format", "canonical", "--input", raw, "--output", out,
           "--long-term-length", "200", "--real-time-length", "10", "--no-feature-store",
           "--test-fraction", "0.3"], progress=lambda _m: None)
    args = probes.build_parser().parse_args(["--data", out, "--raw", raw, "--k1", "20",
                                             "--k2", "5"])
    result = probes.run(args)
    p = result["probes"]
    assert result["requests"] > 30
    assert p["stage1_precision"] > p["recency_precision"] + 0.15  # measured 0.63 vs 0.38
    assert p["stage1_precision"] > p["history_topic_share"]
    assert p["stage2_precision"] > p["stage1_subtopic_share"]
    assert p["attention_on_planted"] is None  # no model given
    assert "click_logit_decomposition" not in result
    # deep engagement concentrates on the preferred subtopic, and stage 2 finds it
    assert result["affinity_auc_of_stage2_deep_share"] > 0.6
    assert "| stage 1" in probes.to_markdown(result)
