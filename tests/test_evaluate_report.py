"""`python -m trainer.evaluate` and `python -m trainer.report` as real command lines on the tiny
dataset: metrics.json/metrics.md with the oracle row, and a 2-preset comparison table + PNG."""
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


def test_report_on_two_presets_writes_table_json_and_chart(tiny_dataset, tmp_path):
    out = tmp_path / "report"
    run = _run("trainer.report", "--data", tiny_dataset, "--output", str(out),
               "--presets", "qin,dnn", "--epochs", "1", "--batch-size", "16", timeout=240)
    report = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["qin", "dnn"]
    oracle = report["oracle"]
    for row in report["rows"]:
        expected = (row["gauc_request"] - 0.5) / (oracle["gauc_request"] - 0.5)
        assert math.isclose(row["gauc_request_lift_captured"], expected)
        metrics = json.loads((out / "eval" / row["model"] / "metrics.json").read_text())
        assert row["auc"] == metrics["model"]["tasks"]["click"]["auc"]
    table = (out / "report.md").read_text()
    assert "| qin |" in table and "| dnn |" in table and "oracle" in table
    assert "GAUC lift captured" in table and "click GAUC by request" in table
    assert report["verdict"] in table
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| qin |" in run.stdout
