"""Unit tests of the core preprocessing transforms (Beam TestPipeline on the in-process runner)
and of the point-in-time join, split rule and statistics they rely on."""
import json
import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from common import features as F
from common.relevance import stage1_top_k
from common import point_in_time as pit
from preprocessing import canonical, pipeline as P, stats as S
from preprocessing.records import BehaviourRecord, ItemRecord, RequestRecord

RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
DIM = 3


def _pipeline():
    return test_pipeline.TestPipeline(runner=RUNNER)


def _items():
    return [ItemRecord("i2", "a1", ("c1", "x"), (0.0, 1.0, 0.0)),
            ItemRecord("i1", "a2", ("c2",), (1.0, 0.0, 0.0)),
            ItemRecord("i3", "", ("c1", "y"), None)]


def _config(**overrides):
    settings = dict(input_format="canonical", embedding_dim=DIM, tasks=("click",),
                    engagement_names=F.ENGAGEMENT_NAMES["canonical"], long_term_length=3,
                    real_time_length=2, max_candidates=2, query_token_buckets=100,
                    profile_buckets=50)
    metadata = F.DatasetMetadata(**{**settings, **overrides})
    return P.PipelineConfig(metadata=metadata, eval_fraction=0.0, test_fraction=0.0)


def _md(long_term_length, real_time_length, mode="recent", stage1_threshold=None):
    """The settings of a point-in-time join (stage1 mode: K1 = long_term_length)."""
    return F.DatasetMetadata(long_term_length=long_term_length,
                             real_time_length=real_time_length, long_term_mode=mode,
                             stage1_threshold=stage1_threshold)


# ---- pure functions ----------------------------------------------------------------------------
def test_catalog_indices_are_sorted_raw_ids_with_zero_unknown():
    catalog = P.build_catalog([i._replace(embedding=i.embedding or (0.0,) * DIM,
                                          categories=(tuple(i.categories) + ("",))[:2])
                               for i in _items()])
    assert catalog["items"] == ["i1", "i2", "i3"]
    assert catalog["authors"] == ["a1", "a2"]
    assert catalog["categories"] == ["c1", "c2", "x", "y"]
    assert catalog["rows"]["i1"] == (1, 2, (2, 0))
    assert catalog["rows"]["i3"] == (3, 0, (1, 4))
    np.testing.assert_array_equal(catalog["embeddings"][0], 0)
    np.testing.assert_array_equal(catalog["embeddings"][2], [0, 1, 0])


def _history(rows):
    unique, duplicates = pit.sort_behaviours(rows)
    return pit.to_history(unique), duplicates


def _row(t, item, source=F.SOURCE_FEED, eng=(0.5, 0, 0, 0)):
    return pit.BehaviourRow(t, item, source, eng, item * 10, (item, item + 1))


def test_point_in_time_is_strict_with_shuffles_ties_and_own_clicks():
    t = 10_000
    rows = [_row(t - 1, 1), _row(t, 2, F.SOURCE_SEARCH), _row(t, 3), _row(t + 1, 4),
            _row(t - 1, 5), _row(t - 500, 6), _row(t - 500, 6), _row(t - 2000, 7)]
    for seed in range(5):
        shuffled = list(rows)
        random.Random(seed).shuffle(shuffled)
        history, duplicates = _history(shuffled)
        assert len(duplicates) == 1 and duplicates[0][:2] == (t - 500, 6)
        feats = pit.join_request(history, t, _md(10, 2))
        long_items = feats["long_item"].tolist()
        # equal timestamps: larger item index counts as more recent (reverse of the sort key)
        assert long_items == [5, 1, 6, 7]
        assert feats["rt_item"].tolist() == [5, 1]
        np.testing.assert_allclose(feats["long_time_gap"], [0.001, 0.001, 0.5, 2.0], rtol=1e-6)
        assert np.all(feats["long_time_gap"] > 0)
        assert feats["long_author"].tolist() == [50, 10, 60, 70]
        assert feats["long_category"].tolist() == [[5, 6], [1, 2], [6, 7], [7, 8]]
        assert feats["long_engagement"].shape == (4, F.ENGAGEMENT_DIM)


def test_point_in_time_empty_and_exactly_at_first_behaviour():
    history, _ = _history([_row(100, 1), _row(200, 2)])
    for t in (0, 99, 100):
        feats = pit.join_request(history, t, _md(5, 5))
        assert feats["long_item"].size == 0 and feats["rt_item"].size == 0
    empty, _ = _history([])
    assert pit.join_request(empty, 50, _md(5, 5))["long_item"].size == 0
    feats = pit.join_request(history, 201, _md(1, 5))
    assert feats["long_item"].tolist() == [2] and feats["rt_item"].tolist() == [2, 1]


