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


def _retrieval(pdr, content, split="test"):
    """The shape of trainer.evaluate_retrieval's retrieval_metrics.json, as far as the gate
    reads it."""
    return {"pdr": {"recall@50": 0.1, "recall@200": pdr}, "content": {"recall@200": content},
            "qrcf": {"recall@200": 0.3}, "run": {"split": split, "requests": 100}}


def test_retrieval_check_compares_pdr_with_the_floor_and_the_content_baseline():
    candidate = _metrics(0.60, 0.61)
    without = G.decide(candidate, FLOORS)
    assert without["blessed"] and len(without["checks"]) == 2  # no file: today's checks
    assert "retrieval_split" not in without
    better = G.decide(candidate, FLOORS, retrieval=_retrieval(0.67, 0.58))
    assert better["blessed"] and better["retrieval_split"] == "test"
    retrieval_checks = better["checks"][2:]
    assert [c["metric"] for c in retrieval_checks] == ["pdr_recall@200"] * 2
    assert retrieval_checks[1]["baseline"] == 0.58
    assert abs(retrieval_checks[1]["threshold"] - (0.58 - 0.02)) < 1e-12
    # within the default margin below the content baseline: still blessed
    assert G.decide(candidate, FLOORS, retrieval=_retrieval(0.57, 0.58))["blessed"]
    worse = G.decide(candidate, FLOORS, retrieval=_retrieval(0.50, 0.58))
    assert not worse["blessed"]
    assert worse["reasons"] == ["pdr_recall@200 0.5000 < 0.5600 (content baseline - 0.02)"]
    # a margin of 0: PDR must not be below the baseline at all
    assert not G.decide(candidate, FLOORS, retrieval=_retrieval(0.57, 0.58),
                        max_pdr_recall_below_content=0.0)["blessed"]
    floor = G.decide(candidate, FLOORS, retrieval=_retrieval(0.67, 0.58), min_pdr_recall=0.7)
    assert floor["reasons"] == ["pdr_recall@200 0.6700 < 0.7000 (floor)"]
    # a ranking failure and a retrieval failure are both reported
    both = G.decide(_metrics(0.50, 0.61), FLOORS, retrieval=_retrieval(0.40, 0.58))
    assert len(both["reasons"]) == 2
    # a metrics file without PDR (or without the content row) never passes
    assert not G.decide(candidate, FLOORS, retrieval={"content": {"recall@200": 0.5}})["blessed"]
    assert not G.decide(candidate, FLOORS, retrieval={"pdr": {"recall@200": 0.5}})["blessed"]


def test_cli_decide_with_retrieval_metrics_and_record_them(tmp_path, capsys):
    root = tmp_path / "models"
    candidate = tmp_path / "metrics.json"
    candidate.write_text(json.dumps(_metrics(0.70, 0.70)))
    retrieval = tmp_path / "retrieval_metrics.json"
    base = ["decide", "--metrics", str(candidate), "--model-base-path", str(root),
            "--retrieval-metrics", str(retrieval)]

    def decide(*flags):
        assert G.main(base + list(flags)) == 0
        out, err = capsys.readouterr()
        return json.loads(out), err

    retrieval.write_text(json.dumps(_retrieval(0.66, 0.60)))
    decision, log = decide()
    assert decision["blessed"] and "(content baseline - 0.02) -> PASS" in log
    retrieval.write_text(json.dumps(_retrieval(0.55, 0.60)))
    decision, _ = decide("--max-pdr-recall-below-content", "0.1")
    assert decision["blessed"]
    decision, _ = decide("--max-pdr-recall-below-content", "0.1", "--min-pdr-recall", "0.6")
    assert not decision["blessed"] and decision["reasons"] == [
        "pdr_recall@200 0.5500 < 0.6000 (floor)"]
    # the command as the pipeline's release_gate step runs it
    run = subprocess.run([sys.executable, "-m", "pipelines.release_gate"] + base,
                         env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert not json.loads(run.stdout)["blessed"]
    assert "-> FAIL; pdr_recall@200 0.5500 < 0.5800 (content baseline - 0.02)" in run.stderr

    version_dir = _serve(str(root / "qin"), 1, _metrics(0.70, 0.70))
    assert G.main(["record", "--metrics", str(retrieval), "--version-dir", version_dir,
                   "--name", G.SERVED_RETRIEVAL_METRICS_NAME]) == 0
    extra = os.path.join(version_dir, "assets.extra")
    assert json.load(open(os.path.join(extra, "retrieval_metrics.json"))) == _retrieval(0.55,
                                                                                         0.60)
    # the ranking metrics recorded beside the version are untouched
    assert G.served_metrics(str(root / "qin")) == (1, _metrics(0.70, 0.70))
