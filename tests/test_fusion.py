"""Score fusion tuned for an objective (trainer/fusion.py): the NumPy score equals the product
form, the choice honours the click floor, and tuning finds the trade-off planted in toy lists."""
import numpy as np
import pytest

from common import features as F
from trainer import fusion
from trainer import metrics as M

TASKS = ("click", "long_view", "like", F.WATCH_TIME)


def test_fused_score_is_the_weighted_product():
    outputs = {"click": np.array([0.2, 0.5]), "long_view": np.array([0.1, 0.3]),
               "like": np.array([0.05, 0.0]), F.WATCH_TIME: np.array([4.0, 9.0])}
    weights = {"click": 1.0, "long_view": 0.5, "like": 0.0, F.WATCH_TIME: 0.3}
    expected = outputs["click"] * outputs["long_view"] ** 0.5 * outputs[F.WATCH_TIME] ** 0.3
    np.testing.assert_allclose(fusion.fused_score(outputs, weights), expected, rtol=1e-12)
    np.testing.assert_allclose(fusion.fused_score(outputs, {"click": 0.0}), [1.0, 1.0])


def test_choose_respects_the_click_floor():
    ref = fusion.Point({"click": 1.0}, clicks=2.0, watch_time=50.0)
    points = [ref, fusion.Point({"a": 1}, 1.985, 52.0), fusion.Point({"a": 2}, 1.97, 60.0),
              fusion.Point({"a": 3}, 2.1, 51.0)]
    assert fusion.choose(points, ref, "watch_time_at_click_floor", 0.01).weights == {"a": 1}
    assert fusion.choose(points, ref, "watch_time_at_click_floor", 0.02).weights == {"a": 2}
    assert fusion.choose(points, ref, "clicks").weights == {"a": 3}
    assert fusion.choose(points, ref, "watch_time").weights == {"a": 2}
    with pytest.raises(ValueError, match="objective"):
        fusion.choose(points, ref, "revenue")


def test_rules_target_and_margin():
    ref = fusion.Point({"a": 0}, clicks=2.0, watch_time=100.0)
    points = [ref, fusion.Point({"a": 1}, 1.996, 104.0), fusion.Point({"a": 2}, 1.99, 106.0),
              fusion.Point({"a": 3}, 1.985, 112.0), fusion.Point({"a": 4}, 1.981, 115.0)]
    assert fusion.choose_by_rule(points, ref, "floor", 0.01).weights == {"a": 4}
    # the least click cost reaching +5 % watch time, then +10 %
    assert fusion.choose_by_rule(points, ref, "target", 0.01, 0.05).weights == {"a": 2}
    assert fusion.choose_by_rule(points, ref, "target", 0.01, 0.10).weights == {"a": 3}
    # unreachable target: the floor's choice
    assert fusion.choose_by_rule(points, ref, "target", 0.01, 0.50).weights == {"a": 4}
    # click changes counted twice: -0.5 % -> -1 % still passes, -0.75 % -> -1.5 % does not
    assert fusion.choose_by_rule(points, ref, "margin", 0.01, click_scale=2.0).weights == \
        {"a": 2}
    # a scale below 1 never loosens the floor
    assert fusion.choose_by_rule(points, ref, "margin", 0.01, click_scale=0.2).weights == \
        {"a": 4}
    with pytest.raises(ValueError, match="rule"):
        fusion.choose_by_rule(points, ref, "luck")


def test_change_scale_is_the_slope_of_observed_on_predicted_changes():
    pref, oref = fusion.Point({}, 2.0, 10.0), fusion.Point({}, 1.0, 20.0)
    predicted = [fusion.Point({}, 2.0 * (1 - d), 10.0 * (1 + 3 * d))
                 for d in (0.005, 0.01, 0.02, 0.2)]
    observed = [fusion.Point({}, 1.0 * (1 - 2 * d), 20.0 * (1 + 1.5 * d))
                for d in (0.005, 0.01, 0.02, 0.2)]
    got = fusion.change_scale(predicted, pref, observed, oref, max_predicted_loss=0.05)
    assert got["clicks"] == pytest.approx(2.0) and got["watch_time"] == pytest.approx(0.5)
    assert got["clicks_points"] == 3  # the 20 % loss is beyond the band