def test_stage1_long_term_is_top_k_by_cosine_most_recent_first():
    table = np.array([[0, 0], [1, 0], [0, 1], [0.9, 0.1], [1, 0]], np.float32)
    rows = [_row(10, 1), _row(20, 2), _row(30, 3), _row(40, 4), _row(50, 2), _row(60, 1)]
    history, _ = _history(rows)
    feats = pit.join_request(history, 55, _md(2, 2, "stage1"), query_embedding=[1, 0],
                             item_embeddings=table)
    # before 55: items 1,2,3,4,2 (t=10..50); cosine 1 for items 1 and 4 (t=10, 40)
    assert feats["long_item"].tolist() == [4, 1]
    np.testing.assert_allclose(feats["long_time_gap"], [0.015, 0.045], rtol=1e-6)
    # ties (items 1 and 4 both cos 1) -> the most recent wins; the reference agrees
    before = np.arange(history.timestamp_ms.searchsorted(55) - 1, -1, -1)
    ref = stage1_top_k([1, 0], table[history.item[before]], 1)
    assert history.item[before[ref]].tolist() == [4]
    one = pit.join_request(history, 55, _md(1, 2, "stage1"), query_embedding=[1, 0],
                           item_embeddings=table)
    assert one["long_item"].tolist() == [4]
    thresholded = pit.join_request(history, 55, _md(5, 2, "stage1", 0.5),
                                   query_embedding=[0, 1], item_embeddings=table)
    assert thresholded["long_item"].tolist() == [2, 2]
    empty = pit.join_request(history, 5, _md(2, 2, "stage1"), query_embedding=[1, 0],
                             item_embeddings=table)
    assert empty["long_item"].size == 0


def test_split_cutoffs_hold_out_the_latest_requests_and_keep_ties_together():
    times = list(range(100))
    random.Random(0).shuffle(times)
    cut = P.request_timestamps_to_cutoffs(times, 0.2, 0.1)
    splits = [P.split_of(t, cut) for t in range(100)]
    assert splits.count("test") == 10 and splits.count("eval") == 20
    assert all(s == "test" for s in splits[90:]) and all(s == "train" for s in splits[:70])
    tied = P.request_timestamps_to_cutoffs([1, 2, 3, 3, 3], 0.0, 0.2)
    assert [P.split_of(t, tied) for t in (1, 2, 3)] == ["train", "train", "test"]
    none = P.request_timestamps_to_cutoffs([5, 6], 0.0, 0.0)
    assert {P.split_of(t, none) for t in (5, 6)} == {"train"}
    assert P.split_of(0, P.request_timestamps_to_cutoffs([], 0.1, 0.1)) == "train"


def test_length_distribution_is_exact():
    d = S.distribution({"0": 2, "5": 1, "10": 7})
    assert d == {"count": 10, "min": 0, "mean": 7.5, "p50": 10, "p90": 10, "p99": 10,
                 "max": 10}
    d = S.distribution({str(k): 1 for k in range(1, 101)})
    assert (d["p50"], d["p90"], d["p99"], d["min"], d["max"]) == (50, 90, 99, 1, 100)
    assert S.distribution({}) == {"count": 0}


def test_canonical_row_parsers_reject_with_reasons():
    good = {"item_id": "i", "author_id": "a", "category_l1": "c", "category_l2": None,
            "duration_s": 3.0, "embedding": [0.1, 0.2, 0.3]}
    item = canonical.parse_item(good, DIM)
    assert item.categories == ("c", "") and item.embedding == pytest.approx((0.1, 0.2, 0.3))
    cases = [({"embedding": [0.1, float("nan"), 0.0]}, "nan_embedding"),
             ({"embedding": [0.1, 0.2]}, "wrong_embedding_dim"),
             ({"duration_s": -1.0}, "negative_duration"),
             ({"item_id": None}, "missing_item_id"),
             ({"duration_s": "abc"}, "unparseable_duration_s")]
    for change, reason in cases:
        with pytest.raises(canonical.RowError) as info:
            canonical.parse_item({**good, **change}, DIM)
        assert info.value.reason == reason
    b = {"user_id": "u", "item_id": "i", "timestamp": 5, "source": "search", "watch_ratio": 1.5,
         "play_time_s": 2.0, "like": 1, "follow": 0, "share": 0}
    assert canonical.parse_behaviour(b).source == F.SOURCE_SEARCH
    for change, reason in [({"timestamp": -3}, "negative_timestamp"),
                           ({"timestamp": "x"}, "unparseable_timestamp"),
                           ({"play_time_s": -1.0}, "negative_duration"),
                           ({"source": "ads"}, "unknown_source"),
                           ({"watch_ratio": float("nan")}, "nan_watch_ratio")]:
        with pytest.raises(canonical.RowError) as info:
            canonical.parse_behaviour({**b, **change})
        assert info.value.reason == reason


