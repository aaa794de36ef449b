"""`python -m trainer.evaluate` and `python -m trainer.report` as real command lines on the tiny
dataset: metrics.json/metrics.md with the oracle row; a tuned QIN + GBDT comparison table, PNG
and per-layout summary."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=150):
    run = subprocess.run([sys.executable, "-m"] + list(args), cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_help_explains_every_cli():
    for module, words in (("trainer.task", ("--data", "--model-dir", "--mixed-precision",
                                            "AIP_MODEL_DIR", "--early-stopping-patience")),
                          ("trainer.evaluate", ("--split", "--output", "oracle")),
                          ("trainer.report", ("--presets", "report.png", "oracle"))):
        out = _run(module, "--help", timeout=60).stdout
        for word in words:
            assert word in out, (module, word)


def test_evaluate_writes_metrics_with_oracle_row(tiny_dataset, tmp_path):
    from common import features as F
    from trainer import metrics as M

    model_dir, out_dir = tmp_path / "m", tmp_path / "e"
    _run("trainer.task", "--data", tiny_dataset, "--model-dir", str(model_dir), "--model", "dnn",
         "--epochs", "1", "--batch-size", "16")
    _run("trainer.evaluate", "--data", tiny_dataset, "--model-dir", str(model_dir),
         "--split", "test", "--output", str(out_dir))
    result = json.loads((out_dir / "metrics.json").read_text())
    markdown = (out_dir / "metrics.md").read_text()
    assert "| oracle | click |" in markdown and "| model | click |" in markdown
    assert "ndcg@5" in markdown and "mrr" in markdown and "hit@10" in markdown

    # every real candidate of the test split, and nothing else, was evaluated
    import tensorflow as tf

    metadata = F.DatasetMetadata.load(tiny_dataset)
    files = tf.io.gfile.glob(F.tfrecord_pattern(tiny_dataset, "test"))
    labels, probs, groups = [], [], []
    for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
        ex = F.parse_examples(tf.reshape(record, [1]), metadata)
        n = int(ex[F.NUM_CANDIDATES][0])
        labels += ex[F.label_feature("click")][0, :n].numpy().tolist()
        probs += ex[F.true_prob_feature("click")][0, :n].numpy().tolist()
        groups += [ex[F.REQUEST_ID][0].numpy()] * n
    assert result["counts"]["candidates"] == len(labels)
    assert result["counts"]["requests"] == len(set(groups))
    # the oracle row is the true probabilities, checked against the metrics module directly
    oracle = result["oracle"]["tasks"]["click"]
    assert oracle["auc"] == pytest.approx(M.auc(labels, probs), rel=1e-9)
    assert oracle["gauc_request"] == pytest.approx(M.grouped_auc(labels, probs, groups).value,
                                                 rel=1e-9)
    assert oracle["logloss"] == pytest.approx(M.log_loss(labels, probs), rel=1e-9)
    model = result["model"]["tasks"]["click"]
    for key in ("auc", "logloss", "gauc_request", "gauc_user"):
        assert math.isfinite(model[key])
    assert model["positives"] == int(np.sum(np.array(labels) > 0.5))
    for block in ("ranking", "ranking_graded"):
        for key in ("ndcg@5", "ndcg@10", "mrr", "hit@1", "hit@5", "hit@10"):
            assert 0.0 <= result["model"][block][key] <= 1.0


def test_evaluate_fails_clearly_without_a_trained_model(tiny_dataset, tmp_path):
    run = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--data", tiny_dataset,
                          "--model-dir", str(tmp_path / "none"), "--output", str(tmp_path / "e")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "model_config.json" in run.stderr


def test_compute_metrics_with_watch_time_and_truth():
    """Binary tasks get AUC and ECE; watch time gets regression metrics and is left out of
    graded relevance; clicks@10 / watch time@10 follow the score, on labels and on truth."""
    from common import features as F
    from trainer import config as C
    from trainer import evaluate as E
    from trainer import metrics as M

    rng = np.random.default_rng(0)
    n, per = 600, 15
    groups = np.repeat(np.arange(n // per), per).astype(str).astype(object)
    flat = {"request_id": groups, "user_id": groups}
    p = rng.beta(1.0, 4.0, n)
    for task, prob in zip(F.DEFAULT_TASKS, (p, p * 0.5, p * 0.2)):
        flat[F.label_feature(task)] = (rng.random(n) < prob).astype(np.float32)
        flat[F.true_prob_feature(task)] = prob
        flat[f"pred_{task}"] = np.clip(prob * 1.1, 0, 1)
    expected_watch = p * rng.uniform(10, 60, n)
    flat[F.label_feature(F.WATCH_TIME)] = flat["label_click"] * expected_watch / np.maximum(p, 1e-3)
    flat[F.true_prob_feature(F.WATCH_TIME)] = expected_watch
    flat[f"pred_{F.WATCH_TIME}"] = expected_watch * 0.9
    flat["score"] = flat["pred_click"] * flat[f"pred_{F.WATCH_TIME}"] ** 0.3
    metadata = F.DatasetMetadata(tasks=F.WATCH_TIME_TASKS, has_true_probabilities=True)
    weights = {"click": 1.0, F.WATCH_TIME: 0.3}
    result = E.compute_metrics(flat, metadata, C.preset("dnn"), weights)
    model = result["model"]
    assert set(model["tasks"]) == set(F.DEFAULT_TASKS)  # no AUC of seconds
    assert model["tasks"]["click"]["ece"] == pytest.approx(
        M.expected_calibration_error(flat["label_click"], flat["pred_click"]))
    watch = model["regression"][F.WATCH_TIME]
    assert watch["mean_prediction"] == pytest.approx(0.9 * expected_watch.mean())
    assert watch["correlation_with_truth"] == pytest.approx(1.0)
    assert model["ranking_graded"]["relevance"] == "click+long_view+like"
    assert model["objectives"]["oracle_watch_time@10"] == pytest.approx(
        M.top_k_mean_sum(expected_watch, flat["score"], groups, 10))
    assert model["objectives"]["clicks@10"] == pytest.approx(
        M.top_k_mean_sum(flat["label_click"], flat["score"], groups, 10))
    # the oracle ranks its true values with the same (tuned) weights: the model's ranking
    # here is the oracle's exactly (predictions are scaled truths)
    assert result["oracle"]["objectives"]["oracle_watch_time@10"] == pytest.approx(
        model["objectives"]["oracle_watch_time@10"])
    assert "| model | watch_time |" in E.to_markdown(result)


def test_objectives_cli_calibrates_tunes_and_stores_with_the_model(tmp_path):
    """`trainer.objectives fit` on a trained tiny model with watch time: post_training.json
    is written and the reloaded model serves exactly the calibrated heads and tuned score;
    the maps are monotone (probabilities inside (0, 1), watch time in seconds); `summarize`
    writes docs-shaped objectives.json."""
    from common import features as F
    from tests.tiny_dataset import write_tiny_dataset
    from trainer import post_training

    data = write_tiny_dataset(str(tmp_path / "data"), requests_per_split=(64, 48, 48),
                              tasks=F.WATCH_TIME_TASKS)
    model_dir, out = tmp_path / "m", tmp_path / "o"
    _run("trainer.task", "--data", data, "--model-dir", str(model_dir), "--model", "dnn",
         "--epochs", "1", "--batch-size", "16")
    _run("trainer.objectives", "fit", "--data", data, "--model-dir", str(model_dir),
         "--output", str(out), timeout=300)
    run = json.loads((out / "objectives_run.json").read_text())
    saved = post_training.load(str(model_dir))
    assert set(saved["calibration"]) == set(F.WATCH_TIME_TASKS)
    assert saved["fusion"]["weights"] == run["fusion"]["weights"]
    assert run["in_model_max_relative_gap"] < 1e-4
    click = run["calibration"]["click"]
    assert click["method"] in ("isotonic", "platt")
    assert set(click["held_out_error_by_method"]) == {"isotonic", "platt"}
    for task, knots in saved["calibration"].items():  # monotone maps; seconds for watch time
        assert np.all(np.diff(knots["x"]) >= 0) and np.all(np.diff(knots["y"]) >= 0)
        if task == F.WATCH_TIME:
            assert knots["method"] == "isotonic" and max(knots["y"]) > 1.0
        else:
            assert 0.0 < min(knots["y"]) and max(knots["y"]) < 1.0
    for key in ("test_labels", "test_oracle"):
        assert set(run["fusion"][key]) >= {"clicks_change", "watch_time_gain", "curve"}
    assert (out / "reliability.png").stat().st_size > 0 and (out / "tradeoff.png").exists()
    docs = tmp_path / "docs"
    _run("trainer.objectives", "summarize", "--runs", str(out), str(out), "--output",
         str(docs), timeout=60)
    summary = json.loads((docs / "objectives.json").read_text())
    assert summary["calibration"]["click"]["ece_after"] == pytest.approx(click["ece_after"])
    assert summary["std"]["click"]["ece_after"] == 0.0  # the same run twice
    fusion = summary["fusion"]
    assert fusion["oracle_watch_time@10_gain"] == pytest.approx(
        run["fusion"]["test_oracle"]["watch_time_gain"])
    assert "oracle_clicks@10_change" in fusion and fusion["objective"]
    assert (docs / "objectives_tradeoff.png").exists()


def _seed_rows(model, gauc_by_seed):
    return [{"model": model, "task": "click", "seed": seed, "auc": g, "gauc_request": g,
             "gauc_user": g, "logloss": 0.4, "ndcg@10": 0.6, "mrr": 0.6, "best_epoch": 3,
             "epochs": 3, "stopped_early": False, "eval_gauc_per_epoch": [g - 0.02, g - 0.01, g]}
            for seed, g in gauc_by_seed.items()]


def _report(per_model):
    from trainer import report as R

    oracle = {"auc": 0.81, "gauc_request": 0.81, "gauc_user": 0.81, "logloss": 0.38,
              "ndcg@10": 0.75, "mrr": 0.77}
    rows = [R.aggregate(model, _seed_rows(model, values), oracle)
            for model, values in per_model.items()]
    for row in rows:
        row["reliability"] = {"count": [10, 20], "mean_prediction": [0.1, 0.3],
                              "mean_label": [0.12, 0.26]}
    return {"data": "data", "split": "test", "seeds": sorted(next(iter(per_model.values()))),
            "epochs": 3, "early_stopping_patience": 0, "batch_size": 64,
            "learning_rate": 0.001, "task": "click", "rows": rows, "oracle": oracle,
            "verdict": R.verdict(rows)}


def test_verdict_claims_a_winner_only_from_three_seeds_paired():
    from trainer import report as R

    one_seed = R.verdict(_report({"qin": {0: 0.74}, "dnn": {0: 0.70}})["rows"])
    assert one_seed.startswith("No winner is claimed: 1 seed(s)") and "dnn +0.0400" in one_seed
    two_seeds = R.verdict(_report({"qin": {0: 0.74, 1: 0.75}, "dnn": {0: 0.70, 1: 0.71}})["rows"])
    assert two_seeds.startswith("No winner is claimed: 2 seed(s)")
    # QIN ahead on every seed by a steady margin: paired test significant
    steady = _report({"qin": {0: 0.740, 1: 0.752, 2: 0.731}, "dnn": {0: 0.730, 1: 0.741, 2: 0.722}})
    assert steady["verdict"].startswith("QIN beats every baseline")
    # the same means, but the per-seed differences disagree in sign: no claim
    noisy = _report({"qin": {0: 0.760, 1: 0.722, 2: 0.741}, "dnn": {0: 0.720, 1: 0.741, 2: 0.732}})
    assert noisy["verdict"].startswith("QIN beats no baseline") and "ties with" in noisy["verdict"]
    # paired, not pooled: seeds shift both models together, QIN always ahead by ~0.002
    shifted = _report({"qin": {0: 0.702, 1: 0.752, 2: 0.8015},
                       "dnn": {0: 0.700, 1: 0.750, 2: 0.800}})
    assert shifted["verdict"].startswith("QIN beats every baseline")


def test_paired_t_test_p_value_matches_the_closed_form_for_two_degrees_of_freedom():
    from trainer import report as R

    result = R.paired_comparison([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    t = 2.0 / (1.0 / math.sqrt(3.0))
    assert result["t"] == pytest.approx(t)
    # Student t with 2 degrees of freedom: two-sided p = 1 - t / sqrt(2 + t^2)
    assert result["p_value"] == pytest.approx(1.0 - t / math.sqrt(2.0 + t * t), rel=1e-9)


def test_table_and_figure_show_spread_over_seeds_and_undertrained_models(tmp_path):
    from trainer import report as R

    report = _report({"qin": {0: 0.740, 1: 0.752, 2: 0.731}, "dnn": {0: 0.730, 1: 0.741, 2: 0.722}})
    qin = report["rows"][0]
    assert qin["gauc_request"] == pytest.approx((0.740 + 0.752 + 0.731) / 3)
    assert qin["gauc_request_std"] == pytest.approx(np.std([0.740, 0.752, 0.731], ddof=1))
    table = R.to_markdown(report)
    assert f"{qin['gauc_request']:.4f} ± {qin['gauc_request_std']:.4f}" in table
    assert "Still improving when the budget ran out" in table and "qin, dnn" in table
    assert "3 seed(s) (0, 1, 2)" in table
    path = tmp_path / "report.png"
    R.plot(report, str(path))
    import matplotlib.image

    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert width > 2.5 * height  # three panels side by side: bars, learning curves, reliability


def test_ablation_costs_are_full_qin_minus_each_ablation_paired_per_seed():
    from trainer import report as R

    report = _report({"qin": {0: 0.760, 1: 0.750, 2: 0.770},
                      "qin_no_stage1": {0: 0.750, 1: 0.745, 2: 0.755},
                      "dnn": {0: 0.700, 1: 0.700, 2: 0.700}})
    text = R.ablation_costs(report["rows"])
    differences = [0.010, 0.005, 0.015]
    assert f"qin_no_stage1 {np.mean(differences):+.4f} ± {np.std(differences, ddof=1):.4f}" in text
    assert "3 seed(s)" in text and "dnn" not in text  # baselines are not ablations
    assert R.ablation_costs(_report({"qin": {0: 0.7}, "dnn": {0: 0.6}})["rows"]) is None


def test_tuning_trials_are_the_same_draws_for_every_preset_on_top_of_the_given_config():
    from trainer import report as R

    assert R.trial_settings(0, 0.002, None) == {"learning_rate": 0.002, "config": None}
    assert R.trial_settings(0, 0.002, '{"k1": 50}') == {"learning_rate": 0.002,
                                                         "config": '{"k1": 50}'}
    draws = [R.trial_settings(t, 0.002, '{"k1": 50}') for t in range(1, 6)]
    assert draws == [R.trial_settings(t, 0.002, '{"k1": 50}') for t in range(1, 6)]
    for draw in draws:
        assert draw["learning_rate"] in R.SEARCH_SPACE["learning_rate"]
        config = json.loads(draw["config"])
        assert config.pop("k1") == 50
        assert set(config) == set(R.SEARCH_SPACE) - {"learning_rate"}
        assert all(config[key] in R.SEARCH_SPACE[key] for key in config)
    assert len({d["config"] for d in draws}) > 1  # the trials do differ


def test_report_tunes_adds_the_classical_baseline_and_writes_table_chart_and_summary(
        tiny_dataset, tmp_path):
    """One report run: QIN with two tuning trials and the GBDT baseline; the table, the JSON,
    the figure, every run's evaluation and the per-layout summary agree."""
    from trainer import report as R

    out, summary_path = tmp_path / "report", tmp_path / "summary.json"
    kept = {"oracle": 0.8, "nonpersonalized_oracle": 0.7, "models": {}}
    summary_path.write_text(json.dumps({"other_layout": kept}))
    run = _run("trainer.report", "--data", tiny_dataset, "--output", str(out),
               "--presets", "qin,gbdt", "--epochs", "1", "--batch-size", "16",
               "--tuning-trials", "2", "--cold-start-rate", "0", "--layout", "tiny",
               "--summary", str(summary_path), timeout=500)
    report = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["qin", "gbdt"]

    # both trials trained with seed 0; the better eval GAUC is chosen; trial 1 is the draw
    tuning = report["tuning"]["presets"]["qin"]
    scores = [json.loads((out / "models" / "qin" / f"trial_{t}" / "seed_0" /
                          "training_summary.json").read_text())["best_eval_gauc"] for t in (0, 1)]
    assert [t["eval_gauc"] for t in tuning["trials"]] == pytest.approx(scores)
    assert tuning["chosen"]["trial"] == int(np.argmax(scores))
    drawn = json.loads(R.trial_settings(1, 1e-3, None)["config"])
    trained = json.loads((out / "models" / "qin" / "trial_1" / "seed_0" /
                          "model_config.json").read_text())
    assert {k: trained[k] for k in drawn} == drawn
    assert "gbdt" not in report["tuning"]["presets"]  # the classical baseline takes no trials

    qin, gbdt = report["rows"]
    chosen_eval = out / "eval" / "qin" / f"trial_{tuning['chosen']['trial']}" / "seed_0"
    assert qin["gauc_request"] == json.loads((chosen_eval / "metrics.json").read_text())[
        "model"]["tasks"]["click"]["gauc_request"]
    gbdt_metrics = json.loads((out / "eval" / "gbdt" / "seed_0" / "metrics.json").read_text())
    assert gbdt_metrics["classical"]  # written by trainer.classical
    assert gbdt["gauc_request"] == gbdt_metrics["model"]["tasks"]["click"]["gauc_request"]
    assert report["seeds"] == [0]
    oracle = report["oracle"]
    for row in report["rows"]:
        expected = (row["gauc_request"] - 0.5) / (oracle["gauc_request"] - 0.5)
        assert math.isclose(row["gauc_request_lift_captured"], expected)
        assert row["auc_std"] is None  # one seed: no spread to show
    # reliability bins of the chosen run's predictions: every test candidate in one bin
    bins = json.loads((chosen_eval / "reliability.json").read_text())["click"]
    assert sum(bins["count"]) == json.loads((chosen_eval / "metrics.json").read_text())[
        "counts"]["candidates"]
    assert qin["reliability"] == bins
    (seed_row,) = qin["per_seed"]
    assert len(seed_row["eval_gauc_per_epoch"]) == seed_row["epochs"] == 1
    table = (out / "report.md").read_text()
    assert "| qin |" in table and "| gbdt |" in table and "oracle" in table
    assert "GAUC lift captured" in table and "click GAUC by request" in table
    assert "Tuning: 2 trials" in table
    assert report["verdict"] in table and "gbdt" in report["verdict"]
    assert report["verdict"].startswith("No winner is claimed: 1 seed(s)")
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| qin |" in run.stdout

    summary = json.loads(summary_path.read_text())
    assert summary["other_layout"] == kept  # other layouts are kept
    tiny = summary["tiny"]
    assert tiny["oracle"] == pytest.approx(report["oracle"]["gauc_request"])
    assert tiny["nonpersonalized_oracle"] is None  # no --truth given
    for row in report["rows"]:
        entry = tiny["models"][row["model"]]
        assert entry["gauc_mean"] == pytest.approx(row["gauc_request"])
        assert entry["gauc_std"] is None and entry["seeds"] == 1
        assert entry["per_seed"] == {"0": pytest.approx(row["gauc_request"])}


