"""The Kubeflow pipeline: the committed YAML is what the code compiles to, and the same
pipeline runs end to end on this machine through kfp.local on tiny generated data."""
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED_YAML = os.path.join(REPO, "pipelines", "qin_pipeline.yaml")


def _env():
    env = dict(os.environ)
    for variable in ("QIN_PIPELINE_IMAGE", "QIN_TRAINER_IMAGE"):
        env.pop(variable, None)  # the committed YAML uses the default image names
    env["PYTHONPATH"] = REPO
    return env


def _without_sdk_version(text):
    # The compiling SDK's patch release (requirements pin kfp 2.17.*) is not part of the
    # pipeline definition; every other line is.
    return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))


def test_compiled_yaml_matches_the_committed_one(tmp_path):
    out = tmp_path / "pipeline.yaml"
    subprocess.run([sys.executable, "-m", "pipelines.compile", "--output", str(out)],
                   check=True, cwd=REPO, env=_env(), capture_output=True)
    assert _without_sdk_version(out.read_text()) == _without_sdk_version(
        open(COMMITTED_YAML).read()), (
        "pipelines/qin_pipeline.yaml is stale: run `python -m pipelines.compile --output "
        "pipelines/qin_pipeline.yaml`")
    assert "sdkVersion: kfp-2.17." in out.read_text()
    spec = yaml.safe_load(out.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {"acquire-raw-logs", "preprocess", "train", "evaluate", "release-gate"} <= set(tasks)
    # export only runs inside the release gate's condition
    gate = [t for t in tasks.values() if t.get("triggerPolicy", {}).get("condition")]
    assert gate and "release-gate" in json.dumps(gate)
    executors = spec["deploymentSpec"]["executors"]
    train = [e for name, e in executors.items() if "train" in name][0]["container"]
    assert train["resources"]["accelerator"]["count"] == "1"
    # The GPU step runs on the GPU image (dockerfiles/trainer.Dockerfile), the others on the
    # CPU one.
    images = {name: e["container"]["image"] for name, e in executors.items()}
    assert train["image"] == "qin-search-trainer:latest"
    assert {image for name, image in images.items() if "train" not in name} == {
        "qin-search:latest"}


def _run_local(tmp_path, name, *flags, models=None):
    root, models = tmp_path / name / "runs", models or tmp_path / name / "models"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.run_local", "--pipeline-root", str(root),
         "--model-base-path", str(models), "--users", "40", "--items", "400",
         "--requests", "500", "--epochs", "1", "--batch-size", "32",
         "--preprocess-workers", "1", "--long-term-length", "100", *flags],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(root / "*"))
    return run_dir, str(models), proc.stdout + proc.stderr


@pytest.mark.timeout(2400)  # two whole pipeline runs; more than the suite's 900 s on 2 cores
def test_local_run_produces_every_artifact_and_the_gate_decides_the_export(tmp_path):
    import tensorflow as tf

    run_dir, models, _ = _run_local(tmp_path, "open", "--min-click-gauc", "0",
                                    "--min-click-auc", "0")
    raw = os.path.join(run_dir, "acquire-raw-logs", "raw")
    for name in ("items", "users", "behaviours", "requests"):
        assert os.path.getsize(os.path.join(raw, f"{name}.parquet")) > 0
    data = os.path.join(run_dir, "preprocess", "data")
    stats = json.load(open(os.path.join(data, "stats.json")))
    files = tf.io.gfile.glob(os.path.join(data, "train", "*.tfrecord.gz"))
    records = sum(1 for _ in tf.data.TFRecordDataset(files, compression_type="GZIP"))
    assert records > 0 and os.path.exists(os.path.join(data, "feature_store.sqlite"))
    assert stats  # counts written by the Beam pipeline
    model = os.path.join(run_dir, "train", "model")
    assert os.path.exists(os.path.join(model, "model_config.json"))
    assert glob.glob(os.path.join(model, "final", "*"))
    metrics = json.load(open(os.path.join(run_dir, "evaluate", "metrics.json")))
    assert 0.0 <= metrics["model"]["tasks"]["click"]["auc"] <= 1.0
    assert "oracle" in metrics  # generated data carries the true probabilities
    assert "| predictor |" in open(os.path.join(run_dir, "evaluate", "report")).read()
    versions = os.listdir(os.path.join(models, "qin"))
    assert versions == ["1"]
    version = os.path.join(models, "qin", "1")
    assert os.path.exists(os.path.join(version, "saved_model.pb"))
    assert os.path.exists(os.path.join(version, "assets.extra", "tf_serving_warmup_requests"))
    # the evaluation is recorded beside the version: the next run's gate compares with it
    assert json.load(open(os.path.join(version, "assets.extra", "metrics.json"))) == metrics

    # The same logs ingested through input_uri into the same model base path, with a gain over
    # served version 1 no model can show: the gate compares with version 1 and fails.
    _, _, log = _run_local(tmp_path, "closed", "--input-uri", raw, "--min-click-gauc", "0",
                           "--min-click-auc", "0", "--min-gain-over-served", "1.0",
                           models=tmp_path / "open" / "models")
    assert "release gate vs served version 1" in log and "-> FAIL" in log
    assert os.listdir(os.path.join(models, "qin")) == ["1"]