# ---- Beam transforms -----------------------------------------------------------------------
def test_validate_items_dedupes_and_rejects_in_beam():
    rows = _items() + [ItemRecord("i1", "zz", ("c9",), (1.0, 0.0, 0.0)),
                       ItemRecord("bad", "a", ("c",), (1.0, float("nan"), 0.0)),
                       ItemRecord("short", "a", ("c",), (1.0,))]
    with _pipeline() as p:
        out = (p | beam.Create(rows) | beam.Map(lambda r: (r.item_id, r)) | beam.GroupByKey()
               | beam.ParDo(P.ValidateItems(DIM)).with_outputs(P.DEAD, P.STATS, main="items"))
        assert_that(out.items | "Ids" >> beam.Map(lambda r: (r.item_id, r.author_id,
                                                              r.categories)),
                    equal_to([("i1", "a2", ("c2", "")), ("i2", "a1", ("c1", "x")),
                              ("i3", "", ("c1", "y"))]), label="kept")
        assert_that(out[P.DEAD] | "Reasons" >> beam.Map(lambda d: (d.source, d.reason)),
                    equal_to([("items", "duplicate_item"), ("items", "nan_embedding"),
                              ("items", "wrong_embedding_dim")]), label="dead")
        assert_that(out[P.STATS] | "Stats" >> beam.CombineGlobally(S.StatsCombineFn())
                    | beam.Map(lambda s: s["counts"]),
                    equal_to([{"items_rejected/duplicate_item": 1,
                               "items_rejected/nan_embedding": 1, "items_without_embedding": 1,
                               "items_rejected/wrong_embedding_dim": 1}]), label="stats")


def _catalog():
    return P.build_catalog([ItemRecord(f"i{k}", "a", ("c", "d"), (float(k), 1.0, 0.0))
                            for k in range(1, 4)])


def test_resolve_behaviours_in_beam():
    rows = [BehaviourRecord("u", "i2", 5, F.SOURCE_FEED, (1.0, 0, 0, 0)),
            BehaviourRecord("u", "nope", 5, F.SOURCE_FEED, (1.0, 0, 0, 0)),
            BehaviourRecord("u", "i1", -5, F.SOURCE_FEED, (1.0, 0, 0, 0)),
            BehaviourRecord("u", "i1", 5, F.SOURCE_FEED, (1.0, 0, 0)),
            BehaviourRecord("u", "i1", 5, 9, (1.0, 0, 0, 0))]
    with _pipeline() as p:
        catalog = p | "Catalog" >> beam.Create([_catalog()])
        out = (p | beam.Create(rows)
               | beam.ParDo(P.ResolveBehaviours(), beam.pvalue.AsSingleton(catalog))
               .with_outputs(P.DEAD, P.STATS, main="behaviours"))
        assert_that(out.behaviours, equal_to([("u", (5, 2, F.SOURCE_FEED, (1.0, 0.0, 0.0, 0.0),
                                                     1, (1, 2)))]), label="kept")
        assert_that(out[P.DEAD] | beam.Map(lambda d: d.reason),
                    equal_to(["unknown_item", "negative_timestamp", "wrong_engagement_dim",
                              "unknown_source"]), label="dead")


