"""The pipeline's release gate (pipelines/release_gate.py): floors on the first run, and a
candidate must not be worse than the latest served version's recorded metrics on the same
split; the export step records a version's metrics beside it."""
import json
import os
import subprocess
import sys

from pipelines import release_gate as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = {"min_click_gauc": 0.55, "min_click_auc": 0.55}


def _metrics(gauc, auc, split="test"):
    """The shape of trainer.evaluate's metrics.json, as far as the gate reads it."""
    return {"split": split, "model": {"tasks": {
        "click": {"gauc_request": gauc, "auc": auc, "logloss": 0.4},
        "like": {"gauc_request": 0.9, "auc": 0.9}}}}


def _serve(model_root, version, metrics=None):
    """A published version folder (saved_model.pb) with its recorded metrics, if any."""
    version_dir = os.path.join(model_root, str(version))
    os.makedirs(version_dir)
    open(os.path.join(version_dir, G.SAVED_MODEL_FILE), "wb").close()
    if metrics is not None:
        G.record(metrics, version_dir)
    return version_dir


def test_first_run_is_judged_by_the_floors_only(tmp_path):
    version, served = G.served_metrics(str(tmp_path / "qin"))
    assert version is None and served is None
    passed = G.decide(_metrics(0.60, 0.61), FLOORS, served, version)
    assert passed["blessed"] and passed["baseline"].startswith("floor only")
    assert [c["against"] for c in passed["checks"]] == ["floor", "floor"]
    failed = G.decide(_metrics(0.54, 0.61), FLOORS, served, version)
    assert not failed["blessed"]
    assert failed["reasons"] == ["click_gauc_request 0.5400 < 0.5500 (floor)"]


def test_a_candidate_worse_than_the_served_version_is_not_blessed(tmp_path):
    root = str(tmp_path / "qin")
    _serve(root, 1, _metrics(0.60, 0.60))
    _serve(root, 2, _metrics(0.70, 0.72))
    os.makedirs(os.path.join(root, ".tmp-export-x"))  # an unfinished export is not served
    os.makedirs(os.path.join(root, "3"))  # nor a numeric folder without a SavedModel yet
    version, served = G.served_metrics(root)
    assert version == 2 and served["model"]["tasks"]["click"]["auc"] == 0.72
    worse = G.decide(_metrics(0.68, 0.73), FLOORS, served, version)
    assert not worse["blessed"]  # above the floors, below version 2 on GAUC
    assert worse["reasons"] == ["click_gauc_request 0.6800 < 0.7000 (version 2)"]
    better = G.decide(_metrics(0.71, 0.73), FLOORS, served, version)
    assert better["blessed"] and better["baseline"] == "served version 2"
    served_checks = [c for c in better["checks"] if c["against"] == "version 2"]
    assert [c["served"] for c in served_checks] == [0.70, 0.72]
    # a required gain over the served version
    assert not G.decide(_metrics(0.71, 0.73), FLOORS, served, version, 0.02)["blessed"]
    # the floors still apply when the served version is weak
    weak = {"min_click_gauc": 0.75, "min_click_auc": 0.55}
    assert not G.decide(_metrics(0.71, 0.73), weak, served, version)["blessed"]


def test_metrics_of_another_split_or_none_recorded(tmp_path):
    root = str(tmp_path / "qin")
    _serve(root, 1, _metrics(0.70, 0.72, split="eval"))
    version, served = G.served_metrics(root)
    decision = G.decide(_metrics(0.90, 0.90), FLOORS, served, version)
    assert not decision["blessed"] and "not comparable" in decision["reasons"][0]
    _serve(root, 2)  # exported by hand: nothing recorded
    version, served = G.served_metrics(root)
    assert (version, served) == (2, None)
    decision = G.decide(_metrics(0.60, 0.60), FLOORS, served, version)
    assert decision["blessed"] and "version 2 has no recorded metrics" in decision["baseline"]


def test_record_and_read_on_a_filesystem_without_rename_semantics_of_the_os():
    root = "ram://release_gate_test/models/qin"
    import tensorflow as tf

    tf.io.gfile.makedirs(root + "/4")
    with tf.io.gfile.GFile(root + "/4/" + G.SAVED_MODEL_FILE, "wb") as f:
        f.write(b"")
    path = G.record(_metrics(0.66, 0.67), root + "/4")
    assert path == root + "/4/assets.extra/metrics.json"
    assert G.served_metrics(root) == (4, _metrics(0.66, 0.67))


def test_cli_record_then_decide(tmp_path):
    root = tmp_path / "models"
    version_dir = _serve(str(root / "qin"), 1)
    candidate = tmp_path / "metrics.json"
    candidate.write_text(json.dumps(_metrics(0.70, 0.70)))
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "pipelines.release_gate", "record", "--metrics",
                    str(candidate), "--version-dir", version_dir], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    assert json.load(open(os.path.join(version_dir, G.SERVED_METRICS_PATH))) == _metrics(0.7, 0.7)
    candidate.write_text(json.dumps(_metrics(0.69, 0.71)))
    run = subprocess.run([sys.executable, "-m", "pipelines.release_gate", "decide",
                          "--metrics", str(candidate), "--model-base-path", str(root),
                          "--output", str(tmp_path / "decision.json")],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    decision = json.loads(run.stdout)
    assert decision == json.load(open(tmp_path / "decision.json"))
    assert not decision["blessed"] and decision["served_version"] == 1
    assert "-> FAIL" in run.stderr and "(version 1)" in run.stderr


def test_nan_never_passes():
    assert not G.decide(_metrics(float("nan"), 0.9), FLOORS)["blessed"]