def _toy_lists(requests=400, n=16, seed=0):
    """Lists where watch time = p_click * duration, durations independent of p_click."""
    rng = np.random.default_rng(seed)
    p = rng.beta(1.0, 4.0, (requests, n))
    duration = rng.lognormal(np.log(30.0), 0.8, (requests, n))
    groups = np.repeat(np.arange(requests), n)
    outputs = {"click": p.ravel(), "long_view": 0.5 * p.ravel(), "like": 0.1 * p.ravel(),
               F.WATCH_TIME: (p * duration).ravel()}
    return outputs, groups


def test_tune_trades_a_little_click_for_more_watch_time_on_the_truth():
    outputs, groups = _toy_lists()
    chosen, reference, points = fusion.tune(outputs, outputs["click"], outputs[F.WATCH_TIME],
                                            groups, TASKS, k=5)
    assert len(points) == len(fusion.candidate_weights(TASKS))
    assert chosen.clicks >= 0.99 * reference.clicks
    assert chosen.watch_time > 1.02 * reference.watch_time  # a real gain exists and is taken
    assert chosen.weights[F.WATCH_TIME] > 0
    # the reference is ranking by p(click): the most clicks of any ranking on the truth
    assert reference.clicks >= max(p.clicks for p in points) - 1e-12
    np.testing.assert_allclose(
        reference.clicks, M.top_k_mean_sum(outputs["click"], outputs["click"], groups, 5))
    with pytest.raises(ValueError, match="watch_time"):
        fusion.tune(outputs, outputs["click"], outputs[F.WATCH_TIME], groups, ("click",))


# ---- the ranker on retrieved candidates (trainer.objectives retrieved) -------------------------
def test_extended_oracle_equals_the_generator_on_its_shown_candidates(tmp_path):
    """The truth of any (request, item) pair (trainer/retrieval_oracle.py) reproduces what the
    generator stored for the candidates it showed: p_click, p_long_view, p_like and the
    expected play time (float32 there; the stored item quality is float32 too)."""
    import pyarrow.parquet as pq

    from preprocessing import synthetic as syn
    from trainer.retrieval_oracle import ClickOracle

    raw = str(tmp_path / "raw")
    syn.generate(raw, users=30, items=400, requests=150, seed=4, embedding_dim=8,
                 mean_history=60)
    vocabulary = sorted(pq.read_table(f"{raw}/items.parquet", columns=["item_id"])
                        .column("item_id").to_pylist())
    index = {item: k for k, item in enumerate(vocabulary, start=1)}
    requests = pq.read_table(f"{raw}/requests.parquet").to_pydict()
    oracle = ClickOracle.from_raw(raw, vocabulary)
    width = max(len(c) for c in requests["candidate_item_ids"])
    items = np.zeros((len(requests["request_id"]), width), np.int64)
    for r, cands in enumerate(requests["candidate_item_ids"]):
        items[r, :len(cands)] = [index[c] for c in cands]
    truth = oracle.truth(requests["request_id"], items)
    every = oracle.click_probability(requests["request_id"])
    stored = {"click": "p_click", "long_view": "p_long_view", "like": "p_like",
              F.WATCH_TIME: "expected_play_time_s"}
    checked = 0
    for r, cands in enumerate(requests["candidate_item_ids"]):
        n = len(cands)
        for task, column in stored.items():
            np.testing.assert_allclose(truth[task][r, :n], requests[column][r], rtol=2e-6,
                                       atol=1e-6, err_msg=f"{task}, request {r}")
            assert np.all(truth[task][r, n:] == 0.0)  # padding (index 0) is worth nothing
        np.testing.assert_allclose(every[r, items[r, :n]], truth["click"][r, :n], rtol=1e-12)
        checked += n
    assert checked > 1000
    assert np.mean(np.concatenate(requests["expected_play_time_s"])) > 1.0  # not trivially 0