def test_resolve_requests_in_beam():
    def req(rid, cands, clicks, emb=(1.0, 0.0, 0.0), t=100):
        return RequestRecord(rid, "u", t, (7, 8), emb, tuple(cands), {"click": clicks})

    rows = [req("ok", ["i1", "zz", "i2", "i3"], [1, 0, 0, 1]),
            req("mismatch", ["i1", "i2"], [1]),
            req("dup", ["i1"], [0]), req("dup", ["i2"], [1]),
            req("nan", ["i1"], [0], emb=(float("nan"), 0.0, 0.0)),
            req("dim", ["i1"], [0], emb=(1.0, 0.0)),
            req("unknown_only", ["zz"], [1])]
    with _pipeline() as p:
        catalog = p | "Catalog" >> beam.Create([_catalog()])
        out = (p | beam.Create(rows) | beam.Map(lambda r: (r.request_id, r)) | beam.GroupByKey()
               | beam.ParDo(P.ResolveRequests(_config()), beam.pvalue.AsSingleton(catalog))
               .with_outputs(P.DEAD, P.STATS, main="requests"))
        assert_that(out.requests | beam.Map(lambda kv: (
            kv[1][F.REQUEST_ID], tuple(kv[1][F.CANDIDATE_ITEM]), tuple(kv[1]["label_click"]),
            tuple(kv[1][F.QUERY_TOKENS]))),
            equal_to([("ok", (1, 2), (1.0, 0.0), (8, 9)), ("dup", (1,), (0.0,), (8, 9))]),
            label="kept")
        assert_that(out[P.DEAD] | beam.Map(lambda d: d.reason),
                    equal_to(["unknown_candidate_item", "label_length_mismatch",
                              "duplicate_request", "nan_embedding", "wrong_embedding_dim",
                              "unknown_candidate_item", "no_known_candidates"]), label="dead")
        assert_that(out[P.STATS] | beam.CombineGlobally(S.StatsCombineFn())
                    | beam.Map(lambda s: (s["counts"]["candidates_truncated"],
                                          s["counts"]["candidates_rejected/unknown_item"],
                                          s["counts"]["requests_read"])),
                    equal_to([(1, 2, 7)]), label="stats")


def test_join_user_in_beam_writes_point_in_time_examples():
    cfg = _config(real_time_length=1)
    catalog = _catalog()
    request = {F.REQUEST_ID: "r", F.USER_ID: "u", F.REQUEST_TIME: 1000, F.QUERY_TOKENS: [3],
               F.QUERY_EMBEDDING: [1.0, 0.0, 0.0], F.CANDIDATE_ITEM: [1],
               F.CANDIDATE_AUTHOR: [1], F.CANDIDATE_CATEGORY: [[1, 2]], "label_click": [1.0]}
    behaviours = [_row(999, 1), _row(1000, 2, F.SOURCE_SEARCH), _row(998, 3), _row(999, 1)]
    element = ("u", {"behaviours": behaviours, "requests": [request], "users": []})

    def check(examples):
        assert len(examples) == 1
        split, blob = examples[0]
        ex = F.make_example({**request, F.USER_INDEX: 1}, ("click",))  # shape reference
        parsed = type(ex).FromString(blob).features.feature
        assert split == "train"
        assert list(parsed["long_item"].int64_list.value) == [1, 3]
        assert list(parsed["rt_item"].int64_list.value) == [1]
        assert list(parsed["user_index"].int64_list.value) == [1]
        assert list(parsed["user_profile"].int64_list.value) == [0] * F.USER_PROFILE_DIM
        assert all(g > 0 for g in parsed["long_time_gap"].float_list.value)

    with _pipeline() as p:
        out = (p | beam.Create([element])
               | beam.ParDo(P.JoinUser(cfg), beam.pvalue.AsSingleton(
                   p | "C" >> beam.Create([catalog])),
                   beam.pvalue.AsSingleton(p | "U" >> beam.Create([{"u": 1}])),
                   beam.pvalue.AsSingleton(p | "T" >> beam.Create([(5000, 6000)])))
               .with_outputs(P.JoinUser.HISTORY, P.DEAD, P.STATS, main="examples"))
        assert_that(out.examples | beam.combiners.ToList() | beam.Map(check),
                    equal_to([None]), label="examples")
        assert_that(out[P.DEAD] | beam.Map(lambda d: d.reason),
                    equal_to(["duplicate_behaviour"]), label="dead")
        assert_that(out[P.JoinUser.HISTORY] | beam.Map(
            lambda s: [r["timestamp_ms"] for r in json.loads(s)[3]]),
                    equal_to([[998, 999, 1000]]), label="history")


def test_accounting_refuses_records_lost_without_a_reason():
    whole = {"requests_read": 10, "examples": 8, "requests_rejected": {"duplicate_request": 2},
             "behaviours_read": 50, "behaviours": 45,
             "behaviours_rejected": {"unknown_item": 3, "duplicate_behaviour": 2}}
    P.check_accounting(whole)
    with pytest.raises(RuntimeError, match="requests_read 10 != examples 5"):
        P.check_accounting({**whole, "examples": 5})
    with pytest.raises(RuntimeError, match="behaviours_read 50 != behaviours 20"):
        P.check_accounting({**whole, "behaviours": 20})
