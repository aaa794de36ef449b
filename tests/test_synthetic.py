"""Tests of the synthetic log generator: layout, determinism and every planted effect.

The effects are checked statistically against the latent truth in `truth/`, with thresholds far
from what the data would show if the effect were missing (each comment says the no-effect value).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import features as F
from preprocessing import synthetic as syn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = F.DEFAULT_TASKS
ALL_FILES = (syn.ITEM_FILE, syn.USER_FILE, syn.BEHAVIOUR_FILE, syn.REQUEST_FILE, syn.VOCAB_FILE,
             "truth/topics.parquet", "truth/items.parquet", "truth/users.parquet",
             "truth/user_interests.parquet", "truth/user_periods.parquet",
             "truth/requests.parquet")


def read(directory, name):
    return pq.read_table(os.path.join(directory, name))


def auc(scores, labels):
    """Mann-Whitney AUC with average ranks for ties (hand-written reference)."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    ranks = pd.Series(scores).rank().to_numpy()
    pos, neg = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg)


def deep(watch_ratio, like):
    return (np.asarray(watch_ratio) >= 0.8) | (np.asarray(like) == 1)


# ---- small generations -----------------------------------------------------------------------
SMALL = dict(users=40, items=400, requests=200, mean_history=80)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("small"))
    summary = syn.generate(out, seed=3, embedding_dim=8, **SMALL)
    return out, summary


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A medium generation (~130k behaviours, 3k requests) with everything joined to the truth."""
    out = str(tmp_path_factory.mktemp("effects"))
    syn.generate(out, users=400, items=2000, requests=3000, seed=11, mean_history=300)
    items = read(out, "truth/items.parquet").to_pandas().set_index("item_id")
    interests = read(out, "truth/user_interests.parquet").to_pandas()
    pref = {(u, t): s for u, t, s in zip(interests.user_id, interests.topic,
                                         interests.preferred_subtopic)}
    requests = read(out, syn.REQUEST_FILE).to_pandas()
    truth_requests = read(out, "truth/requests.parquet").to_pandas()
    requests = requests.merge(truth_requests, on=["request_id", "user_id"], validate="1:1")
    columns = (["candidate_item_ids"] + list(TASKS) + [f"p_{t}" for t in TASKS]
               + ["play_time_s", "expected_play_time_s"])
    shown = requests.explode(columns)
    shown["topic"] = items.topic.reindex(shown.candidate_item_ids).to_numpy()
    shown["subtopic"] = items.subtopic.reindex(shown.candidate_item_ids).to_numpy()
    shown["quality"] = items.quality.reindex(shown.candidate_item_ids).to_numpy()
    shown["relevant"] = shown.topic == shown.query_topic
    shown["preferred"] = [pref.get(k, -1) for k in zip(shown.user_id, shown.query_topic)]
    shown["affinity"] = shown.relevant & (shown.subtopic == shown.preferred)
    for t in TASKS:
        shown[t] = shown[t].astype(int)
        shown[f"p_{t}"] = shown[f"p_{t}"].astype(float)
    for column in ("play_time_s", "expected_play_time_s"):
        shown[column] = shown[column].astype(float)
    shown["duration_s"] = read(out, syn.ITEM_FILE).to_pandas().set_index(
        "item_id").duration_s.reindex(shown.candidate_item_ids).to_numpy()
    behaviours = read(out, syn.BEHAVIOUR_FILE).to_pandas()
    behaviours["topic"] = items.topic.reindex(behaviours.item_id).to_numpy()
    behaviours["subtopic"] = items.subtopic.reindex(behaviours.item_id).to_numpy()
    behaviours["preferred"] = [pref.get(k, -1) for k in zip(behaviours.user_id,
                                                             behaviours.topic)]
    return dict(dir=out, items=items, pref=pref, requests=requests, shown=shown,
                behaviours=behaviours, interests=interests)


# ---- layout ------------------------------------------------------------------------------------
def test_every_file_has_the_canonical_schema(small):
    out, summary = small
    D = 8
    expected = {syn.ITEM_FILE: syn.ITEM_SCHEMA, syn.USER_FILE: syn.USER_SCHEMA,
                syn.BEHAVIOUR_FILE: syn.BEHAVIOUR_SCHEMA, syn.REQUEST_FILE: syn.REQUEST_SCHEMA,
                syn.VOCAB_FILE: syn.VOCAB_SCHEMA}
    # The schemas are the ones docs/ARCHITECTURE.md section 1 lists, spelled out independently.
    f32, s = pa.list_(pa.float32()), pa.string()
    documented = {
        syn.ITEM_FILE: [("item_id", s), ("author_id", s), ("category_l1", s), ("category_l2", s),
                        ("duration_s", pa.float32()), ("embedding", f32)],
        syn.USER_FILE: [("user_id", s), ("age_bucket", s), ("gender", s), ("activity_level", s),
                        ("city_tier", s)],
        syn.BEHAVIOUR_FILE: [("user_id", s), ("item_id", s), ("timestamp", pa.int64()),
                             ("source", s), ("watch_ratio", pa.float32()),
                             ("play_time_s", pa.float32()), ("like", pa.int8()),
                             ("follow", pa.int8()), ("share", pa.int8())],
        syn.REQUEST_FILE: [("request_id", s), ("user_id", s), ("timestamp", pa.int64()),
                           ("query_tokens", pa.list_(pa.int64())), ("query_embedding", f32),
                           ("candidate_item_ids", pa.list_(s)), ("click", pa.list_(pa.int8())),
                           ("long_view", pa.list_(pa.int8())), ("like", pa.list_(pa.int8())),
                           ("play_time_s", f32), ("p_click", f32), ("p_long_view", f32),
                           ("p_like", f32), ("expected_play_time_s", f32)],
        syn.VOCAB_FILE: [("token_id", pa.int64()), ("word", s), ("embedding", f32)],
    }
    for name in ALL_FILES:
        assert os.path.isfile(os.path.join(out, name)), name
        assert not os.path.exists(os.path.join(out, name + ".partial"))
    for name, schema in expected.items():
        table = read(out, name)
        assert table.schema.equals(schema), (name, table.schema)
        assert [(f.name, f.type) for f in table.schema] == documented[name], name

    items, users = read(out, syn.ITEM_FILE), read(out, syn.USER_FILE)
    beh, req, vocab = read(out, syn.BEHAVIOUR_FILE), read(out, syn.REQUEST_FILE), \
        read(out, syn.VOCAB_FILE)
    assert items.num_rows == SMALL["items"] and users.num_rows == SMALL["users"]
    assert req.num_rows == SMALL["requests"] == summary["requests"]
    assert beh.num_rows == summary["behaviours"]
    for table, column in ((items, "embedding"), (req, "query_embedding"), (vocab, "embedding")):
        lengths = pa.compute.list_value_length(table[column]).to_numpy()
        assert (lengths == D).all(), column
        values = np.stack(table[column].to_numpy(zero_copy_only=False))
        assert np.isfinite(values).all()
    # Per request: candidate, label and probability lists aligned; 12-20 unique candidates.
    n = pa.compute.list_value_length(req["candidate_item_ids"]).to_numpy()
    assert n.min() >= 12 and n.max() <= 20
    for column in list(TASKS) + [f"p_{t}" for t in TASKS]:
        assert (pa.compute.list_value_length(req[column]).to_numpy() == n).all(), column
    r = req.to_pandas()
    assert r.request_id.is_unique
    assert all(len(set(c)) == len(c) for c in r.candidate_item_ids)
    item_ids = set(items["item_id"].to_pylist())
    assert set(np.concatenate(r.candidate_item_ids.to_numpy())) <= item_ids
    assert set(beh["item_id"].to_pylist()) <= item_ids
    assert set(beh["user_id"].to_pylist()) | set(r.user_id) <= set(users["user_id"].to_pylist())
    assert set(beh["source"].to_pylist()) == {"feed", "search"}
    # Labels are 0/1, long_view/like only on clicks, probabilities consistent with that.
    for t in TASKS:
        flat = np.concatenate(r[t].to_numpy())
        assert set(np.unique(flat)) <= {0, 1}
    click = np.concatenate(r.click.to_numpy())
    for t in ("long_view", "like"):
        assert (np.concatenate(r[t].to_numpy()) <= click).all()
        assert (np.concatenate(r[f"p_{t}"].to_numpy())
                <= np.concatenate(r.p_click.to_numpy()) + 1e-7).all()
    # Query tokens are vocabulary ids, and the query embedding is exactly the L2-normalised mean
    # of their vocabulary embeddings (query_vocab.parquet is an encoder for new queries).
    table = np.stack(vocab["embedding"].to_numpy(zero_copy_only=False))
    ids = vocab["token_id"].to_numpy()
    assert (ids == np.arange(1, len(ids) + 1)).all()
    for tokens, emb in zip(r.query_tokens, r.query_embedding):
        assert 1 <= len(tokens) <= F.MAX_QUERY_TOKENS
        mean = table[np.asarray(tokens) - 1].mean(axis=0)
        np.testing.assert_allclose(emb, mean / np.linalg.norm(mean), atol=1e-5)
    words = vocab["word"].to_pylist()
    assert "cooking_0" in words and "how" in words
    # play time = watch ratio * duration; watch ratios are positive.
    b = beh.to_pandas().merge(items.select(["item_id", "duration_s"]).to_pandas(), on="item_id")
    np.testing.assert_allclose(b.play_time_s, b.watch_ratio * b.duration_s, rtol=1e-5)
    assert (b.watch_ratio > 0).all()


def test_same_seed_same_output_and_independent_of_chunking(small, tmp_path):
    out, _ = small
    again = str(tmp_path / "again")
    # Same seed, tiny row groups: must still produce identical tables.
    syn.generate(again, seed=3, embedding_dim=8, behaviour_row_group=97, request_row_group=5,
                 **SMALL)
    for name in ALL_FILES:
        assert read(out, name).equals(read(again, name)), name
    assert pq.ParquetFile(os.path.join(again, syn.BEHAVIOUR_FILE)).num_row_groups > 1
    other = str(tmp_path / "other")
    syn.generate(other, seed=4, embedding_dim=8, **SMALL)
    for name in (syn.ITEM_FILE, syn.BEHAVIOUR_FILE, syn.REQUEST_FILE, "truth/items.parquet"):
        assert not read(out, name).equals(read(other, name)), name


def test_history_lengths_span_tens_to_thousands():
    cfg = syn.GeneratorConfig(users=5000, requests=10000, mean_history=300, seed=5)
    scalars = syn.draw_user_scalars(cfg)
    lengths = scalars.feed_length
    assert lengths.min() <= 30 and lengths.max() >= 2000
    assert abs(lengths.mean() - 300) < 40
    assert scalars.requests.sum() == 10000


def test_lifelong_users_have_ten_thousand_plus_behaviours(tmp_path):
    out = str(tmp_path / "lifelong")
    summary = syn.generate(out, users=4, items=400, requests=40, seed=2, lifelong_users=2,
                           mean_history=50)
    truth = read(out, "truth/users.parquet").to_pandas()
    counts = read(out, syn.BEHAVIOUR_FILE).to_pandas().groupby("user_id").size()
    lifelong = truth.user_id[truth.lifelong]
    assert len(lifelong) == 2
    assert (counts[lifelong] >= 10_000).all() and (counts[lifelong] <= 100_000 + 1000).all()
    assert (counts[truth.user_id[~truth.lifelong]] < 10_000).all()
    assert summary["behaviours"] == counts.sum()
    # Lifelong histories reach back before the common window; requests stay inside it.
    beh = read(out, syn.BEHAVIOUR_FILE).to_pandas()
    assert beh[beh.user_id.isin(lifelong)].timestamp.min() < syn.WINDOW_START_MS - 300 * syn.DAY_MS
    assert read(out, syn.REQUEST_FILE)["timestamp"].to_numpy().min() >= syn.WINDOW_START_MS
    activity = read(out, syn.USER_FILE).to_pandas().set_index("user_id").activity_level
    assert (activity[lifelong] == "lifelong").all()


def test_bad_settings_fail_fast_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="--items"):
        syn.generate(str(tmp_path / "x"), users=5, items=10, requests=5)
    with pytest.raises(ValueError, match="--lifelong-users"):
        syn.generate(str(tmp_path / "x"), users=5, items=400, requests=5, lifelong_users=6)
    with pytest.raises(TypeError, match="unknown generator options"):
        syn.generate(str(tmp_path / "x"), users=5, items=400, requests=5, bogus=1)


def test_cli_help_run_and_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "preprocessing.synthetic", *args],
                              capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120)

    help_ = run("--help")
    assert help_.returncode == 0
    for option in ("--lifelong-users", "--embedding-dim", "--topics", "--subtopics",
                   "--candidates-per-request", "--mean-history", "--seed"):
        assert option in help_.stdout
    out = str(tmp_path / "cli")
    ok = run("--output", out, "--users", "20", "--items", "400", "--requests", "50", "--seed",
             "1", "--candidates-per-request", "5-8", "--embedding-dim", "16")
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["requests"] == 50 and summary["embedding_dim"] == 16
    assert "users 20/20" in ok.stderr  # progress line
    n = pa.compute.list_value_length(read(out, syn.REQUEST_FILE)["candidate_item_ids"])
    assert 5 <= pa.compute.min(n).as_py() and pa.compute.max(n).as_py() <= 8
    generator = json.load(open(os.path.join(out, "truth", "generator.json")))
    assert generator["config"]["seed"] == 1
    bad = run("--output", out, "--users", "20", "--items", "10")
    assert bad.returncode == 2 and "--items must be" in bad.stderr


# ---- planted effects ---------------------------------------------------------------------------
def test_query_relevance_raises_clicks(data):
    shown = data["shown"]
    relevant, other = shown[shown.relevant].click.mean(), shown[~shown.relevant].click.mean()
    assert relevant > 2.5 * other  # no effect: ratio ~1
    share = shown.groupby("request_id").relevant.mean().mean()
    assert 0.5 < share < 0.7  # ~60% of candidates come from the query topic


def test_preferred_subtopic_raises_clicks_within_the_query_topic(data):
    rel = data["shown"][data["shown"].relevant]
    preferred = rel[rel.affinity]
    assert preferred.click.mean() > 1.6 * rel[~rel.affinity].click.mean()  # no effect: ~1
    assert preferred.long_view.mean() > 2.0 * rel[~rel.affinity].long_view.mean()
    assert preferred.like.mean() > 2.0 * rel[~rel.affinity].like.mean()


def _predict_subtopic(window, topic, subtopics, rng):
    """Majority subtopic of the deep-engaged behaviours on `topic`; None when there are none."""
    sel = window[(window.topic.to_numpy() == topic) & deep(window.watch_ratio, window.like)]
    if len(sel) == 0:
        return None
    counts = np.bincount(sel.subtopic.to_numpy(), minlength=subtopics)
    best = np.flatnonzero(counts == counts.max())
    return int(rng.choice(best))


def test_affinity_is_in_long_term_history_not_in_the_last_50(data):
    """QIN's premise: the query topic's preferred subtopic is recoverable from the deep-engaged
    full-site history before the request, but not from the last 50 behaviours."""
    subtopics = syn.GeneratorConfig().subtopics
    rng = np.random.default_rng(0)
    beh = data["behaviours"].sort_values(["user_id", "timestamp"], kind="stable")
    by_user = {u: g for u, g in beh.groupby("user_id")}
    hits = {"long": [], "last50": [], "search": []}
    requests = data["requests"].sample(600, random_state=0)
    for user, t, topic in zip(requests.user_id, requests.timestamp, requests.query_topic):
        history = by_user[user]
        before = history[history.timestamp.to_numpy() < t]  # point in time: strictly before
        truth = data["pref"][(user, topic)]
        for name, window in (("long", before), ("last50", before.tail(50)),
                             ("search", before[before.source == "search"])):
            guess = _predict_subtopic(window, topic, subtopics, rng)
            hits[name].append(1 / subtopics if guess is None else float(guess == truth))
    long_term, last50 = np.mean(hits["long"]), np.mean(hits["last50"])
    assert long_term > 0.72  # chance: 1 / subtopics = 0.25
    assert last50 < 0.4
    assert long_term - last50 > 0.35
    # Past searches carry some affinity (clicks favour it), less than the full-site history.
    assert np.mean(hits["search"]) < long_term - 0.1


def test_query_topic_is_not_a_current_feed_topic(data):
    out = data["dir"]
    periods = read(out, "truth/user_periods.parquet").to_pandas()
    current = {(u, p): set(c) for u, p, c in zip(periods.user_id, periods.period,
                                                  periods.current_topics)}
    req = data["requests"]
    not_current = [q not in current[(u, p)] for u, p, q in zip(req.user_id, req.period,
                                                                req.query_topic)]
    assert np.mean(not_current) > 0.97
    # Most query topics were current in an earlier period (the rest: users with short
    # histories or many searches, whose query topic is new to their history).
    assert req.topic_seen_before.mean() > 0.65
    # Request times lie inside their period, after some history.
    starts = periods.set_index(["user_id", "period"])
    span = starts.loc[list(zip(req.user_id, req.period))]
    assert ((req.timestamp.to_numpy() >= span.start_ms.to_numpy())
            & (req.timestamp.to_numpy() < span.end_ms.to_numpy())).all()


def test_deep_engagement_marks_affinity_short_views_do_not(data):
    feed = data["behaviours"]
    feed = feed[(feed.source == "feed") & (feed.preferred >= 0)]  # items of interest topics
    is_deep = deep(feed.watch_ratio, feed.like)
    on_preferred = feed.subtopic.to_numpy() == feed.preferred.to_numpy()
    base = 1 / syn.GeneratorConfig().subtopics
    assert on_preferred[is_deep].mean() > 0.55  # no effect: ~base (0.25)
    assert on_preferred[~is_deep].mean() < base  # short views are not concentrated
    # Without engagement, merely having seen items says little: close to the base rate.
    assert abs(on_preferred.mean() - base) < 0.12


def test_item_quality_acts_through_the_item_id_only(data):
    shown, items = data["shown"], data["items"]
    cell_rate = shown.groupby(["relevant", "affinity"]).click.transform("mean")
    residual = (shown.click - cell_rate).groupby(shown.candidate_item_ids).agg(["mean", "size"])
    residual = residual[residual["size"] >= 15]
    quality = items.quality.reindex(residual.index)
    assert len(residual) > 500
    assert np.corrcoef(residual["mean"], quality)[0, 1] > 0.3  # no effect: ~0
    # Quality is not in the embedding (held-out ridge R^2) ...
    catalogue = read(data["dir"], syn.ITEM_FILE).to_pandas().set_index("item_id")
    q = items.quality.reindex(catalogue.index).to_numpy()
    x = np.stack(catalogue.embedding.to_numpy())
    half = len(x) // 2
    w = np.linalg.solve(x[:half].T @ x[:half] + np.eye(x.shape[1]), x[:half].T @ q[:half])
    r2 = 1 - np.mean((q[half:] - x[half:] @ w) ** 2) / np.var(q[half:])
    assert r2 < 0.05
    # ... nor in the author or categories (mean quality of the other items in the same group).
    for column in ("author_id", "category_l1", "category_l2"):
        groups = catalogue[column].to_numpy()
        frame = pd.DataFrame({"g": groups, "q": q})
        total, size = frame.groupby("g").q.transform("sum"), frame.groupby("g").q.transform("size")
        keep = size > 1
        others = (total - frame.q)[keep] / (size - 1)[keep]
        assert abs(np.corrcoef(others, frame.q[keep])[0, 1]) < 0.1, column


def test_embeddings_are_informative_but_noisy(data):
    out = data["dir"]
    topics = read(out, "truth/topics.parquet").to_pandas()
    centres = np.stack(topics.centre.to_numpy())
    catalogue = read(out, syn.ITEM_FILE).to_pandas().set_index("item_id")
    truth = data["items"].reindex(catalogue.index)
    emb = np.stack(catalogue.embedding.to_numpy())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    cos = emb @ centres.T
    own = cos[np.arange(len(emb)), truth.topic.to_numpy()]
    mask = np.ones_like(cos, bool)
    mask[np.arange(len(emb)), truth.topic.to_numpy()] = False
    assert 0.5 < own.mean() < 0.9 and own.max() < 0.98  # informative, clearly not exact
    assert own.mean() > cos[mask].mean() + 0.4
    assert (cos.argmax(axis=1) == truth.topic.to_numpy()).mean() > 0.9
    # The subtopic is only partly visible: nearest subtopic direction is right more often than
    # chance but far from always.
    offsets = np.stack([np.stack(o) for o in topics.subtopic_offsets])  # [T, S, D]
    sub_scores = np.einsum("nd,nsd->ns", emb, offsets[truth.topic.to_numpy()])
    accuracy = (sub_scores.argmax(axis=1) == truth.subtopic.to_numpy()).mean()
    assert 0.4 < accuracy < 0.995
    # category_l1 is the topic; category_l2 (format) says nothing about the subtopic.
    names = topics.set_index("topic").name
    assert (catalogue.category_l1.to_numpy() == names[truth.topic].to_numpy()).all()
    table = pd.crosstab(catalogue.category_l2, truth.subtopic, normalize="columns")
    assert (table.max(axis=1) - table.min(axis=1)).max() < 0.08
    # Query embeddings point at the query topic, noisily.
    req = data["requests"]
    q_cos = np.stack(req.query_embedding.to_numpy()) @ centres.T
    q_own = q_cos[np.arange(len(req)), req.query_topic.to_numpy()]
    assert 0.5 < q_own.mean() < 0.97
    assert (q_cos.argmax(axis=1) == req.query_topic.to_numpy()).mean() > 0.9


def test_oracle_auc_is_high_but_below_one(data):
    shown = data["shown"]
    oracle = auc(shown.p_click, shown.click)
    assert 0.72 < oracle < 0.92
    assert auc(shown.p_long_view, shown.long_view) > 0.7
    assert auc(shown.p_like, shown.like) > 0.7
    # The true probabilities are calibrated (labels were drawn from them).
    for t in TASKS:
        assert abs(shown[t].mean() - shown[f"p_{t}"].mean()) < 0.01
    # Personalisation is part of the ceiling: relevance alone ranks clearly worse.
    assert auc(shown.relevant.astype(float), shown.click) < oracle - 0.05


def test_search_clicks_appear_as_behaviours_at_or_after_their_request(data):
    shown, beh = data["shown"], data["behaviours"]
    clicks = shown[shown.click == 1][["user_id", "candidate_item_ids", "timestamp"]]
    search = beh[beh.source == "search"]
    assert len(search) == len(clicks)
    clicks = clicks.rename(columns={"candidate_item_ids": "item_id", "timestamp": "request_time"})
    merged = search.merge(clicks, on=["user_id", "item_id"])
    merged["delay"] = merged.timestamp - merged.request_time
    # Each search behaviour follows a click of the same user and item by seconds to minutes, and
    # never precedes its request (a leak a point-in-time join must prevent).
    key = ["user_id", "item_id", "timestamp"]
    nearest = merged[merged.delay >= 0].groupby(key).delay.min()
    assert len(nearest) == len(search[key].drop_duplicates())
    assert nearest.min() >= 3000 and nearest.max() <= 10 * 60 * 1000


def test_observable_long_term_deep_history_carries_the_personal_signal(data):
    """The planted personal signal is reachable from what a model sees (no truth): a QIN-like
    score (query relevance + similarity of the candidate to the query-relevant, deep-engaged
    long-term behaviours) ranks clicks better than the same score over the last 50 behaviours
    or over the long-term history without engagement weighting. Compared by GAUC."""
    catalogue = read(data["dir"], syn.ITEM_FILE).to_pandas()
    index = {k: i for i, k in enumerate(catalogue.item_id)}
    emb = np.stack(catalogue.embedding.to_numpy())
    beh = data["behaviours"]
    engaged = deep(beh.watch_ratio, beh.like)
    by_user = {u: (g.timestamp.to_numpy(), g.item_id.map(index).to_numpy(), engaged[g.index])
               for u, g in beh.groupby("user_id")}
    scores = {"relevance": [], "recent50": [], "long_unweighted": [], "long_deep": []}
    requests = data["requests"].sample(800, random_state=1)
    for user, t, query, candidates, click in zip(requests.user_id, requests.timestamp,
                                                 requests.query_embedding,
                                                 requests.candidate_item_ids, requests.click):
        y = np.asarray(click, bool)
        if y.all() or not y.any():
            continue
        times, items, is_deep = by_user[user]
        before = times < t
        items, is_deep = items[before], is_deep[before]
        q = np.asarray(query)
        cand = emb[[index[c] for c in candidates]]
        relevance = cand @ q

        def affinity(hist_items, weight):
            vectors = emb[hist_items]
            keep = (vectors @ q > 0.4) & weight  # stage 1: query-relevant behaviours
            return (cand @ vectors[keep].T).mean(axis=1) if keep.any() else 0.0

        scores["relevance"].append(auc(relevance, y))
        scores["recent50"].append(auc(relevance + 2 * affinity(items[-50:], is_deep[-50:]), y))
        scores["long_unweighted"].append(
            auc(relevance + 2 * affinity(items, np.ones(len(items), bool)), y))
        scores["long_deep"].append(auc(relevance + 2 * affinity(items, is_deep), y))
    gauc = {k: float(np.mean(v)) for k, v in scores.items()}
    assert len(scores["relevance"]) > 500
    assert gauc["relevance"] > 0.62  # the query is informative
    assert gauc["long_deep"] > gauc["recent50"] + 0.02, gauc
    assert gauc["long_deep"] > gauc["long_unweighted"] + 0.02, gauc
    assert gauc["recent50"] < gauc["relevance"] + 0.02, gauc  # recent history adds ~nothing


def test_play_time_of_shown_candidates_and_its_true_expectation(data):
    """play_time_s is watch ratio * duration of clicked candidates (0 otherwise), equal to the
    play time of the search behaviour the click became; expected_play_time_s is its exact
    expectation: the observed mean matches it overall and within duration and click-probability
    strata (a wrong formula, e.g. without the duration or the long-view mix, would not)."""
    shown, beh = data["shown"], data["behaviours"]
    assert (shown.loc[shown.click == 0, "play_time_s"] == 0).all()
    assert (shown.loc[shown.click == 1, "play_time_s"] > 0).all()
    # the request's play times are the search behaviours' play times, click for click
    search = beh[beh.source == "search"]
    assert np.allclose(np.sort(shown.loc[shown.click == 1, "play_time_s"].to_numpy()),
                       np.sort(search.play_time_s.to_numpy()), rtol=1e-6)
    # the closed form, recomputed by hand from the true probabilities and the duration
    c_long = shown.p_long_view / shown.p_click
    by_hand = shown.p_click * shown.duration_s * (
        c_long * syn.DEEP_WATCH_RATIO_MEAN + (1 - c_long) * syn.SHORT_WATCH_RATIO_MEAN)
    np.testing.assert_allclose(shown.expected_play_time_s, by_hand, rtol=1e-4)
    assert 0.20 < syn.SHORT_WATCH_RATIO_MEAN < 0.21 and syn.DEEP_WATCH_RATIO_MEAN == 1.08
    # unbiased: observed mean / expected mean near 1, overall and per stratum
    ratio = shown.play_time_s.sum() / shown.expected_play_time_s.sum()
    assert 0.93 < ratio < 1.07, ratio
    long_items = shown.duration_s > shown.duration_s.median()
    likely = shown.p_click > shown.p_click.median()
    for stratum in (long_items, ~long_items, likely, ~likely):
        part = shown[stratum]
        assert 0.85 < part.play_time_s.sum() / part.expected_play_time_s.sum() < 1.15
    # duration drives the expectation apart from p_click: the two rankings differ
    assert np.corrcoef(shown.expected_play_time_s, shown.p_click)[0, 1] < 0.9


def test_canonical_reader_adds_the_watch_time_task_when_requests_carry_play_time(small,
                                                                                  tmp_path):
    import shutil

    from preprocessing import canonical

    out, _ = small
    info = canonical.validate(out)
    assert info["tasks"] == F.WATCH_TIME_TASKS and info["has_true_probabilities"]
    row = read(out, syn.REQUEST_FILE).slice(0, 1).to_pylist()[0]
    record = canonical.parse_request(row, 8, True, info["tasks"])
    assert record.labels[F.WATCH_TIME] == pytest.approx(row["play_time_s"])
    assert record.true_probabilities[F.WATCH_TIME] == pytest.approx(row["expected_play_time_s"])
    with pytest.raises(canonical.RowError, match="negative_play_time_s"):
        canonical.parse_request(dict(row, play_time_s=[-1.0] * len(row["play_time_s"])), 8,
                                True, info["tasks"])
    # logs without play time: the three binary tasks, as before
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    table = read(out, syn.REQUEST_FILE).drop(["play_time_s", "expected_play_time_s"])
    pq.write_table(table, plain / syn.REQUEST_FILE)
    assert canonical.validate(str(plain))["tasks"] == F.DEFAULT_TASKS