def test_retrieved_list_tuning_matches_a_hand_computation():
    """Two requests of three retrieved candidates, K = 1. Request 0: the long item 1 passes the
    clicky item 0 only for a >= 0.1 (0.4 * 10^a > 0.5), at 20 % of its clicks; request 1: item
    1 passes item 0 for any a >= 0.01 (0.299 * 30^a > 0.3), at 0.3 % of its clicks. With a 1 %
    click floor on the predictions the choice is the first of those, a = 0.01: only request 1
    changes hands."""
    from trainer.objectives import tune_on_lists

    tasks = ("click", F.WATCH_TIME)
    pred = {"click": np.array([[0.5, 0.4, 0.1], [0.3, 0.299, 0.2]]),
            F.WATCH_TIME: np.array([[1.0, 10.0, 1.0], [1.0, 30.0, 1.0]])}
    truth = {"click": np.array([[0.5, 0.4, 0.1], [0.3, 0.299, 0.2]]),
             F.WATCH_TIME: np.array([[2.0, 20.0, 1.0], [1.0, 30.0, 1.0]])}
    r = tune_on_lists(pred, pred, truth, tasks, "watch_time_at_click_floor", 0.01, k=1,
                      truth_eval=truth, deployed={"click": 1.0, F.WATCH_TIME: 0.1})
    assert r["weights"] == {"click": 1.0, F.WATCH_TIME: 0.01}
    assert r["candidates"] == 3 and r["requests"] == {"eval": 2, "test": 2}
    # chosen on the predictions: clicks 0.5 + 0.299 against 0.5 + 0.3 (over 2), watch time
    # (1 + 30) / 2 against (1 + 1) / 2
    assert r["eval_predicted"]["clicks_change"] == pytest.approx(0.799 / 0.8 - 1)
    assert r["eval_predicted"]["watch_time_gain"] == pytest.approx(15.5 / 1.0 - 1)
    # judged by the truth: clicks 0.3995 vs 0.4, watch time (2 + 30) / 2 vs (2 + 1) / 2
    test = r["test_oracle"]
    assert test["reference"]["clicks"] == pytest.approx(0.4)
    assert test["reference"]["watch_time"] == pytest.approx(1.5)
    assert test["clicks"] == pytest.approx(0.3995)
    assert test["watch_time_gain"] == pytest.approx(16.0 / 1.5 - 1)
    # the truth ranks the same way here: its ceiling is the same point
    assert r["truth_ceiling"]["weights"] == {"click": 1.0, F.WATCH_TIME: 0.01}
    assert r["truth_ceiling"]["watch_time_gain"] == pytest.approx(16.0 / 1.5 - 1)
    # ranking by true watch time alone: item 1 twice, clicks (0.4 + 0.299) / 2, watch time 25
    assert r["truth_by_expected_watch_time"]["clicks_change"] == pytest.approx(0.3495 / 0.4 - 1)
    assert r["truth_by_expected_watch_time"]["watch_time_gain"] == pytest.approx(25 / 1.5 - 1)
    # the deployed a = 0.1 also moves request 0: clicks 0.3495, watch time (20 + 30) / 2
    assert r["deployed_weights"]["clicks_change"] == pytest.approx(0.3495 / 0.4 - 1)
    assert r["deployed_weights"]["watch_time_gain"] == pytest.approx(25 / 1.5 - 1)
    assert r["model_chosen_on_eval_truth"]["weights"] == r["weights"]
    assert r["model_click_ranking_share_of_truth"] == {"clicks": 1.0, "watch_time": 1.0}
    # every rule's choice is kept; the default (target) is the run's
    assert r["rule"] == "target" and set(r["rules"]) == set(fusion.RULES)
    assert r["rules"]["floor"]["weights"] == r["weights"]
    assert r["rules"]["floor"]["test_oracle"]["clicks"] == pytest.approx(0.3995)
    # target +5 %: reached by a = 0.01 already, the least click cost -> the same point
    assert r["rules"]["target"]["weights"] == r["weights"]
    # a margin that counts the 0.125 % predicted click loss 10 times breaks the 1 % floor
    m = tune_on_lists(pred, pred, truth, tasks, "watch_time_at_click_floor", 0.01, k=1,
                      rule="margin", click_scale=10.0)
    assert m["rule"] == "margin" and m["weights"] == {"click": 1.0, F.WATCH_TIME: 0.0}
    assert m["test_oracle"]["clicks_change"] == 0.0 and m["click_scale"] == 10.0