def test_a_failed_tuning_trial_is_left_out_and_all_failed_is_an_error(tmp_path, monkeypatch):
    import types

    from trainer import report as R

    args = types.SimpleNamespace(tuning_trials=3, learning_rate=1e-3, config=None,
                                 output=str(tmp_path))
    scores = {0: 0.71, 2: 0.73}

    def fake_run(args, preset, seed, trial, settings):
        if trial not in scores:
            raise RuntimeError(f"trial {trial} refused")
        dirs = R.run_directories(args.output, preset, seed, trial)
        os.makedirs(dirs["model"], exist_ok=True)
        with open(os.path.join(dirs["model"], "training_summary.json"), "w") as f:
            json.dump({"best_eval_gauc": scores[trial]}, f)
        return dirs

    monkeypatch.setattr(R, "_train_and_evaluate", fake_run)
    tuning = R._tune(args, "qin", 0, [0], 3)
    assert tuning["chosen"]["trial"] == 2
    assert [t.get("error") for t in tuning["trials"]] == [None, "trial 1 refused", None]
    scores.clear()
    with pytest.raises(RuntimeError, match="every tuning trial of qin failed"):
        R._tune(args, "qin", 0, [0], 3)


def test_layout_summary_takes_the_oracle_from_the_side_file_when_the_data_has_none():
    from trainer import report as R

    report = _report({"qin": {0: 0.74, 1: 0.75}, "dnn": {0: 0.70, 1: 0.72}})
    entry = R.layout_summary(report, 0.76)
    assert entry["oracle"] == 0.81 and entry["nonpersonalized_oracle"] == 0.76
    assert entry["models"]["dnn"] == {"gauc_mean": pytest.approx(0.71),
                                      "gauc_std": pytest.approx(np.std([0.70, 0.72], ddof=1)),
                                      "seeds": 2, "per_seed": {"0": 0.70, "1": 0.72}}
    report["oracle"] = None  # a public layout: no true probabilities in its TFRecords
    assert R.layout_summary(report, 0.76, truth_oracle=0.8)["oracle"] == 0.8
    assert R.layout_summary(report, None)["oracle"] is None
