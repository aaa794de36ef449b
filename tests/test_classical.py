"""The classical baseline (trainer/classical.py): its history features equal a hand count on a
hand-built request, its rates come from the train split only (and leave a train row's own
request out), and on generated logs run through the real pipeline it ranks better than a
random ranking and writes metrics in the format of `python -m trainer.evaluate`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common import features as F
from tests.helpers import REPO, subprocess_env
from tests.test_cli_help import imported_modules
from trainer import classical as C

DAY_S = 86_400.0
HALF_LIFE_S = C.DECAY_HALF_LIFE_DAYS * DAY_S
DEEP, SHALLOW_LIKED, SHALLOW = (0.9, 0, 0, 0), (0.2, 1, 0, 0), (0.5, 0, 0, 0)


def small_metadata(**overrides):
    settings = dict(embedding_dim=2, num_items=10, num_authors=5, num_categories=6, num_users=3,
                    query_token_buckets=50, profile_buckets=20, long_term_length=8,
                    real_time_length=4, max_candidates=4)
    settings.update(overrides)
    return F.DatasetMetadata(**settings)


def parsed(requests, metadata):
    """NumPy batch of `parse_examples` over hand-built request mappings."""
    serialized = [F.make_example(r, metadata.tasks).SerializeToString() for r in requests]
    return {k: v.numpy() for k, v in F.parse_examples(serialized, metadata).items()}


def request(request_id, candidates, clicks, tokens=(3,), long=(), rt=(), time_ms=10**12):
    """A request mapping; `long`/`rt` are behaviours (item, author, (cat1, cat2), engagement,
    source, time gap s), most recent first; authors of candidates equal their item id."""
    r = {F.REQUEST_ID: request_id, F.USER_ID: "u1", F.USER_INDEX: 1, F.REQUEST_TIME: time_ms,
         F.QUERY_TOKENS: list(tokens), F.QUERY_EMBEDDING: [1.0, 0.0],
         F.CANDIDATE_ITEM: [c[0] for c in candidates],
         F.CANDIDATE_AUTHOR: [c[1] for c in candidates],
         F.CANDIDATE_CATEGORY: [list(c[2]) for c in candidates]}
    for task in F.DEFAULT_TASKS:
        r[F.label_feature(task)] = [float(c) if task == "click" else 0.0 for c in clicks]
    for seq, rows in ((F.LONG_TERM, long), (F.REAL_TIME, rt)):
        for k, field in enumerate((F.SEQ_ITEM, F.SEQ_AUTHOR, F.SEQ_CATEGORY, F.SEQ_ENGAGEMENT,
                                   F.SEQ_SOURCE, F.SEQ_TIME_GAP)):
            r[F.seq_feature(seq, field)] = [row[k] for row in rows]
    return r


def test_deep_engagement_follows_the_meaning_of_each_format():
    canonical = F.ENGAGEMENT_NAMES["canonical"]
    engagement = np.array([[0.8, 0, 0, 0], [0.79, 0, 0, 0], [0.1, 1, 0, 0], [0.1, 0, 1, 1]])
    assert C.deep_engagement_mask(engagement, canonical).tolist() == [True, False, True, False]
    # JDsearch: (click, follow, cart, order): a plain click is shallow, a cart or order deep
    jd = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]])
    assert C.deep_engagement_mask(jd, F.ENGAGEMENT_NAMES["jdsearch"]).tolist() == [
        False, False, True, True]
    with pytest.raises(ValueError, match="deep-engagement rule"):
        C.deep_engagement_mask(engagement, ("a", "b", "c", "d"))


def test_history_features_equal_a_hand_count():
    metadata = small_metadata()
    feed, search = F.SOURCE_FEED, F.SOURCE_SEARCH
    long = [(1, 1, (1, 3), DEEP, feed, 3600.0),
            (2, 1, (1, 4), SHALLOW_LIKED, search, 7 * DAY_S),  # deep: liked
            (3, 2, (1, 3), SHALLOW, feed, 14 * DAY_S),
            (1, 1, (1, 3), (0.1, 0, 0, 0), search, 20 * DAY_S),
            (4, 3, (2, 5), (1.0, 0, 0, 0), feed, 30 * DAY_S)]
    rt = [(1, 1, (1, 3), (0.85, 0, 0, 0), feed, 60.0), (6, 4, (2, 6), SHALLOW, feed, 120.0)]
    # candidate 0 = item 1 of author 1; candidate 1 = item 5 of an unknown author (index 0,
    # which the padded behaviour slots also hold: it must match nothing)
    r = request("r", [(1, 1, (1, 3)), (5, 0, (2, 6))], [1, 0], long=long, rt=rt)
    embeddings = np.zeros((11, 2), np.float32)
    embeddings[[1, 2, 3, 4, 5, 6]] = [[1, 0], [0, 1], [1, 1], [-1, 0], [0, 1], [1, 0]]
    out = C.history_features(parsed([r], metadata), metadata, C._unit_rows(embeddings))

    def both(name):
        return out[name][0].tolist()

    # long-term: deep = behaviours 0, 1 (liked), 4; shallow = 2, 3
    assert both("long_category1_deep_count") == [2, 1]
    assert both("long_category1_shallow_count") == [2, 0]
    assert both("long_category2_deep_count") == [1, 0]
    assert both("long_category2_shallow_count") == [2, 0]
    assert both("long_author_deep_count") == [2, 0]
    assert both("long_author_shallow_count") == [1, 0]
    assert both("long_item_deep_count") == [1, 0]
    assert both("long_item_shallow_count") == [1, 0]
    assert both("long_category1_search_count") == [2, 0]
    assert both("long_category2_search_count") == [1, 0]
    assert both("long_author_search_count") == [2, 0]
    assert both("long_item_search_count") == [1, 0]
    assert both("long_deep_total") == [3, 3]
    assert both("long_length") == [5, 5] and both("rt_length") == [2, 2]
    np.testing.assert_allclose(both("long_category1_deep_share"), [2 / 3, 1 / 3])
    # real-time: behaviour 0 deep (item 1), behaviour 1 shallow (item 6, category (2, 6))
    assert both("rt_category1_deep_count") == [1, 0]
    assert both("rt_category1_shallow_count") == [0, 1]
    assert both("rt_category2_shallow_count") == [0, 1]
    assert both("rt_author_deep_count") == [1, 0]
    assert both("rt_author_shallow_count") == [0, 0]
    assert both("rt_item_deep_count") == [1, 0]
    # recency: weight 0.5 ** (gap / half-life)
    decay = lambda gap: 0.5 ** (gap / HALF_LIFE_S)  # noqa: E731
    np.testing.assert_allclose(both("long_author_deep_decayed"),
                               [decay(3600.0) + decay(7 * DAY_S), 0.0])
    np.testing.assert_allclose(both("long_author_shallow_decayed"), [decay(20 * DAY_S), 0.0])
    np.testing.assert_allclose(both("long_category1_deep_decayed"),
                               [decay(3600.0) + decay(7 * DAY_S), decay(30 * DAY_S)])
    # cosine of the candidate to the behaviours (unit vectors above; item 3 at 45 degrees)
    diagonal = np.sqrt(0.5)
    np.testing.assert_allclose(both("long_similarity_deep_mean"), [0.0, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(both("long_similarity_deep_max"), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(both("long_similarity_shallow_mean"),
                               [(diagonal + 1) / 2, diagonal / 2], atol=1e-6)
    np.testing.assert_allclose(both("long_similarity_deep_same_category1_mean"), [0.5, 0.0],
                               atol=1e-6)
    np.testing.assert_allclose(both("long_similarity_shallow_same_category1_mean"),
                               [(diagonal + 1) / 2, 0.0], atol=1e-6)
    np.testing.assert_allclose(both("query_cosine"), [1.0, 0.0], atol=1e-6)
    assert {c.name for c in C.HISTORY_COLUMNS} == set(out)


def write_dataset(directory, splits, metadata):
    """A preprocessing output (metadata, item embeddings, one TFRecord per split)."""
    import tensorflow as tf

    metadata.save(directory)
    np.save(os.path.join(directory, F.ITEM_EMBEDDINGS_FILE),
            np.eye(metadata.num_items + 1, 2, dtype=np.float32))
    for split, requests in splits.items():
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        path = os.path.join(directory, split, "part-00000-of-00001.tfrecord.gz")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for r in requests:
                writer.write(F.make_example(r, metadata.tasks).SerializeToString())
    return directory


def candidates(*items):
    return [(item, item, (1, 3)) for item in items]


def test_rates_come_from_the_train_split_only_and_leave_the_own_request_out(tmp_path):
    metadata = small_metadata()
    train = [request(f"t{k}", candidates(1, 4), [k < 3, 0]) for k in range(6)]
    train.append(request("t_item3", candidates(3, 4), [1, 0]))  # item 3: one train request
    splits = {"train": train,
              "eval": [request("e", candidates(3, 1), [1, 1])],
              "test": [request("x", candidates(2, 1, 3), [1, 0, 1])]}  # item 2: test only
    data = write_dataset(str(tmp_path), splits, metadata)
    embeddings = C.load_unit_item_embeddings(data)
    rows = {s: C.read_split(data, s, metadata, embeddings, batch_size=4) for s in splits}
    stats = C.TrainStatistics.fit(rows["train"], metadata)
    prior = 4 / 14  # train: 14 candidates, 4 clicks
    assert stats.prior["click"] == pytest.approx(prior)

    test = stats.features(rows["test"], out_of_fold=False)
    by_item = {int(item): k for k, item in enumerate(rows["test"].item)}
    smoothed = lambda clicks, shown: C.log_odds(  # noqa: E731
        (clicks + C.SMOOTHING_IMPRESSIONS * prior) / (shown + C.SMOOTHING_IMPRESSIONS))
    # clicked in test, never shown in train: no rate of its own (the prior), no popularity
    assert test["item_click_rate"][by_item[2]] == pytest.approx(C.log_odds(prior))
    assert test["item_impressions"][by_item[2]] == 0
    assert test["item_click_rate"][by_item[1]] == pytest.approx(smoothed(3, 6))
    assert test["item_impressions"][by_item[1]] == 6
    assert test["item_click_rate"][by_item[3]] == pytest.approx(smoothed(1, 1))
    assert test["author_click_rate"][by_item[3]] == pytest.approx(smoothed(1, 1))
    # eval's and test's clicks do not move the statistics: eval shows item 1 clicked
    assert C.TrainStatistics.fit(rows["train"], metadata).item.full.impressions.sum() == 14

    # a train row never sees its own request's label (out of fold): item 3's only train
    # request is its own, so it gets the prior; item 1 sees the other folds' requests
    train_features = stats.features(rows["train"], out_of_fold=True)
    own = np.flatnonzero((rows["train"].request_id == b"t_item3") & (rows["train"].item == 3))
    assert train_features["item_click_rate"][own] == pytest.approx(C.log_odds(prior))
    assert train_features["item_impressions"][own] == 0
    folds = rows["train"].folds()
    item1 = np.flatnonzero(rows["train"].item == 1)
    shown_elsewhere = np.array([(folds[item1] != folds[k]).sum() for k in item1])
    scale = C.TRAIN_FOLDS / (C.TRAIN_FOLDS - 1)
    np.testing.assert_allclose(train_features["item_impressions"][item1],
                               shown_elsewhere * scale)


@pytest.fixture(scope="module")
def generated_data(tmp_path_factory):
    from preprocessing import pipeline as P
    from preprocessing import synthetic as syn

    root = tmp_path_factory.mktemp("classical")
    raw, out = str(root / "raw"), str(root / "data")
    syn.generate(raw, users=40, items=400, requests=500, seed=3, embedding_dim=8,
                 mean_history=60)
    P.run(["--input-format", "canonical", "--input", raw, "--output", out,
           "--long-term-length", "60", "--real-time-length", "10",
           "--eval-fraction", "0.2", "--test-fraction", "0.3"], progress=lambda _m: None)
    return out


def test_beats_a_random_ranking_and_writes_the_evaluate_format(generated_data, tmp_path):
    from trainer import evaluate as E
    from trainer import metrics as M
    from trainer.config import ModelConfig

    output = str(tmp_path / "eval")
    assert C.main(["--data", generated_data, "--output", output, "--model", "best",
                   "--seed", "1"]) == 0
    with open(os.path.join(output, E.METRICS_JSON)) as f:
        result = json.load(f)
    with open(os.path.join(output, E.METRICS_MD)) as f:
        markdown = f.read()
    metadata = F.DatasetMetadata.load(generated_data)
    tasks = list(metadata.tasks)

    # the same metrics, computed by trainer.evaluate, for a random ranking of the same rows
    test = C.read_split(generated_data, "test", metadata,
                        C.load_unit_item_embeddings(generated_data))
    rng = np.random.default_rng(0)
    flat = {"request_id": test.request_id, "user_id": test.user_id,
            "score": rng.random(len(test)), **test.truth}
    for task in tasks:
        flat[F.label_feature(task)] = test.labels[task]
        flat[f"pred_{task}"] = rng.random(len(test))
    random_result = E.compute_metrics(flat, metadata, ModelConfig())
    random_gauc = random_result["model"]["tasks"]["click"]["gauc_request"]
    gauc = result["model"]["tasks"]["click"]["gauc_request"]
    assert abs(random_gauc - 0.5) < 0.05
    assert gauc > random_gauc + 0.1, (gauc, random_gauc)
    assert result["model"]["ranking"]["ndcg@10"] > random_result["model"]["ranking"]["ndcg@10"]
    assert gauc < result["oracle"]["tasks"]["click"]["gauc_request"] + 0.02

    # the format of trainer.evaluate: the same keys all the way down, the same markdown
    def shape(tree):
        return {k: shape(v) for k, v in tree.items()} if isinstance(tree, dict) else None

    for key in ("counts", "model", "oracle"):
        assert shape(result[key]) == shape(json.loads(json.dumps(random_result[key],
                                                                 default=float))), key
    assert result["counts"] == random_result["counts"]
    assert result["split"] == "test" and result["model_type"] == "classical"
    # metrics.md is trainer.evaluate's table (metrics.json sorts keys, so rows and columns of a
    # table rendered from it may come in another order: compare the per-task rows)
    assert markdown.startswith(f"# {C.title(result)}\n")
    rendered = E.to_markdown(result, C.title(result)).splitlines()
    task_rows = [line for line in rendered
                 if any(line.startswith(f"| {who} | {t} |") for who in ("model", "oracle")
                        for t in tasks)]
    assert len(task_rows) == 2 * len(tasks) and set(task_rows) <= set(markdown.splitlines())
    chosen = result["classical"]["chosen"]
    assert set(chosen) == set(tasks) and set(chosen.values()) <= set(C.LEARNERS)
    for task in tasks:
        scores = result["classical"]["eval_selection"][task]["scores"]
        assert set(scores) == set(C.LEARNERS)
        higher = result["classical"]["eval_selection"][task]["metric"] == "gauc_request"
        assert chosen[task] == C.choose(scores, higher)
    assert M.lift_captured(gauc, result["oracle"]["tasks"]["click"]["gauc_request"]) > 0.3


def test_logistic_regression_does_not_depend_on_the_seed(generated_data):
    prepared = C.prepare(generated_data, split="eval")
    runs = [C.fit_and_evaluate(prepared, model="logreg", seed=seed) for seed in (0, 9)]
    click = [r["model"]["tasks"]["click"]["gauc_request"] for r in runs]
    assert click[0] == click[1] and np.isfinite(click[0])
    assert set(runs[0]["classical"]["chosen"].values()) == {"logreg"}
    assert set(runs[0]["classical"]["eval_selection"]["click"]["scores"]) == {"logreg"}


def test_mlp_learner_beats_random_and_repeats_per_seed(generated_data):
    prepared = C.prepare(generated_data, split="eval")
    first, again, other = (C.fit_and_evaluate(prepared, model="mlp", seed=seed)
                           for seed in (0, 0, 4))
    click = [r["model"]["tasks"]["click"]["gauc_request"] for r in (first, again, other)]
    assert click[0] == click[1] and click[0] != click[2]
    assert min(click) > 0.6, click
    assert set(first["classical"]["chosen"].values()) == {"mlp"}
    regression = first["model"].get("regression", {})
    for task, figures in regression.items():  # watch time: a squared-loss net, clipped at 0
        assert figures["mean_prediction"] >= 0, task


def test_feature_groups_can_be_dropped():
    every = C.feature_columns(F.DEFAULT_TASKS)
    kept = C.feature_columns(F.DEFAULT_TASKS, ["history_similarity", "train_rates"])
    assert {c.group for c in kept} == set(C.FEATURE_GROUPS) - {"history_similarity",
                                                                 "train_rates"}
    assert {c.name for c in every} - {c.name for c in kept} == {
        c.name for c in every if c.group in ("history_similarity", "train_rates")}
    with pytest.raises(ValueError, match="unknown feature groups"):
        C.feature_columns(F.DEFAULT_TASKS, ["history_count"])
    with pytest.raises(ValueError, match="nothing is left"):
        C.feature_columns(F.DEFAULT_TASKS, C.FEATURE_GROUPS)


def test_cli_help_is_fast_and_errors_are_clear(tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "trainer.classical",
                           "--help"], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: python -m trainer.classical ")
    for option in ("--data", "--output", "--model", "--seed", "logreg", "gbdt", "mlp", "best"):
        assert option in proc.stdout
    modules = imported_modules(proc.stderr)
    assert "argparse" in modules and "common" in modules  # the trace covers the entry point
    assert not {m.split(".")[0] for m in modules} & {"tensorflow", "sklearn"}

    assert C.main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "e")]) == 2
    assert "python -m preprocessing" in capsys.readouterr().err
    assert C.main(["--data", str(tmp_path), "--output", str(tmp_path / "e"),
                   "--drop-features", "history_count"]) == 2
    assert "unknown feature groups" in capsys.readouterr().err