def test_retrieved_candidates_are_the_clients_content_cosine_top_n():
    from trainer.objectives import retrieve_candidates

    class Table:
        def items(self):
            return {"item_id": ["a", "b", "c", "d"], "item_index": np.array([1, 2, 3, 4]),
                    "author_index": np.array([7, 8, 9, 7]),
                    "category": np.array([[1, 2], [1, 3], [2, 4], [2, 5]]),
                    "embedding": np.array([[1, 0], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)}

    got = retrieve_candidates(Table(), np.array([[1.0, 0.0], [0.0, 2.0]], np.float32), 2)
    # query 0 = x: a (cos 1), b (0.6); query 1 = y: c (1), b (0.8)
    assert got["item_index"].tolist() == [[1, 2], [3, 2]]
    assert got["author_index"].tolist() == [[7, 8], [9, 8]]
    assert got["category"].tolist() == [[[1, 2], [1, 3]], [[2, 4], [1, 3]]]
    np.testing.assert_allclose(got["cosine"], [[1.0, 0.6], [1.0, 0.8]], rtol=1e-6)


def test_retrieved_cli_end_to_end_on_generated_data(tmp_path):
    """generate -> preprocess -> train a tiny model -> fit -> `retrieved`: the item table
    gives the logged candidates exactly the examples' authors and categories, the model scores
    a batch's logged candidates identically through `with_candidates`, and the run judges the
    retrieved lists of every test request with the truth."""
    import json
    import os
    import subprocess
    import sys

    from preprocessing import pipeline as P
    from preprocessing import synthetic as syn
    from trainer import data as data_lib
    from trainer import evaluate as E
    from trainer import model as model_lib
    from trainer import objectives as O

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raw, data = str(tmp_path / "raw"), str(tmp_path / "data")
    syn.generate(raw, users=30, items=400, requests=300, seed=6, embedding_dim=8,
                 mean_history=60)
    P.run(["--input-format", "canonical", "--input", raw, "--output", data, "--workers", "1",
           "--no-feature-store"], progress=lambda m: None)
    model_dir, out = str(tmp_path / "m"), str(tmp_path / "o")

    def run(*args):
        result = subprocess.run([sys.executable, "-m"] + list(args), cwd=root,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run("trainer.task", "--data", data, "--model-dir", model_dir, "--model", "dnn",
        "--epochs", "1", "--batch-size", "16")
    run("trainer.objectives", "fit", "--data", data, "--model-dir", model_dir,
        "--output", str(tmp_path / "fit"))
    run("trainer.objectives", "retrieved", "--data", data, "--model-dir", model_dir, "--raw",
        raw, "--output", out, "--candidates", "30")
    result = json.loads(open(os.path.join(out, O.RETRIEVED_JSON)).read())
    fusion = result["fusion"]
    metadata = F.DatasetMetadata.load(data)
    assert fusion["candidates"] == 30
    assert fusion["requests"]["test"] == data_lib.count_requests(data, "test")
    assert result["calibrated"] and fusion["truth_ceiling"]["clicks_change"] >= -0.01
    assert fusion["truth_ceiling"]["watch_time_gain"] >= 0.0
    # the truth ranks by true p(click) at least as well as the model: it is the best for clicks
    assert fusion["model_click_ranking_share_of_truth"]["clicks"] <= 1.0 + 1e-12

    table = O.ItemTable(data, raw)
    model = model_lib.load_trained_model(model_dir, data)
    batch = next(iter(data_lib.make_dataset(data, "test", metadata, 8, for_training=False)))
    table.check(batch)
    items = batch[F.CANDIDATE_ITEM].numpy()
    logged = {"item_index": items, "author_index": table.author[items],
              "category": table.category[items]}
    infer = E.make_infer_fn(model, list(metadata.tasks))
    direct, rebuilt = infer(batch), infer(O.with_candidates(batch, logged, metadata))
    mask = F.candidate_mask(batch).numpy()
    for task in metadata.tasks:  # num_candidates differs (padding scored too), real rows equal
        np.testing.assert_allclose(rebuilt[task].numpy()[mask], direct[task].numpy()[mask],
                                   rtol=1e-5)


def test_summarize_puts_the_retrieved_fusion_first(tmp_path):
    import json

    from trainer import objectives as O

    def point(g, c):
        return {"watch_time_gain": g, "clicks_change": c, "weights": {"click": 1.0}}

    fits, rets = [], []
    for i, (g, c) in enumerate(((0.06, -0.004), (0.08, -0.006))):
        fit, ret = tmp_path / f"o{i}", tmp_path / f"r{i}"
        fit.mkdir()
        ret.mkdir()
        cal = {"ece_before": 0.02, "ece_after": 0.01, "error": "ece", "method": "platt"}
        (fit / O.RUN_JSON).write_text(json.dumps({
            "data": f"data{i}", "tasks": ["click"], "calibration": {"click": cal},
            "fusion": {"k": 10, "objective": "logged", "weights": {"click": 1.0},
                       "test_oracle": point(0.01, -0.01)}}))
        (ret / O.RETRIEVED_JSON).write_text(json.dumps({
            "data": f"data{i}", "retrieval": "top 100", "logged_eval_change_scale": {"clicks": 2},
            "fusion": {"k": 10, "objective": "retrieved", "rule": "target",
                       "weights": {"click": 1.0},
                       "test_oracle": dict(point(g, c), curve=[point(0, 0), point(g, c)]),
                       "truth_ceiling": point(0.2, -0.009), "model_best_on_test": point(0.1, -0.01),
                       "rules": {"target": {"weights": {"click": 1.0},
                                            "test_oracle": point(g, c)}}}}))
        fits.append(str(fit))
        rets.append(str(ret))
    summary = O.summarize(fits, str(tmp_path / "docs"), rets)
    assert summary["calibration"]["click"] == {"ece_before": 0.02, "ece_after": 0.01,
                                               "error": "ece", "methods": ["platt", "platt"]}
    assert summary["fusion"]["objective"] == "retrieved"
    assert summary["fusion"]["oracle_watch_time@10_gain"] == pytest.approx(0.07)
    assert summary["fusion"]["oracle_clicks@10_change"] == pytest.approx(-0.005)
    assert summary["fusion"]["rules"]["target"]["oracle_clicks@10_change"] == \
        pytest.approx(-0.005)
    assert summary["fusion_logged"]["oracle_watch_time@10_gain"] == pytest.approx(0.01)
    assert "oracle_clicks@10_change" in summary["std"]["fusion_logged"]
    assert "fusion_logged:" in O.summary_markdown(summary)
    assert (tmp_path / "docs" / O.DOCS_RETRIEVED_TRADEOFF_PNG).stat().st_size > 0
